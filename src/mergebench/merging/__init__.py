"""Aggregators, repairs and K-model strategies: every module here that registers with one of the registries is one;
the registries import them when asked."""

from mergebench.merging.registry import AGGREGATORS, REPAIRS, STRATEGIES, Aggregator, Merged, Methods, Repair, Strategy

__all__ = ["AGGREGATORS", "REPAIRS", "STRATEGIES", "Aggregator", "Merged", "Methods", "Repair", "Strategy"]
