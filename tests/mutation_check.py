"""Mutation check of the fused-path tests: break the Triton kernels on purpose, one way at a time,
and report which tests notice (killed) and which mutations no test notices (survived).

Usage, from the repository root (the virtualenv active)::

    python tests/mutation_check.py                    # every mutation, tiers optimizer, ops, launchers
    python tests/mutation_check.py --list             # the mutations and tiers, nothing run
    python tests/mutation_check.py -m adamw -m snsm   # mutations whose name contains one of these
    python tests/mutation_check.py --tiers optimizer  # only the whole-optimizer tests
    python tests/mutation_check.py --tiers all        # also the older kernel/ops test files

The source tree (default: the repository holding this file) is copied to a scratch folder (default
/tmp/mut, deleted first); the copy is imported instead of the installed package through a
``sitecustomize`` on PYTHONPATH that maps ``subspace_ops`` and ``subspace_ops.kernels`` to the copy's
``subspace_ops/`` and ``kernels/`` (nothing is installed; the editable install still points at the
source tree). A pytest plugin checks, in every pytest run, that both packages were imported from the
copy and that the mutated module's source holds the mutated text. Bytecode is never written, so a
restored or mutated file is always recompiled.

Each mutation is a list of edits ``(file, regex, replacement)``, optionally within one top-level
function; a regex must match exactly ``count`` times, else the mutation is reported STALE (the
kernels changed: update its anchor) and the script exits non-zero. The unmutated copy must pass
every selected tier first. Per mutation, each tier runs with ``-x`` and the first failing test is
recorded. Exit status: 0 when every mutation was killed, 1 when one survived, 2 when a baseline
failed or an anchor is stale.

The 16-bit-only mutations condition on W's dtype inside the kernel (``out_ptr.dtype.element_ty``,
known when the kernel is specialized), which is how a real dtype-dependent bug would look.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------------
# Which tests: tiers, run in this order, each with -x
# ---------------------------------------------------------------------------------------------------
_FU = "tests/test_fused_updates.py::"
TIERS = {
    "optimizer": [_FU + "test_galore_adamw_per_step_delta_w", _FU + "test_adam_snsm_per_step_delta_w"],
    "ops": [_FU + "test_galore_matrix_step_delta_w", _FU + "test_snsm_matrix_step_delta_w",
            _FU + "test_adam_step_delta_w"],
    "launchers": [_FU + "test_back_project_update_delta_w", _FU + "test_project_adam_epilogue_eps_and_beta2",
                  _FU + "test_lowrank_adam_eps_and_beta2", _FU + "test_adamw_delta_w",
                  _FU + "test_back_project_snsm_update_delta_w"],
    # The older kernel and ops tests (minutes per surviving mutation): only with --tiers all / existing.
    "existing": ["tests/test_kernels.py", "tests/test_snsm_kernels.py", "tests/test_ops.py"],
}
DEFAULT_TIERS = ("optimizer", "ops", "launchers")


# ---------------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Edit:
    path: str  # relative to the repository root
    pattern: str  # a regex (re.MULTILINE)
    replacement: str  # re.sub replacement (\1 etc.)
    within: Optional[str] = None  # name of a top-level function whose body the pattern must be in
    count: int = 1  # exact number of matches (all are replaced)


@dataclasses.dataclass
class Mutation:
    name: str
    what: str
    edits: List[Edit]
    # False for mutations of the optimizer's host code, which changes more often than the kernels: a
    # stale anchor is then reported without failing the run.
    required: bool = True


BF16 = "tl.bfloat16"
FP32 = "tl.float32"
BP, PJ, LA, SN = "kernels/backproject.py", "kernels/project.py", "kernels/lowrank_adam.py", "kernels/subset_norm.py"
CM = "kernels/_common.py"

# The back-projection epilogue's two weight lines (UPDATE = 1: GaLore, SNSM_UPDATE = 2: SNSM).
_BP_UPDATE = r"^([ \t]*)w = (w \+ alpha \* acc)\b[^\n]*$"
_BP_DECAY = r"^([ \t]*)w = (tl\.where\(decay != 0\.0, w \+ decay \* w, w\))[^\n]*$"


def _skip(pattern, epilogue, dtype):
    """The back-projection weight line ``pattern`` skipped for W of ``dtype`` in epilogue ``epilogue``."""
    cond = f"out_ptr.dtype.element_ty == {dtype}" + (f" and EPILOGUE == {epilogue}" if epilogue else "")
    return Edit(BP, pattern, rf"\1w = w if ({cond}) else (\2)", within="_back_project_kernel")


def _adamw_arg(arg, dtype):
    """``arg`` (alpha: the step, decay: the weight decay) passed as 0 to the AdamW math for W of ``dtype``."""
    if arg == "alpha":
        return Edit(LA, r"(_adamw_math\([^)]*?), alpha, decay\)",
                    rf"\1, (0.0 if w_ptr.dtype.element_ty == {dtype} else alpha), decay)",
                    within="_adamw_kernel", count=2)
    return Edit(LA, r"(_adamw_math\([^)]*?), alpha, decay\)",
                rf"\1, alpha, (0.0 if w_ptr.dtype.element_ty == {dtype} else decay))",
                within="_adamw_kernel", count=2)


def _adam_variants(prefix, path, within, grad, eps_pattern):
    """eps and β2 mutations of an Adam moment update ``v = v * beta2 + (one_minus_beta2 * grad) * grad``
    and its direction ``tl.div_rn(m, tl.sqrt_rn(v) + eps)``."""
    v_line = rf"v = v \* beta2 \+ \(one_minus_beta2 \* {grad}\) \* {grad}"
    return [
        Mutation(f"{prefix}: eps x10", "eps ten times too large in the direction",
                 [Edit(path, eps_pattern, r"\1eps * 10.0)", within=within)]),
        Mutation(f"{prefix}: eps dropped", "no eps in the direction",
                 [Edit(path, eps_pattern, r"\g<1>0.0)", within=within)]),
        Mutation(f"{prefix}: beta2 -> beta1", "V decays with β1",
                 [Edit(path, v_line, f"v = v * beta1 + (one_minus_beta2 * {grad}) * {grad}", within=within)]),
        Mutation(f"{prefix}: 1-beta2 -> 1-beta1", "V takes (1-β1)·g²",
                 [Edit(path, v_line, f"v = v * beta2 + (one_minus_beta1 * {grad}) * {grad}", within=within)]),
        Mutation(f"{prefix}: beta2 - 1e-3", "β2 off by 1e-3 in V's decay",
                 [Edit(path, v_line, f"v = v * (beta2 - 1e-3) + (one_minus_beta2 * {grad}) * {grad}",
                       within=within)]),
    ]


_DIV_EPS = r"(tl\.div_rn\(m, tl\.sqrt_rn\(v\) \+ )eps\)"
_SUMSQ = r"v \* beta2 \+ one_minus_beta2 \* sumsq"

MUTATIONS = [
    # 1, 2: the back-projection epilogue skips the update / the decay of a bf16 (or fp32) weight.
    Mutation("galore backproject: update skipped (bf16 W)", "W ← W − step·α·back(N) not applied to bf16 W",
             [_skip(_BP_UPDATE, 1, BF16)]),
    Mutation("galore backproject: decay skipped (bf16 W)", "W ← W − lr·wd·W not applied to bf16 W",
             [_skip(_BP_DECAY, 1, BF16)]),
    Mutation("galore backproject: decay skipped (fp32 W)", "W ← W − lr·wd·W not applied to fp32 W",
             [_skip(_BP_DECAY, 1, FP32)]),
    Mutation("snsm backproject: update skipped (bf16 W)", "the SNSM step not applied to bf16 W",
             [_skip(_BP_UPDATE, 2, BF16)]),
    Mutation("snsm backproject: decay skipped (bf16 W)", "the SNSM decay not applied to bf16 W",
             [_skip(_BP_DECAY, 2, BF16)]),
    Mutation("snsm backproject: decay skipped (fp32 W)", "the SNSM decay not applied to fp32 W",
             [_skip(_BP_DECAY, 2, FP32)]),
    # 3, 4: eps and β2 of the projection's Adam epilogue (GaLore).
    *_adam_variants("project adam epilogue", PJ, "_project_kernel", "acc", _DIV_EPS),
    # 3, 4: the elementwise kernels: the plain AdamW step and the unfused low-rank Adam.
    *_adam_variants("adamw kernel", LA, "_adamw_math", "g", _DIV_EPS),
    *_adam_variants("lowrank_adam kernel", LA, "_lowrank_adam_kernel", "r", _DIV_EPS),
    # 5: the plain AdamW kernel drops the decay (and the step) of bf16 / fp32 parameters.
    Mutation("adamw kernel: decay dropped (bf16 W)", "no weight decay for bf16 params", [_adamw_arg("decay", BF16)]),
    Mutation("adamw kernel: decay dropped (fp32 W)", "no weight decay for fp32 params", [_adamw_arg("decay", FP32)]),
    Mutation("adamw kernel: update skipped (bf16 W)", "no Adam step for bf16 params", [_adamw_arg("alpha", BF16)]),
    # A 16-bit-only eps bug shows in the ΔW of 16-bit weights alone (no state holds the direction).
    Mutation("project adam epilogue: eps dropped (bf16 G)", "no eps in the direction when G is bf16",
             [Edit(PJ, _DIV_EPS, rf"\1(0.0 if (a_ptr.dtype.element_ty == {BF16} or b_ptr.dtype.element_ty == {BF16})"
                   r" else eps))", within="_project_kernel")]),
    Mutation("snsm backproject: eps x10 (bf16 W)", "(back(D) + G) / (sqrt(V) + 10·eps) for bf16 W",
             [Edit(BP, r"(tl\.sqrt_rn\(v\) \+ )eps\)",
                   rf"\1(eps * 10.0 if out_ptr.dtype.element_ty == {BF16} else eps))", within="_back_project_kernel")]),
    # The update scalars formed in the kernels from a device lr and step count (capturable=True).
    Mutation("update_scalars (device hyper): decay dropped", "decay = 0 when formed from the device lr",
             [Edit(CM, r"decay = -lr \* weight_decay\b", "decay = 0.0 * lr", within="update_scalars")]),
    Mutation("update_scalars (device hyper): bias correction with beta1 for beta2",
             "c_t = sqrt(1 − β1^t) / (1 − β1^t) from the device step count",
             [Edit(CM, r"tl\.exp2\(t \* log2_beta2\)", "tl.exp2(t * log2_beta1)", within="update_scalars")]),
    Mutation("update_scalars (device hyper): step count off by one", "c_(t+1) instead of c_t",
             [Edit(CM, r"(t = tl\.load\(step_ptr\)\.to\(tl\.float32\))", r"\1 + 1.0", within="update_scalars")]),
    # SNSM: eps of the Subset-Norm division, the complement G, the momentum, V's β2.
    Mutation("snsm backproject: eps x10", "(back(D) + G) / (sqrt(V) + 10·eps)",
             [Edit(BP, r"(tl\.sqrt_rn\(v\) \+ )eps\)", r"\1eps * 10.0)", within="_back_project_kernel")]),
    Mutation("snsm backproject: eps dropped", "(back(D) + G) / sqrt(V)",
             [Edit(BP, r"(tl\.sqrt_rn\(v\)) \+ eps\)", r"\1 + 0.0)", within="_back_project_kernel")]),
    Mutation("snsm backproject: G dropped", "back(D) / (sqrt(V) + eps): no complement step",
             [Edit(BP, r"tl\.div_rn\(acc \+ g(\.to\(tl\.float32\))?,", "tl.div_rn(acc,",
                   within="_back_project_kernel")]),
    Mutation("project momentum epilogue: beta1 - 1e-3", "SNSM momentum M ← (β1−1e-3)·M + (1−β1)·R",
             [Edit(PJ, r"(EPILOGUE == 2:[^\n]*\n(?:[^\n]*\n){0,6}?[ \t]*m = m \* )beta1 \+", r"\1(beta1 - 1e-3) +",
                   within="_project_kernel")]),
    Mutation("project sumsq (V rows, right side): beta2 - 1e-3", "fused Subset-Norm V (m, 1) decays with β2 − 1e-3",
             [Edit(PJ, _SUMSQ + r"(, mask=offs_m < M\))", r"v * (beta2 - 1e-3) + one_minus_beta2 * sumsq\1",
                   within="_project_kernel")]),
    Mutation("project sumsq (V cols, left side): beta2 - 1e-3", "fused Subset-Norm V (1, n) decays with β2 − 1e-3",
             [Edit(PJ, _SUMSQ + r"(, mask=offs_n < N\))", r"v * (beta2 - 1e-3) + one_minus_beta2 * sumsq\1",
                   within="_project_kernel")]),
    Mutation("project sumsq: beta2 -> beta1", "fused Subset-Norm V decays with β1",
             [Edit(PJ, _SUMSQ, "v * beta1 + one_minus_beta2 * sumsq", within="_project_kernel", count=2)]),
    Mutation("project sumsq: 1-beta2 -> 1-beta1", "fused Subset-Norm V takes (1−β1)·Σ G²",
             [Edit(PJ, _SUMSQ, "v * beta2 + one_minus_beta1 * sumsq", within="_project_kernel", count=2)]),
    Mutation("subset_norm kernel: beta2 - 1e-3", "standalone Subset-Norm V decays with β2 − 1e-3",
             [Edit(SN, _SUMSQ, "v * (beta2 - 1e-3) + one_minus_beta2 * sumsq", within="_subset_norm_kernel")]),
    Mutation("subset_norm kernel: 1-beta2 x10",
             "standalone Subset-Norm V takes 10·(1−β2)·Σ G² (= 1−β1 in the tests)",
             [Edit(SN, _SUMSQ, "v * beta2 + (one_minus_beta2 * 10.0) * sumsq", within="_subset_norm_kernel")]),
    # The optimizer's grouping of launches (optional: host code that may be restructured).
    Mutation("optimizer grouping: step count ignored",
             "same-shape matrices at different step counts share one launch and the first one's step size",
             [Edit("subspace_ops/optim/base.py", r"^([ \t]*key = \([^\n]*\bside, [^\n]*), t\)", r"\1)")],
             required=False),
    Mutation("optimizer grouping: plain groups merged",
             "plain AdamW tensors of every group share one launch and the first one's hyperparameters",
             [Edit("subspace_ops/optim/base.py", r"^([ \t]*)key = tuple\((?:map\(id, )?hyper\.values\(\)\)?\)[^\n]*$",
                   r"\1key = ()")],
             required=False),
]


# ---------------------------------------------------------------------------------------------------
# Applying edits
# ---------------------------------------------------------------------------------------------------
class Stale(Exception):
    pass


def _region(text: str, within: Optional[str]):
    """(start, end) of top-level function ``within`` (from its ``def`` to the next top-level
    statement, decorator or definition), or the whole text."""
    if within is None:
        return 0, len(text)
    defs = [m for m in re.finditer(rf"^def {re.escape(within)}\(", text, re.MULTILINE)]
    if len(defs) != 1:
        raise Stale(f"function {within!r}: {len(defs)} definitions found, expected 1")
    start = defs[0].start()
    nxt = re.compile(r"^(?:@|def |class |[A-Za-z_])", re.MULTILINE).search(text, defs[0].end())
    return start, (nxt.start() if nxt else len(text))


def apply_edit(text: str, edit: Edit) -> str:
    start, end = _region(text, edit.within)
    body = text[start:end]
    pattern = re.compile(edit.pattern, re.MULTILINE)
    found = len(pattern.findall(body))
    if found != edit.count:
        where = f" in {edit.within}()" if edit.within else ""
        raise Stale(f"{edit.path}{where}: /{edit.pattern}/ matched {found} times, expected {edit.count}")
    new_body = pattern.sub(edit.replacement, body)
    if new_body == body:
        raise Stale(f"{edit.path}: /{edit.pattern}/ replaced by itself")
    return text[:start] + new_body + text[end:]


def mutated_files(scratch: str, mutation: Mutation, pristine: dict) -> dict:
    """{relative path: mutated text}, from the pristine texts; raises Stale."""
    out = {}
    for edit in mutation.edits:
        text = out.get(edit.path, pristine[edit.path])
        out[edit.path] = apply_edit(text, edit)
    return out


# ---------------------------------------------------------------------------------------------------
# The scratch copy and how it is imported
# ---------------------------------------------------------------------------------------------------
SITECUSTOMIZE = '''\
"""Written by tests/mutation_check.py: import subspace_ops (and subspace_ops.kernels) from {root!r}."""
import importlib.util
import os
import sys

_ROOT = os.environ["MUTATION_ROOT"]
_MAP = {{"subspace_ops": os.path.join(_ROOT, "subspace_ops"), "subspace_ops.kernels": os.path.join(_ROOT, "kernels")}}


class _ScratchFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        folder = _MAP.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


sys.meta_path.insert(0, _ScratchFinder)
'''

GUARD_PLUGIN = '''\
"""Written by tests/mutation_check.py: fail the pytest run unless the scratch copy is what is imported
and the mutated module's source holds the mutation."""
import importlib
import inspect
import json
import os


