"""Side by side with PyPI `rebasin` 0.0.47 (snimu's PermutationCoordinateDescent): wall time and objective of
weight matching model B onto model A, ours against theirs, on the same models, trials interleaved, one thread.

Not a dependency and not part of `make bench`: it needs a throw-away venv that holds both packages,

    python3 -m venv /tmp/rebasin-venv
    /tmp/rebasin-venv/bin/pip install torch==2.13.0 rebasin==0.0.47 torchview
    /tmp/rebasin-venv/bin/pip install -e .            # mergebench itself, from the repo root
    OMP_NUM_THREADS=1 /tmp/rebasin-venv/bin/python scripts/compare_rebasin.py [--cases mlp vgg11] [--seeds 3]

Times are whole calls: ours = weight_matching + applying the permutations to B's state; theirs = tracing the
models, the descent and applying the permutations to B (what a user of either pays). The objective is
Σ_w ⟨W_A[w], π(W_B)[w]⟩ over the *parameters* the spec maps, the same function for both results. `rebasin`
ignores 1-D tensors in its cost (a bias's A·B is a scalar added to every entry), lists a group's tensors more
than once (on the MLP, group 1's cost counts layer 0's weight 4× and layer 1's 2×), and does not permute BN
running statistics, so its B keeps its function only in train mode; the `func` column is the largest logit change of
each aligned B against the original B (eval mode for ours, train mode for theirs). Trained cases train A and B
briefly on MNIST or Fashion-MNIST (`--data`, default $MERGEBENCH_DATA) and cache them under outputs/bench/.
Figures are also written to outputs/bench/<--record>.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rebasin import PermutationCoordinateDescent
from torch import Tensor, nn

from mergebench.align.weight_matching import parameters, weight_matching
from mergebench.bench_record import BENCH_DIR, write_record
from mergebench.data.datasets import load_dataset
from mergebench.models import MODELS, ModelInput
from mergebench.registry import to_dataclass
from mergebench.spec import Transform, apply_transforms


@dataclasses.dataclass(frozen=True)
class Case:
    arch: str
    overrides: dict
    data: ModelInput
    dataset: str | None = None  # trained on this dataset when set, else random init

    @property
    def label(self) -> str:
        width = self.overrides.get("width")
        name = self.arch if width is None else f"{self.arch}×{width:g}"
        return f"{name} {'trained' if self.dataset else 'random'}"


MNIST = ModelInput(1, 28, 10)
CIFAR = ModelInput(3, 32, 10)
CASES = {
    "mlp": Case("mlp", {}, MNIST),
    "mlp-trained": Case("mlp", {}, MNIST, "mnist"),
    "resnet20x4": Case("resnet20", {"width": 4}, CIFAR),
    "vgg11": Case("vgg11", {"width": 1}, CIFAR),
    "resnet20x1-trained": Case("resnet20", {"width": 1}, MNIST, "fashion_mnist"),
}


def build(case: Case, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    entry = MODELS.get(case.arch)
    return entry.factory(to_dataclass(entry.params, case.overrides, "model"), case.data)


def trained(case: Case, seed: int, root: Path, images: int, epochs: int) -> nn.Module:
    """A briefly trained model (Adam, batch 128), cached: the objective's landscape differs from random init."""
    path = (
        BENCH_DIR
        / "models"
        / f"{case.arch}-{case.overrides.get('width', 1)}-{case.dataset}-{images}-{epochs}-{seed}.pt"
    )
    model = build(case, seed)
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    _, train, _ = load_dataset(case.dataset, root)
    x = train.x[:images].float().div(255).sub(0.5).div(0.25)
    y = train.y[:images]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def objective(model_a: nn.Module, model_b: nn.Module, names: list[str]) -> float:
    """Σ ⟨A, B⟩ in float64 over the named parameters."""
    pa, pb = parameters(model_a), parameters(model_b)
    return sum(float((pa[k].double() * pb[k].double()).sum()) for k in names)


def logits(model: nn.Module, x: Tensor, train: bool) -> Tensor:
    with torch.no_grad():
        return model.train(train)(x)


