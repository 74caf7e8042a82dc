"""Helpers shared by the kernel tests: comparisons, and proof that kernels (not the reference) ran."""
import torch


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values around |x| (fp32 result)."""
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
