"""YM Table 1 ablation: which part of the base-model recipe moves the weight-matching cells at 45° and 90°.

Each configuration is one factor changed from a reference recipe; its runs live under `ROOT/<name>_s<seed>/`
(one multirun per seed, made by the command printed with `--commands`). This script gathers their results.csv
rows into one CSV per configuration and a summary table (markdown and CSV):

    python scripts/studies/ym_table1_ablation.py ROOT --out docs/results/ym_table1_ablation
    python scripts/studies/ym_table1_ablation.py ROOT --commands    # the commands that make ROOT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from fnmatch import fnmatchcase
from pathlib import Path

import pandas as pd

from mergebench.report import load_rows

PAPER = {0.0: 98.49, 15.0: 97.53, 30.0: 94.69, 45.0: 89.68, 60.0: 80.33, 75.0: 74.19, 90.0: 70.86}  # YM Table 1, WM
SGD = "train.optimizer=sgd train.lr=0.1 train.momentum=0.9 train.weight_decay=0 train.schedule=constant"
UNIT = "data.dataset.normalize=unit"
# the old preset's recipe (conf/train/mlp.yaml: Adam 1e-3, mean/std inputs), on which the first rows change a factor
BASE = "experiment=ym_table1 train=mlp data.dataset.normalize=standard curve.points=0"
# the current preset (conf/train/mlp_ym.yaml: YM's recipe, 20 epochs), on which the `preset_*` rows change a factor
PRESET_BASE = "experiment=ym_table1 curve.points=0"


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    factor: str
    setting: str
    overrides: str
    angles: str = "45,90"
    base: str = BASE


CONFIGS = [
    Config("adam_std_e20", "optimiser + normalisation", "Adam 1e-3, mean/std (the old preset)", ""),
    Config("adam_unit_e20", "optimiser", "Adam 1e-3, x/255", UNIT),
    Config("sgdm_const_std_e20", "normalisation", "SGD m0.9 lr 0.1 constant, mean/std", SGD),
    Config(
        "sgdm_const_unit_e20",
        "reference",
        "SGD m0.9 lr 0.1 constant, x/255, bilinear, 20 ep (YM's code; the preset); weight matching of e72a88e",
        f"{SGD} {UNIT}",
        "45,60,90",
    ),
    Config("sgd_m0_const_unit_e20", "momentum", "SGD momentum 0", f"{SGD} train.momentum=0 {UNIT}"),
    Config(
        "sgdm_cos_unit_e20",
        "schedule",
        "SGD m0.9 warm-up 10 steps + cosine to 0 (Git Re-Basin's SGD)",
        f"{SGD} train.schedule=warmup_cosine train.warmup_epochs=0.0834 {UNIT}",
    ),
    Config("sgdm_const_unit_e5", "epochs", "5 epochs", f"{SGD} {UNIT} train.epochs=5", "45,60,90"),
    Config("sgdm_const_unit_e100", "epochs", "100 epochs (YM's length)", f"{SGD} {UNIT} train.epochs=100", "60"),
    Config(
        "sgdm_const_unit_nearest_e20",
        "rotation",
        "nearest instead of bilinear",
        f"{SGD} {UNIT} data.interpolation=nearest",
    ),
    Config(
        "sgdm_const_unit_wm5_e20",
        "weight matching",
        "5 random restarts, best objective kept (same base models as the reference)",
        f"{SGD} {UNIT} align.restarts=5",
    ),
    # current code (the rows above ran the weight matching of commit e72a88e: descent from the identity)
    Config(
        "std_sweep_e20",
        "normalisation (current code)",
        "SGD m0.9 lr 0.1 constant, mean/std inputs, current weight matching (align.start=sweep)",
        f"{SGD} data.dataset.normalize=standard",
        "45,60,75,90",
    ),
    Config(
        "wm_identity_e20",
        "weight-matching start (current code)",
        "align.start=identity: Git Re-Basin's and YM's descent (identity start, random group order, no sweep)",
        f"{SGD} {UNIT} align.start=identity",
        "0,15,30,45,60,75,90",
    ),
    Config(
        "shared_init_e20",
        "initialisation (current code)",
        "model B initialised and shuffled like model A (train.init_seed = seed, as YM's code: both seed 0)",
        f"{SGD} {UNIT} ++train.init_seed=$s",
        "45,60,75,90",
    ),
    Config(
        "shared_init_wm_identity_e20",
        "initialisation + start (current code)",
        "shared initialisation and align.start=identity (YM's code on both counts)",
        f"{SGD} {UNIT} ++train.init_seed=$s align.start=identity",
        "45,60,75,90",
    ),
    Config("e100_current", "epochs (current code)", "100 epochs (YM's length)", f"{SGD} {UNIT} train.epochs=100", "90"),
    Config(
        "e100_wm_identity",
        "epochs + start (current code)",
        "100 epochs and align.start=identity",
        f"{SGD} {UNIT} train.epochs=100 align.start=identity",
        "90",
    ),
    Config(
        "shared_init_e100",
        "initialisation + epochs (current code)",
        "shared initialisation, 100 epochs (YM's length)",
        f"{SGD} {UNIT} ++train.init_seed=$s train.epochs=100",
        "90,60",
    ),
    # one factor changed from the current preset (YM's recipe at 20 epochs, current weight matching)
    Config(
        "preset_m0_e20",
        "momentum (current code)",
        "SGD without momentum (YM App. C.8 names none; its code uses 0.9), otherwise the preset",
        "train.momentum=0",
        "45,60,90",
        PRESET_BASE,
    ),
    Config(
        "preset_cos_e20",
        "schedule (current code)",
        "warm-up 10 steps + cosine to 0 (Git Re-Basin's SGD) instead of constant, otherwise the preset",
        "train.schedule=warmup_cosine train.warmup_epochs=0.0834",
        "45,60,90",
        PRESET_BASE,
    ),
    Config(
        "preset_adam_unit_e20",
        "optimiser (current code)",
        "Adam 1e-3 (Git Re-Basin's other recipe) on x/255 inputs, otherwise the preset",
        "train.optimizer=adam train.lr=0.001",
        "45,60,90",
        PRESET_BASE,
    ),
    Config(
        "preset_e100",
        "epochs (current code)",
        "100 epochs (YM's length) instead of 20, otherwise the preset",
        "train.epochs=100",
        "60,75,90",
        PRESET_BASE,
    ),
]
# the current preset's YM Table 1 runs (--preset DIR): weight matching with align.start=sweep, the default
PRESET = Config(
    "preset_sweep_e20",
    "weight-matching start (current code)",
    "align.start=sweep (the default: input-to-output sweep, then descent); the YM Table 1 runs of the preset",
    "",
    "0,15,30,45,60,75,90",
)
COLUMNS = ["config", "scenario", "seed", "method_label", "model_role", "metric", "subset", "value", "wall_s"]


def command(config: Config) -> str:
    """The configuration's base then its overrides, each key once (the last value wins, as on Hydra's command line)."""
    pairs = dict(item.split("=", 1) for item in f"{config.base} data.angle={config.angles} {config.overrides}".split())
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def angle_of(scenario: str) -> float:
    match = re.search(r"angle=([-0-9.]+)", scenario)
    return float(match.group(1)) if match else float("nan")


def config_rows(rows: pd.DataFrame, root: Path, config: Config) -> pd.DataFrame | None:
    """The rows of the configuration's jobs (`ROOT/<name>_s<seed>/<job>/`) among the report's rows under ROOT."""
    if not rows.empty:
        jobs = {job: Path(job).relative_to(root).parts for job in rows.job.unique()}
        ours = [job for job, parts in jobs.items() if len(parts) == 2 and fnmatchcase(parts[0], f"{config.name}_s*")]
        rows = rows[rows.job.isin(ours)]
    return None if rows.empty else rows.assign(config=config.name)


def gather(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows[rows.metric.isin(["top1", "loss"]) & rows.subset.isin(["test", "client_0", "client_1"])]
    return rows[COLUMNS].sort_values(["scenario", "seed", "model_role", "metric", "subset"], kind="stable")


def wm_diagnostics(rows: pd.DataFrame) -> pd.DataFrame:
    """Weight matching's objective, passes and winning restart per (angle, seed), from the merged rows."""
    merged = rows[(rows.model_role == "merged") & rows.diagnostics.notna()].drop_duplicates(["scenario", "seed"])
    out = []
    for r in merged.itertuples():
        diag = json.loads(r.diagnostics)
        history = diag.get("align_history") or [None]
        out.append(
            {
                "config": r.config,
                "angle": angle_of(r.scenario),
                "seed": r.seed,
                "wm_objective": diag.get("align_objective"),
                "wm_objective_at_start": history[0],  # the identity; a random permutation for restart > 0
                "wm_passes": diag.get("align_passes"),
                "wm_restart": diag.get("align_restart"),
            }
        )
    return pd.DataFrame(out)


