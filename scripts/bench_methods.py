"""Matching-time benchmark (CPU) of the newer methods: ZipIt!, OT fusion and C2M3 on a random-init ResNet20×4 pair,
as ratios to `permute`'s matching time on the same statistics (issue 11). One statistics pass of both models over
random CIFAR-shaped inputs is timed on its own and shared: permute (one LAP per group), OT with `cost=acts` (one
exact OT per group) and ZipIt! (the stacked K·n correlation built from the same sums, greedy zipping at the
reference α = 0.3, β = 0.125; its α/β search scores merges on data and is not matching) read it; OT with
`cost=weights` and C2M3 (K = 2, Frank–Wolfe, default iteration cap) need no data and are timed from the weights.
Figures also go to outputs/bench/methods.json.

    python scripts/bench_methods.py [--inputs 2000] [--batch-size 200] [--threads 1] [--c2m3-iters 200]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from mergebench.align.activations import stacked_moments
from mergebench.align.c2m3 import universe_matching
from mergebench.align.ot import ot_fusion
from mergebench.align.permute import correlation_matching
from mergebench.align.weight_matching import parameters
from mergebench.align.zipit import zip_features
from mergebench.bench_record import write_record
from mergebench.models import MODELS, ModelInput

CIFAR = ModelInput(channels=3, size=32, num_classes=10)
ZIPIT_ALPHA, ZIPIT_BETA = 0.3, 0.125  # the reference code's


def build(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    entry = MODELS.get("resnet20")
    return entry.factory(entry.params(width=4), CIFAR).eval()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=2000, help="random CIFAR-shaped inputs for the statistics")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--c2m3-iters", type=int, default=200, help="C2M3's Frank–Wolfe iteration cap")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=120)
    console.print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads")

    model_a, model_b = build(0), build(1)
    spec = model_a.permutation_spec()
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(min(args.batch_size, args.inputs - i), 3, 32, 32, generator=gen), None)
        for i in range(0, args.inputs, args.batch_size)
    ]
    stats_s, moments = timed(lambda: stacked_moments(spec, [model_a, model_b], batches))
    stats = {g: m.pair_stats() for g, m in moments.items()}
    permute_s, _ = timed(lambda: correlation_matching(stats))
    ot_acts_s, (_, ot_acts) = timed(lambda: ot_fusion(spec, parameters(model_a), parameters(model_b), stats=stats))
    zipit_s, zips = timed(lambda: [zip_features(m.correlation(), 2, ZIPIT_ALPHA, ZIPIT_BETA) for m in moments.values()])
    ot_weights_s, (_, ot_weights) = timed(lambda: ot_fusion(spec, parameters(model_a), parameters(model_b)))
    c2m3_s, (_, c2m3) = timed(
        lambda: universe_matching(spec, [parameters(model_a), parameters(model_b)], max_iter=args.c2m3_iters)
    )

    rows = [
        ("permute (LAP on correlations)", permute_s, "statistics", {}),
        ("zipit (α 0.3, β 0.125)", zipit_s, "statistics", {"within_model_merges": sum(z.within for z in zips)}),
        ("ot, cost=acts (emd)", ot_acts_s, "statistics", {"dense_groups": ot_acts["dense_groups"]}),
        ("ot, cost=weights (emd)", ot_weights_s, "weights", {"dense_groups": ot_weights["dense_groups"]}),
        ("c2m3 (K = 2, Frank–Wolfe)", c2m3_s, "weights", {"iterations": c2m3["iterations"]}),
    ]
    table = Table(title=f"matching time, resnet20×4 random init, statistics from {args.inputs} inputs 3×32×32")
    for col in ("method", "reads", "seconds", "× permute", "notes"):
        table.add_column(col, justify="left" if col in ("method", "reads", "notes") else "right")
    common = {"case": "resnet20×4", "inputs": args.inputs, "batch_size": args.batch_size}
    figures = [{"figure": "activation statistics seconds", "value": stats_s, "unit": "s", **common}]
    for label, seconds, reads, notes in rows:
        table.add_row(label, reads, f"{seconds:.3f}", f"{seconds / permute_s:.1f}×", str(notes or ""))
        figures += [
            {"figure": f"{label} matching seconds", "value": seconds, "unit": "s", **common, **notes},
            {"figure": f"{label} / permute", "value": seconds / permute_s, "unit": "×", **common},
        ]
    console.print(table)
    console.print(f"statistics pass (shared, not in the ratios): {stats_s:.1f} s")
    console.print(f"wrote {write_record('methods', figures)}")


if __name__ == "__main__":
    main()
