"""The `mergebench` command: check the overrides, compose with Hydra, run the pipeline, print the table."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, NoReturn

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.markup import escape

from mergebench.cache import content_key
from mergebench.config import RunConfig, TrainConfig, suggest, validate
from mergebench.data.datasets import DATASETS, check_available
from mergebench.errors import ConfigError
from mergebench.interrupts import INTERRUPTED, JobInterrupted
from mergebench.models import MODELS
from mergebench.progress import console
from mergebench.results import run_table
from mergebench.run import Loaded, build_scenario, run

# a wheel ships conf/ inside the package; a source checkout (editable install) reads the repository's conf/
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else Path(__file__).resolve().parents[2] / "conf"
# output folders carry the process id: two runs started in the same second never share a folder
OmegaConf.register_new_resolver("pid", os.getpid, replace=True, use_cache=True)  # cached: SLURM jobs keep it
# conf/hydra/launcher/*.yaml document the launcher plugins' options under the plugins' own names, so Hydra checks
# them against the plugins' schemas (what we want) and warns that this matching is deprecated: not the user's concern.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/.*validated against ConfigStore schema")


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object) -> str:
    """Warnings (a traced op left unpermuted, the zoo's import shim) as one line, not Python's source excerpt."""
    return f"warning: {message}\n"


warnings.formatwarning = _one_line_warning
# flags after which Hydra prints help or config instead of running: nothing to check
PASSTHROUGH_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion"}
CONFIG_FLAGS = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir"}

err_console = Console(stderr=True)


# commands a launcher runs, by its class, and where they are: without them it fails after Hydra started, at length
LAUNCHER_COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher": (
        ("sbatch", "srun"),
        "run the sweep on a SLURM login node, or try it here with hydra/launcher=submitit_local",
    ),
}


def override_variants(args: list[str]) -> tuple[list[list[str]], list[str]]:
    """Every job of the sweep (the product of its sweep values), and the overrides that sweep: composing is cheap,
    so each job's config is checked before the first one runs. An override that does not parse is named with how
    to quote it."""
    parser = OverridesParser.create()
    for arg in args:
        try:
            parser.parse_overrides([arg])
        except HydraException as err:
            raise ConfigError(_parse_message(arg, err)) from None
    fixed, sweeps, swept = [], [], []
    for o in parser.parse_overrides(args):
        if o.is_sweep_override():
            sweeps.append([f"{o.input_line.split('=', 1)[0]}={v}" for v in o.sweep_string_iterator()])
            swept.append(o.input_line)
        else:
            fixed.append(o.input_line)
    return [fixed + list(choice) for choice in itertools.product(*sweeps)], swept


def _parse_message(arg: str, err: Exception) -> str:
    key, _, value = arg.partition("=")
    if value.endswith(","):
        return f"cannot parse the override {arg!r}: a sweep ends with a comma; list values as {key}=a,b"
    return (
        f"cannot parse the override {arg!r} ({str(err).splitlines()[0].strip()}); quote a value with spaces or "
        f"special characters inside the override, e.g. '{key}=\"{value}\"'"
    )


# datasets read in this process, shared by the check of every job and the jobs that the basic launcher runs here
LOADED: Loaded = {}


def register_default_recipes() -> None:
    """`train: ${model}` in config.yaml picks conf/train/<model>.yaml; a model without one (a new architecture)
    trains with TrainConfig's defaults (DESIGN §6's recipe), stored under its name so that Hydra finds it. Run at
    import, so Hydra's launchers find the recipes in their job processes too."""
    store = ConfigStore.instance()
    for name in MODELS.names():
        if not (CONF_DIR / "train" / f"{name}.yaml").exists():
            store.store(group="train", name=name, node=TrainConfig)


register_default_recipes()


def check_overrides(args: list[str], multirun: bool = False) -> None:
    """Compose and validate every job before Hydra launches anything; raise a one-line ConfigError."""
    variants, swept = override_variants(args)
    if swept and not multirun:
        raise ConfigError(f"{swept[0]} lists several values: add -m to run one job per value")
    loaded = LOADED
    scenarios: set[str] = set()
    for overrides in variants:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            check_groups(overrides)
            try:
                cfg = compose("config", overrides=overrides, return_hydra_config=True)
            except (HydraException, OmegaConfBaseException) as err:
                raise ConfigError(_compose_message(err, overrides)) from None
            output = Path(str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir))
        if multirun:
            check_launcher(cfg.hydra)
        else:
            check_single_job(cfg.hydra, overrides)
        with open_dict(cfg):
            del cfg["hydra"]
        run_cfg = validate(cfg)
        check_device(run_cfg.device)
        check_writable("cache_dir", run_cfg.cache_dir)
        check_writable("hydra.run.dir", output)
        check_data(run_cfg)
        data_key = content_key({k: run_cfg.raw.get(k) for k in ("data", "seed", "cache_dir")})
        if data_key not in scenarios:  # each distinct split is built once: empty clients, bad class lists
            scenarios.add(data_key)
            build_scenario(run_cfg, loaded)
    GlobalHydra.instance().clear()