def pytest_sessionstart(session):
    import subspace_ops
    import subspace_ops.kernels

    root = os.path.realpath(os.environ["MUTATION_ROOT"])
    for mod in (subspace_ops, subspace_ops.kernels):
        path = os.path.realpath(mod.__file__)
        if not path.startswith(root + os.sep):
            raise RuntimeError(f"mutation check: {mod.__name__} imported from {path}, not from {root}")
    for module, marks in json.loads(os.environ.get("MUTATION_EXPECT", "{}")).items():
        mod = importlib.import_module(module)
        src = inspect.getsource(mod)
        if not os.path.realpath(mod.__file__).startswith(root + os.sep):
            raise RuntimeError(f"mutation check: {module} imported from {mod.__file__}")
        for mark in marks:
            if mark not in src:
                raise RuntimeError(f"mutation check: {module} does not hold the mutated text {mark!r}")
'''


def make_scratch(source: str, scratch: str) -> str:
    if os.path.exists(scratch):
        shutil.rmtree(scratch)
    shutil.copytree(source, scratch, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info"))
    site = os.path.join(scratch, ".mutation_site")
    os.makedirs(site)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE.format(root=scratch))
    with open(os.path.join(site, "_mutation_guard.py"), "w") as f:
        f.write(GUARD_PLUGIN)
    return site


def env_for(scratch: str, site: str, expect: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env["MUTATION_ROOT"] = scratch
    env["PYTHONPATH"] = site + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["MUTATION_EXPECT"] = json.dumps(expect or {})
    env.pop("SUBSPACE_OPS_BACKEND", None)
    return env


def module_of(path: str) -> str:
    parts = path[:-3].split("/")
    if parts[0] == "kernels":
        parts = ["subspace_ops", "kernels"] + parts[1:]
    return ".".join(parts)


def run_tier(scratch: str, site: str, tests: List[str], expect: Optional[dict], timeout: int):
    """(passed, first failing test id or error line, seconds)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "_mutation_guard",
           *tests]
    t0 = time.time()
    try:
        out = subprocess.run(cmd, cwd=scratch, env=env_for(scratch, site, expect), capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout}s", time.time() - t0
    dt = time.time() - t0
    text = out.stdout + out.stderr
    if out.returncode == 0:
        return True, "", dt
    if "mutation check:" in text:
        line = next(ln for ln in text.splitlines() if "mutation check:" in ln)
        raise RuntimeError(f"import guard failed: {line.strip()}")
    for line in text.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return False, line.split(" - ")[0].split(" ", 1)[1], dt
    if out.returncode == 5:
        raise RuntimeError(f"no tests collected by {tests}:\n{text[-2000:]}")
    return False, f"pytest exit {out.returncode}: {text.strip().splitlines()[-1] if text.strip() else ''}", dt


# ---------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=ROOT, help="tree to copy (default: this repository)")
    ap.add_argument("--scratch", default=os.path.join(tempfile.gettempdir(), "mut"),
                    help="scratch copy, deleted and recreated (default: /tmp/mut)")
    ap.add_argument("-m", "--mutation", action="append", default=[],
                    help="run only mutations whose name contains this (repeatable)")
    ap.add_argument("--tiers", default=",".join(DEFAULT_TIERS),
                    help=f"comma-separated tiers of {list(TIERS)}, or 'all' (default: %(default)s)")
    ap.add_argument("--all-tiers-per-mutation", action="store_true",
                    help="run every tier for every mutation (default: stop at the first tier that kills it)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--list", action="store_true", help="list mutations and tiers, run nothing")
    ap.add_argument("--dry-run", action="store_true",
                    help="make the scratch copy, check every anchor and print each mutation's diff; no tests")
    args = ap.parse_args(argv)

    tiers = list(TIERS) if args.tiers == "all" else [t.strip() for t in args.tiers.split(",") if t.strip()]
    unknown = [t for t in tiers if t not in TIERS]
    if unknown:
        ap.error(f"unknown tiers {unknown}; choose from {list(TIERS)}")
    mutations = [m for m in MUTATIONS if not args.mutation or any(s in m.name for s in args.mutation)]
    if args.list:
        for t in tiers:
            print(f"tier {t}: {' '.join(TIERS[t])}")
        for m in mutations:
            print(f"- {m.name}: {m.what}")
        return 0
    source, scratch = os.path.abspath(args.source), os.path.abspath(args.scratch)
    if scratch == source or source.startswith(scratch + os.sep):
        ap.error("the scratch folder must not be (or contain) the source tree")

    site = make_scratch(source, scratch)
    paths = sorted({e.path for m in MUTATIONS for e in m.edits})
    pristine = {}
    for p in paths:
        with open(os.path.join(scratch, p)) as f:
            pristine[p] = f.read()
    print(f"source {source} copied to {scratch}; tiers {tiers}", flush=True)

    # Stale anchors first: no test time is spent before they are all known good.
    stale = {}
    for m in mutations:
        try:
            files = mutated_files(scratch, m, pristine)
        except Stale as e:
            stale[m.name] = str(e)
            print(f"STALE{'' if m.required else ' (optional)'}  {m.name}: {e}", file=sys.stderr, flush=True)
            continue
        if args.dry_run:
            print(f"--- {m.name}: {m.what}")
            for p, text in files.items():
                sys.stdout.writelines(difflib.unified_diff(pristine[p].splitlines(True), text.splitlines(True),
                                                           p, p + " (mutated)", n=0))
    required_stale = [m.name for m in mutations if m.name in stale and m.required]
    if args.dry_run:
        print(f"{len(mutations) - len(stale)} mutations apply, {len(stale)} stale")
        return 2 if required_stale else 0

    for t in tiers:
        ok, first, dt = run_tier(scratch, site, TIERS[t], None, args.timeout)
        print(f"baseline (unmutated) tier {t}: {'pass' if ok else 'FAIL ' + first} ({dt:.0f}s)", flush=True)
        if not ok:
            print("the unmutated copy must pass every tier: fix the tests or the kernels first", file=sys.stderr)
            return 2

    results = []
    for m in mutations:
        if m.name in stale:
            results.append(dict(mutation=m.name, status="STALE" if m.required else "stale (optional)",
                                detail=stale[m.name], tiers={}))
            continue
        files = mutated_files(scratch, m, pristine)
        expect = {}
        for p, text in files.items():
            # The mutated lines, as the guard plugin must find them in the imported module.
            marks = [ln.strip() for ln in text.splitlines() if ln.strip() and ln not in pristine[p].splitlines()]
            expect[module_of(p)] = marks[:3]
            with open(os.path.join(scratch, p), "w") as f:
                f.write(text)
        killers = {}
        try:
            for t in tiers:
                ok, first, dt = run_tier(scratch, site, TIERS[t], expect, args.timeout)
                killers[t] = None if ok else first
                print(f"  {m.name} | tier {t}: {'survived' if ok else 'killed by ' + first} ({dt:.0f}s)", flush=True)
                if not ok and not args.all_tiers_per_mutation:
                    break
        finally:
            for p in files:
                with open(os.path.join(scratch, p), "w") as f:
                    f.write(pristine[p])
        status = "killed" if any(v for v in killers.values()) else "SURVIVED"
        results.append(dict(mutation=m.name, status=status, tiers=killers))
        print(f"{status:8s} {m.name}", flush=True)

    print("\n| mutation | result | " + " | ".join(tiers) + " |")
    print("|---|---|" + "---|" * len(tiers))
    for r in results:
        cells = []
        for t in tiers:
            if t not in r["tiers"]:
                cells.append("-" if r["status"].lower().startswith("stale") else "")
            else:
                cells.append(r["tiers"][t] or "survived")
        print(f"| {r['mutation']} | {r['status']} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(source=source, tiers=tiers, results=results), f, indent=1)
    if required_stale:
        print(f"\n{len(required_stale)} mutation(s) STALE: their anchors no longer match the kernels",
              file=sys.stderr)
        return 2
    survived = [r["mutation"] for r in results if r["status"] == "SURVIVED"]
    if survived:
        print(f"\n{len(survived)} mutation(s) SURVIVED: {survived}", file=sys.stderr)
        return 1
    print(f"\nall {len(results)} mutations killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
