"""Alignment benchmark (CPU): weight matching wall time and passes for ResNet20×8 and VGG11 (random init), and the
activation-statistics pass over CIFAR-shaped inputs for ResNet20×4 as a ratio to plain eval passes of the same two
models over the same inputs (DESIGN §8: weight matching in seconds; statistics at most ~1.5× the forwards).

    python scripts/bench_align.py [--inputs 10000] [--batch-size 500] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from mergebench.align.activations import activation_stats
from mergebench.align.weight_matching import weight_matching
from mergebench.models import MODELS, ModelInput
from mergebench.registry import to_dataclass

CIFAR = ModelInput(channels=3, size=32, num_classes=10)


def build(arch: str, width: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    entry = MODELS.get(arch)
    return entry.factory(to_dataclass(entry.params, {"width": width}, "model"), CIFAR).eval()


def bench_weight_matching(arch: str, width: float) -> tuple[float, int, int]:
    """Seconds and passes to align model B (seed 1) onto model A (seed 0), and the number of groups."""
    model_a, model_b = build(arch, width, 0), build(arch, width, 1)
    spec = model_a.permutation_spec()
    start = time.perf_counter()
    _, info = weight_matching(spec, model_a.state_dict(), model_b.state_dict(), seed=0)
    return time.perf_counter() - start, info["passes"], len(spec.groups)


@torch.no_grad()
def bench_statistics(inputs: int, batch_size: int) -> tuple[float, float]:
    """Seconds of plain eval forwards of A and B over the inputs, and of the statistics pass over the same inputs."""
    model_a, model_b = build("resnet20", 4, 0), build("resnet20", 4, 1)
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
    parser.add_argument("--inputs", type=int, default=10_000, help="CIFAR-shaped inputs for the statistics pass")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    console.print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads")

    table = Table(title="weight matching (random init, model B seed 1 onto model A seed 0, order seed 0)")
    for col in ("model", "groups", "passes", "seconds"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for arch, width in (("resnet20", 8), ("vgg11", 1)):
        seconds, passes, groups = bench_weight_matching(arch, width)
        table.add_row(f"{arch}×{width:g}", str(groups), str(passes), f"{seconds:.2f}")
    console.print(table)

    plain, stats = bench_statistics(args.inputs, args.batch_size)
    table = Table(title=f"activation statistics, resnet20×4, {args.inputs} inputs 3×32×32, batch {args.batch_size}")
    for col in ("plain eval of A and B (s)", "statistics pass (s)", "ratio (target ≤ 1.5)"):
        table.add_column(col, justify="right")
    table.add_row(f"{plain:.1f}", f"{stats:.1f}", f"{stats / plain:.2f}×")
    console.print(table)


if __name__ == "__main__":
    main()
