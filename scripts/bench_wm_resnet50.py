"""Weight matching between two different random ResNet-50s (CPU, one thread by default): seconds, passes, objective
and where the time goes (setup, cost matrices, LAP, gains, objective), for the current code and for the code as it
was before its cost matrices were kept per group (commit BEFORE, read from git; per-tensor shares summed at every
step, scipy's LAP), on the same pair. Figures go to outputs/bench/bench_wm_resnet50.json.

The ResNet-50 is written here in torchvision's layout (Bottleneck blocks [3, 4, 6, 3], widths 64..2048, 1×1 conv +
BN downsample, 1000 classes; torchvision cannot be imported here) with PyTorch's default init, or torchvision's
(`--init torchvision`: Kaiming-normal convs, BN scale 1 and shift 0). Its spec is traced on a 2×3×64×64 input and
only its parameters are scored, as the aligner does. `--cases resnet26d` adds a timm-style ResNet-26d (deep
3-conv stem, average-pool downsample, Bottleneck blocks [2, 2, 2, 2]).

The record also times `checked_spec` (trace + the per-merge check) on each pair, the fastest of --repeats.

    python scripts/bench_wm_resnet50.py [--pairs 1] [--repeats 1] [--threads 1] [--before d19e55e|none]
        [--cases resnet50 resnet26d] [--init default|torchvision] [--solvers auto scipy lap]

Model B (seed 2p+1) is aligned onto model A (seed 2p) for pair p, with seed p for the descent. "same perms" and
"Δ vs first" compare each run with the first one of its pair (the code before, where it ran); the objective is
Σ⟨W_A, π(W_B)⟩ in float64. Solvers: auto (`lap` from n = 128 where installed), scipy, lap. The record also says
how many passes a stop after the first pass gaining < 1e-6 (relative) would have taken, and the objective it
would have given up. Timings on a shared machine are noisy: the runs of one pair are done back to back, the
fastest of --repeats counts, and CPU seconds are given beside wall seconds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from mergebench.align import assignment
from mergebench.align import weight_matching as wm
from mergebench.bench_record import write_record
from mergebench.spec.trace import trace_spec
from mergebench.spec.verify import checked_spec

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "d19e55e"  # the last commit with per-tensor cost shares summed in float64 at every step, scipy's LAP
PHASES = ("setup", "cost", "lap", "gain", "objective")


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, avg_down: bool = False) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            if avg_down:  # timm's ResNet-D shortcut: average pool, then a 1×1 conv at stride 1
                pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
                self.downsample = nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
            else:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


class ResNetBottleneck(nn.Module):
    """torchvision's ResNet-50 (`layers=(3, 4, 6, 3)`), or timm's ResNet-26d (`layers=(2, 2, 2, 2)`, `deep=True`)."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), deep: bool = False, num_classes: int = 1000) -> None:
        super().__init__()
        if deep:
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, 32, 3, 2, 1, bias=False),
                nn.BatchNorm2d(32),
                nn.ReLU(inplace=True),
                nn.Conv2d(32, 32, 3, 1, 1, bias=False),
                nn.BatchNorm2d(32),
                nn.ReLU(inplace=True),
                nn.Conv2d(32, 64, 3, 1, 1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            stage = []
            for j in range(blocks):
                stage.append(Bottleneck(cin, width, 2 if j == 0 and i > 0 else 1, avg_down=deep))
                cin = 4 * width
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


CASES: dict[str, Callable[[], nn.Module]] = {
    "resnet50": lambda: ResNetBottleneck((3, 4, 6, 3)),
    "resnet26d": lambda: ResNetBottleneck((2, 2, 2, 2), deep=True),
}


def build(case: str, seed: int, init: str) -> nn.Module:
    torch.manual_seed(seed)
    model = CASES[case]()
    if init == "torchvision":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return model.eval()


def load_before(commit: str) -> types.ModuleType | None:
    """weight_matching.py as it was at `commit`, as a module of its own (its aligner not registered again), with
    timers on its phases; None where git or the commit is not at hand."""
    try:
        source = subprocess.run(
            ["git", "show", f"{commit}:src/mergebench/align/weight_matching.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    lines = source.splitlines(keepends=True)
    source = "".join(line for line in lines if not line.startswith("@ALIGNERS.register("))
    module = types.ModuleType(f"weight_matching_{commit}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{commit}:weight_matching.py", "exec"), module.__dict__)
    module.seconds = dict.fromkeys(PHASES, 0.0)

    def timed(phase: str, fn: Callable) -> Callable:
        def wrapper(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                module.seconds[phase] += time.perf_counter() - start

        return wrapper

    module._assign = timed("lap", module._assign)
    for name, phase in (("__init__", "setup"), ("cost", "cost"), ("gain", "gain"), ("objective", "objective")):
        setattr(module._Problem, name, timed(phase, getattr(module._Problem, name)))
    return module


def run(
    label: str, fn: Callable[..., tuple[dict[str, Tensor], dict]], phases: Callable[[dict], dict], repeats: int, **kw
) -> dict:
    """The fastest of `repeats` runs (wall seconds; CPU seconds too, which other processes on a shared machine
    disturb less), with its phases."""
    walls, cpus, phase_seconds = [], [], {}
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        perms, info = fn(**kw)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
        current = phases(info)  # read after every run: counters that add up start again
        if walls[-1] == min(walls):
            phase_seconds = current
    seconds, cpu_best = min(walls), min(cpus)
    history = info["history"]
    # what a looser stopping rule would have given up: the first pass after which a pass gains < 1e-6 relative
    small = (i for i in range(1, len(history)) if history[i] - history[i - 1] < 1e-6 * abs(history[i - 1]))
    loose = next(small, len(history) - 1)
    return {
        "label": label,
        "perms": perms,
        "seconds": seconds,
        "cpu_seconds": cpu_best,
        "passes": info["passes"],
        "objective": info["objective"],
        "phases": phase_seconds,
        "solves": info.get("solves"),
        "stop_1e-6_passes": loose,
        "stop_1e-6_loss": history[-1] - history[loose],
    }


def check_seconds(model_a: nn.Module, model_b: nn.Module, repeats: int) -> float:
    """The fastest of `repeats` wall times of what every merge runs before aligning: `checked_spec` (trace model A,
    check the spec on model B) on a 4×3×32×32 batch, after one warm-up call."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    checked_spec([model_a, model_b], x, None, seed=0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        checked_spec([model_a, model_b], x, None, seed=0)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1, help="model pairs per case")
    parser.add_argument("--cases", nargs="*", default=["resnet50"], choices=list(CASES))
    parser.add_argument("--init", default="default", choices=["default", "torchvision"])
    parser.add_argument("--before", default=BEFORE, help="git commit to compare with; 'none' to skip")
    parser.add_argument("--solvers", nargs="*", default=["auto", "scipy"], choices=["auto", "scipy", "lap"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each code on each pair; the fastest counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=200)
    lap = "installed" if assignment._lapjv is not None else "not installed"
    console.print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, PyPI lap {lap}")
    before = None if args.before == "none" else load_before(args.before)

    def before_phases(_: dict) -> dict:
        """The phase timers of the code before (its last run's), started again."""
        assert before is not None
        out = dict(before.seconds)
        before.seconds = dict.fromkeys(PHASES, 0.0)
        return out

    if args.before != "none" and before is None:
        console.print(f"[yellow]commit {args.before} not readable through git: no 'before' run[/yellow]")

    table = Table(title=f"weight matching, random {args.init}-init pairs (B seed 2p+1 onto A seed 2p)")
    for col in (
        "model",
        "pair",
        "code",
        "seconds",
        "cpu s",
        "passes",
        "solves",
        "objective",
        "Δ vs first",
        "same perms",
    ):
        table.add_column(col, justify="left" if col in ("model", "code") else "right")
    for col in PHASES:
        table.add_column(f"{col} s", justify="right")
    figures: list[dict] = []
    for case in args.cases:
        for pair in range(args.pairs):
            model_a, model_b = build(case, 2 * pair, args.init), build(case, 2 * pair + 1, args.init)
            spec = trace_spec(model_a, torch.randn(2, 3, 64, 64)).spec
            state_a, state_b = wm.parameters(model_a), wm.parameters(model_b)
            problem = {"spec": spec, "state_a": state_a, "state_b": state_b, "seed": pair}
            runs = []
            if before is not None:
                before.seconds = dict.fromkeys(PHASES, 0.0)
                label = f"before ({args.before})"
                runs.append(run(label, before.weight_matching, before_phases, args.repeats, **problem))
            for solver in args.solvers:
                name = None if solver == "auto" else solver
                label = f"now, LAP {solver}"
                runs.append(run(label, wm.weight_matching, lambda i: i["phases"], args.repeats, solver=name, **problem))
            reference = runs[0]
            for r in runs:
                same = all(reference["perms"][g].equal(p) for g, p in r["perms"].items())
                delta = r["objective"] - reference["objective"]
                table.add_row(
                    case,
                    str(pair),
                    r["label"],
                    f"{r['seconds']:.2f}",
                    f"{r['cpu_seconds']:.2f}",
                    str(r["passes"]),
                    "" if r["solves"] is None else str(r["solves"]),
                    f"{r['objective']:.6f}",
                    f"{delta:+.2e}",
                    "yes" if same else "NO",
                    *(f"{r['phases'].get(p, 0.0):.2f}" for p in PHASES),
                )
                common = {"case": case, "pair": pair, "code": r["label"], "init": args.init}
                figures += [
                    {"figure": "weight matching seconds", "value": r["seconds"], "unit": "s", **common},
                    {"figure": "weight matching CPU seconds", "value": r["cpu_seconds"], "unit": "s", **common},
                    {"figure": "weight matching passes", "value": r["passes"], "unit": "passes", **common},
                    {"figure": "weight matching objective", "value": r["objective"], "unit": "Σ⟨A,πB⟩", **common},
                    {"figure": "objective minus first run's", "value": delta, "unit": "Σ⟨A,πB⟩", **common},
                    {"figure": "same permutations as first run", "value": int(same), "unit": "bool", **common},
                    *(
                        {"figure": f"{p} seconds", "value": r["phases"].get(p, 0.0), "unit": "s", **common}
                        for p in PHASES
                    ),
                    {
                        "figure": "passes if stopped at a 1e-6 relative gain",
                        "value": r["stop_1e-6_passes"],
                        "unit": "passes",
                        **common,
                    },
                    {
                        "figure": "objective given up by that stop",
                        "value": r["stop_1e-6_loss"],
                        "unit": "Σ⟨A,πB⟩",
                        **common,
                    },
                ]
            if len(runs) > 1:
                speedup = runs[0]["seconds"] / runs[1]["seconds"]
                figures.append(
                    {"figure": "speed-up over first run", "value": speedup, "unit": "×", "case": case, "pair": pair}
                )
            seconds = check_seconds(model_a, model_b, args.repeats)
            console.print(f"{case} pair {pair}: trace + check (checked_spec, 4×3×32×32) {seconds:.2f} s")
            figures.append({"figure": "trace + check", "value": seconds, "unit": "s", "case": case, "pair": pair})
    console.print(table)
    console.print(
        "phases: setup (tensors, fixed sums), cost (matrices: GEMMs, updates), lap (the solver), gain (objective "
        "changes, float64 where within rounding), objective (exact float64 sums)"
    )
    console.print(f"wrote {write_record('bench_wm_resnet50', figures)}")


if __name__ == "__main__":
    main()
