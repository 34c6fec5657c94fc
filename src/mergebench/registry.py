"""Name -> component registries, so adding an aligner, aggregator, split or model is one module + one YAML.

A registry names the package its plugins live in and imports every module of it before it answers a lookup:
registering is a side effect of importing, so a new plugin is found where it is put, and listed nowhere else.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mergebench.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered component. `label` and `abbrev` are the papers' names for it, from which the results' method
    labels are built (results.method_label): an aligner's name and short form ('Permute', 'P'), an aggregator's
    template over them ('NP-{abbrev}'), a repair's template over the name so far ('{method} + REPAIR')."""

    name: str
    factory: T
    params: type | None
    label: str | None = None
    abbrev: str | None = None


@dataclasses.dataclass(frozen=True)
class Component(Generic[T]):
    """A registry entry chosen by config, with its validated parameters."""

    name: str
    factory: T
    params: Any


class Registry(Generic[T]):
    """Components keyed by the name used in config; each declares a dataclass of its parameters."""

    def __init__(self, key: str, package: str | None = None) -> None:
        self.key = key
        self.package = package
        self._entries: dict[str, Entry[T]] = {}
        self._scanned: tuple[str, ...] | None = None  # the package's __path__ when its modules were last imported

    def register(
        self, name: str, params: type | None = None, *, label: str | None = None, abbrev: str | None = None
    ) -> Callable[[T], T]:
        def decorate(factory: T) -> T:
            if name in self._entries:
                raise RuntimeError(f"{self.key}: '{name}' registered twice")
            self._entries[name] = Entry(name, factory, params, label, abbrev)
            return factory

        return decorate

    def discover(self) -> None:
        """Import every module of the plugin package, once per search path of the package (lookups are cheap)."""
        if self.package is None:
            return
        package = importlib.import_module(self.package)
        if tuple(package.__path__) == self._scanned:
            return
        for module in pkgutil.iter_modules(package.__path__, f"{self.package}."):
            importlib.import_module(module.name)
        self._scanned = tuple(package.__path__)

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def get(self, name: str) -> Entry[T]:
        self.discover()
        if name not in self._entries:
            raise ConfigError(f"{self.key}={name!r} is not known; allowed: {', '.join(self.names())}")
        return self._entries[name]

    def parse(self, section: Mapping[str, Any] | Any, prefix: str | None = None) -> tuple[Entry[T], Any]:
        """Validate a config section `{name: ..., **params}` against the entry's dataclass.

        Returns the entry and a params instance; unknown keys and wrong types raise one-line ConfigErrors.
        """
        prefix = prefix or self.key
        raw = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
        name = raw.pop("name", None)
        if name is None:
            raise ConfigError(f"{prefix}.name is missing; allowed: {', '.join(self.names())}")
        entry = self.get(str(name))
        if entry.params is None:
            if raw:
                raise ConfigError(f"{prefix}.{next(iter(raw))} is not a parameter of {self.key}={name!r}")
            return entry, None
        return entry, to_dataclass(entry.params, raw, f"{prefix}")


def to_dataclass(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """Build `cls` from plain values with OmegaConf's type checks, turning its errors into one-line ConfigErrors.

    A params class may define `check()` raising `ConfigError("key=value must be ...")`; the prefix is added here.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"{prefix}.{key} is not a known key; allowed: {', '.join(sorted(fields))}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), values)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(err).splitlines()[0]
        raise ConfigError(f"{prefix}.{key}: {msg}") from None
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as err:
            raise ConfigError(f"{prefix}.{err}") from None
    return obj
