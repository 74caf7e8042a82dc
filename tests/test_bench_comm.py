"""``python -m bench --op comm --quick`` (bench/comm.py): FSDP2 on 2 gloo processes, collectives counted
with a TorchDispatchMode around each ``opt.step()``; the invariants of the sharded optimizers' traffic
and state.

One run of the quick mode (a LLaMA-like block, d 128, MLP 344, rank 32; 19 optimizers stepped 4 times,
refresh every 2 steps: steps 0 and 2 refresh, 1 and 3 do not) in a subprocess, its JSON checked:

* side "right" (basis n x r replicated, moments with the rows): GaLoreAdamW moves 0 bytes in
  ``opt.step()`` between refreshes, for every projector with a scheduled refresh (online_pca moves its
  basis every step); AdamSNSM only all-reduces the per-column norms (1 x n) of wide matrices;
* side "left" (basis with the rows, moments split over columns): between refreshes at least the
  reduce-scatter of R (r x n per matrix) and at most a small multiple of r·n per matrix;
* the exact SVD's refresh moves at least this rank's rows of every gradient (the gather);
* optimizer state per rank = (single-process state − replicated) / world + replicated;
* the dispatch-mode bytes equal ``subspace_ops.distributed.Rows.sent`` (no collective outside it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
ELEM = 4  # fp32
# Left side between refreshes, per matrix: a reduce-scatter of R (r x n) and an all-gather of this
# rank's columns of the direction (r x n / world) = 1.5 r·n on 2 ranks; online_pca adds its basis step
# (all-reduces of r x n and r x r, a TSQR). C_LEFT leaves room for those.
C_LEFT = 4
PERIODIC = ("svd", "randomized", "gaussian", "srht")  # projectors with a scheduled refresh

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm")
    js, md = out / "comm.json", out / "comm.md"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--op", "comm", "--quick", "--world", str(WORLD), "--json", str(js),
         "--md", str(md)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(js.read_text())
    assert md.read_text() == proc.stdout
    return doc, proc.stdout


def _rows(doc, optimizer=None, side=None, projector=None):
    rows = [r for r in doc["rows"]
            if (optimizer is None or r["optimizer"] == optimizer) and (side is None or r["side"] == side)
            and (projector is None or r["projector"] == projector)]
    assert rows, (optimizer, side, projector)
    return rows


def _plain_steps(doc):
    return [s for s in range(doc["steps"]) if s % doc["gap"]]


def _refresh_steps(doc):
    return [s for s in range(doc["steps"]) if s % doc["gap"] == 0]


def test_report_structure(report):
    doc, text = report
    assert doc["world"] == WORLD and doc["mode"] == "quick"
    for key in ("torch", "git_sha", "device", "date"):
        assert key in doc["meta"]
    assert f"torch {doc['meta']['torch']}" in text
    assert "## FSDP2's own collectives" in text and "## `opt.step()` per rank per step" in text
    assert "## Optimizer state per rank" in text
    cfg = doc["config"]
    shapes = sorted(tuple(s) for s in doc["matrices"].values())
    d, f = cfg["d"], cfg["ffn"]
    assert shapes == sorted([(d, d)] * 4 + [(f, d)] * 2 + [(d, f)]) * cfg["layers"]
    sides = {(r["optimizer"], r["side"], r["projector"]) for r in doc["rows"]}
    for projector in ("svd", "randomized", "online_pca", "gaussian", "srht"):
        for side in ("left", "right"):
            assert ("GaLoreAdamW", side, projector) in sides


def test_bytes_equal_rows_sent(report):
    doc, _ = report
    for r in doc["rows"]:
        for step, s in enumerate(r["steps"]):
            assert s["sent_per_rank"] == s["rows_sent_per_rank"], (r["name"], step, s["by_op_per_rank"])


def test_fsdp_reduce_scatters_the_whole_gradient(report):
    doc, _ = report
    params = doc["fsdp_param_bytes"]
    for step, f in enumerate(doc["fsdp"]):
        assert params <= f["reduce_scatter_sent"] <= 1.01 * params, (step, f)
        assert f["all_gather_sent"] > 0


def test_right_side_moves_nothing_between_refreshes(report):
    doc, _ = report
    for r in _rows(doc, optimizer="GaLoreAdamW", side="right"):
        if r["projector"] not in PERIODIC:
            continue
        for step in _plain_steps(doc):
            s = r["steps"][step]
            assert s["sent_per_rank"] == [0] * WORLD, (r["name"], step, s["by_op_per_rank"])
    # AdamSNSM on the right: only the per-column subset norms (1 x n) of wide matrices (m < n) sum
    # over the ranks (a per-row norm has the rows); its momentum (m x r) is row-local.
    columns = ELEM * sum(n for m, n in doc["matrices"].values() if m < n)
    wide = sum(m < n for m, n in doc["matrices"].values())
    for step in _plain_steps(doc):
        s = _rows(doc, "AdamSNSM", "right", "svd")[0]["steps"][step]
        assert s["sent_per_rank"] == [columns] * WORLD, (step, s["by_op_per_rank"])
        assert s["by_op_rank0"] == {"c10d.allreduce_": [wide, columns]}, (step, s["by_op_rank0"])
    # torch's AdamW on the shards: elementwise, no collective at all
    for step in range(doc["steps"]):
        assert _rows(doc, optimizer="torch.optim.AdamW")[0]["steps"][step]["sent"] == 0


def test_online_pca_right_side_is_low_rank(report):
    doc, _ = report
    rank = doc["config"]["rank"]
    bound = C_LEFT * ELEM * sum(rank * (m + n) for m, n in doc["matrices"].values())
    for step in _plain_steps(doc):
        sent = _rows(doc, "GaLoreAdamW", "right", "online_pca")[0]["steps"][step]["sent"]
        assert 0 < sent <= bound, (step, sent, bound)


def test_left_side_moves_order_r_n_between_refreshes(report):
    doc, _ = report
    rank = doc["config"]["rank"]
    rn = ELEM * sum(rank * n for _, n in doc["matrices"].values())  # every matrix projects on the left
    for r in _rows(doc, side="left"):
        for step in _plain_steps(doc):
            s = r["steps"][step]
            assert rn <= s["sent"] <= C_LEFT * rn, (r["name"], step, s["sent"], rn, s["by_op_rank0"])
            assert "c10d.gather_" not in s["by_op_rank0"] and "c10d.broadcast_" not in s["by_op_rank0"]


def test_svd_refresh_gathers_the_whole_gradient(report):
    doc, _ = report
    rows_per_rank = lambda m: -(-m // WORLD)  # noqa: E731 (torch.chunk shards: the padded shard is sent)
    gather = ELEM * sum(rows_per_rank(m) * n for m, n in doc["matrices"].values())
    for r in _rows(doc, projector="svd"):
        for step in _refresh_steps(doc):
            s = r["steps"][step]
            assert s["sent"] >= gather, (r["name"], step, s["sent"], gather)
            assert s["by_op_rank0"]["c10d.gather_"][1] == gather, (r["name"], step, s["by_op_rank0"])


def test_state_per_rank_is_single_over_world_plus_replicated(report):
    doc, _ = report
    for r in doc["rows"]:
        m = r["memory"]
        single = m["single"]["total"]
        for per_rank in m["per_rank"]:
            replicated = per_rank["replicated_bases"] + per_rank["replicated_other"]
            target = (single - replicated) / WORLD + replicated
            assert per_rank["total"] == pytest.approx(target, rel=0.01), (r["name"], per_rank, single)
            assert per_rank["total"] < 0.75 * single, r["name"]
    for projector in PERIODIC + ("online_pca",):
        galore = {side: _rows(doc, "GaLoreAdamW", side, projector)[0]["memory"]["per_rank"]
                  for side in ("left", "right")}
        assert all(x["replicated_bases"] == 0 for x in galore["left"]), projector  # the left basis has the rows
        if projector not in ("gaussian", "srht"):  # regenerated from a seed: never stored
            assert all(x["replicated_bases"] > 0 for x in galore["right"]), projector
    adamw = _rows(doc, optimizer="torch.optim.AdamW")[0]["memory"]
    assert adamw["per_rank_max"] == pytest.approx(adamw["single"]["total"] / WORLD, rel=0.01)
