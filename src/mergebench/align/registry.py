"""The aligner registry and what every aligner returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mergebench.align.spec import Transform
from mergebench.registry import Registry


@dataclasses.dataclass
class Alignment:
    """Transforms that carry model B into model A's basis, plus the aligner's own diagnostics."""

    transforms: dict[str, Transform]
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)


ALIGNERS: Registry[Callable[..., Alignment]] = Registry("align")
