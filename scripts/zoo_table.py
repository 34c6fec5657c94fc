"""How far the traced spec, its check and the aligners reach on torchvision and timm classifiers (random weights,
10 classes, the small inputs of `mergebench.zoo.CLASSIFIERS`), one thread on a CPU.

Per model: the trace (groups, ops left unpermuted in warnings), the share of hidden units in a permutation group
(every conv/linear output unit but the 10-logit heads: a unit outside every group is one no aligner can match),
whether the per-merge check (`checked_spec`) accepts the traced spec, and whether a planted permutation (one cycle
through every group, `moving_permutations`) is undone by `mergebench.merge([model, planted], agg="avg")` with
weight matching and with activation matching (`permute`, on random inputs): the merge must give the model back
(max |Δ| ≤ 1e-5 × the tensor's max |value|, every tensor of the state dict); and whether two different random
initialisations (seeds 0 and 1) merge with weight matching without error. A failing step records its error's first
line and the next steps still run. Prints a markdown table; figures go to outputs/bench/zoo_table.json.

`--set unnamed` runs the same on zoo models the tests and the issue that asked for this never named.

    python scripts/zoo_table.py [--set named|unnamed] [--models timm:resnet26d ...] [--samples 32]
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import mergebench
from mergebench import zoo
from mergebench.bench_record import write_record
from mergebench.checkpoints import load_state
from mergebench.spec import PermutationSpec, apply_transforms
from mergebench.spec.trace import trace_spec
from mergebench.spec.verify import VERIFY_BATCH, checked_spec, moving_permutations

NUM_CLASSES = 10
EXACT = 1e-5  # merged weights within this fraction of each tensor's max |value| count as the original's
ALIGNERS = ("weight_matching", "permute")


def hidden_coverage(model: nn.Module, spec: PermutationSpec) -> tuple[int, int]:
    """(units in a group, all units) over the output axes of every conv and linear layer but the classifier heads
    (output width NUM_CLASSES); an output axis made of parts (a fused qkv) counts its parts' units."""
    covered = total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | nn.modules.conv._ConvNd) or module.weight.shape[0] == NUM_CLASSES:
            continue
        key = f"{name}.weight"
        total += module.weight.shape[0]
        if spec.axes.get(key, (None,))[0] is not None:
            covered += module.weight.shape[0]
        else:
            covered += sum(p.size for p in spec.parts.get(key, {}).get(0, ()) if p.group is not None)
    return covered, total


def max_relative_diff(merged: dict[str, Tensor], original: dict[str, Tensor]) -> float:
    """The largest max |Δ| / max |value| over the floating-point tensors of the state dict (others must be equal)."""
    worst = 0.0
    for key, tensor in original.items():
        if not tensor.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(merged[key], tensor) else float("inf"))
            continue
        diff = (merged[key].double() - tensor.double()).abs().max().item()
        worst = max(worst, diff / max(tensor.abs().max().item(), 1e-12))
    return worst


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def step(row: dict[str, Any], key: str, fn: Callable[[], Any]) -> Any:
    """Run one step; its error's first line goes to row['errors'][key] and None is returned."""
    start = time.perf_counter()
    try:
        return fn()
    except Exception as err:
        row["errors"][key] = first_line(err)
        return None
    finally:
        row[f"{key}_s"] = round(time.perf_counter() - start, 2)


