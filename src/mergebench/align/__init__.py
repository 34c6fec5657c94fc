"""Aligners: every module here that registers with ALIGNERS is one; the registry imports them when asked."""

from mergebench.align.registry import ALIGNERS, Aligner, Alignment

__all__ = ["ALIGNERS", "Aligner", "Alignment"]
