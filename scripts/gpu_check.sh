#!/usr/bin/env bash
# GPU check (DESIGN §8), at most ~5 minutes on one GPU:
#  1. base-training images/s for ResNet20×8 and VGG11 on CIFAR-shaped random uint8 data (on-device batches with
#     crop+flip, SGD as the recipes): fp32, bf16 autocast, bf16 + channels_last, bf16 + channels_last +
#     torch.compile — written to outputs/bench/gpu_train.json;
#  2. the NP-epoch / fine-tune-epoch ratio on the GPU (scripts/bench_merge.py --device cuda) — gpu_merge.json.
# Both JSON files are also copied to $OUT when it is set (the device tool brings $OUT back). The records name
# the commit from git, or from $MERGEBENCH_COMMIT where the tree travels without .git:
#   run(command='MERGEBENCH_COMMIT=<sha> scripts/gpu_check.sh', carry=['.gpu_site'], timeout_s=420)
#
#   scripts/gpu_check.sh             on a machine with CUDA
#   scripts/gpu_check.sh --dry-run   anywhere: the same code on CPU, tiny sizes, no compile (*_dryrun.json)
#   scripts/gpu_check.sh --prepare   here, before sending the tree to a GPU machine whose Python lacks
#                                    omegaconf: copies the pure-Python omegaconf and antlr4 from .venv into
#                                    .gpu_site/ (git-ignored); carry ".gpu_site" with the run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    site=$(.venv/bin/python -c 'import omegaconf, os; print(os.path.dirname(os.path.dirname(omegaconf.__file__)))')
    rm -rf .gpu_site && mkdir -p .gpu_site
    cp -r "$site/omegaconf" "$site/antlr4" .gpu_site/
    grep -qx '/.gpu_site/' .git/info/exclude 2>/dev/null || echo '/.gpu_site/' >>.git/info/exclude
    echo "prepared .gpu_site: carry it, e.g. run(command='scripts/gpu_check.sh', carry=['.gpu_site'])"
    exit 0
fi

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu_site ] && export PYTHONPATH="$PYTHONPATH:.gpu_site"
export PYTHONUNBUFFERED=1

if [ "$DRY" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: no CUDA device; use --dry-run to check the script on CPU" >&2
    exit 1
fi

DRY=$DRY "$PY" - <<'PY'
"""Training throughput per variant: warm-up steps (compilation included) are not timed; the timed steps end
with a synchronize, so the figure is what a long run sustains."""

import os
import time

import torch
import torch.nn.functional as F

from mergebench.bench_record import write_record
from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.data.loader import Batches
from mergebench.models import MODELS, ModelInput

DRY = os.environ["DRY"] == "1"
device = torch.device("cpu" if DRY else "cuda")
ARCHS = {"resnet20×8": ("resnet20", {"width": 0.25 if DRY else 8}), "vgg11": ("vgg11", {"width": 0.125 if DRY else 1})}
VARIANTS = {  # (bf16 autocast, channels_last, torch.compile)
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "bf16+channels_last": (True, True, False),
    "bf16+channels_last+compile": (True, True, True),
}
BATCH, WARMUP, TIMED = (32, 2, 3) if DRY else (500, 15, 40)
INFO = DatasetInfo("bench", 10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False)


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_s(arch: str, overrides: dict, amp: bool, channels_last: bool, compile_: bool) -> float:
    torch.manual_seed(0)
    entry = MODELS.get(arch)
    model = entry.factory(entry.params(**overrides), ModelInput(3, 32, 10)).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_fn = torch.compile(model) if compile_ else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    n = BATCH * (WARMUP + TIMED)
    gen = torch.Generator().manual_seed(0)
    data = ImageData(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device),
        torch.randint(0, 10, (n,), generator=gen).to(device),
    )
    batches = list(Batches(data, torch.arange(n), INFO, BATCH, shuffle=True, augment=True))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(step_fn(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for x, y in batches[:WARMUP]:
        step(x, y)
    sync()
    start = time.perf_counter()
    for x, y in batches[WARMUP:]:
        step(x, y)
    sync()
    return BATCH * TIMED / (time.perf_counter() - start)


figures = []
where = "CPU dry run (tiny widths)" if DRY else torch.cuda.get_device_name()
print(f"base training images/s, {where}, batch {BATCH}, {TIMED} timed steps after {WARMUP} warm-up steps")
for label, (arch, overrides) in ARCHS.items():
    base = None
    for variant, (amp, channels_last, compile_) in VARIANTS.items():
        if DRY and compile_:
            continue  # compiling on CPU takes minutes and proves nothing about the GPU
        rate = images_per_s(arch, overrides, amp, channels_last, compile_)
        base = base or rate
        print(f"  {label:<11} {variant:<28} {rate:>10.0f} images/s  {rate / base:5.2f}× fp32", flush=True)
        common = {"case": label, "variant": variant, "batch_size": BATCH, "device": str(device)}
        figures.append({"figure": "base training throughput", "value": rate, "unit": "images/s", **common})
name = "gpu_train_dryrun" if DRY else "gpu_train"
print(f"wrote {write_record(name, figures)}")
PY

if [ "$DRY" = 1 ]; then
    "$PY" scripts/bench_merge.py --device cpu --samples 32 --batch-size 32 --repeats 1 --archs vgg11 \
        --skip-memory --record gpu_merge_dryrun
    names="gpu_train_dryrun gpu_merge_dryrun"
else
    "$PY" scripts/bench_merge.py --device cuda --samples 10000 --batch-size 500 --repeats 3 --threads 0 --skip-memory \
        --record gpu_merge
    names="gpu_train gpu_merge"
fi

if [ -n "${OUT:-}" ]; then
    for n in $names; do cp "outputs/bench/$n.json" "$OUT/"; done
fi
