"""mergebench: align, merge and repair independently trained classifiers, and reproduce the papers' tables.

`mergebench.merge(models, align=..., agg=..., repair=..., data=...)` merges models in memory (mergebench/api.py);
the aggregators, repairs and K-model strategies it draws on are the subpackage `mergebench.merging`. A bare
`import mergebench` still imports nothing heavy: `merge` is looked up in mergebench.api when first asked for.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "merge"]


def __getattr__(name: str) -> Any:
    """`mergebench.merge`, imported on first use (PEP 562); no submodule has that name, so nothing rebinds it."""
    if name == "merge":
        from mergebench.api import merge

        globals()["merge"] = merge
        return merge
    raise AttributeError(f"module 'mergebench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
