"""YM Table 2's Ensemble row under two combination rules, on the cached base models of a run (nothing is trained).

mergebench's ensemble averages the two models' logits; YM's code (`utils/training.py: test_ensembling`) averages the
models' outputs, which for its MLP are log-softmax values (`models/mlp.py` returns `log_softmax`), i.e. it averages
log-probabilities. Each model's log-softmax shifts its logits by a log-sum-exp that is the same for every class of an
example, so the two rules pick the same classes; averaging probabilities does not. This script rebuilds the run's base
models from the model cache and scores the three rules on the run's test set:

    python scripts/studies/ym_ensemble_rule.py --out docs/results/ym_table2/ensemble_rule.csv \\
        --job "experiment=ym_table2 scenario=mnist_rmnist90 seed=0 cache_dir=outputs/ym_final2/cache" [--job ...]

Each --job is the overrides of one CLI run (its base models must be in its cache_dir).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from mergebench.cache import ModelCache
from mergebench.cli import CONF_DIR
from mergebench.config import validate
from mergebench.data.loader import to_device
from mergebench.evaluate import predict
from mergebench.models import ModelInput
from mergebench.run import build_scenario, scenario_label
from mergebench.train import BaseModelRequest

RULES = {
    "logits (mergebench)": lambda a, b: (a + b) / 2,
    "log-softmax (YM's code)": lambda a, b: (F.log_softmax(a, 1) + F.log_softmax(b, 1)) / 2,
    "softmax": lambda a, b: (F.softmax(a, 1) + F.softmax(b, 1)) / 2,
}


def job_rows(overrides: list[str]) -> list[dict]:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = validate(compose("config", overrides=overrides))
    scenario = build_scenario(cfg)
    info = scenario.info
    augment = info.augment if cfg.dataset.augment is None else cfg.dataset.augment
    train, test = to_device(scenario.train, torch.device("cpu")), to_device(scenario.test, torch.device("cpu"))
    cache = ModelCache(cfg.cache_dir)
    logits = []
    for k, idx in enumerate(scenario.clients):
        request = BaseModelRequest(
            f"base {k}", train, idx, info, cfg.model.name, cfg.model.params, cfg.train, augment, cfg.seed + k
        )
        cached = cache.load(request.key())
        if cached is None:
            raise SystemExit(f"base {k} of {overrides} is not in {cfg.cache_dir}: run the job first")
        model = cfg.model.factory(cfg.model.params, ModelInput(info.channels, info.size, info.num_classes))
        model.load_state_dict(cached[0])
        logits.append(predict(model.eval(), test, torch.arange(len(test)), info, cfg.eval.batch_size))
    rows = []
    for rule, combine in RULES.items():
        for subset, idx in scenario.test_subsets.items():
            pred = combine(logits[0][idx], logits[1][idx]).argmax(1)
            top1 = (pred == test.y[idx]).float().mean().item() * 100
            rows.append(
                {"scenario": scenario_label(cfg), "seed": cfg.seed, "rule": rule, "subset": subset, "top1": top1}
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", action="append", required=True, help="one run's overrides, space-separated")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [row for job in args.job for row in job_rows(job.split())]
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    test = table[table.subset == "test"]
    summary = test.groupby(["scenario", "rule"], sort=False).top1.agg(["mean", "std", "count"]).round(2)
    print(summary.to_string())


if __name__ == "__main__":
    main()
