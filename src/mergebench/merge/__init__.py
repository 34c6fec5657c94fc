"""Aggregators, repairs and K-model strategies; importing this package registers them all."""

from mergebench.merge import avg, finetune, np_merge, repair, reset_bn, strategies
from mergebench.merge.registry import AGGREGATORS, REPAIRS, STRATEGIES, Merged

__all__ = [
    "AGGREGATORS",
    "REPAIRS",
    "STRATEGIES",
    "Merged",
    "avg",
    "finetune",
    "np_merge",
    "repair",
    "reset_bn",
    "strategies",
]
