"""GaLoreAdamW inside Hugging Face ``transformers``' ``Trainer``: ``optimizers=(opt, scheduler)``,
gradient accumulation, gradient clipping, a checkpoint and ``resume_from_checkpoint``.

Needs ``transformers`` and ``accelerate`` (``Trainer`` requires it); the module is skipped when
either is missing. The ``test`` extra lists both (``pip install -e ".[test]"``); into an existing
environment: ``pip install transformers accelerate "torch==<the torch you have>"``, so that pip
keeps your torch. Then ``python -m pytest -q tests/test_hf_trainer.py`` (~20 s on 2 CPU cores).
Nothing is downloaded: the model is built from a config with random weights and the data are
random token ids.
"""
import dataclasses
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import subspace_ops  # noqa: E402

STEPS = 8  # optimizer steps per run; each takes ACCUM micro-batches
STOP_AT = 4  # the interrupted run saves a checkpoint here and stops
ACCUM = 2
BATCH = 4
SAMPLES = 24  # 3 optimizer steps per epoch: the runs cross epoch boundaries, resumed mid-epoch
SEQ = 12
VOCAB = 64
# Both runs execute the same float32 operations in the same order on the same machine (the
# checkpoint stores weights, optimizer state, scheduler state and RNG states exactly), so their
# parameters are expected to agree to the last bit (they do with transformers 4.57 and 5.24).
# 1e-6 relative (about 8 float32 ulps) leaves room only for a reordered reduction; a resume that
# loses state lands much further away: ~3e-2 relative with the low-rank moments zeroed or other
# bases (test_resume_with_damaged_lowrank_state_is_detected), ~4e-2 with step counts off by one.
RTOL = 1e-6


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self):
        gen = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=gen)

    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama(seed):
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float()


def make_optimizer(model):
    groups = subspace_ops.lowrank_param_groups(model, rank=8, update_proj_gap=3, scale=0.25)
    opt = subspace_ops.GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01)
    # Linear warm-up over 2 steps, then linear decay to 0 at STEPS (as a LambdaLR: its state is
    # the step count, which Trainer saves in scheduler.pt and loads with weights_only=True).
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / 2 if s < 2 else max(0.0, (STEPS - s) / (STEPS - 2))
    )
    return opt, sched


def training_args(output_dir, **kw):
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    cpu = {"use_cpu": True} if "use_cpu" in fields else {"no_cuda": True}
    return transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        max_grad_norm=0.05,  # below every step's gradient norm: clipping acts at every step
        seed=0,
        dataloader_num_workers=0,
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        **cpu,
        **kw,
    )


class Recorder(transformers.TrainerCallback):
    """Counts the model's forward calls and records the gradient norm just before each optimizer
    step (Trainer clips before ``on_pre_optimizer_step``, so this is the clipped norm)."""

    def __init__(self, model):
        self.model, self.norms, self.forwards = model, [], 0
        model.register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.forwards += 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


class StopAt(transformers.TrainerCallback):
    """Saves a checkpoint at ``step`` and ends training there, as an interrupted job would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def run(output_dir, *, stop_at=None, resume=None, init_seed=0):
    model = tiny_llama(init_seed)
    opt, sched = make_optimizer(model)
    recorder = Recorder(model)
    callbacks = [recorder] + ([StopAt(stop_at)] if stop_at else [])
    args = training_args(output_dir, save_strategy="no" if stop_at is None else "steps", save_steps=STEPS)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=RandomTokens(), optimizers=(opt, sched), callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, opt, trainer, recorder


def max_rel_diff(model_a, model_b):
    worst = 0.0
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        worst = max(worst, ((a - b).norm() / b.norm()).item())
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and a run stopped at STOP_AT whose checkpoint is then resumed."""
    straight = run(tmp_path_factory.mktemp("straight"))
    out = tmp_path_factory.mktemp("interrupted")
    stopped = run(out, stop_at=STOP_AT)
    checkpoint = out / f"checkpoint-{STOP_AT}"
    return straight, stopped, checkpoint


