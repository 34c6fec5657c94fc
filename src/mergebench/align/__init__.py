"""Aligners: each carries model B into model A's basis; importing this package registers them all."""

from mergebench.align import cca, identity, permute, ste, weight_matching
from mergebench.align.registry import ALIGNERS, Alignment

__all__ = ["ALIGNERS", "Alignment", "cca", "identity", "permute", "ste", "weight_matching"]
