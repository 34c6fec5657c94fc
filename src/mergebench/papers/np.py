"""NP Merge (the NP paper): Tables I–IV and Fig. 1."""

from __future__ import annotations

from mergebench.align import ALIGNERS
from mergebench.merging import AGGREGATORS
from mergebench.papers import Layout, register
from mergebench.papers.names import ARCH_NAMES, DATASET_NAMES, SPLIT_NAMES, merge_data_size, paper_name

register(
    "np_table1",
    Layout(
        "NP Table I (same data, accuracy %)",
        lambda r: f"{DATASET_NAMES.get(r.dataset, r.dataset)} {ARCH_NAMES.get(r.arch, r.arch)}×{r.width:g}",
    ),
)
register("np_table2", Layout("NP Table II (ResNet20×8, CIFAR-100)", lambda r: SPLIT_NAMES.get(r.split, r.split)))
register(
    "np_table3",
    Layout(
        "NP Table III (ResNet18×4, ImageNet-200, Dirichlet)",
        lambda r: {"top1": "top-1", "top5": "top-5"}[r.metric],
        metrics=("top1", "top5"),
    ),
)
register(
    "np_table4",
    Layout(
        "NP Table IV (ResNet20×8, CIFAR-100 Dirichlet; merge data per class)",
        lambda r: (
            f"{merge_data_size(r)}: "
            f"{'merging only' if r['agg'] == 'avg' else paper_name(AGGREGATORS, r['agg'], 'abbrev')}"
        ),
        row=lambda r: paper_name(ALIGNERS, r["align"]) if r.model_role == "merged" else None,
    ),
)
register(
    "np_fig1",
    Layout(
        "NP Fig. 1 (accuracy vs number of merged models)",
        lambda r: f"{'balanced' if r.split == 'same' else 'unbalanced'} K={r.num_models}",
        row=lambda r: f"{r.method_label} ({r.strategy})" if r.model_role == "merged" else r.method_label,
    ),
)