def test_optimizer_and_schedule_are_what_trainer_uses(runs):
    (model, opt, trainer, recorder), _, _ = runs
    assert trainer.state.global_step == STEPS
    assert trainer.optimizer.optimizer is opt  # accelerate's wrapper around our optimizer
    low = [g for g in opt.param_groups if "rank" in g]
    assert len(low) == 1 and len(low[0]["params"]) == 2 * 7  # q, k, v, o, gate, up, down per layer
    q = model.model.layers[0].self_attn.q_proj.weight
    assert opt.state[q]["exp_avg"].shape == (32, 8) and opt.state[q]["basis"].shape == (32, 8)
    # Gradient accumulation: STEPS optimizer steps took STEPS * ACCUM forward/backward passes.
    assert opt.state[q]["step"].item() == STEPS and recorder.forwards == STEPS * ACCUM
    assert opt.param_groups[0]["lr"] == 0.0  # the LambdaLR was stepped STEPS times
    # Clipping was active at every step: the norm the optimizer saw is max_grad_norm (clipping
    # scales by max_norm / (norm + 1e-6), so it lands there to ~1e-5 relative), which an unclipped
    # gradient would not hit.
    assert len(recorder.norms) == STEPS
    for norm in recorder.norms:
        assert norm == pytest.approx(trainer.args.max_grad_norm, rel=1e-4)


def test_resume_from_checkpoint_matches_uninterrupted_run(runs, tmp_path, monkeypatch):
    (straight_model, straight_opt, _, _), (_, _, stopped, _), checkpoint = runs
    assert stopped.state.global_step == STOP_AT
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (checkpoint / name).is_file(), name
    # The optimizer state is tensors only: it loads with weights_only=True.
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]

    loads = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        loads.append((os.path.basename(str(f)), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    # A different initialization: everything must come from the checkpoint.
    model, opt, trainer, _ = run(tmp_path, resume=str(checkpoint), init_seed=1)
    monkeypatch.undo()
    # Trainer loaded our optimizer state itself, with weights_only (True, or None: torch's default
    # of True since torch 2.6).
    assert ("optimizer.pt", True) in loads or ("optimizer.pt", None) in loads
    assert trainer.state.global_step == STEPS
    assert max_rel_diff(model, straight_model) <= RTOL
    for p, ref in zip(model.parameters(), straight_model.parameters()):
        st, st_ref = opt.state[p], straight_opt.state[ref]
        assert st.keys() == st_ref.keys()
        for key in st:
            torch.testing.assert_close(st[key], st_ref[key], rtol=RTOL, atol=1e-9, msg=key)


def _zero_lowrank_moments(state):
    for st in state.values():
        if "basis" in st:
            st["exp_avg"].zero_()
            st["exp_avg_sq"].zero_()


def _other_basis(state):
    gen = torch.Generator().manual_seed(0)
    for st in state.values():
        if "basis" in st:
            st["basis"] = torch.linalg.qr(torch.randn(st["basis"].shape, generator=gen))[0]


@pytest.mark.parametrize("damage", [_zero_lowrank_moments, _other_basis], ids=["moments", "basis"])
def test_resume_with_damaged_lowrank_state_is_detected(runs, tmp_path, damage):
    """The comparison above can fail: a checkpoint whose low-rank moments or bases are not the
    saved ones (everything else intact) ends ~3e-2 relative away from the uninterrupted run."""
    (straight_model, _, _, _), _, checkpoint = runs
    copy = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, copy)
    saved = torch.load(copy / "optimizer.pt", weights_only=True)
    damage(saved["state"])
    torch.save(saved, copy / "optimizer.pt")
    model, _, _, _ = run(tmp_path / "out", resume=str(copy))
    assert max_rel_diff(model, straight_model) > 1e-3
