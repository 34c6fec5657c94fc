"""`make bench`: the cost of one NP Merge epoch against one fine-tuning epoch of the same model on the same data
(DESIGN §8: at most ~1.15×), and the peak memory of each, for ResNet20×4 and VGG11 on CPU; then the memory of
joint K-model NP Merge against pairwise merging.

Both epochs run the loop the aggregators run (`merge.loop.adam_epochs`): NP optimises α_pre through
`functional_call` with the blend recomputed per step, fine-tuning optimises the weights. Timings alternate
NP/fine-tune for `--repeats` rounds and report the median ratio, so they hold on a noisy machine. Peak memory is
the process's peak resident set (VmHWM in /proc/self/status) above its level before the epoch, with the peak
reset through /proc/self/clear_refs and glibc's mmap threshold pinned so freed tensors go back to the OS. Besides
the wall-time ratio the script prints the process-CPU-time ratio, which other jobs on a shared machine disturb less.
With `--device cuda` (scripts/gpu_check.sh) the data and models live on the GPU, each timing ends with a
synchronize, and peak memory is the CUDA allocator's peak above its level before the epoch. Figures also go to
outputs/bench/<--record>.json (default bench_merge).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.table import Table
from torch import nn

from mergebench.bench_record import write_record
from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.data.loader import Batches
from mergebench.merging.loop import adam_epochs, learn_blend
from mergebench.merging.np_merge import ParameterBlend
from mergebench.models import MODELS, ModelInput
from mergebench.progress import console

ARCHS = {"resnet20×4": ("resnet20", {"width": 4}), "vgg11": ("vgg11", {"width": 1})}
INFO = DatasetInfo("bench", 10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False)
STATUS = Path("/proc/self/status")


def pin_malloc() -> None:
    """Make large frees return memory to the OS, so each measurement starts from what is really held."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: fixed, no dynamic growth
    except OSError:
        pass


