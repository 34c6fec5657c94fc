"""Every YAML under conf/ composes and validates; every paper preset runs end to end with smoke=true."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mergebench.cli import CONF_DIR, check_single_job
from mergebench.config import validate
from mergebench.errors import ConfigError
from mergebench.report import main as report_main
from tests.fake_data import write_all
from tests.test_cli import cli

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
EXPERIMENTS = [p.stem for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))]
FAST = {"ym_table1"}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option == "cross_dataset":
        overrides.append("dataset=mnist")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=overrides)
    if (group, option) == ("model", "custom"):  # the user's factory is required: one line naming the key
        with pytest.raises(ConfigError, match=r"model\.target"):
            validate(cfg)
        return
    validate(cfg)


LAUNCHER_KEYS = {
    "submitit_slurm": {"partition", "timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb", "array_parallelism"},
    "submitit_local": {"timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb"},
    "joblib": {"n_jobs"},
}


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/.*validated against ConfigStore schema")
def test_launchers_compose_with_documented_keys() -> None:
    launchers = {p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml")}
    assert launchers == set(LAUNCHER_KEYS)
    for name, keys in LAUNCHER_KEYS.items():
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose("config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")
        assert keys <= set(cfg.hydra.launcher), name


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_all(tmp_path_factory.mktemp("data"))


def sweep_params(name: str) -> dict[str, list[str]]:
    """The preset's sweep: key -> its values (Hydra's `hydra.sweeper.params`)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    return {key: str(values).split(",") for key, values in cfg.hydra.sweeper.params.items()}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_job_of_every_preset_validates(name: str) -> None:
    """Each job of the full sweep composes and passes the config checks (what the smoke runs below cut short)."""
    params = sweep_params(name)
    assert params.pop("seed") and params, params  # seeds do not change what composes
    jobs = [dict(zip(params, values)) for values in itertools.product(*params.values())]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        for job in jobs:
            validate(compose("config", overrides=[f"experiment={name}", *(f"{k}={v}" for k, v in job.items())]))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_preset_without_m_runs_only_with_its_swept_keys_set(name: str) -> None:
    """Without -m, Hydra would run one job of the preset's sweep and say nothing: the CLI refuses, naming the swept
    keys, unless each of them is set, which asks for that one job (issue 21)."""
    params = sweep_params(name)
    preset = [f"experiment={name}"]
    one_job = [*preset, *(f"{key}={values[0]}" for key, values in params.items())]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        with pytest.raises(ConfigError, match=rf"experiment={name} sweeps {re.escape(', '.join(params))}: add -m"):
            check_single_job(compose("config", overrides=preset, return_hydra_config=True).hydra, preset)
        check_single_job(compose("config", overrides=one_job, return_hydra_config=True).hydra, one_job)


def test_ym_presets_have_the_papers_rows() -> None:
    """YM Table 2's ZipIt! and Coreset AB rows, and YM Table 8's three rows, are run by the presets."""
    assert "zipit" in sweep_params("ym_table2")["method"]
    assert set(sweep_params("ym_table8")["method"]) == {"ste", "ste_coreset50", "zipit"}
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=["experiment=ym_table2"])
    assert cfg.references.coreset and cfg.references.joint


# Smoke runs cover every method of a preset on one setting; the sweep dimension we cut is named here (every one
# of its values is still composed and validated above). Budget: ~50 smoke runs for the whole `slow` set.
SMOKE_SUBSET = {
    # all 8 methods run in both np_table1 presets (VGG without BN, ResNet with BN); the bigger nets run 3 of them
    "np_table2": ["data=dirichlet", "method=direct,weight_matching,np_p"],
    "np_table3": ["method=direct,permute,np_wm"],  # ResNet18 on 64×64 ImageNet-200 files, top-1 and top-5
    "np_table4": ["merge_data.per_class=1"],  # the smallest merge set: 1 example per class
    # 8 models: pairwise NP (7 merges) vs all-to-one; CCA (minutes for 7 maps on a CPU) runs in the np_table* presets
    "np_fig1": ["data=dirichlet", "data.num_models=8", "method=np_p_pairwise,permute"],
    "ym_table2": ["method=weight_matching,ste_coreset"],  # all four scenarios (USPS and CIFAR readers included)
    "ym_table8": ["method=ste_coreset50,zipit"],  # STE on all the merge data runs in ym_table2/ym_table3
}


def run_preset(name: str, root: Path, cwd: Path) -> pd.DataFrame:
    args = ["-m", f"experiment={name}", "smoke=true", "seed=0", f"data.root={root}", *SMOKE_SUBSET.get(name, [])]
    proc = cli(args, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (cwd / "outputs" / "multirun").glob("*/*")
    csvs = sorted(sweep.glob("*/results.csv"))
    assert csvs, proc.stdout[-2000:]
    return pd.concat([pd.read_csv(c) for c in csvs])


@pytest.mark.parametrize("name", [pytest.param(e, marks=() if e in FAST else pytest.mark.slow) for e in EXPERIMENTS])
def test_preset_runs_with_smoke(name: str, fake_root: Path, tmp_path: Path) -> None:
    df = run_preset(name, fake_root, tmp_path)
    merged = df[df.model_role == "merged"]
    jobs = len(list(tmp_path.glob("outputs/multirun/*/*/*/results.csv")))
    assert merged["run_id"].nunique() == jobs and merged.value.notna().all()
    sweep = next((tmp_path / "outputs" / "multirun").glob("*/*"))
    paper = name if not name.startswith("np_table1") else "np_table1"
    assert report_main([str(sweep), "--paper", paper]) == 0
    table = pd.read_csv(sweep / "tables" / f"{paper}.csv", index_col=0)
    ours = [c for c in table.columns if not c.endswith((" paper", " Δ"))]
    assert (table[ours] != "—").any(axis=None), table  # our runs filled cells of the paper's layout
    if name == "ym_table2":  # the ste_coreset jobs merge on a coreset: the Coreset AB reference is trained there
        assert (table.loc["Coreset AB", ours] != "—").any(), table
    if name == "ym_table1":  # smoke keeps a 3-point interpolation curve per run
        assert {p.name for p in (sweep / "tables").glob("*.png")} == {"interpolation.png", "accuracy_vs_angle.png"}
