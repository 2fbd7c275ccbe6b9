"""Curated mutation check: every listed mechanism of fedtune must have a test that fails without it.

Reads ``tests/mutations.toml`` (a list of ``[[mutation]]`` entries: ``name``, ``file``, ``find``,
``replace``, ``tests``), copies the repository once to a scratch folder and, for each entry, replaces
the ``find`` snippet (which must occur exactly once in ``file``) by ``replace``, runs only the entry's
``tests`` with pytest (``-x``, the project's default markers), then restores the file. A mutation is
*caught* when those tests fail; one that they pass *survives*, and the check exits 1.

    python scripts/mutation_check.py                 # every entry (baseline run first)
    python scripts/mutation_check.py --only fedavg   # entries whose name contains "fedavg"
    python scripts/mutation_check.py --list          # the entries, nothing run

Imports in the scratch runs resolve to the scratch copy (pytest's ``pythonpath = ["."]`` and
``PYTHONPATH=<scratch>`` for subprocesses the tests start), which the baseline checks with a probe
test. A mutation that breaks importing the module counts as caught but is flagged ``import error``:
it proves nothing about the mechanism, so such entries should be rewritten.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOML = ROOT / "tests" / "mutations.toml"
EXCLUDE_NAMES = {".venv", ".git", "outputs", "wandb", "__pycache__", ".pytest_cache", ".ruff_cache",
                 "fedtune.egg-info", "multirun"}
EXCLUDE_PATHS = {"docs/figures"}
PROBE = "tests/test__mutation_probe.py"  # written into the scratch copy only
PROBE_TEXT = '''"""Written by scripts/mutation_check.py: imports must resolve to this scratch copy."""
from pathlib import Path


def test_imports_resolve_to_the_scratch_copy():
    import fedtune

    root = Path(__file__).resolve().parents[1]
    assert Path(fedtune.__file__).resolve().is_relative_to(root), (fedtune.__file__, root)
    print("fedtune imported from", fedtune.__file__)
'''


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@dataclass
class Mutation:
    name: str
    file: str
    find: str
    replace: str
    tests: list[str]
    problem: str = ""  # set when the entry cannot be applied (find not unique, file missing)


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # caught | survived | import error | timeout | no tests | invalid
    seconds: float = 0.0
    first_failure: str = ""
    log: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return self.status in ("caught", "import error")


def load_mutations(path: Path) -> list[Mutation]:
    data = tomllib.loads(path.read_text())
    out = []
    for i, entry in enumerate(data.get("mutation", [])):
        missing = [k for k in ("name", "file", "find", "replace", "tests") if k not in entry]
        if missing:
            raise SystemExit(f"{path}: mutation #{i} ({entry.get('name', '?')}) lacks {', '.join(missing)}")
        tests = entry["tests"]
        tests = [tests] if isinstance(tests, str) else list(tests)
        if not tests:
            raise SystemExit(f"{path}: mutation {entry['name']!r} lists no tests")
        out.append(Mutation(entry["name"], entry["file"], entry["find"], entry["replace"], tests))
    names = [m.name for m in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SystemExit(f"{path}: duplicate mutation names {dupes}")
    return out


def check_unique(mutations: list[Mutation], root: Path) -> None:
    for m in mutations:
        target = root / m.file
        if not target.is_file():
            m.problem = f"file {m.file} not found"
            continue
        count = target.read_text().count(m.find)
        if count != 1:
            m.problem = f"find occurs {count} times in {m.file} (must be exactly once)"
        elif m.find == m.replace:
            m.problem = "replace equals find"


def _ignore(src: str, names: list[str], *, root: Path) -> set[str]:
    rel = Path(src).resolve().relative_to(root)
    return {n for n in names if n in EXCLUDE_NAMES or (rel / n).as_posix() in EXCLUDE_PATHS}


def make_scratch(root: Path, base: Path) -> Path:
    """``base/<repo name>``, a copy of the repo, with ``base/shared`` linked to the repo's sibling
    ``shared/`` (tests and the Makefile find shared data at ``../shared``)."""
    scratch = base / root.name
    shutil.copytree(root, scratch, ignore=lambda s, n: _ignore(s, n, root=root), symlinks=True)
    shared = root.parent / "shared"
    if shared.exists():
        (base / "shared").symlink_to(shared)
    (scratch / PROBE).write_text(PROBE_TEXT)
    return scratch


def test_env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
        # `python -m fedtune` started by a test must import the scratch copy too
        "PYTHONPATH": os.pathsep.join([str(scratch), *filter(None, [os.environ.get("PYTHONPATH")])]),
        # no .pyc: a restored file of the same size within the same second must not reuse a stale one
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    return env


PYTEST_EXTRA: list[str] = []  # --deselect NODE ... from the command line


def run_pytest(python: str, tests: list[str], scratch: Path, timeout: float) -> tuple[int | None, str, float]:
    """(returncode or None on timeout, combined output, seconds)."""
    cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *PYTEST_EXTRA, *tests]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=scratch, env=test_env(scratch), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the test's own subprocesses too
        out, _ = proc.communicate()
        rc = None
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): leave nothing running in the scratch copy
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return rc, out, time.perf_counter() - start


_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)
_IMPORT = re.compile(r"^E\s+(ImportError|ModuleNotFoundError|SyntaxError|IndentationError|NameError)\b", re.M)


def classify(m: Mutation, rc: int | None, out: str, seconds: float) -> Outcome:
    if rc is None:
        return Outcome(m, "timeout", seconds, "", out)
    if rc == 0:
        return Outcome(m, "survived", seconds, "", out)
    if rc == 5:
        return Outcome(m, "no tests", seconds, "no test collected (a slow test? a wrong node id?)", out)
    hit = _SUMMARY.search(out)
    first = f"{hit[1] if hit[1] == 'ERROR' else ''} {hit[2]}".strip() if hit else f"exit {rc}"
    if rc in (2, 3, 4) or "ERROR collecting" in out or _IMPORT.search(out):
        return Outcome(m, "import error", seconds, first, out)
    return Outcome(m, "caught", seconds, first, out)


def apply_and_run(m: Mutation, scratch: Path, python: str, timeout: float) -> Outcome:
    if m.problem:
        return Outcome(m, "invalid", 0.0, m.problem)
    target = scratch / m.file
    original = target.read_text()
    try:
        target.write_text(original.replace(m.find, m.replace, 1))
        rc, out, seconds = run_pytest(python, m.tests, scratch, timeout)
    finally:
        target.write_text(original)
    return classify(m, rc, out, seconds)


def table(outcomes: list[Outcome], *, markdown: bool) -> str:
    rows = [(o.mutation.name, o.status, f"{o.seconds:.1f}", o.first_failure) for o in outcomes]
    head = ("mechanism", "caught?", "seconds", "first failing test")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), "-+-".join("-" * w for w in widths)]
    return "\n".join([*lines, *(fmt.format(*r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_TOML, help="the mutations file (tests/mutations.toml)")
    p.add_argument("--only", action="append", default=[], metavar="SUBSTR",
                   help="run entries whose name contains SUBSTR (case-insensitive; repeatable)")
    p.add_argument("--list", action="store_true", help="list the entries and exit")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the listed tests")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation (and per baseline file)")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    p.add_argument("--out", type=Path, help="also write the table here, as markdown")
    p.add_argument("--keep-scratch", action="store_true", help="leave the scratch copy (its path is printed)")
    p.add_argument("--deselect", action="append", default=[], metavar="NODE",
                   help="pass --deselect NODE to pytest (a test that fails without any mutation; repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="print pytest's output of each mutation")
    args = p.parse_args(argv)
    PYTEST_EXTRA[:] = [a for node in args.deselect for a in ("--deselect", node)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up (restore, kill, rmtree)
    # Started as a shell background job, this process (and every test's subprocess) would ignore SIGINT;
    # a handler here makes exec'd children start with the default again (Ctrl-C tests rely on it).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    mutations = load_mutations(args.config)
    if args.only:
        wanted = [s.lower() for s in args.only]
        mutations = [m for m in mutations if any(s in m.name.lower() for s in wanted)]
        if not mutations:
            sys.stderr.write(f"no mutation name contains any of {args.only}\n")
            return 1
    check_unique(mutations, ROOT)
    if args.list:
        for m in mutations:
            note = f"  !! {m.problem}" if m.problem else ""
            say(f"{m.name}\n    {m.file} -> {' '.join(m.tests)}{note}")
        return 1 if any(m.problem for m in mutations) else 0

    start = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="fedtune-mutants-"))
    try:
        scratch = make_scratch(ROOT, base)
        say(f"scratch copy: {scratch}")
        check_unique(mutations, scratch)  # the snapshot, in case a file changed meanwhile
        if not args.no_baseline:
            union = list(dict.fromkeys([PROBE, *(t for m in mutations if not m.problem for t in m.tests)]))
            say(f"baseline: {len(union) - 1} test targets, unmutated ...")
            rc, out, seconds = run_pytest(args.python, ["-s", *union], scratch, args.timeout * 2)
            hit = re.search(r"fedtune imported from (\S+)", out)
            say(f"baseline: {'passed' if rc == 0 else 'FAILED'} in {seconds:.0f} s; "
                  f"fedtune imported from {hit[1] if hit else '?'}")
            if rc != 0:
                say(out[-6000:])
                say("the listed tests fail without any mutation: fix that first (or --no-baseline)")
                return 1
        outcomes = []
        for i, m in enumerate(mutations, 1):
            o = apply_and_run(m, scratch, args.python, args.timeout)
            outcomes.append(o)
            say(f"[{i}/{len(mutations)}] {o.status:<12} {o.seconds:6.1f} s  {m.name}"
                  + (f"  ({o.first_failure})" if o.first_failure else ""))
            if args.verbose or o.status in ("timeout", "no tests"):
                say(o.log[-4000:])
        # the scratch copy must be back to the original after every mutation
        drift = [m.file for m in mutations if (ROOT / m.file).exists() and not m.problem
                 and (scratch / m.file).read_text().count(m.find) != 1]
        assert not drift, f"scratch files not restored: {drift}"
    finally:
        if args.keep_scratch:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    say("")
    say(table(outcomes, markdown=False))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table(outcomes, markdown=True) + "\n")
    bad = [o for o in outcomes if not o.ok]
    flagged = [o for o in outcomes if o.status == "import error"]
    say(f"\n{len(outcomes) - len(bad)}/{len(outcomes)} mutations caught in {time.perf_counter() - start:.0f} s")
    if flagged:
        say(f"{len(flagged)} caught only by an import error (not a semantic check): "
              + "; ".join(o.mutation.name for o in flagged))
    for o in bad:
        say(f"NOT CAUGHT ({o.status}): {o.mutation.name} [{o.mutation.file}] {o.first_failure}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
