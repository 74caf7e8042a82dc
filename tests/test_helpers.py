"""lowrank_param_groups and memory_report."""
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