def ours(model_a: nn.Module, model_b: nn.Module, seed: int) -> nn.Module:
    spec = model_a.permutation_spec()
    perms, _ = weight_matching(spec, parameters(model_a), parameters(model_b), seed=seed)
    aligned = copy.deepcopy(model_b)
    transforms = {g: Transform.permutation(p) for g, p in perms.items()}
    aligned.load_state_dict(apply_transforms(model_b.state_dict(), spec, transforms))
    return aligned


def theirs(model_a: nn.Module, model_b: nn.Module, seed: int, x: Tensor) -> nn.Module:
    aligned = copy.deepcopy(model_b)
    torch.manual_seed(seed)  # rebasin draws its group order from the global generator
    PermutationCoordinateDescent(model_a, aligned, x).rebasin()
    return aligned


def timed(run: Callable[..., nn.Module], *args: object) -> tuple[float, nn.Module]:
    start = time.perf_counter()
    out = run(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", type=int, default=3, help="model pairs per case (A seed 2s, B seed 2s+1)")
    parser.add_argument("--trials", type=int, default=3, help="interleaved timing trials per pair")
    parser.add_argument("--data", default=os.environ.get("MERGEBENCH_DATA", "/work/shared/data"))
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--train-epochs", type=int, default=1)
    parser.add_argument("--record", default="compare_rebasin", help="JSON record name under outputs/bench/")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; times: median of {args.trials} trials")
    header = f"{'case':<22}{'seed':>5}{'ours s':>9}{'theirs s':>10}{'ratio':>8}{'ours obj':>12}{'theirs obj':>12}"
    print(header + f"{'func ours':>11}{'func theirs':>13}")
    figures = []
    for key in args.cases:
        case = CASES[key]
        for s in range(args.seeds):
            if case.dataset:
                model_a = trained(case, 2 * s, Path(args.data), args.train_images, args.train_epochs)
                model_b = trained(case, 2 * s + 1, Path(args.data), args.train_images, args.train_epochs)
            else:
                model_a, model_b = build(case, 2 * s).eval(), build(case, 2 * s + 1).eval()
            spec = model_a.permutation_spec()
            names = [k for k, _ in model_a.named_parameters() if any(spec.axes.get(k, ()))]
            x = torch.randn(
                8, case.data.channels, case.data.size, case.data.size, generator=torch.Generator().manual_seed(s)
            )
            ours_t, theirs_t = [], []
            for _ in range(args.trials):  # interleaved, so load drifts on a shared machine hit both alike
                t, ours_b = timed(ours, model_a, model_b, s)
                ours_t.append(t)
                t, theirs_b = timed(theirs, model_a, model_b, s, x[:1])
                theirs_t.append(t)
            ours_s, theirs_s = statistics.median(ours_t), statistics.median(theirs_t)
            ours_obj, theirs_obj = objective(model_a, ours_b, names), objective(model_a, theirs_b, names)
            func_ours = float((logits(ours_b, x, False) - logits(model_b, x, False)).abs().max())
            func_theirs = float((logits(theirs_b, x, True) - logits(model_b, x, True)).abs().max())
            model_b.eval()
            print(
                f"{case.label:<22}{s:>5}{ours_s:>9.3f}{theirs_s:>10.3f}{theirs_s / ours_s:>7.1f}×"
                f"{ours_obj:>12.2f}{theirs_obj:>12.2f}{func_ours:>11.1e}{func_theirs:>13.1e}",
                flush=True,
            )
            common = {"case": case.label, "seed": s, "threads": 1}
            figures += [
                {"figure": "wm seconds ours", "value": ours_s, "unit": "s", **common},
                {"figure": "wm seconds rebasin", "value": theirs_s, "unit": "s", **common},
                {"figure": "time ratio rebasin/ours", "value": theirs_s / ours_s, "unit": "×", **common},
                {"figure": "objective ours", "value": ours_obj, "unit": "Σ⟨A,πB⟩ params", **common},
                {"figure": "objective rebasin", "value": theirs_obj, "unit": "Σ⟨A,πB⟩ params", **common},
            ]
    print(f"wrote {write_record(args.record, figures)}")


if __name__ == "__main__":
    main()
