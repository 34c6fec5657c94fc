"""Tracing + verification benchmark (CPU): both run on every merge, so they must cost well under a second.

For a torchvision-style ResNet-18 (×1, 32×32 inputs) and the built-in ResNet20×16 (traced, not its hand-written
spec): the median wall time of `trace_spec` and of `verify_spec` on one batch of VERIFY_BATCH inputs, cropped as a
merge crops them (`verification_input`; four forwards: eval and train, original and permuted), after one warm-up
call (the first forward of a fresh process pays for kernel setup). ResNet20×16 has 74M parameters: each forward
reads 300 MB of weights whatever the batch, so its check is bound by memory bandwidth, not by the input size.
Then, for every architecture of tests/user_models.py at test widths, a table: groups found,
groups with a probe, function preserved (max |Δlogit| / max |logit| under a random permutation of the traced
spec), planted permutation recovered by weight matching, trace time. Figures go to outputs/bench/bench_trace.json.

    python scripts/bench_trace.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from mergebench.align.weight_matching import weight_matching
from mergebench.bench_record import write_record
from mergebench.models import MODELS, ModelInput
from mergebench.registry import to_dataclass
from mergebench.spec import Transform, apply_transforms, random_permutations
from mergebench.spec.trace import trace_spec
from mergebench.spec.verify import VERIFY_BATCH, verification_input, verify_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import user_models  # the repository's test architectures

CIFAR = ModelInput(channels=3, size=32, num_classes=10)


def resnet20x16() -> nn.Module:
    entry = MODELS.get("resnet20")
    return entry.factory(to_dataclass(entry.params, {"width": 16}, "model"), CIFAR)


TIMED: dict[str, Callable[[], nn.Module]] = {
    "resnet18-style ×1 (torchvision layout)": lambda: user_models.ResNet18Style(width=64),
    "resnet20×16": resnet20x16,
}
TABLE: dict[str, Callable[[], nn.Module]] = {
    "ResNet18Style": lambda: user_models.ResNet18Style(width=8),
    "MobileNetV2Style": lambda: user_models.MobileNetV2Style(width=8),
    "ConvNeXtStyle": lambda: user_models.ConvNeXtStyle(width=8, kernel=3),
    "MixerStyle": lambda: user_models.MixerStyle(width=8),
    "ViTStyle": lambda: user_models.ViTStyle(width=8),
    "VGGFlattenStyle": lambda: user_models.VGGFlattenStyle(width=8),
    "DenseNetStyle": lambda: user_models.DenseNetStyle(width=8),
}


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def warm_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x * 2 + 1)
    return model.eval()


def table_row(name: str, build: Callable[[], nn.Module]) -> dict:
    torch.manual_seed(0)
    x = torch.randn(VERIFY_BATCH, 3, 8, 8)
    model = warm_bn(build(), x)
    traced = trace_spec(model, x)
    spec, state = traced.spec, model.state_dict()
    check = verify_spec(model, spec, x, seed=1)
    plant = random_permutations(spec, state, seed=2)
    permuted = apply_transforms(state, spec, plant)
    perms, _ = weight_matching(spec, state, permuted, seed=0)
    back = apply_transforms(permuted, spec, {g: Transform.permutation(p) for g, p in perms.items()})
    return {
        "arch": name,
        "groups": len(spec.groups),
        "probed": len(spec.probes),
        "rel_diff": max(check.max_diff.values()) / check.scale,
        "wm_recovered": all(torch.equal(back[k], v) for k, v in state.items()),
        "trace_ms": 1000 * traced.seconds,
        "warnings": len(traced.warnings),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    figures = []
    timing = Table(title=f"trace + verify, CPU, {args.threads} thread(s), median of {args.repeats}")
    for column in ("model", "groups", "trace s", "verify s", "total s"):
        timing.add_column(column, justify="left" if column == "model" else "right")
    for name, build in TIMED.items():
        torch.manual_seed(0)
        x = torch.randn(VERIFY_BATCH, 3, 32, 32)
        model = build().eval()
        spec = trace_spec(model, x).spec
        trace_s = timed(lambda model=model, x=x: trace_spec(model, x), args.repeats)
        verify_s = timed(
            lambda model=model, spec=spec, x=x: verify_spec(model, spec, verification_input(model, x)), args.repeats
        )
        timing.add_row(name, str(len(spec.groups)), f"{trace_s:.3f}", f"{verify_s:.3f}", f"{trace_s + verify_s:.3f}")
        for figure, value in (("trace", trace_s), ("verify", verify_s), ("trace+verify", trace_s + verify_s)):
            figures.append({"figure": f"{figure} {name}", "value": value, "unit": "s", "batch": VERIFY_BATCH})
    console.print(timing)

    arch_table = Table(title="traced specs of tests/user_models.py (width 8, 8×8 inputs)")
    for column in ("architecture", "groups", "with probe", "max |Δlogit|/scale", "WM planted recovery", "trace ms"):
        arch_table.add_column(column, justify="left" if column == "architecture" else "right")
    for name, build in TABLE.items():
        row = table_row(name, build)
        arch_table.add_row(
            name,
            str(row["groups"]),
            str(row["probed"]),
            f"{row['rel_diff']:.1e}",
            "exact" if row["wm_recovered"] else "no",
            f"{row['trace_ms']:.0f}",
        )
        figures.append({"figure": f"trace {name} (width 8)", "value": row["trace_ms"] / 1000, "unit": "s", **row})
    console.print(arch_table)
    console.print(f"wrote {write_record('bench_trace', figures)}")


if __name__ == "__main__":
    main()