def rss_mb(field: str) -> float:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(run: Callable[[], None], device: torch.device) -> tuple[float, float, float]:
    """Wall seconds of `run`, its process CPU seconds (what other jobs on a shared machine disturb least), and its
    peak memory above the starting level in MB: resident set on CPU (nan off Linux), the allocator's on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        start, cpu = time.perf_counter(), time.process_time()
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 - before
        return time.perf_counter() - start, time.process_time() - cpu, peak
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = rss_mb("VmRSS")
    except OSError:
        before = float("nan")
    start, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - start, time.process_time() - cpu, rss_mb("VmHWM") - before


def build(arch: str, overrides: dict, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    entry = MODELS.get(arch)
    return entry.factory(entry.params(**overrides), ModelInput(3, 32, 10)).to(device)


def np_epoch(models: list[nn.Module], batches: Batches) -> Callable[[], None]:
    net = copy.deepcopy(models[0])  # NP Merge's own network (aggregate_np builds one), built before the clock starts

    def run() -> None:
        sources = [dict(m.named_parameters()) for m in models]
        blend = ParameterBlend(sources, list(sources[0]))
        learn_blend(net, blend.params, blend.logits.values(), batches, lr=0.01, epochs=1, label="NP epoch")
        del blend

    return run


def finetune_epoch(model: nn.Module, batches: Batches) -> Callable[[], None]:
    def run() -> None:
        net = model.requires_grad_(True).train()
        adam_epochs(net, net.parameters(), batches, lr=1e-4, epochs=1, label="fine-tune epoch")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # small defaults keep `make bench` within minutes on a 2-core machine. The blend costs per step and the
    # forward per image, so batches of 128 make the ratio if anything pessimistic against the recipes' 500
    # (--samples 1000 --batch-size 500 for those)
    parser.add_argument("--samples", type=int, default=256, help="merge-data size (random CIFAR-shaped images)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--archs", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU check")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the joint-vs-pairwise memory table")
    parser.add_argument("--record", default="bench_merge", help="JSON record name under outputs/bench/")
    args = parser.parse_args()
    device = torch.device(args.device)
    pin_malloc()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    data = ImageData(
        torch.randint(0, 256, (args.samples, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device),
        torch.randint(0, 10, (args.samples,), generator=gen).to(device),
    )
    batches = Batches(data, torch.arange(args.samples), INFO, args.batch_size, shuffle=True)
    one_batch = Batches(data, torch.arange(min(args.batch_size, args.samples)), INFO, args.batch_size)

    where = f"CPU ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
    table = Table(title=f"NP epoch vs fine-tune epoch, {where}, {args.samples} images")
    figures = []
    columns = ("model", "params", "NP s", "FT s", "NP/FT wall", "NP/FT CPU", "target", "NP peak MB", "FT peak MB")
    for col in columns:
        table.add_column(col, justify="right")
    for label in args.archs:
        arch, overrides = ARCHS[label]
        a, b, ft = (build(arch, overrides, seed, device) for seed in range(3))
        np_epoch([a, b], one_batch)(), finetune_epoch(ft, one_batch)()  # warm-up: allocator, kernels
        np_runs, ft_runs = [], []
        for _ in range(args.repeats):  # alternate, so drifts in machine load hit both alike
            np_runs.append(measure(np_epoch([a, b], batches), device))
            ft_runs.append(measure(finetune_epoch(ft, batches), device))
        ratio = statistics.median(n[0] / f[0] for n, f in zip(np_runs, ft_runs))
        cpu_ratio = statistics.median(n[1] / f[1] for n, f in zip(np_runs, ft_runs))
        console.log(
            f"{label} NP/FT wall ratios per repeat: "
            + ", ".join(f"{n[0] / f[0]:.3f}" for n, f in zip(np_runs, ft_runs))
        )
        table.add_row(
            label,
            f"{sum(p.numel() for p in a.parameters()) / 1e6:.2f}M",
            f"{statistics.median(r[0] for r in np_runs):.2f}",
            f"{statistics.median(r[0] for r in ft_runs):.2f}",
            f"{ratio:.3f}",
            f"{cpu_ratio:.3f}",
            "≤ 1.15" + (" ✓" if ratio <= 1.15 else " ✗"),
            f"{max(r[2] for r in np_runs):.0f}",
            f"{max(r[2] for r in ft_runs):.0f}",
        )
        common = {"case": label, "samples": args.samples, "device": str(device)}
        figures += [
            {"figure": "NP epoch seconds", "value": statistics.median(r[0] for r in np_runs), "unit": "s", **common},
            {
                "figure": "fine-tune epoch seconds",
                "value": statistics.median(r[0] for r in ft_runs),
                "unit": "s",
                **common,
            },
            {"figure": "NP/FT epoch wall ratio", "value": ratio, "unit": "×", "target": "≤ 1.15", **common},
            {"figure": "NP/FT epoch CPU ratio", "value": cpu_ratio, "unit": "×", **common},
            {"figure": "NP epoch peak memory", "value": max(r[2] for r in np_runs), "unit": "MB", **common},
            {"figure": "fine-tune epoch peak memory", "value": max(r[2] for r in ft_runs), "unit": "MB", **common},
        ]
    console.print(table)
    if args.skip_memory:
        console.print(f"wrote {write_record(args.record, figures)}")
        return

    mem = Table(title="NP Merge peak memory, one step: 4 models jointly (softmax weights) vs one pairwise merge")
    for col in ("model", "joint K=4 MB", "pairwise (2 models) MB"):
        mem.add_column(col, justify="right")
    for label in args.archs:
        arch, overrides = ARCHS[label]
        four = [build(arch, overrides, s, device) for s in range(4)]
        joint, pair = measure(np_epoch(four, one_batch), device)[2], measure(np_epoch(four[:2], one_batch), device)[2]
        mem.add_row(label, f"{joint:.0f}", f"{pair:.0f}")
        figures += [
            {"figure": "NP step peak memory, joint K=4", "value": joint, "unit": "MB", "case": label},
            {"figure": "NP step peak memory, pairwise", "value": pair, "unit": "MB", "case": label},
        ]
    console.print(mem)
    peak = (
        "the CUDA allocator's peak above its level before the run"
        if device.type == "cuda"
        else "peak resident set above the level before the run (/proc VmHWM, reset per measurement)"
    )
    console.print(
        "ratios: medians over alternating repeats; CPU = process CPU time (robust to other jobs on the machine); "
        f"peak MB = {peak}"
    )
    console.print(f"wrote {write_record(args.record, figures)}")


if __name__ == "__main__":
    main()
