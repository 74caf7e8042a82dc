"""lowrank_param_groups and memory_report."""
import warnings

import pytest
import torch
from torch import nn

import subspace_ops
from subspace_ops import GaLoreAdamW


class TinyLM(nn.Module):
    def __init__(self, tie=False):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.ModuleDict(
            {"attn": nn.Linear(16, 48), "mlp": nn.Linear(16, 64), "norm": nn.LayerNorm(16), "conv": nn.Conv1d(16, 16, 3)}
        )
        self.lm_head = nn.Linear(16, 50, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight


def names(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return sorted(by_id[id(p)] for p in params)


def test_default_split():
    model = TinyLM()
    groups = subspace_ops.lowrank_param_groups(model, rank=4, update_proj_gap=50)
    low, full = groups
    assert low["rank"] == 4 and low["update_proj_gap"] == 50
    assert names(model, low["params"]) == ["block.attn.weight", "block.conv.weight", "block.mlp.weight"]
    assert names(model, full["params"]) == [
        "block.attn.bias", "block.conv.bias", "block.mlp.bias", "block.norm.bias", "block.norm.weight",
        "embed.weight", "lm_head.weight",
    ]
    GaLoreAdamW(groups)  # accepted as is


def test_patterns_and_tied_head():
    model = TinyLM(tie=True)
    low = subspace_ops.lowrank_param_groups(model, rank=4, full_rank_patterns=(), lowrank_patterns=("attn",))[0]
    assert names(model, low["params"]) == ["block.attn.weight"]
    low = subspace_ops.lowrank_param_groups(model, rank=4, full_rank_patterns=())[0]
    assert "embed.weight" not in names(model, low["params"])  # tied to an embedding: full rank
    frozen = TinyLM()
    frozen.block["mlp"].weight.requires_grad_(False)
    all_params = [p for g in subspace_ops.lowrank_param_groups(frozen, rank=2) for p in g["params"]]
    assert all(p.requires_grad for p in all_params)


def test_memory_report_counts_state_against_adamw():
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))
    opt = GaLoreAdamW(subspace_ops.lowrank_param_groups(model, rank=16))
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    report = subspace_ops.memory_report(opt)
    expected = 0
    for p in model.parameters():
        expected += sum(v.numel() * v.element_size() for v in opt.state[p].values())
    assert report["state_bytes"] == expected
    numel = sum(p.numel() for p in model.parameters())
    assert report["adamw_bytes"] == 2 * 4 * numel + 4 * 4
    assert report["ratio"] < 0.1 and report["params_with_state"] == 4
    adam = torch.optim.AdamW(model.parameters())
    adam.step()
    measured = sum(v.numel() * v.element_size() for s in adam.state.values() for v in s.values())
    assert subspace_ops.memory_report(adam)["state_bytes"] == measured == report["adamw_bytes"]


def test_multihead_attention_input_projection_is_low_rank():
    # nn.TransformerEncoder's largest attention matrix is nn.MultiheadAttention's own in_proj_weight
    # (3·E x E), not an nn.Linear weight; out_proj is an nn.Linear subclass.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    low, full = subspace_ops.lowrank_param_groups(model, rank=4)
    per_layer = ["linear1.weight", "linear2.weight", "self_attn.in_proj_weight", "self_attn.out_proj.weight"]
    assert names(model, low["params"]) == [f"layers.{i}.{n}" for i in range(2) for n in per_layer]
    assert all(n.endswith(("bias", "norm1.weight", "norm2.weight")) for n in names(model, full["params"]))

    opt = GaLoreAdamW([low, full], lr=1e-3)
    model(torch.randn(2, 5, 16)).sum().backward()
    opt.step()
    in_proj = model.layers[0].self_attn.in_proj_weight
    assert opt.state[in_proj]["basis"].shape == (16, 4)  # 48 x 16: projected on the 16 side
    assert opt.state[in_proj]["exp_avg"].shape == (48, 4)

    # The MHA module's own name is what the patterns see for in_proj_weight; out_proj has its own.
    low = subspace_ops.lowrank_param_groups(model, rank=4, lowrank_patterns=(r"self_attn$",))[0]
    assert names(model, low["params"]) == ["layers.0.self_attn.in_proj_weight", "layers.1.self_attn.in_proj_weight"]
    low = subspace_ops.lowrank_param_groups(model, rank=4, full_rank_patterns=(r"self_attn$",))[0]
    assert "layers.0.self_attn.in_proj_weight" not in names(model, low["params"])
    assert "layers.0.self_attn.out_proj.weight" in names(model, low["params"])

    # Separate query/key/value matrices when kdim/vdim differ from embed_dim.
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=12)
    low = subspace_ops.lowrank_param_groups(mha, rank=4)[0]
    assert names(mha, low["params"]) == ["k_proj_weight", "out_proj.weight", "q_proj_weight", "v_proj_weight"]
    mha.in_proj_bias.requires_grad_(False)
    mha.k_proj_weight.requires_grad_(False)
    groups = subspace_ops.lowrank_param_groups(mha, rank=4)
    assert "k_proj_weight" not in names(mha, [p for g in groups for p in g["params"]])


def test_rank_at_least_min_dim_stays_full_rank_with_one_warning():
    model = TinyLM()  # attn 48x16, mlp 64x16, conv 16x(16·3)
    with pytest.warns(UserWarning, match=r"rank=16 is >= min\(m, n\) of 3 matrices") as record:
        groups = subspace_ops.lowrank_param_groups(model, rank=16)
    assert len(record) == 1  # one warning naming every such matrix, not one per matrix
    message = str(record[0].message)
    for listed in ("block.attn.weight (48, 16)", "block.mlp.weight (64, 16)", "block.conv.weight (16, 16, 3)"):
        assert listed in message
    assert "lm_head" not in message and "embed" not in message  # full rank by name: not the rank's doing
    assert len(groups) == 1 and "rank" not in groups[0]  # the low-rank group is empty, left out
    assert len(groups[0]["params"]) == len(list(model.parameters()))

    # m x n with n = prod(shape[1:]): a 4 x 24 Linear at rank 4 is full rank, the others stay low.
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 24), nn.Linear(24, 4))
    with pytest.warns(UserWarning, match=r"of 1 matrix, .*: 2\.weight \(4, 24\)$"):
        low, full = subspace_ops.lowrank_param_groups(model, rank=4, full_rank_patterns=())
    assert names(model, low["params"]) == ["0.weight", "1.weight"]
    assert "2.weight" in names(model, full["params"])
    opt = GaLoreAdamW([low, full], lr=1e-3)
    model(torch.randn(3, 16)).sum().backward()
    opt.step()
    assert opt.state[model[2].weight]["exp_avg"].shape == (4, 24) and "basis" not in opt.state[model[2].weight]

    # Below min(m, n) everywhere: no warning at all.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = subspace_ops.lowrank_param_groups(TinyLM(), rank=15)
    assert len(groups[0]["params"]) == 3
    # Frozen or name-excluded matrices are not listed.
    model = TinyLM()
    model.block["attn"].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="of 1 matrix") as record:
        subspace_ops.lowrank_param_groups(model, rank=16, full_rank_patterns=("conv", "lm_head", "embed"))
    assert "block.mlp.weight" in str(record[0].message)


def test_bad_rank_is_left_to_the_optimizer():
    groups = subspace_ops.lowrank_param_groups(TinyLM(), rank="8")  # no TypeError from the check
    with pytest.raises(ValueError, match="invalid rank"):
        GaLoreAdamW(groups)
