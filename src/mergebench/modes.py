"""Running a model for a measurement (a trace, a check, activation statistics) without leaving a trace on it:
every module's train/eval flag as it was afterwards, and forward hooks removed however the block ends."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from torch import nn


@contextlib.contextmanager
def restored_modes(*models: nn.Module) -> Iterator[None]:
    """Every module's own train/eval flag (not only the top module's) as it was before the block."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """The models in eval mode inside the block, every module's flag restored after it."""
    with restored_modes(*models):
        for model in models:
            model.eval()
        yield


@contextlib.contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable[..., object]]]) -> Iterator[None]:
    """`hook` on each `module`'s forward inside the block, removed after it."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
