"""The `mergebench` command: check the overrides, compose with Hydra, run the pipeline, print the table."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import hydra
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.markup import escape

from mergebench.cache import atomic_write_text, content_key
from mergebench.config import RunConfig, validate
from mergebench.data.datasets import DATASETS, check_available
from mergebench.errors import ConfigError
from mergebench.progress import console
from mergebench.results import run_table
from mergebench.run import run

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# conf/hydra/launcher/*.yaml document the launcher plugins' options under the plugins' own names, so Hydra checks
# them against the plugins' schemas (what we want) and warns that this matching is deprecated: not the user's concern.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/.*validated against ConfigStore schema")
# flags after which Hydra prints help or config instead of running: nothing to check
PASSTHROUGH_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion"}
CONFIG_FLAGS = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir"}

err_console = Console(stderr=True)


def group_options(group: str) -> list[str] | None:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else None


def override_variants(args: list[str]) -> list[list[str]]:
    """Every sweep value once, with the first value of every other sweep: enough to check each choice."""
    parsed = OverridesParser.create().parse_overrides(args)
    fixed, sweeps = [], []
    for o in parsed:
        if o.key_or_group.startswith("hydra"):
            continue
        if o.is_sweep_override():
            sweeps.append([f"{o.input_line.split('=', 1)[0]}={v}" for v in o.sweep_string_iterator()])
        else:
            fixed.append(o.input_line)
    if not sweeps:
        return [fixed]
    firsts = [s[0] for s in sweeps]
    variants = [fixed + firsts]
    for i, values in enumerate(sweeps):
        variants += [fixed + firsts[:i] + [v] + firsts[i + 1 :] for v in values[1:]]
    return variants


def check_overrides(args: list[str]) -> None:
    """Compose and validate every distinct choice before Hydra launches anything; raise a one-line ConfigError."""
    try:
        variants = override_variants(args)
    except HydraException as err:
        raise ConfigError(f"cannot parse the overrides: {str(err).splitlines()[0]}") from None
    for overrides in variants:
        for item in overrides:
            key, _, value = item.lstrip("+~").partition("=")
            group = key.split("@")[0]
            options = group_options(group) if "." not in group else None
            if options is not None and value not in options and value != "null":
                raise ConfigError(f"{group}={value!r} is not known; allowed: {', '.join(options)}")
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            try:
                cfg = compose("config", overrides=overrides)
            except (HydraException, OmegaConfBaseException) as err:
                raise ConfigError(_compose_message(err)) from None
        check_data(validate(cfg))
    GlobalHydra.instance().clear()


def check_data(run_cfg: RunConfig) -> None:
    """Every dataset the run reads is on disk (or fetchable): fail here, before Hydra launches any job."""
    others = getattr(run_cfg.split.params, "others", None) or []
    for name in others:
        if name not in DATASETS.names():
            raise ConfigError(f"data.others={name!r} is not known; allowed: {', '.join(DATASETS.names())}")
    for name in [run_cfg.dataset.name, *others]:
        check_available(name, run_cfg.data.root, run_cfg.data.download)


def _compose_message(err: Exception) -> str:
    text = f"{err}\n{err.__cause__ or ''}"
    head = text.strip().splitlines()[0]
    if "Could not override" in head and "not in struct" in text:
        key = head.split("'")[1]
        return f"{key} is not a known key (a typo? new keys need +{key}=...; see conf/ for the known ones)"
    return head


def run_or_resume(run_cfg: RunConfig, out_dir: Path) -> pd.DataFrame:
    """Run, unless a run with the same resolved config finished before: then reuse its rows (a cache hit: repeated
    commands and resumed sweeps train and merge nothing)."""
    finished = run_cfg.cache_dir / "results" / f"{content_key(run_cfg.raw)}.csv"
    if finished.exists():
        console.log(f"cache hit: run finished before: reusing its rows ({finished})", highlight=False)
        text = finished.read_text()
        atomic_write_text(out_dir / "results.csv", text)
        return pd.read_csv(out_dir / "results.csv")
    df = run(run_cfg, out_dir)
    atomic_write_text(finished, (out_dir / "results.csv").read_text())
    return df


def _task(cfg: DictConfig) -> None:
    try:
        run_cfg = validate(cfg)
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        df = run_or_resume(run_cfg, out_dir)
    except ConfigError as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    title = f"{run_cfg.name}: {run_cfg.dataset.name} {run_cfg.data.split} {run_cfg.model.name}"
    console.print(run_table(df, title))
    console.print(f"results: {out_dir / 'results.csv'}", highlight=False)


def main() -> None:
    args = sys.argv[1:]
    flags = {a.split("=")[0] for a in args if a.startswith("-")}
    if not flags & (PASSTHROUGH_FLAGS | CONFIG_FLAGS):
        overrides = [a for a in args if not a.startswith("-")]
        try:
            check_overrides(overrides)
        except ConfigError as err:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            sys.exit(2)
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()
