"""A fresh clone works as README.md says: every example in it runs, the package builds without warnings, and the
real-data tests read $MERGEBENCH_DATA and say when they skip.

Every fenced block of README.md is labelled ```bash, ```python or ```text (text is never run), and each bash or
python block has a rule on the line just before it, an HTML comment that the rendered README hides:

    <!-- readme-test: CLAUSE; CLAUSE; ... -->

    run [OVERRIDES]  run it (bash: `bash -euo pipefail`; python: `python -c`), with OVERRIDES, e.g. `smoke=true`,
                     appended to every `mergebench` command of the block
    ci               never run here: it is `make demo` / `make test`, what CI itself runs (.ci/run); from inside
                     the suite it would set up the venv and run the suite again
    needs WHAT ...   skip with the reason unless each WHAT is here: a dataset under $MERGEBENCH_DATA (the
                     conftest's SHARED_DATA), `sbatch` (a SLURM cluster), `gpu` (CUDA), `zoo` (torchvision
                     and timm import through mergebench.zoo)
    slow             the `slow` marker

A block without a rule fails, so an example cannot be added, or left to rot, untested. The blocks of one `## `
section run in order in one fresh folder outside the repository (whose `tests.user_models` stays importable), as a
reader pastes them: a block's test first runs the earlier blocks of its section, each once per session.
`outputs/multirun/<date>/<time>` stands for the newest sweep folder there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from mergebench import zoo
from mergebench.data.datasets import DATASETS, dataset_names
from mergebench.errors import ConfigError
from tests.conftest import REPO, SHARED_DATA

README = REPO / "README.md"
RULE = re.compile(r"<!-- readme-test: (.*) -->")
CLAUSES = ("run", "ci", "needs", "slow")
SWEEP = "outputs/multirun/<date>/<time>"
BASH_PRELUDE = """set -euo pipefail
mergebench() {{ command mergebench "$@" {overrides}; }}
newest_sweep() {{ ls -d outputs/multirun/*/* | sort | tail -n 1; }}
"""
CI_ONLY = "`make demo` / `make test` are what CI runs (.ci/run): from the suite they would run the suite again"


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block of README.md: where it opens (1-based line), its `## ` section, label, rule and code."""

    line: int
    section: str
    language: str
    rule: str | None
    code: str

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks() -> list[Block]:
    """Every fenced block of README.md, with the rule on the line just before it (None when there is none)."""
    lines = README.read_text().splitlines()
    blocks, section, i = [], "top", 0
    while i < len(lines):
        if lines[i].startswith("## "):
            section = lines[i][3:].strip()
        elif lines[i].startswith("```"):
            end = lines.index("```", i + 1)
            rule = RULE.fullmatch(lines[i - 1]) if i else None
            code = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(i + 1, section, lines[i][3:].strip(), rule and rule.group(1), code))
            i = end
        i += 1
    return blocks


def parse_rule(block: Block) -> dict[str, list[str]]:
    """The block's rule as {clause: words}; ValueError names what is wrong with it."""
    if block.rule is None:
        raise ValueError(f"{block.where}: no `<!-- readme-test: ... -->` rule on the line before the block")
    clauses: dict[str, list[str]] = {}
    for clause in block.rule.split(";"):
        name, *words = clause.split() or [""]
        if name not in CLAUSES:
            raise ValueError(f"{block.where}: rule clause {clause.strip()!r} is not one of {', '.join(CLAUSES)}")
        clauses[name] = words
    if ("run" in clauses) == ("ci" in clauses):
        raise ValueError(f"{block.where}: a rule says exactly one of `run` and `ci`")
    for need in clauses.get("needs", []):
        if need not in ("sbatch", "gpu", "zoo", *dataset_names()):
            raise ValueError(f"{block.where}: needs {need!r}: not sbatch, gpu, zoo or a dataset")
    return clauses


def unmet(need: str) -> str | None:
    """Why `need` is not met here (None when it is); a missing dataset's reason names SHARED_DATA's path."""
    if need == "sbatch":
        return None if shutil.which("sbatch") else "needs sbatch: no SLURM cluster here (`make slurm-up` starts one)"
    if need == "gpu":
        return None if torch.cuda.is_available() else "needs a CUDA GPU: torch sees none"
    if need == "zoo":
        try:
            zoo.timm()
        except ConfigError as err:
            return f"needs the zoo extra: {err}"
        return None
    path = DATASETS.get(need).factory.missing(SHARED_DATA)
    return None if path is None else f"needs {need}: {path} not found; set MERGEBENCH_DATA to the folder with it"


def skip_reason(block: Block) -> str | None:
    """Why the block is not run here, or None."""
    clauses = parse_rule(block)
    if "ci" in clauses:
        return CI_ONLY
    return next(filter(None, map(unmet, clauses.get("needs", []))), None)


def execute(block: Block, folder: Path) -> subprocess.CompletedProcess:
    """Runs the block in `folder` as a reader would from a fresh clone with the venv's scripts on PATH."""
    env = {k: v for k, v in os.environ.items() if k != "MERGEBENCH_CACHE"} | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),  # `tests.user_models`, importable as from the repository's root
        "MERGEBENCH_DATA": str(SHARED_DATA),
        "COLUMNS": "200",
    }
    if block.language == "python":
        argv = [sys.executable, "-c", block.code]
    else:
        script = block.code.replace(SWEEP, '"$(newest_sweep)"')
        placeholder = re.search(r"<[\w /]+>", script)
        assert placeholder is None, f"{block.where}: no stand-in for {placeholder.group()} (only {SWEEP})"
        overrides = " ".join(parse_rule(block)["run"])
        argv = ["bash", "-c", BASH_PRELUDE.format(overrides=overrides) + script]
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=1800)


class Reader:
    """Pastes README blocks as a reader does: each section in its own fresh folder, its blocks in order, once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.results: dict[int, subprocess.CompletedProcess] = {}

    def paste(self, block: Block) -> subprocess.CompletedProcess:
        if block.line not in self.results:
            folder = self.root / re.sub(r"\W+", "-", block.section.lower()).strip("-")
            folder.mkdir(exist_ok=True)
            self.results[block.line] = execute(block, folder)
        return self.results[block.line]


def failure(block: Block, proc: subprocess.CompletedProcess) -> str:
    return f"{block.where} exited {proc.returncode}:\n{block.code}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


CODE = [b for b in readme_blocks() if b.language in ("bash", "python")]


def as_param(block: Block, number: int) -> object:
    """One test per block, named after its section; `slow` from the rule (an invalid rule fails in the test)."""
    slow = block.rule is not None and "slow" in (c.strip() for c in block.rule.split(";"))
    name = f"{re.sub(r'[^a-z0-9]+', '-', block.section.lower()).strip('-')}-{number}"
    return pytest.param(block, id=name, marks=[pytest.mark.slow] if slow else [])


PARAMS = [as_param(b, sum(c.section == b.section for c in CODE[:i]) + 1) for i, b in enumerate(CODE)]


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Reader:
    return Reader(tmp_path_factory.mktemp("fresh_clone"))


def test_every_readme_example_has_a_rule() -> None:
    problems = []
    for block in readme_blocks():
        if block.language not in ("bash", "python", "text"):
            problems.append(f"{block.where}: ```{block.language}: label the block bash, python or text")
        elif block.language != "text":
            try:
                parse_rule(block)
            except ValueError as err:
                problems.append(str(err))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", PARAMS)
def test_readme_example_runs(block: Block, reader: Reader) -> None:
    try:
        reason = skip_reason(block)
    except ValueError as err:
        pytest.fail(str(err))
    if reason is not None:
        pytest.skip(reason)
    for earlier in CODE:
        if earlier.section == block.section and earlier.line < block.line and skip_reason(earlier) is None:
            proc = reader.paste(earlier)
            assert proc.returncode == 0, f"the block before it failed: {failure(earlier, proc)}"
    proc = reader.paste(block)
    assert proc.returncode == 0, failure(block, proc)


def test_real_data_tests_read_mergebench_data_and_say_when_they_skip(tmp_path: Path) -> None:
    """$MERGEBENCH_DATA wins over ../shared/data, and a run without the data names what it skipped in one line."""
    test = "tests/test_cli.py::test_real_mnist_dirichlet_run"
    env = {**os.environ, "MERGEBENCH_DATA": str(tmp_path)}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout
    (line,) = [line for line in proc.stdout.splitlines() if "real-data test(s) skipped" in line]
    assert test in line and str(tmp_path) in line and "set MERGEBENCH_DATA=" in line


def test_package_builds_without_warnings(tmp_path: Path) -> None:
    """`make setup` (pip install -e) once printed ~540 lines of setuptools warnings about conf/'s folders."""
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info next to pyproject.toml
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."]
    proc = subprocess.run(build, cwd=source, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "warn" not in output.lower(), output[-5000:]
    (wheel,) = tmp_path.glob("mergebench-*.whl")
    conf = {f"mergebench/{p.relative_to(REPO).as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert conf <= set(zipfile.ZipFile(wheel).namelist())  # package-data alone still ships every config