def measure(case: zoo.Classifier, samples: int) -> dict[str, Any]:
    """One row of the table; a step that fails leaves its error, and the steps that need its result are skipped."""
    start = time.perf_counter()
    row: dict[str, Any] = {"model": case.name, "side": case.side, "errors": {}}
    torch.manual_seed(0)
    model = step(row, "build", lambda: case.build(NUM_CLASSES).eval())
    x = torch.randn(samples, 3, case.side, case.side)
    y = torch.randint(0, NUM_CLASSES, (samples,))
    traced = None if model is None else step(row, "trace", lambda: trace_spec(model, x[:VERIFY_BATCH]))
    if traced is not None:
        covered, total = hidden_coverage(model, traced.spec)
        row |= {
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "groups": len(traced.spec.groups),
            "warnings": len(traced.warnings),
            "first_warning": traced.warnings[0] if traced.warnings else None,
            "coverage": covered / total if total else None,
        }
        checked = step(row, "check", lambda: checked_spec([model, model], x[:VERIFY_BATCH], NUM_CLASSES, seed=0))
        row["check"] = checked is not None
        planted = step(row, "plant", lambda: _planted(model, traced.spec))
        for align in ALIGNERS if planted is not None else ():
            merged = step(
                row, align, lambda align=align: mergebench.merge([model, planted], align=align, agg="avg", data=(x, y))
            )
            row[align] = None if merged is None else max_relative_diff(merged.model.state_dict(), model.state_dict())
        other = step(row, "build_seed1", lambda: _seeded(case, 1))
        if other is not None:
            pair = [model, other]
            merged = step(row, "two_seeds", lambda: mergebench.merge(pair, align="weight_matching", data=(x, y)))
            row["two_seeds"] = merged is not None
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _seeded(case: zoo.Classifier, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return case.build(NUM_CLASSES).eval()


def _planted(model: nn.Module, spec: PermutationSpec) -> nn.Module:
    """The model with a cycle through every group's units planted: the same function where the spec is right."""
    planted = copy.deepcopy(model)
    state = model.state_dict()
    load_state(planted, apply_transforms(state, spec, moving_permutations(spec, state, seed=1)))
    return planted


def cell(row: dict[str, Any], key: str, notes: list[str], show: Callable[[Any], str]) -> str:
    """A column's value shown, ✗ with the number of the note that holds its step's error, or blank (not run)."""
    if key in row["errors"]:
        notes.append(f"{row['model']}, {key}: {row['errors'][key]}")
        return f"✗ [{len(notes)}]"
    return "" if row.get(key) is None else show(row[key])


def recovered(diff: float) -> str:
    return "exact" if diff <= EXACT else f"✗ {diff:.1e}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table, then the numbered first lines of the errors its ✗ cells point to."""
    notes: list[str] = []
    lines = [
        "| model | input | params (M) | groups | trace warnings | hidden units in a group | check | WM merge back "
        "| P merge back | two seeds (WM) | trace + check s | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            f"`{row['model']}`",
            f"{row['side']}×{row['side']}",
            cell(row, "build", notes, str) or str(row.get("params_m", "")),
            cell(row, "trace", notes, str) or str(row.get("groups", "")),
            str(row.get("warnings", "")),
            "" if row.get("coverage") is None else f"{100 * row['coverage']:.1f}%",
            cell(row, "check", notes, lambda ok: "ok" if ok else "✗"),
            cell(row, "plant", notes, str) or cell(row, "weight_matching", notes, recovered),
            cell(row, "permute", notes, recovered),
            cell(row, "two_seeds", notes, lambda ok: "ok"),
            "" if "check_s" not in row else f"{row['trace_s'] + row['check_s']:.1f}",
            f"{row['seconds']:.0f}",
        ]
        lines.append(f"| {' | '.join(cells)} |")
    numbered = [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    warned = [f"- `{row['model']}`: {row['first_warning']}" for row in rows if row.get("first_warning")]
    errors = [*numbered, ""] if numbered else []
    return "\n".join([*lines, "", *errors, "First trace warning of each model:", "", *warned])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=("named", "unnamed"), default="named", help="zoo.CLASSIFIERS or zoo.UNNAMED")
    parser.add_argument("--models", nargs="*", help="create() targets of the set (default: all)")
    parser.add_argument("--samples", type=int, default=32, help="random merge-data inputs per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the traced spec's warnings are counted in the table, not printed
    chosen = zoo.CLASSIFIERS if args.set == "named" else zoo.UNNAMED
    cases = [c for c in chosen if not args.models or c.name in args.models]
    start = time.perf_counter()
    rows = []
    for case in cases:
        rows.append(measure(case, args.samples))
        print(f"{case.name}: {rows[-1]['seconds']} s, errors: {rows[-1]['errors'] or 'none'}", flush=True)
    print(f"\n{markdown(rows)}\n\n{len(rows)} models in {time.perf_counter() - start:.0f} s")
    if zoo.c_extension_missing():
        print(f"torchvision imported through mergebench.zoo's shim: {zoo.c_extension_missing()}")
    figures = [{"figure": f"zoo {row['model']}", "value": row["seconds"], "unit": "s", **row} for row in rows]
    print(f"wrote {write_record('zoo_table' if args.set == 'named' else 'zoo_table_unnamed', figures)}")


if __name__ == "__main__":
    main()
