"""Helpers shared by the tests: error measures and tolerances (``rel_err``, ``TOL``, ``delta_w_close``),
checkpoint round trips (``roundtrip``), seeded trajectories (``seeded_grads``, ``run_steps``,
``assert_states_equal``), and proof that kernels (not the reference) ran.

Weight updates are compared as updates (DESIGN.md, Testing): ``ΔW = W_after − W_before`` against the
reference's ``ΔW_ref`` from the same ``W_before``, relative to ``‖ΔW_ref‖``, allowing each element one
rounding into W's dtype. A whole-weight comparison (``rel_err(W, W_ref)``) at a 16-bit tolerance
passes a kernel that skips the update or the weight decay, since both are a few percent of ``‖W‖``.
"""
import io
from typing import Optional

import torch

# ‖out − ref‖ / ‖ref‖ per dtype of the result under test (docs/design.md, Testing; TF32 off,
# conftest.py). A test that needs another bound says so at its call site.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# ‖ΔW − ΔW_ref‖ / ‖ΔW_ref‖ beyond one rounding of W per element: the same table. fp32 math with
# another summation order, fp16 / bf16 the direction rounded once to the basis dtype for the
# tensor-core product (2^-11 / 2^-8 relative).
DELTA_RTOL = TOL


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖, computed in float64 (a zero ``ref`` counts as 1e-30)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# -- checkpoints and trajectories ------------------------------------------------------------------
def roundtrip(obj):
    """What a checkpoint gives back: ``obj.state_dict()`` (an optimizer, a module, a GradFilter) or
    ``obj`` itself (a state dict) through ``torch.save`` and ``torch.load(weights_only=True)``."""
    state_dict = obj.state_dict() if hasattr(obj, "state_dict") else obj
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def seeded_grads(params, step: int, seed: int = 0, skip=()) -> None:
    """Set ``p.grad`` of every parameter to N(0, 1) values from one generator seeded with
    ``seed + step`` (drawn in ``params`` order, in fp32 on the CPU, then cast to ``p``'s dtype and
    device); the parameters at the indices in ``skip`` get ``grad = None`` (and draw nothing)."""
    gen = torch.Generator().manual_seed(seed + step)
    for i, p in enumerate(params):
        if i in skip:
            p.grad = None
            continue
        p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)


def run_steps(opt, params, steps: int, start: int = 0, seed: int = 0) -> None:
    """Steps ``start .. start + steps - 1`` of a trajectory: ``seeded_grads(params, s, seed)``, then
    ``opt.step()``."""
    for s in range(start, start + steps):
        seeded_grads(params, s, seed)
        opt.step()


