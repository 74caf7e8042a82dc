"""The README's "Using it" example runs as written, on a CPU, in seconds, and is really low-rank."""
import re
import warnings
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parent.parent / "README.md"


def using_it_example(text: str) -> str:
    """The first ```python block of the section "## Using it" (up to the next "## " heading)."""
    _, found, section = text.partition("\n## Using it\n")
    assert found, 'README.md has no "## Using it" section'
    section = re.split(r"\n## ", section, maxsplit=1)[0]  # "### ..." subsections stay in
    match = re.search(r"^```python\n(.*?)^```[ \t]*$", section, re.S | re.M)
    assert match, 'no ```python block under "## Using it"'
    return match.group(1)


def test_using_it_example_runs_verbatim(tmp_path, monkeypatch, capsys):
    code = using_it_example(README.read_text(encoding="utf-8"))
    assert "..." not in code  # no placeholders: it runs as written
    monkeypatch.chdir(tmp_path)  # it writes opt.pt into the working directory
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. a rank too large for the model's matrices
        exec(compile(code, f"{README} (Using it)", "exec"), namespace)

    opt, model = namespace["opt"], namespace["model"]
    import subspace_ops

    report = subspace_ops.memory_report(opt)
    assert str(report) in capsys.readouterr().out  # what the example prints
    assert (tmp_path / "opt.pt").is_file()
    # Really low-rank: every weight matrix of the model is in a low-rank group, at a rank below its size,
    # and the optimizer holds well under half of AdamW's state.
    lowrank = [g for g in opt.param_groups if "rank" in g]
    matrices = [p for p in model.parameters() if p.ndim == 2]
    assert matrices and {id(p) for g in lowrank for p in g["params"]} == {id(p) for p in matrices}
    assert all(g["rank"] < min(p.shape) for g in lowrank for p in g["params"])
    assert 0 < report["ratio"] < 0.5
    # And it trains: better than predicting zeros for the example's task, on fresh inputs.
    x = torch.randn(1024, 64)
    want = x @ namespace["target"]
    with torch.no_grad():
        assert nn.functional.mse_loss(model(x), want) < 0.9 * want.pow(2).mean()


def test_step_in_backward_example_runs_verbatim():
    """The README's "Step in backward" example runs as written, steps inside backward (no .grad left
    behind) and trains."""
    text = README.read_text(encoding="utf-8")
    _, found, section = text.partition("\n### Step in backward")
    assert found, 'README.md has no "### Step in backward" section'
    section = re.split(r"\n### ", section, maxsplit=1)[0]
    match = re.search(r"^```python\n(.*?)^```[ \t]*$", section, re.S | re.M)
    assert match, 'no ```python block under "### Step in backward"'
    code = match.group(1)
    assert "step_in_backward" in code and "..." not in code
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # includes torch's "scheduler before optimizer" warning
        exec(compile(code, f"{README} (Step in backward)", "exec"), namespace)
    model, opt = namespace["model"], namespace["opt"]
    assert opt._backward is None  # removed
    assert all(p.grad is None for p in model.parameters())
    assert all(int(opt.state[p]["step"]) == 30 for p in model.parameters())
    x = torch.randn(256, 64)
    with torch.no_grad():
        assert nn.functional.mse_loss(model(x), x.flip(1)) < 0.9 * x.pow(2).mean()