def check_groups(overrides: list[str]) -> None:
    """Each `group=option` names an option on Hydra's search path: conf/, Hydra's own (hydra/launcher=basic) and
    its plugins'. Called where Hydra is initialised."""
    loader = GlobalHydra.instance().config_loader()
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        group = key.split("@")[0]
        options = loader.get_group_options(group) if "." not in group else []  # [] for a plain key: seed=1
        if options and value not in options and value != "null":
            raise ConfigError(f"{group}={value!r} is not known; {suggest(value, options)}")


def check_launcher(hydra_cfg: DictConfig) -> None:
    """The commands the sweep's launcher submits through are on PATH (sbatch and srun for SLURM)."""
    commands, advice = LAUNCHER_COMMANDS.get(hydra_cfg.launcher._target_, ((), ""))
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        choice = hydra_cfg.runtime.choices.get("hydra/launcher")
        raise ConfigError(
            f"hydra/launcher={choice} submits through {', '.join(commands)}; not found on PATH: {', '.join(missing)} "
            f"({advice})"
        )


def check_single_job(hydra_cfg: DictConfig, overrides: list[str]) -> None:
    """Without -m, Hydra runs one job of a preset that sweeps keys (hydra.sweeper.params) and says nothing: refuse,
    unless each swept key is set on the command line, which asks for that one job."""
    swept = [str(key) for key in hydra_cfg.sweeper.params or {}]
    given = {item.lstrip("+~").partition("=")[0] for item in overrides}
    unset = [key for key in swept if key.lstrip("+~") not in given]
    if unset:
        preset = hydra_cfg.runtime.choices.get("experiment")
        source = f"experiment={preset}" if preset else "the config"
        raise ConfigError(
            f"{source} sweeps {', '.join(swept)}: add -m to run its jobs, or set {', '.join(unset)} to run one job"
        )


def check_device(name: str) -> None:
    """A device this machine has: asking for CUDA without it fails here, not in the first tensor op."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r}: CUDA is not available on this machine; allowed here: auto, cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps': MPS is not available on this machine; allowed here: auto, cpu")


def check_writable(key: str, folder: Path) -> None:
    """The folder (or its nearest existing ancestor) takes a new file: a read-only or misplaced folder is one line
    here, not a traceback after training."""
    folder = folder.resolve()
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}={folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"{key}={folder}: cannot write in {existing} ({err.strerror or err})") from None


def check_data(run_cfg: RunConfig) -> None:
    """Every dataset the run reads is on disk (or fetchable): fail here, before Hydra launches any job."""
    hook = getattr(run_cfg.split.params, "datasets_read", None)
    more = hook() if hook is not None else {}  # the split's own keys naming datasets, e.g. cross_dataset's
    for key, names in more.items():
        for name in names:
            if name not in DATASETS.names():
                raise ConfigError(f"data.{key}={name!r} is not known; {suggest(name, DATASETS.names())}")
    for name in [run_cfg.dataset.name, *(n for names in more.values() for n in names)]:
        check_available(name, run_cfg.data.root, run_cfg.data.download)


def _compose_message(err: Exception, overrides: list[str]) -> str:
    text = f"{err}\n{err.__cause__ or ''}"
    head = text.strip().splitlines()[0]
    if "Could not override" in head and "not in struct" in text:
        return _unknown_key(head.split("'")[1], overrides)
    return head


def _unknown_key(key: str, overrides: list[str]) -> str:
    """Name the keys that the config has where `key` is missing, the closest first (a typo). Called where Hydra
    is initialised: composes the config without that override."""
    others = [item for item in overrides if item.lstrip("+~").partition("=")[0] != key]
    try:
        node: Any = compose("config", overrides=others)
    except (HydraException, OmegaConfBaseException):
        return f"{key} is not a known key"
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            break
        if part not in node:
            template = ".".join([*parts[:depth], "{}", *parts[depth + 1 :]])
            return f"{key} is not a known key; {suggest(part, sorted(str(k) for k in node), template)}"
        node = node[part]
    return f"{key} is not a known key"


def _task(cfg: DictConfig) -> None:
    try:
        run_cfg = validate(cfg)
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        df = run(run_cfg, out_dir, LOADED)
    except ConfigError as err:
        _fail(str(err), 2)
    title = f"{run_cfg.name}: {run_cfg.dataset.name} {run_cfg.split.name} {run_cfg.model.name}"
    console.print(run_table(df, title))
    console.print(f"results: {out_dir / 'results.csv'}", highlight=False)


def _fail(message: str, code: int) -> NoReturn:
    prefix = "[bold red]error:[/] " if code == 2 else ""
    err_console.print(f"{prefix}{escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """Ctrl-C anywhere (the check, Hydra's launch, between or inside jobs) is one line and exit 130."""
    try:
        _main(sys.argv[1:])
    except (KeyboardInterrupt, JobInterrupted):  # joblib hands over its worker's, which may come first
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not interrupt the goodbye
        _fail(INTERRUPTED, 130)


def _main(args: list[str]) -> None:
    flags = {a.split("=")[0] for a in args if a.startswith("-")}
    if not flags & (PASSTHROUGH_FLAGS | CONFIG_FLAGS):
        overrides = [a for a in args if not a.startswith("-")]
        try:
            check_overrides(overrides, multirun=bool(flags & {"-m", "--multirun"}))
        except ConfigError as err:
            _fail(str(err), 2)
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()