def assert_states_equal(opt_a, params_a, opt_b, params_b) -> None:
    """Bit-exact: the parameters, and every state tensor of each (same keys, dtypes and values)."""
    for x, y in zip(params_a, params_b):
        assert torch.equal(x, y)
        sa, sb = opt_a.state[x], opt_b.state[y]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype, k
            assert torch.equal(sa[k], sb[k]), k


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values around |x| (a float64 tensor)."""
    info = torch.finfo(dtype)
    mant = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[dtype]
    a = x.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - mant)


def within_one_rounding(W, W_ref, W_old, dtype) -> bool:
    """Elementwise: W and W_ref are one rounding into ``dtype`` of fp32 values that differ only by
    summation order (fp32 noise, at most ~1e-6 of the update W_ref - W_old): at most one unit in the
    last place apart, plus that noise where the update cancels the weight down to a few ulps."""
    diff = (W.double() - W_ref.double()).abs()
    update = (W_ref.double() - W_old.double()).abs()
    return bool((diff <= ulp(W_ref, dtype) + 1e-6 * update).all())


def forbid_reference_and_count_launches(monkeypatch, reference_module, forbidden, launchers) -> dict:
    """Make the reference functions named in ``forbidden`` raise, and count calls of every
    ``(module, name)`` launcher; returns the live ``{name: calls}`` dict."""
    def boom(*args, **kwargs):
        raise AssertionError("the reference path ran on the Triton backend")

    for name in forbidden:
        monkeypatch.setattr(reference_module, name, boom)
    calls = {}

    def counted(module, name):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for module, name in launchers:
        counted(module, name)
    return calls


def delta_w_close(W_after, W_before, W_ref_after, dtype=None, rtol=None) -> Optional[str]:
    """None when the update ``W_after − W_before`` matches the reference's ``W_ref_after − W_before``
    (both from the same ``W_before``), else a message saying by how much and where.

    Criterion: ``‖max(|ΔW − ΔW_ref| − u, 0)‖ ≤ rtol·‖ΔW_ref‖`` with ``u`` one unit in the last place
    of ``dtype`` (default: W's) at the larger of the two results: two fp32 values that differ by δ
    round into ``dtype`` at most ``δ + u`` apart. ``rtol`` defaults to ``DELTA_RTOL[dtype]``. The
    comparison only means something when the terms under test (update, decay) are several units in
    the last place of W: check that with ``ulps``.
    """
    dtype = W_after.dtype if dtype is None else dtype
    rtol = DELTA_RTOL[dtype] if rtol is None else rtol
    W_after, W_before, W_ref_after = (t.detach().double() for t in (W_after, W_before, W_ref_after))
    if W_after.shape != W_ref_after.shape or W_before.shape != W_ref_after.shape:
        return (f"shapes differ: W_after {tuple(W_after.shape)}, W_before {tuple(W_before.shape)}, "
                f"W_ref_after {tuple(W_ref_after.shape)}")
    dW, dW_ref = W_after - W_before, W_ref_after - W_before
    if not torch.isfinite(dW).all() or not torch.isfinite(dW_ref).all():
        bad, bad_ref = int((~torch.isfinite(dW)).sum()), int((~torch.isfinite(dW_ref)).sum())
        return f"non-finite update: {bad} elements of ΔW, {bad_ref} of ΔW_ref"
    one_rounding = ulp(torch.maximum(W_after.abs(), W_ref_after.abs()), dtype)
    diff = (dW - dW_ref).abs()
    excess = (diff - one_rounding).clamp_min(0.0)
    ref_norm = dW_ref.norm().item()
    err = excess.norm().item()
    if err <= rtol * ref_norm:
        return None
    worst = int(excess.flatten().argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), excess.shape)) if excess.dim() else ()
    off = int((excess > 0).sum())
    return (
        f"ΔW differs from the reference's: ‖ΔW − ΔW_ref‖ beyond one rounding = {err:.3e} > "
        f"rtol {rtol:g} · ‖ΔW_ref‖ {ref_norm:.3e} (ratio {err / max(ref_norm, 1e-300):.3e}); "
        f"‖ΔW‖/‖ΔW_ref‖ = {dW.norm().item() / max(ref_norm, 1e-300):.4f}; "
        f"{off}/{excess.numel()} elements off by more than one {str(dtype).replace('torch.', '')} rounding; "
        f"worst at {idx}: ΔW = {dW.flatten()[worst].item():.6e}, ΔW_ref = {dW_ref.flatten()[worst].item():.6e}, "
        f"one rounding = {one_rounding.flatten()[worst].item():.3e}"
    )


def assert_delta_w_close(W_after, W_before, W_ref_after, dtype=None, rtol=None, where: str = "") -> None:
    """``delta_w_close`` as an assertion, the message prefixed with ``where``."""
    msg = delta_w_close(W_after, W_before, W_ref_after, dtype, rtol)
    assert msg is None, f"{where}: {msg}" if where else msg


def ulps(term, W, dtype=None) -> float:
    """Median of ``|term| / ulp(W)``: how many units in the last place of W's dtype a term of the
    update (the step, the decay) moves W by; a test of that term needs several."""
    dtype = W.dtype if dtype is None else dtype
    return (term.detach().double().abs() / ulp(W.detach(), dtype)).median().item()
