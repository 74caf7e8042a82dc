"""capturable=True and learning rates held in tensors: the kernels read the learning rate and the
step count from device memory (no host sync, CUDA-graph capturable), and the step equals the
ordinary one up to the fp32 rounding of the step size.

On the CPU the Triton kernels run in the interpreter, reading the same pointers; the CUDA graph
capture itself is a ``gpu`` test.
"""
import functools

import pytest
import torch

from subspace_ops import AdamSNSM, GaLoreAdamW, kernels
from _numerics import assert_delta_w_close, roundtrip, seeded_grads

needs_interpreter = pytest.mark.skipif(not kernels.interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")
BACKENDS = ["reference", pytest.param("triton", marks=needs_interpreter)]
OPTIMIZERS = {"galore": GaLoreAdamW, "snsm": AdamSNSM}


def _params(device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 17), (13, 29), (13, 29), (6, 3, 5), (17,)]
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.5).to(device=device, dtype=dtype)) for s in shapes]


def _groups(params, **kw):
    return [{"params": params[:4], "rank": 4, "update_proj_gap": 3, **kw}, {"params": params[4:]}]


_grads = functools.partial(seeded_grads, seed=1000)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_capturable_and_tensor_lr_equal_the_ordinary_step(name, backend):
    """Per step, ΔW of capturable (tensor lr, device step counts) equals the ordinary optimizer's ΔW,
    across refreshes (gap 3), with weight decay, while a scheduler-like loop changes the lr."""
    cls = OPTIMIZERS[name]
    ref_params, cap_params = _params(), _params()
    ref = cls(_groups(ref_params), lr=0.02, weight_decay=0.1, backend=backend)
    lr = torch.tensor(0.02)
    cap = cls(_groups(cap_params), lr=lr, weight_decay=0.1, backend=backend, capturable=True)
    for step in range(7):
        _grads(ref_params, step)
        _grads(cap_params, step)
        before = [p.detach().clone() for p in ref_params]
        ref.step()
        cap.step()
        for i, (pr, pc, b) in enumerate(zip(ref_params, cap_params, before)):
            # fp32 step size formed on the device vs the host's float64: a few ulps of the update.
            assert_delta_w_close(pc.detach(), b, pr.detach(), rtol=1e-5, where=f"{name} step {step} param {i}")
            with torch.no_grad():
                pc.copy_(pr)
        new_lr = 0.02 * (0.8 ** (step + 1))
        for g in ref.param_groups:
            g["lr"] = new_lr
        lr.fill_(new_lr)  # the tensor the capturable groups hold: read by the next step's kernels
    assert all(cap.state[p]["step"].item() == 7 for p in cap_params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_state_dict_round_trip_keeps_counting(backend):
    params = _params()
    opt = GaLoreAdamW(_groups(params), lr=0.02, backend=backend, capturable=True)
    for step in range(2):
        _grads(params, step)
        opt.step()
    sd = roundtrip(opt)
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = GaLoreAdamW(_groups(params2), lr=0.02, backend=backend, capturable=True)
    opt2.load_state_dict(sd)
    for step in range(2, 5):  # a refresh at 3 completed steps, scheduled from the loaded count
        _grads(params, step)
        _grads(params2, step)
        opt.step()
        opt2.step()
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


def test_capturable_must_be_a_bool():
    with pytest.raises(ValueError, match="capturable"):
        GaLoreAdamW(_params(), capturable="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_capture_replays_the_eager_step(name, dtype):
    """Capture one step in a CUDA graph, replay it; an eager capturable twin fed the same gradients
    must match bit for bit (the same kernels reading the same device values)."""
    cls = OPTIMIZERS[name]
    dev = "cuda"
    eager_p, graph_p = _params(dev, dtype), _params(dev, dtype)
    lr_e, lr_g = torch.tensor(0.01, device=dev), torch.tensor(0.01, device=dev)
    groups = dict(update_proj_gap=1000)  # no refresh after the first step: nothing the graph cannot hold
    eager = cls(_groups(eager_p, **groups), lr=lr_e, weight_decay=0.1, capturable=True)
    graphed = cls(_groups(graph_p, **groups), lr=lr_g, weight_decay=0.1, capturable=True)
    grads = [torch.zeros_like(p) for p in graph_p]
    for p, g in zip(graph_p, grads):
        p.grad = g
    # Warm-up (first step: bases, state, compiled kernels, group tables) on a side stream.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _grads(eager_p, 0)
        for g, e in zip(grads, eager_p):
            g.copy_(e.grad)
        eager.step()
        graphed.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    _grads(eager_p, 1)
    for g, e in zip(grads, eager_p):
        g.copy_(e.grad)
    with torch.cuda.graph(graph):
        graphed.step()
    graph.replay()
    eager.step()
    for step in range(2, 5):
        _grads(eager_p, step)
        for g, e in zip(grads, eager_p):
            g.copy_(e.grad)
        lr_e.mul_(0.9)
        lr_g.mul_(0.9)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(eager_p, graph_p):
        assert torch.equal(p, q)
    assert all(int(graphed.state[p]["step"].item()) == 5 for p in graph_p)


@pytest.mark.gpu
def test_cuda_tensor_lr_step_does_not_sync():
    params = _params("cuda", torch.bfloat16)
    opt = GaLoreAdamW(_groups(params, update_proj_gap=1000), lr=torch.tensor(0.01, device="cuda"), weight_decay=0.1)
    _grads(params, 0)
    opt.step()  # the first step refreshes (SVD): that may sync
    _grads(params, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
