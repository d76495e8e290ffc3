"""Mutation testing of the code whose answers users trust: would the tests notice if that code were wrong?

    python tools/mutation_test.py [--modules parity.metrics,parity.lineage] [--functions 'judge,parity.lineage.*']
        [--lines parity.metrics:150-160] [--tests tests/test_validate.py ...] [--max-children 2] [--list] [--keep]

Runs mutmut (the version installed beside this Python) over lora_export's verdict code, by default the modules of
``DEFAULT_MODULES`` below (dotted paths below ``lora_export``; ``--help`` lists them). A mutant is one small change
to one function (a flipped comparison, a dropped ``not``, a changed constant or string, an argument set to None,
...). mutmut first runs the selected tests once to learn which tests execute which function, runs them once
unmutated, then, per mutant, runs the tests that execute its function (pytest ``-p no:randomly -q -x``, one thread
per process, ``--max-children`` mutants at a time). A test that fails kills the mutant; a mutant every test passes
survived: no test notices that change.

Nothing lands in the checkout: the repository's tracked and untracked-not-ignored files (``git ls-files -co
--exclude-standard``) are copied to a temporary directory, a ``[tool.mutmut]`` table is appended to that copy's
pyproject.toml, and mutmut writes its ``mutants/`` folder there (removed at the end unless ``--keep``).

Choosing what runs: ``--modules`` picks the files to mutate, by dotted module name (``parity.metrics``).
``--functions`` (comma-separated name globs matched against ``judge`` / ``StagedOutputs.commit`` and against
``parity.metrics.judge``) and ``--lines MODULE:START-END`` (repeatable;
lines of the checkout's file) each add the mutants they match; with neither, every mutant of the modules runs.
``--tests`` picks the tests (default: the whole suite). ``--list`` prints the selected mutants and stops.

How long: each mutant is a fresh pytest session, so one whose tests need the conftest's tiny exports first
spends ~20 s of CPU building them; killed mutants stop at the first failing test, survivors run all of their
tests. Measured on a 2-core machine with
``--max-children 2`` and test_validate, test_report, test_files, test_cli_export and test_export: ~6 min before the
first mutant (generating the mutants, one full run of the tests to learn which tests execute which function, one
unmutated run of them), then ~25 s of wall time per mutant, i.e. ~140 mutants an hour. Restrict with
``--functions`` / ``--lines`` / ``--tests``; ``--list`` shows how many mutants a selection holds (in ~30 s).

Reading the output: mutmut's progress goes to stderr. stdout gets one line per mutant that was not killed:

survived   parity.metrics.judge:228  failures = []  ->  failures = None  [lora_export.parity.metrics.x_judge__mutmut_1]

status, module.function:line (in the checkout's file), the original line(s) -> the mutated line(s) (several
joined with ' | '), and mutmut's name for it (``mutmut show NAME`` in a ``--keep`` copy prints the diff). Then the
counts and the wall time. survived: no selected test noticed the change, so it is either equivalent (it cannot
change behaviour) or a missing test. no tests: no selected test executes that function. timeout: the tests ran
past (their measured duration + --timeout-constant) x --timeout-multiplier seconds. Tests that run the CLI in a
subprocess import the unmutated copy (PYTHONPATH points at it), so they can never kill a mutant.

Exits 0 when mutmut ran, whatever survived; mutmut's exit code when it could not run (e.g. a test fails unmutated).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "lora_export"
DEFAULT_MODULES = ("tolerance", "parity.metrics", "parity.verdict", "parity.sessions", "parity.lineage",
                   "parity.validate", "parity.validate_decoder", "parity.subject", "export.adapters", "export.convert",
                   "model.checkpoint", "files")
PYTEST_ARGS = ["-p", "no:randomly", "-q", "-x"]
ALWAYS_COUNTED = ("killed", "survived", "timeout", "skipped")
#: mutmut names a function's mutants x_<function>__mutmut_<n>, a method's x<SEP><class><SEP><method>__mutmut_<n>
SEP = "\u01c1"


def module_path(root: Path, module: str) -> Path:
    """``parity.metrics`` -> ``<root>/lora_export/parity/metrics.py``."""
    return root / PACKAGE / Path(*module.split(".")).with_suffix(".py")


@dataclass(frozen=True)
class Mutant:
    """One mutant: mutmut's name for it and where and what it changes."""

    name: str  # e.g. lora_export.parity.metrics.x_judge__mutmut_1
    module: str  # e.g. parity.metrics
    function: str  # e.g. judge, StagedOutputs.commit
    line: int  # first changed line in the module's file
    before: str
    after: str

    def describe(self) -> str:
        return f"{self.module}.{self.function}:{self.line}  {self.before}  ->  {self.after}  [{self.name}]"


def comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def line_range(value: str) -> tuple[str, int, int]:
    """'parity.validate:386-396' (or 'parity.validate:386') -> ('parity.validate', 386, 396)."""
    module, _, lines = value.partition(":")
    start, _, end = lines.partition("-")
    try:
        return Path(module).stem, int(start), int(end or start)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MODULE:START-END, got {value!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", type=comma_list, default=list(DEFAULT_MODULES),
                        help=f"lora_export modules to mutate (default: {','.join(DEFAULT_MODULES)})")
    parser.add_argument("--functions", type=comma_list, default=[],
                        help="name globs of the functions whose mutants run, e.g. 'judge,parity.lineage.*,files.*'")
    parser.add_argument("--lines", type=line_range, action="append", default=[], metavar="MODULE:START-END",
                        help="also run the mutants on these lines of MODULE (repeatable)")
    parser.add_argument("--tests", nargs="+", default=["tests"], help="test files or node ids (default: tests)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default: 2)")
    parser.add_argument("--timeout-constant", type=float, default=30.0,
                        help="seconds added to a mutant's measured test time before the multiplier (default: 30; "
                             "it must cover the session fixtures, which the measured time leaves out)")
    parser.add_argument("--timeout-multiplier", type=float, default=5.0, help="(default: 5)")
    parser.add_argument("--list", action="store_true", help="print the selected mutants and stop")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (for mutmut show / browse)")
    args = parser.parse_args(argv)
    args.modules = [module.removesuffix(".py").replace("/", ".") for module in args.modules]
    missing = [m for m in args.modules + [m for m, _, _ in args.lines] if not module_path(REPO, m).is_file()]
    if missing:
        parser.error(f"no such module in {PACKAGE}/: {', '.join(missing)}")
    if args.max_children < 1:
        parser.error("--max-children must be >= 1")
    return args


