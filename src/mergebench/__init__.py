"""mergebench: align, merge and repair independently trained classifiers, and reproduce the papers' tables.

`mergebench.merge(models, align=..., agg=..., repair=..., data=...)` merges models in memory (mergebench/api.py).
`mergebench.merge` is also the subpackage of aggregators and repairs, so that subpackage is made callable:
`from mergebench.merge import AGGREGATORS` and `mergebench.merge(...)` both work, and `inspect.signature` (what
IDEs and notebooks show) gives the function's. A bare `import mergebench` still imports nothing heavy.
"""

import importlib
import inspect
import sys
import types
from typing import Any

__version__ = "0.1.0"


class _CallablePackage(types.ModuleType):
    """The `mergebench.merge` subpackage; calling it is `mergebench.api.merge`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from mergebench.api import merge

        return merge(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        from mergebench.api import merge

        return inspect.signature(merge)


class _Package(types.ModuleType):
    @property
    def merge(self) -> types.ModuleType:
        package = importlib.import_module("mergebench.merge")
        package.__class__ = _CallablePackage
        return package

    @merge.setter
    def merge(self, value: types.ModuleType) -> None:
        """The import system binds the loaded subpackage here; the getter serves it from sys.modules."""


sys.modules[__name__].__class__ = _Package