def cell(values: pd.Series) -> str:
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std():.2f} (n={len(values)})"


def summary(config: Config, rows: pd.DataFrame) -> dict[str, str]:
    test = rows[rows.subset == "test"].assign(angle=lambda d: d.scenario.map(angle_of))
    out = {"factor": config.factor, "setting": config.setting, "config": config.name}
    for angle, paper in PAPER.items():
        at = test[(test.angle == angle) & (test.metric == "top1")]
        wm = at[at.model_role == "merged"].value
        out[f"WM {angle:g}°"] = cell(wm) if len(wm) else "—"
        out[f"Δ {angle:g}°"] = f"{wm.mean() - paper:+.2f}" if len(wm) else "—"
        for role, name in (("base_0", "A"), ("base_1", "B")):
            v = at[at.model_role == role].value
            out[f"{name} {angle:g}°"] = f"{v.mean():.2f}" if len(v) else "—"
    out["seeds"] = ",".join(str(s) for s in sorted(rows.seed.unique()))
    return out


def markdown(table: pd.DataFrame, bases: bool = True) -> str:
    """The summary as a markdown table, with a column group for each angle some configuration ran (the merged model
    and its Δ, and with `bases` the two base models)."""
    angles = [a for a in PAPER if (table.get(f"WM {a:g}°", pd.Series(dtype=str)) != "—").any()]
    cols = ["factor", "setting"]
    for a in angles:
        cols += [f"WM {a:g}°", f"Δ {a:g}°"] + ([f"A {a:g}°", f"B {a:g}°"] if bases else [])
    cols.append("seeds")
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for _, r in table.iterrows()]
    return "\n".join(lines) + "\n"


