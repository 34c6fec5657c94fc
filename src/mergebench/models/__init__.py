"""Architectures, each with its permutation spec; importing this package registers them all."""

from mergebench.models import mlp, resnet, vgg
from mergebench.models.registry import MODELS, ModelInput

__all__ = ["MODELS", "ModelInput", "mlp", "resnet", "vgg"]
