"""The `mergebench` command end to end: one-line errors for bad input, CSV rows, and the caches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mergebench import cli as cli_module
from mergebench.data.download import can_download
from tests.conftest import SHARED_DATA

MERGEBENCH = str(Path(sys.executable).parent / "mergebench")
SMALL = ["model.hidden=[32,32]", "train.epochs=2", "train.batch_size=256"]
NO_TORCHVISION = can_download("cifar10") is not None


def default_sigint() -> None:
    """Popen's preexec_fn for a run a test will Ctrl-C: SIGINT's default action, as a terminal gives it. A suite
    started in the background by a shell without job control (`make test &` in a script, some CI runners) ignores
    SIGINT, every child inherits that, and the run would never see the interrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "MERGEBENCH_CACHE"}
    environment.update({"MERGEBENCH_DATA": str(SHARED_DATA), "COLUMNS": "200", **env})
    return subprocess.run([MERGEBENCH, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


def results_of(cwd: Path) -> pd.DataFrame:
    (csv,) = (cwd / "outputs" / "runs").glob("*/*/results.csv")
    return pd.read_csv(csv)


BAD_INPUT = [
    pytest.param(["align=foo"], "align='foo' is not known; allowed: c2m3, cca, identity", id="unknown-group-option"),
    pytest.param(
        ["dataset=imagenet"],
        "dataset='imagenet' is not known; did you mean imagenet200? allowed: cifar10, cifar100, digits",
        id="dataset",
    ),
    pytest.param(["-m", "align=identity,nope"], "align='nope' is not known", id="unknown-option-in-sweep"),
    pytest.param(["foo=1"], "foo is not a known key", id="unknown-top-key"),
    pytest.param(["+foo=1"], "foo is not a known key; allowed:", id="added-unknown-key"),
    pytest.param(["model.widht=2"], "model.widht is not a known key", id="unknown-nested-key"),
    pytest.param(["+model.widht=2"], "model.widht is not a known key; allowed: hidden, norm, width", id="added-nested"),
    pytest.param(["model.width=abc"], "model.width", id="wrong-type-float"),
    pytest.param(["data.num_models=two"], "data.num_models", id="wrong-type-int"),
    pytest.param(["model.width=0"], "model.width=0 must be > 0", id="width-zero"),
    pytest.param(["model.width=-2"], "model.width=-2 must be > 0", id="width-negative"),
    pytest.param(["data.num_models=1"], "data.num_models=1 must be >= 2", id="one-model"),
    pytest.param(["data=dirichlet", "data.concentration=-1"], "data.concentration=-1.0 must be > 0", id="split-param"),
    pytest.param(
        ["dataset=cifar10", "data.root=/nonexistent/data"],
        "dataset=cifar10: /nonexistent/data/cifar-10-batches-py/data_batch_1 not found",
        id="missing-dataset",
    ),
    pytest.param(
        ["data=cross_dataset", "dataset=digits", "data.root=/nonexistent/data"],
        "dataset=fashion_mnist: /nonexistent/data/FashionMNIST/raw/train-images-idx3-ubyte not found",
        id="missing-second-dataset",
    ),
    pytest.param(
        ["data=cross_dataset", "dataset=digits", "data.others=[nope]"], "data.others='nope' is not known", id="others"
    ),
    # a typo gets its fix (issue 21): the closest key or option first, then what is allowed
    pytest.param(
        ["train.epoch=3"], "train.epoch is not a known key; did you mean train.epochs? allowed: amp,", id="key-typo"
    ),
    pytest.param(["traim.epochs=3"], "traim.epochs is not a known key; did you mean train.epochs?", id="section-typo"),
    pytest.param(["+sed=1"], "sed is not a known key; did you mean seed? allowed: agg,", id="added-key-typo"),
    pytest.param(["align=permut"], "did you mean permute? allowed: c2m3, cca", id="option-typo"),
    pytest.param(["train.optimizer=adma"], "train.optimizer='adma' is not known; did you mean adam?", id="value-typo"),
    pytest.param(
        ["-m", "seed=0,1", "hydra/launcher=basci"],
        "hydra/launcher='basci' is not known; did you mean basic? allowed: basic, joblib, submitit_local",
        id="launcher-typo",
    ),
    # a sweep without -m would run one job of it, silently (issue 21)
    pytest.param(
        ["experiment=ym_table1", "smoke=true", "dataset=digits"],  # runs here: Hydra would run one job of it
        "experiment=ym_table1 sweeps data.angle, seed: add -m to run its jobs, or set data.angle, seed to run one job",
        id="preset-without-m",
    ),
    pytest.param(
        ["experiment=ym_table1", "dataset=digits", "seed=0"], "or set data.angle to run one job", id="preset-partly-set"
    ),
    pytest.param(["seed=0,1"], "seed=0,1 lists several values: add -m to run one job per value", id="sweep-without-m"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_is_one_clear_line(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In process (fast): the CLI's pre-flight check exits 2 with one line; Hydra never starts a job."""
    monkeypatch.setattr(sys, "argv", ["mergebench", *args])
    monkeypatch.setenv("COLUMNS", "80")  # soft wrap: a long message stays one line on a narrow terminal
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main()
    assert exit_info.value.code == 2
    out = capsys.readouterr()
    lines = [ln for ln in out.err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.err
    assert "Traceback" not in out.err + out.out


@pytest.mark.skipif(not NO_TORCHVISION, reason="torchvision is importable: data.download=true would fetch")
def test_download_without_torchvision_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["mergebench", "dataset=usps", "data.root=/nonexistent", "data.download=true"])
    with pytest.raises(SystemExit):
        cli_module.main()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "/nonexistent/usps.bz2" in err and "pip install mergebench[vision]" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "align=identity,nope"], "align='nope' is not known"),
        (["dataset=cifar10", "data.root=/nonexistent/data"], "/nonexistent/data/cifar-10-batches-py"),
    ],
)
def test_bad_input_from_the_installed_command(tmp_path: Path, args: list[str], message: str) -> None:
    proc = cli(args, tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "outputs").exists()  # nothing launched


def test_digits_run_writes_rows_and_repeats_hit_the_caches(tmp_path: Path) -> None:
    args = ["data=split_classes", "repair=reset_bn", "model.norm=bn", *SMALL]
    first = cli([*args, "hydra.run.dir=outputs/runs/a/first"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "cache hit" not in first.stdout and first.stdout.count("trained in") == 2
    df = results_of(tmp_path)
    roles = set(df.model_role)
    assert {"base_0", "base_1", "base_avg", "ensemble", "merged"} <= roles
    assert set(df.subset) == {"test", "classes_0", "classes_1"}
    assert set(df.metric) == {"top1", "top5", "loss"}
    merged = df[(df.model_role == "merged") & (df.metric == "top1") & (df.subset == "test")]
    assert merged.method_label.tolist() == ["Direct averaging"]
    assert df.run_id.nunique() == 1 and (df.dataset == "digits").all() and (df.repair == "reset_bn").all()
    run_dir = tmp_path / "outputs" / "runs" / "a" / "first"
    assert (run_dir / "split_manifest.json").exists() and (run_dir / "split_indices.npz").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()

    # the same command again: the finished run is a cache hit, nothing is trained or merged
    second = cli([*args, "hydra.run.dir=outputs/again"], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "cache hit: run finished before: reusing" in second.stdout and "trained in" not in second.stdout
    again = pd.read_csv(tmp_path / "outputs" / "again" / "results.csv")
    pd.testing.assert_frame_equal(again, df)

    # a different merge of the same base models: each base model is a cache hit, nothing is trained
    third = cli([*args, "agg.alpha=0.3", "hydra.run.dir=outputs/alpha"], tmp_path)
    assert third.returncode == 0, third.stderr
    assert third.stdout.count("cache hit") == 2 and "trained in" not in third.stdout, third.stdout
    assert "base 0: cache hit" in third.stdout and "base 1: cache hit" in third.stdout
    alpha = pd.read_csv(tmp_path / "outputs" / "alpha" / "results.csv")
    bases = alpha.model_role.str.startswith("base")
    pd.testing.assert_series_equal(
        alpha[bases].value.reset_index(drop=True), df[df.model_role.str.startswith("base")].value.reset_index(drop=True)
    )


@pytest.mark.slow
def test_real_mnist_dirichlet_run(tmp_path: Path, shared_data: Path) -> None:
    args = ["data=dirichlet", "dataset=mnist", f"data.root={shared_data}", "model=mlp", "train.epochs=1"]
    proc = cli(
        [*args, "data.train_limit=6000", "data.test_limit=2000", "model.hidden=[128,128]", "train.batch_size=100"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    df = results_of(tmp_path)
    assert (df.dataset == "mnist").all() and (df.split == "dirichlet").all() and (df.arch == "mlp").all()
    assert set(df.model_role) == {"base_0", "base_1", "base_avg", "ensemble", "merged"}
    assert set(df.metric) == {"top1", "top5", "loss"} and set(df.subset) == {"test"}
    assert len(df) == 5 * 3
    top1 = df[(df.metric == "top1") & (df.subset == "test")].set_index("model_role")["value"]
    assert top1["base_0"] > 50 and top1["base_1"] > 50  # one epoch on ~3000 examples each still learns
    assert top1["ensemble"] >= min(top1["base_0"], top1["base_1"])
    top5 = df[(df.metric == "top5")].set_index("model_role")["value"]
    assert (top5 >= top1.reindex(top5.index)).all()
    manifest = (next((tmp_path / "outputs" / "runs").glob("*/*")) / "split_manifest.json").read_text()
    assert '"train_pool": 6000' in manifest and '"test": 2000' in manifest


def test_the_check_and_the_jobs_read_each_dataset_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-flight check builds every split of the sweep; the jobs the basic launcher runs in the same process
    reuse what it read instead of reading the files again."""
    from mergebench import run as run_module

    reads: list[str] = []
    real = run_module.load_dataset
    monkeypatch.setattr(run_module, "load_dataset", lambda name, *rest: reads.append(name) or real(name, *rest))
    monkeypatch.setattr(cli_module, "LOADED", {})
    monkeypatch.chdir(tmp_path)
    args = ["-m", "align=identity,permute", *SMALL, "train.epochs=1", f"cache_dir={tmp_path / 'cache'}"]
    monkeypatch.setattr(sys, "argv", ["mergebench", *args])
    cli_module.main()
    assert reads == ["digits"]
    assert len(list((tmp_path / "outputs" / "multirun").glob("*/*/*/results.csv"))) == 2


TINY_SWEEP = ["model.hidden=[16]", "train.epochs=1", "train.batch_size=100", "data.train_limit=300"]


def run_in_process(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_module, "LOADED", {})
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["mergebench", *args, f"cache_dir={cwd / 'cache'}"])
    cli_module.main()


def test_hydras_own_basic_launcher_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Launchers are checked against Hydra's search path, not only conf/hydra/launcher/ (issue 21)."""
    run_in_process(["-m", "hydra/launcher=basic", "seed=0,1", *TINY_SWEEP], tmp_path, monkeypatch)
    assert len(list((tmp_path / "outputs" / "multirun").glob("*/*/*/results.csv"))) == 2


def test_preset_with_every_swept_key_set_runs_one_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting each key the preset sweeps asks for that one job: it runs without -m."""
    args = ["experiment=ym_table1", "smoke=true", "dataset=digits", "data.angle=30", "seed=0", "curve.points=0"]
    run_in_process([*args, "hydra.run.dir=outputs/one"], tmp_path, monkeypatch)
    df = pd.read_csv(tmp_path / "outputs" / "one" / "results.csv")
    assert set(df["seed"]) == {0} and df.split_params.str.contains("30").all()


def slurm_free_path(tmp: Path, *commands: str) -> str:
    """A PATH with only these (fake) commands on it."""
    folder = tmp / "bin"
    folder.mkdir()
    for name in commands:
        (folder / name).write_text("#!/bin/sh\nexit 1\n")
        (folder / name).chmod(0o755)
    return str(folder)


def test_slurm_launcher_without_sbatch_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    args = ["-m", "seed=0,1", "hydra/launcher=submitit_slurm", *TINY_SWEEP]
    proc = cli(args, tmp_path, PATH=slurm_free_path(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "hydra/launcher=submitit_slurm" in lines[0], proc.stderr
    assert "not found on PATH: sbatch, srun" in lines[0], lines[0]
    assert not (tmp_path / "outputs").exists()  # nothing launched


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/.*validated against ConfigStore schema")
def test_slurm_launcher_names_the_missing_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", slurm_free_path(tmp_path, "sbatch"))
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(["-m", "seed=0,1", "hydra/launcher=submitit_slurm", *TINY_SWEEP], tmp_path, monkeypatch)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0 and "not found on PATH: srun (" in err, err
