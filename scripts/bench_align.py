"""Alignment benchmark (CPU): weight matching wall time, passes and objective (Σ⟨W_A, π(W_B)⟩ over parameters)
for a random MLP 784-512³, ResNet20×4, ResNet20×8 and VGG11 over several model pairs, and the activation-statistics
pass over CIFAR-shaped inputs for ResNet20×4 as a ratio to plain eval passes of the same two models over the same
inputs (DESIGN §8: weight matching in seconds; statistics at most ~1.5× the forwards). Figures also go to
outputs/bench/bench_align.json.

    python scripts/bench_align.py [--seeds 3] [--inputs 400] [--batch-size 200] [--threads 1]

One thread by default: weight matching's figure is the single-thread one (as compared with PyPI `rebasin`), and
on a shared 2-core machine two threads per process ran several times slower than one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from mergebench.align.activations import activation_stats
from mergebench.align.weight_matching import parameters, weight_matching
from mergebench.bench_record import write_record
from mergebench.models import MODELS, ModelInput

CIFAR = ModelInput(channels=3, size=32, num_classes=10)
MNIST = ModelInput(channels=1, size=28, num_classes=10)
WM_CASES = {
    "mlp 784-512³": ("mlp", {}, MNIST),
    "resnet20×4": ("resnet20", {"width": 4}, CIFAR),
    "resnet20×8": ("resnet20", {"width": 8}, CIFAR),
    "vgg11": ("vgg11", {"width": 1}, CIFAR),
}


def build(arch: str, overrides: dict, data: ModelInput, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    entry = MODELS.get(arch)
    return entry.factory(entry.params(**overrides), data).eval()


def bench_weight_matching(arch: str, overrides: dict, data: ModelInput, pair: int) -> dict:
    """Align model B (seed 2·pair+1) onto model A (seed 2·pair), parameters scored: seconds, passes, objective."""
    model_a, model_b = build(arch, overrides, data, 2 * pair), build(arch, overrides, data, 2 * pair + 1)
    spec = model_a.permutation_spec()
    start = time.perf_counter()
    _, info = weight_matching(spec, parameters(model_a), parameters(model_b), seed=pair)
    return {"seconds": time.perf_counter() - start, "passes": info["passes"], "objective": info["objective"]}


@torch.no_grad()
def bench_statistics(inputs: int, batch_size: int) -> tuple[float, float]:
    """Seconds of plain eval forwards of A and B over the inputs, and of the statistics pass over the same inputs."""
    model_a, model_b = build("resnet20", {"width": 4}, CIFAR, 0), build("resnet20", {"width": 4}, CIFAR, 1)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(min(batch_size, inputs - i), 3, 32, 32, generator=gen), None) for i in range(0, inputs, batch_size)
    ]
    model_a(batches[0][0][:8])  # warm-up: first-call allocations are not part of either figure
    model_b(batches[0][0][:8])
    start = time.perf_counter()
    for x, _ in batches:
        model_a(x)
        model_b(x)
    plain = time.perf_counter() - start
    start = time.perf_counter()
    activation_stats(model_a.permutation_spec(), model_a, model_b, batches)
    return plain, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="model pairs per weight-matching case")
    parser.add_argument("--cases", nargs="*", default=list(WM_CASES), choices=list(WM_CASES))
    parser.add_argument("--inputs", type=int, default=400, help="CIFAR-shaped inputs for the statistics pass")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    console.print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads")
    figures = []

    table = Table(title=f"weight matching, random init, {args.seeds} pairs (B seed 2s+1 onto A seed 2s)")
    for col in ("model", "pair", "passes", "seconds", "objective (params)"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for label in args.cases:
        arch, overrides, data = WM_CASES[label]
        runs = [bench_weight_matching(arch, overrides, data, pair) for pair in range(args.seeds)]
        for pair, run in enumerate(runs):
            table.add_row(label, str(pair), str(run["passes"]), f"{run['seconds']:.2f}", f"{run['objective']:.2f}")
            common = {"case": label, "pair": pair}
            figures += [
                {"figure": "weight matching seconds", "value": run["seconds"], "unit": "s", **common},
                {"figure": "weight matching passes", "value": run["passes"], "unit": "passes", **common},
                {"figure": "weight matching objective", "value": run["objective"], "unit": "Σ⟨A,πB⟩", **common},
            ]
        median = statistics.median(r["seconds"] for r in runs)
        figures.append({"figure": "weight matching seconds, median", "value": median, "unit": "s", "case": label})
    console.print(table)

    plain, stats = bench_statistics(args.inputs, args.batch_size)
    table = Table(title=f"activation statistics, resnet20×4, {args.inputs} inputs 3×32×32, batch {args.batch_size}")
    for col in ("plain eval of A and B (s)", "statistics pass (s)", "ratio (target ≤ 1.5)"):
        table.add_column(col, justify="right")
    table.add_row(f"{plain:.1f}", f"{stats:.1f}", f"{stats / plain:.2f}×")
    console.print(table)
    common = {"case": "resnet20×4", "inputs": args.inputs, "batch_size": args.batch_size}
    figures += [
        {"figure": "plain eval of A and B seconds", "value": plain, "unit": "s", **common},
        {"figure": "activation statistics seconds", "value": stats, "unit": "s", **common},
        {"figure": "statistics / plain eval", "value": stats / plain, "unit": "×", "target": "≤ 1.5", **common},
    ]
    console.print(f"wrote {write_record('bench_align', figures)}")


if __name__ == "__main__":
    main()
