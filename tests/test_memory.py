"""Training memory (``python -m bench --op memory``, bench/memory.py): the meta-device estimate against
a measured step, the optimizers stepping on meta tensors, and the CLI in smoke mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import subspace_ops
from subspace_ops import projectors
from subspace_ops.basis import Basis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import memory  # noqa: E402

# The demo model, small enough for a test (2 layers, d_model 64, 8 x 64 tokens): a MemTracker step
# takes about a second.
SMALL_DEMO = ("--d-model", "64", "--layers", "2", "--heads", "2", "--context", "64", "--batch-size", "8",
              "--rank", "16")


# ---------------------------------------------------------------------------------------------------
# (a) the meta estimate against the MemTracker measurement of the demo model's training step
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def measured():
    torch.set_num_threads(1)
    return memory.run_measured("cpu", SMALL_DEMO, memory.ROWS, log=lambda msg: None)


def _demo_model():
    from subspace_ops.demo.data import CharTokenizer, load_corpus
    from subspace_ops.demo.model import GPT

    args = memory.demo_args(SMALL_DEMO)
    return GPT(CharTokenizer(load_corpus()).vocab_size, args.context, args.d_model, args.layers, args.heads)


def test_measurement_counts_what_the_step_holds(measured):
    """Independent checks of the MemTracker numbers: parameters, gradients and AdamW's state are
    known exactly (fp32 model: two fp32 moments and a 4-byte step counter per parameter tensor)."""
    model = _demo_model()
    params = [p for p in model.parameters()]
    nbytes = sum(p.numel() * 4 for p in params)
    rows = {r["optimizer"]: r for r in measured["rows"]}
    assert list(rows) == [r.label for r in memory.ROWS]
    adam, galore = rows["torch.optim.AdamW"], rows["GaLoreAdamW"]
    for r in (adam, galore):
        for step in (r["first"], r["steady"]):
            assert step["params"] == nbytes and step["grads"] == nbytes
            assert step["peak_phase"] in memory.PHASES
            at_peak = step["at_peak"]
            assert sum(at_peak.values()) == step["peak"]
            assert at_peak["params"] == nbytes
        assert r["steady"]["activations"] > nbytes  # 8 x 64 tokens: activations dominate
        assert r["peak"] > nbytes + r["steady"]["optimizer_state"] + r["steady"]["activations"] / 2
    assert adam["steady"]["optimizer_state"] == 2 * nbytes + 4 * len(params)
    # GaLore's low-rank moments: a fraction of AdamW's state
    assert galore["steady"]["optimizer_state"] < 0.6 * adam["steady"]["optimizer_state"]
    # at the steady step the state exists before the step starts: it is held at the peak
    assert adam["steady"]["at_peak"]["optimizer_state"] >= adam["steady"]["optimizer_state"]


def test_meta_estimate_agrees_with_the_measured_step(measured):
    for r in measured["rows"]:
        est, steady = r["estimate"], r["steady"]
        label = r["optimizer"]
        # the optimizer's own step on meta tensors creates the same state, byte for byte
        # (stepping inside backward: the most gradient bytes alive at once, over the first and a steady step)
        grads = max(r["first"]["grads"], steady["grads"]) if "step in backward" in label else steady["grads"]
        assert est["params"] == steady["params"] and est["grads"] == grads, label
        assert est["optimizer_state"] == steady["optimizer_state"], label
        # saved tensors of the meta forward (fused attention) against the activations held after the
        # real forward; the T x T attention weights of torch's meta math path would add ~8% here
        assert est["activations"] == pytest.approx(steady["activations"], rel=0.01), label
        # the paper-style sum against the measured peak (stepping inside backward: the tracked meta run)
        assert est["total"] == pytest.approx(r["peak"], rel=0.05), label
        if label.startswith("GaLoreAdamW, step in backward"):
            assert est["total"] == est["simulated_peak"], label
        else:
            assert est["total"] == est["params"] + est["grads"] + est["optimizer_state"] + est["activations"]
        # the same step simulated on the meta model under MemTracker
        assert est["simulated_peak"] == pytest.approx(r["peak"], rel=0.01), label


def test_fused_attention_on_meta_saves_what_a_cpu_forward_saves():
    model = _demo_model()
    args = memory.demo_args(SMALL_DEMO)
    vocab = model.tok_embed.num_embeddings
    real = memory.saved_activation_bytes(model, memory.random_batch(vocab, args.batch_size, args.context, "cpu"))
    meta = memory.saved_activation_bytes(model.to("meta"),
                                         memory.random_batch(vocab, args.batch_size, args.context, "meta"))
    assert meta == real
    # without it, meta tensors take torch's math path and save the attention weights too
    exclude = {memory._storage_key(p) for p in model.parameters()}
    seen = {}

    def pack(t):
        if memory._storage_key(t) not in exclude:
            seen.setdefault(memory._storage_key(t), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*memory.random_batch(vocab, args.batch_size, args.context, "meta"))
    assert sum(seen.values()) > 1.05 * real


# ---------------------------------------------------------------------------------------------------
# (b) the optimizers step on meta tensors, every projector, and keep the state a real step keeps
# ---------------------------------------------------------------------------------------------------
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.up = nn.Linear(24, 40)  # m > n
        self.down = nn.Linear(40, 24)  # m < n
        self.conv = nn.Conv2d(3, 8, 3)  # viewed as (8, 27)
        self.norm = nn.LayerNorm(24)


def _optimizer(model, cls, projector, proj_type):
    groups = subspace_ops.lowrank_param_groups(model, rank=4, update_proj_gap=1, projector=projector,
                                               proj_type=proj_type, transport_moments=True)
    if cls is subspace_ops.AdamSNSM:
        groups[0].pop("scale", None)
    return cls(groups, lr=1e-3, weight_decay=0.1, backend="reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
@pytest.mark.parametrize("cls", [subspace_ops.GaLoreAdamW, subspace_ops.AdamSNSM], ids=lambda c: c.__name__)
@pytest.mark.parametrize("projector", ["svd", "randomized", "online_pca", "gaussian", "srht"])
def test_meta_step_keeps_the_state_of_a_real_step(projector, cls, proj_type, dtype):
    torch.manual_seed(0)
    real = Small().to(dtype)
    with torch.device("meta"):
        fake = Small().to(dtype)
    opts = {}
    for name, model in (("cpu", real), ("meta", fake)):
        opt = opts[name] = _optimizer(model, cls, projector, proj_type)
        for _ in range(3):  # refreshes (update_proj_gap=1) with moment transport, online PCA steps
            for p in model.parameters():
                p.grad = torch.randn_like(p) if name == "cpu" else torch.empty_like(p)
            opt.step()
    assert memory.state_bytes(opts["meta"]) == memory.state_bytes(opts["cpu"]) > 0
    for p_real, p_fake in zip(real.parameters(), fake.parameters()):
        st_real, st_fake = opts["cpu"].state[p_real], opts["meta"].state[p_fake]
        assert st_real.keys() == st_fake.keys()
        for key, value in st_real.items():
            other = st_fake[key]
            assert (value.shape, value.dtype) == (other.shape, other.dtype), key
            # CPU counters stay on the CPU; everything else follows the parameter
            assert other.device.type == ("cpu" if value.dim() == 0 else "meta"), key


def test_real_tensors_keep_their_finiteness_checks():
    """The meta guards must not switch the checks off for real tensors."""
    G = torch.randn(12, 9)
    G[0, 0] = float("nan")
    group = {"seed": 0, "oversample": 2, "power_iters": 1}
    for name in ("svd", "randomized", "online_pca"):
        assert projectors.get(name).compute(G, 3, "left", group, index=0, step=0) is None, name
    assert not Basis("left", torch.full((12, 3), float("nan")), None).is_finite()
    assert Basis("left", torch.empty(12, 3, device="meta"), None).is_finite()


# ---------------------------------------------------------------------------------------------------
# (c) the CLI
# ---------------------------------------------------------------------------------------------------
def test_cli_smoke(tmp_path):
    js, md = tmp_path / "memory.json", tmp_path / "memory.md"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "bench", "--op", "memory", "--smoke", "--json", str(js),
                           "--md", str(md)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert md.read_text() == proc.stdout
    for heading in ("## Measured: one training step of the demo model", "## Estimated: LLaMA",
                    "token batch 1 x 256", "## Published figures", "## Method"):
        assert heading in proc.stdout, heading
    doc = json.loads(js.read_text())
    labels = [r.label for r in memory.ROWS]
    assert [r["optimizer"] for r in doc["measured"]["rows"]] == labels
    for r in doc["measured"]["rows"]:
        assert r["peak"] == max(r["first"]["peak"], r["steady"]["peak"]) > 0
        assert r["estimate"]["optimizer_state"] == r["steady"]["optimizer_state"]
    est = {(e["model"], e["optimizer"]): e for e in doc["estimated"]}
    assert set(est) == {("60M", label) for label in labels}
    adam, galore = est[("60M", "torch.optim.AdamW")], est[("60M", "GaLoreAdamW")]
    model = memory.build_llama(memory.LLAMA[0])
    n, tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    assert adam["n_params"] == n and adam["params"] == adam["grads"] == 2 * n  # bf16
    assert adam["optimizer_state"] == 2 * adam["params"] + 4 * tensors  # bf16 moments, fp32 step counters
    assert galore["params"] == adam["params"] and galore["rank"] == 128
    assert 0 < galore["activations"] == adam["activations"]
    assert "| 60M   |           0.12 | 0.12 |" in proc.stdout  # the paper's Table 6 next to ours


def test_cli_rejects_bad_arguments(capsys):
    from bench.cli import main

    for argv, message in ((["--op", "memory,step"], "runs alone"), (["--op", "memory", "--models", "13B"], "unknown"),
                          (["--models", "7B"], "go with --op memory"), (["--op", "memory", "--tokens", "256"], "1x256")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_step_in_backward_holds_at_most_one_lowrank_gradient(measured):
    """Step in backward, accumulation 1, no clipping: every parameter steps in its gradient's hook
    and frees it, so the gradient bytes alive at once (measured on CPU, sampled as each gradient
    arrives) are at most the plain parameters' gradients plus the largest low-rank matrix's gradient;
    the ordinary step holds every gradient."""
    model = _demo_model()
    args = memory.demo_args(SMALL_DEMO)
    groups = memory._galore(model, args).param_groups
    lowrank = [p for g in groups if "rank" in g for p in g["params"] if p.dim() >= 2]
    ids = {id(p) for p in lowrank}
    plain = sum(p.numel() * 4 for p in model.parameters() if id(p) not in ids)
    bound = plain + max(p.numel() * 4 for p in lowrank)
    rows = {r["optimizer"]: r for r in measured["rows"]}
    layerwise = rows["GaLoreAdamW, step in backward, accumulation 1"]
    for step in (layerwise["first"], layerwise["steady"]):
        assert 0 < step["grads"] <= bound
    everything = sum(p.numel() * 4 for p in model.parameters())
    assert rows["GaLoreAdamW"]["steady"]["grads"] == everything > bound
    # accumulation 4 keeps the plain gradients and the refreshing matrices' for the window, frees the rest
    accumulating = rows["GaLoreAdamW, step in backward, accumulation 4"]
    assert accumulating["steady"]["grads"] < everything
