"""pytest-benchmark cases for every op x provider of ``python -m bench``.

``pytest bench --benchmark-only``: timings (grouped per op and shape).
``pytest bench --benchmark-disable -q``: each case runs once, as a smoke test.
Not collected by the default ``python -m pytest`` (pytest.ini: ``testpaths = tests``).
Shapes are small on CPU; on CUDA, two LLaMA-7B matrices in bf16.
"""
from __future__ import annotations

import pytest
import torch

from bench import cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    SPECS = [cases.Spec(4096, 4096, 256, "bf16", DEVICE), cases.Spec(4096, 11008, 256, "bf16", DEVICE)]
else:  # both sides: 256x256 projects on the right, 256x512 on the left
    SPECS = [cases.Spec(256, 256, 32, "fp32", DEVICE), cases.Spec(256, 512, 32, "fp32", DEVICE)]

CASES = [(op, provider) for op in cases.OPS for provider in cases.providers_for(op)]


@pytest.fixture(scope="module")
def inputs_for():
    cache = {}

    def get(spec):
        if spec not in cache:
            cache.clear()  # one shape's tensors alive at a time
            cache[spec] = cases.make_inputs(spec)
        return cache[spec]

    return get


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label.replace(" ", "-"))
@pytest.mark.parametrize("op,provider", CASES, ids=[f"{o}-{p}" for o, p in CASES])
def test_op(benchmark, inputs_for, op, provider, spec):
    try:
        bench = cases.make_bench(op, provider, spec, inputs_for(spec))
    except cases.Skip as exc:
        pytest.skip(str(exc))
    nbytes, flops, _ = cases.analytic(op, provider, spec)
    benchmark.group = f"{op} {spec.label}"
    benchmark.extra_info.update(bytes=nbytes, flops=flops, side=spec.side)
    fn = bench.fn
    if DEVICE == "cuda":
        def fn():  # noqa: F811 - time to completion, not to launch
            bench.fn()
            torch.cuda.synchronize()
    benchmark(fn)