def diagnostics_markdown(diag: pd.DataFrame) -> str:
    """Weight matching's final objective and passes, mean over seeds, one row per configuration, a column per angle."""
    stats = diag.groupby(["config", "angle"]).agg(
        objective=("wm_objective", "mean"), passes=("wm_passes", "mean"), n=("seed", "count")
    )
    angles = sorted(diag.angle.unique())
    cols = ["config"] + [f"{a:g}°" for a in angles]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for config in dict.fromkeys(diag.config):
        cells = []
        for a in angles:
            if (config, a) in stats.index:
                r = stats.loc[(config, a)]
                cells.append(f"{r.objective:.2f} / {r.passes:.1f} (n={int(r.n)})")
            else:
                cells.append("—")
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "objective / passes, mean over seeds\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder holding <config>_s<seed>/ multiruns")
    parser.add_argument("--out", type=Path, help="where to write the CSVs and ablation.md")
    parser.add_argument("--commands", action="store_true", help="print the command of every configuration")
    parser.add_argument("--preset", type=Path, help="the current preset's YM Table 1 multirun (align.start=sweep)")
    args = parser.parse_args()
    if args.commands:
        for c in CONFIGS:
            print(f"mergebench -m {command(c)} seed=$s hydra.sweep.dir={args.root}/{c.name}_s$s")
        return
    if args.out is None:
        parser.error("--out is required unless --commands")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, diagnostics = [], []
    ablation, _ = load_rows(args.root)
    configs = [(c, config_rows(ablation, args.root, c)) for c in CONFIGS]
    if args.preset is not None:  # every row of the preset's multirun
        preset, _ = load_rows(args.preset)
        configs.append((PRESET, None if preset.empty else preset.assign(config=PRESET.name)))
    for config, runs in configs:
        if runs is None:
            continue
        diagnostics.append(wm_diagnostics(runs))
        found = gather(runs)
        found.to_csv(args.out / f"{config.name}.csv", index=False)
        if found.seed.nunique() > 1:  # the one-factor rows are seed 0: show this configuration's seed 0 beside them
            seed0 = dataclasses.replace(config, setting=f"{config.setting}, seed 0 only")
            rows.append(summary(seed0, found[found.seed == 0]))
        rows.append(summary(config, found))
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "ablation.csv", index=False)
    diag = pd.concat(diagnostics, ignore_index=True).sort_values(["config", "angle", "seed"], kind="stable")
    diag.to_csv(args.out / "wm_diagnostics.csv", index=False)
    (args.out / "wm_diagnostics.md").write_text(diagnostics_markdown(diag))
    (args.out / "ablation.md").write_text(markdown(table))
    (args.out / "ablation_compact.md").write_text(markdown(table, bases=False))
    print(markdown(table, bases=False))


if __name__ == "__main__":
    main()
