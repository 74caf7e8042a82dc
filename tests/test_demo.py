"""The demo (python -m subspace_ops.demo) at tiny sizes: it trains, reports, plots and parses flags."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from subspace_ops import demo
from subspace_ops.demo.train import optimizer_state_bytes

# A tiny model and run: the three optimizers together take a few seconds on 2 CPU cores.
TINY = [
    "--steps", "40", "--d-model", "32", "--layers", "1", "--heads", "2", "--context", "16",
    "--batch-size", "8", "--rank", "4", "--update-proj-gap", "10", "--eval-every", "20",
    "--eval-windows", "32", "--no-progress", "--device", "cpu",
]


@pytest.fixture(scope="module")
def tiny_rows():
    return demo.main(TINY)


def test_rows_for_every_optimizer(tiny_rows):
    assert [r["optimizer"] for r in tiny_rows] == list(demo.DEFAULT_OPTIMIZERS)
    for r in tiny_rows:
        for key in ("val_loss", "initial_val_loss", "state_bytes", "state_ratio", "step_ms", "opt_step_ms"):
            assert key in r
        assert len(r["train_losses"]) == 40
        assert [s for s, _ in r["val_curve"]] == [0, 20, 40]


def test_losses_finite_and_decrease(tiny_rows):
    for r in tiny_rows:
        assert all(math.isfinite(x) for x in r["train_losses"]), r["optimizer"]
        assert math.isfinite(r["val_loss"])
        # Untrained: about ln(vocab) = ln(103) = 4.63 nats; 40 steps get well below it.
        assert r["initial_val_loss"] == pytest.approx(math.log(103), abs=0.15)
        assert r["val_loss"] < r["initial_val_loss"] - 0.5, r["optimizer"]
        assert r["train_losses"][-1] < r["train_losses"][0] - 0.5, r["optimizer"]


def test_same_initial_weights_for_every_optimizer(tiny_rows):
    first = tiny_rows[0]
    for r in tiny_rows[1:]:
        assert r["initial_val_loss"] == first["initial_val_loss"]
        assert r["train_losses"][0] == first["train_losses"][0]  # same init, same first batch


def test_galore_state_smaller_than_adamw(tiny_rows):
    by_name = {r["optimizer"]: r for r in tiny_rows}
    adamw = by_name["adamw"]
    assert adamw["state_ratio"] == 1.0
    for name in ("galore", "galore_rand"):
        assert 0 < by_name[name]["state_bytes"] < adamw["state_bytes"]
        assert by_name[name]["state_ratio"] == by_name[name]["state_bytes"] / adamw["state_bytes"]


@pytest.mark.parametrize("grokfast", ["none", "ema"])
def test_every_other_optimizer_trains_and_reports_subspace_stats(grokfast):
    others = [n for n in demo.OPTIMIZERS if n not in demo.DEFAULT_OPTIMIZERS]
    assert {"osd", "snsm", "galore_srht", "galore_gauss"} <= set(others)
    rows = demo.main(TINY + ["--optim", ",".join(others), "--grokfast", grokfast])
    assert [r["optimizer"] for r in rows] == others
    for r in rows:
        assert math.isfinite(r["val_loss"]) and r["val_loss"] < r["initial_val_loss"] - 0.5, r["optimizer"]
        # 40 steps, refresh every 10: every subspace optimizer has refreshed and reports its stats
        assert 0.0 < r["energy"] <= 1.0 + 1e-6, r["optimizer"]
        assert r["min_cosine"] is None or 0.0 <= r["min_cosine"] <= 1.0 + 1e-6
    assert demo.main(TINY + ["--optim", "all", "--steps", "2"])[-1]["optimizer"] == list(demo.OPTIMIZERS)[-1]


def test_adamw_state_bytes_counted_like_torch():
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 5)).sum().backward()
    opt.step()
    # two fp32 moments per parameter plus a scalar fp32 step per parameter tensor
    assert optimizer_state_bytes(opt) == 2 * 4 * (15 + 3) + 2 * 4


def test_threads_restored_after_main():
    before = torch.get_num_threads()
    demo.main(TINY + ["--optim", "adamw", "--steps", "2", "--threads", "1"])
    assert torch.get_num_threads() == before


def test_reproducible():
    argv = TINY + ["--optim", "galore_rand", "--steps", "5"]
    a, b = demo.main(argv), demo.main(argv)
    assert a[0]["train_losses"] == b[0]["train_losses"]
    assert a[0]["val_loss"] == b[0]["val_loss"]


def test_table_printed_and_json_written(tmp_path, capsys):
    path = tmp_path / "rows.json"
    rows = demo.main(TINY + ["--steps", "3", "--optim", "galore", "--json", str(path)])
    out = capsys.readouterr().out
    assert "optimizer" in out and "val loss" in out and "state MiB" in out
    assert any(line.startswith("galore ") for line in out.splitlines())
    data = json.loads(path.read_text())
    assert data["rows"][0]["optimizer"] == "galore"
    assert data["rows"][0]["val_loss"] == rows[0]["val_loss"]
    assert data["config"]["steps"] == 3
    # Without an AdamW row the ratio is against what torch AdamW would hold.
    assert 0 < rows[0]["state_ratio"] < 1


def test_progress_bar_in_a_log(capsys):
    demo.main([a for a in TINY if a != "--no-progress"] + ["--steps", "10", "--optim", "adamw"])
    err = capsys.readouterr().err
    assert "adamw" in err and "10/10" in err and "it/s" in err
    assert "\r" not in err  # not a terminal: whole lines, no in-place redraw


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "loss.png"
    demo.main(TINY + ["--steps", "4", "--eval-every", "2", "--plot", str(path)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        demo.main(TINY + ["--plot", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optim", "sgd"], "unknown"),
        (["--optim", ","], "unknown"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--rank", "-1"], "--rank must be a positive integer"),
        (["--threads", "0"], "--threads must be a positive integer"),
        (["--d-model", "30", "--heads", "4"], "divisible"),
        (["--warmup-fraction", "1.5"], "--warmup-fraction"),
    ],
)
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(argv)
    assert message in capsys.readouterr().err


def test_help_subprocess():
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "subspace_ops.demo", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--steps", "--rank", "--device", "--plot", "--optim", "--lr", "--galore-lr"):
        assert flag in result.stdout
    for name in demo.OPTIMIZERS:
        assert name in result.stdout


# -- --fsdp: FSDP2 under torchrun ----------------------------------------------------------------------
FSDP_RUN = TINY + ["--steps", "12", "--optim", "adamw,galore", "--update-proj-gap", "5"]


def test_fsdp_without_torchrun_says_how_to_launch(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        demo.parse_args(["--fsdp"])
    assert "torchrun --nproc-per-node 2 -m subspace_ops.demo --fsdp" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "16"], "divisible by the number of processes (3)"),
    (["--grokfast", "ema"], "--fsdp with --grokfast is not supported"),
])
def test_fsdp_bad_flags(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        demo.parse_args(["--fsdp", "--device", "cpu", "--batch-size", "15", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_fsdp_under_torchrun_matches_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m subspace_ops.demo --fsdp``: rank 0 prints the table with the
    per-rank state column, and the losses equal one process's on the same batches (FSDP2 averages the
    gradients of the ranks' equal slices: the whole batch's gradient, up to summation order)."""
    path = tmp_path / "fsdp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "subspace_ops.demo", "--fsdp", *FSDP_RUN, "--json", str(path)],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "state MiB/rank" in out and "FSDP2 over 2 processes" in out
    assert out.count("val loss") == 1  # rank 0 alone prints
    for name in ("adamw", "galore"):
        assert sum(line.startswith(name + " ") for line in out.splitlines()) == 1, out
    data = json.loads(path.read_text())
    assert data["config"]["world"] == 2 and data["config"]["fsdp"]
    single = {r["optimizer"]: r for r in demo.main(FSDP_RUN)}
    for row in data["rows"]:
        ref = single[row["optimizer"]]
        # the whole state, summed over the shards, as one process holds it; each rank about half of it
        assert row["state_bytes"] == ref["state_bytes"]
        assert row["state_bytes_per_rank"] < 0.75 * row["state_bytes"]
        assert row["train_losses"] == pytest.approx(ref["train_losses"], rel=1e-5, abs=1e-5), row["optimizer"]
        assert row["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5), row["optimizer"]