def copy_repository(target: Path) -> list[str]:
    """Copy the checkout's tracked and untracked-not-ignored files into ``target``; returns their paths."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode()
    files = [name for name in listed.split("\0") if name and (REPO / name).is_file()]  # skips deleted files
    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name)
    return files


def write_config(root: Path, files: list[str], args: argparse.Namespace) -> None:
    """Append mutmut's configuration to the copy's pyproject.toml."""
    settings = {
        "source_paths": [PACKAGE],  # the whole package is copied into mutants/, only_mutate picks what changes
        "only_mutate": [module_path(Path(), module).as_posix() for module in args.modules],
        # tests/ and pyproject.toml are copied by default; the rest (models/, README.md, ...) tests may read
        "also_copy": sorted({name.split("/", 1)[0] for name in files} - {PACKAGE, "tests", "pyproject.toml"}),
        "pytest_add_cli_args": PYTEST_ARGS,
        "pytest_add_cli_args_test_selection": args.tests,
        "process_isolation": "forkserver",  # torch and onnxruntime threads are not fork-safe in mutmut's process
        "timeout_constant": args.timeout_constant,
        "timeout_multiplier": args.timeout_multiplier,
        "use_git_change_detection": False,  # the copy is no git repository
    }
    with open(root / "pyproject.toml", "a", encoding="utf-8") as f:
        f.write("\n[tool.mutmut]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items()))


def def_lines(source: str) -> dict[str, int]:
    """{mutmut's name of a top-level function or method (x_f, x<SEP>C<SEP>m): line of its def}."""
    lines = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines[f"x_{node.name}"] = node.lineno
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines[f"x{SEP}{node.name}{SEP}{item.name}"] = item.lineno
    return lines


def enumerate_mutants(root: Path, modules: list[str]) -> list[Mutant]:
    """Every mutant mutmut makes of ``modules`` in the copy at ``root``, generated the way ``mutmut run`` does."""
    from mutmut.mutation.file_mutation import mutate_file_contents
    from mutmut.utils.file_utils import change_cwd

    mutants = []
    with change_cwd(root):  # mutmut reads its configuration from the working directory
        for module in modules:
            path = module_path(Path(), module).as_posix()
            source = Path(path).read_text(encoding="utf-8")
            mutated = mutate_file_contents(path, source)
            code, starts = mutated.code.splitlines(), def_lines(source)
            for generated in mutated.mutant_names:
                function = generated.partition("__mutmut_")[0]
                original = f"{function}__mutmut_orig"
                spans = [mutated.line_span_by_function_name[name] for name in (original, generated)]
                before, after = ([line.replace(name, function) for line in code[span.start - 1:span.end]]
                                 for name, span in zip((original, generated), spans, strict=True))
                def_index = next(i for i, line in enumerate(before) if f"def {function}(" in line)
                changes = [op for op in difflib.SequenceMatcher(None, before, after, autojunk=False).get_opcodes()
                           if op[0] != "equal"]
                mutants.append(Mutant(
                    name=f"{PACKAGE}.{module}.{generated}", module=module,
                    function=function.removeprefix("x_").removeprefix(f"x{SEP}").replace(SEP, "."),
                    line=starts[function] + changes[0][1] - def_index,
                    before=" | ".join(line.strip() for _, i1, i2, _, _ in changes for line in before[i1:i2]),
                    after=" | ".join(line.strip() for _, _, _, j1, j2 in changes for line in after[j1:j2]),
                ))
    return mutants


def select(mutants: list[Mutant], functions: list[str], lines: list[tuple[str, int, int]]) -> list[Mutant]:
    """The mutants of the functions matching ``functions`` plus those on ``lines``; all when neither is given."""
    unmatched = [glob for glob in functions if not any(matches(m, glob) for m in mutants)]
    if unmatched:
        sys.exit(f"error: no function with mutants matches {', '.join(unmatched)}")
    if not functions and not lines:
        return mutants
    return [m for m in mutants if any(matches(m, glob) for glob in functions)
            or any(m.module == module and start <= m.line <= end for module, start, end in lines)]


def matches(mutant: Mutant, glob: str) -> bool:
    return fnmatch.fnmatchcase(mutant.function, glob) or fnmatch.fnmatchcase(f"{mutant.module}.{mutant.function}", glob)


def run_mutmut(root: Path, names: list[str], max_children: int, tmp: Path) -> int:
    """``mutmut run`` on the named mutants in the copy at ``root``, its output on stderr; returns its exit code."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        "TMPDIR": str(tmp),  # the tests' tmp_path folders go with the copy
        # subprocesses the tests start import the copy, not the checkout (mutmut keeps its mutants first in-process)
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    command = [str(Path(sys.executable).with_name("mutmut")), "run", "--max-children", str(max_children), *names]
    return subprocess.run(command, cwd=root, env=env, stdout=sys.stderr).returncode


def read_statuses(root: Path, modules: list[str]) -> dict[str, str]:
    """{mutant name: mutmut's status (killed, survived, timeout, ...)} from the copy's mutants/*.meta."""
    from mutmut.stats import status_by_exit_code

    statuses = {}
    for module in modules:
        meta = root / "mutants" / module_path(Path(), module).with_suffix(".py.meta")
        for name, exit_code in json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"].items():
            statuses[name] = status_by_exit_code[exit_code]
    return statuses


def report(selected: list[Mutant], statuses: dict[str, str], seconds: float) -> None:
    """One line per mutant that was not killed, then the counts."""
    counts = Counter(statuses[m.name] for m in selected)
    for mutant in sorted(selected, key=lambda m: (m.module, m.line, m.name)):
        if statuses[mutant.name] != "killed":
            print(f"{statuses[mutant.name]:<10} {mutant.describe()}")
    counted = [f"{counts[status]} {status}" for status in ALWAYS_COUNTED]
    counted += [f"{n} {status}" for status, n in sorted(counts.items()) if status not in ALWAYS_COUNTED]
    print(f"{len(selected)} mutants: {', '.join(counted)}; {seconds / 60:.1f} min wall")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="lora-export-mutation-"))
    root, tmp = scratch / "repo", scratch / "tmp"
    tmp.mkdir()
    try:
        write_config(root, copy_repository(root), args)
        selected = select(enumerate_mutants(root, args.modules), args.functions, args.lines)
        if args.list:
            for mutant in selected:
                print(mutant.describe())
            print(f"{len(selected)} mutants")
            return 0
        code = run_mutmut(root, [m.name for m in selected], args.max_children, tmp)
        if code != 0:
            print(f"mutmut run failed (exit code {code}); its output is above", file=sys.stderr)
            return code
        report(selected, read_statuses(root, args.modules), time.monotonic() - start)
        return 0
    finally:
        if args.keep:
            print(f"kept the copy: cd {root} && mutmut show NAME", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
