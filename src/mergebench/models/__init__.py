"""Architectures, each with its permutation spec: every module here that registers with MODELS is one; the
registry imports them when asked."""

from mergebench.models.registry import MODELS, Architecture, ModelBuilder, ModelInput

__all__ = ["MODELS", "Architecture", "ModelBuilder", "ModelInput"]
