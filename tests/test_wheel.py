"""The wheel is complete: built from the repository, installed (not editable) in a throw-away venv, `mergebench`
and `mergebench-report` run from a folder outside the repository with the configs shipped inside the package."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO


def test_the_wheel_lists_every_package_of_src() -> None:
    """pyproject's package list is explicit (conf/ is mapped into the package): a new subpackage must be added."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO / "src").parts) for p in (REPO / "src" / "mergebench").rglob("__init__.py")
    }
    assert found | {"mergebench.conf"} == listed


@pytest.mark.slow
def test_installed_wheel_runs_from_another_folder(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), "."]
    subprocess.run(build, cwd=REPO, check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("mergebench-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # the dependencies come from this interpreter's site-packages (no network); mergebench only from the wheel
    site = subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=600)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MERGEBENCH_CACHE", "PYTHONPATH")} | {"COLUMNS": "200"}
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import mergebench.cli as c; print(c.__file__, c.CONF_DIR)"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert str(venv) in where and "mergebench/conf" in where and str(REPO) not in where, where

    args = ["dataset=digits", "data=split_classes", "model.hidden=[32]", "train.epochs=1", "hydra.run.dir=out/run"]
    proc = subprocess.run(
        [venv / "bin" / "mergebench", *args], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert (work / "out" / "run" / "results.csv").exists() and "Direct averaging" in proc.stdout
    report = subprocess.run(
        [venv / "bin" / "mergebench-report", "out/run"], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert report.returncode == 0, report.stderr
