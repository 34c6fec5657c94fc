"""The import layers of ARCHITECTURE.md: no module imports from a layer above its own, so the import graph has no
arrow running back up and no cycle for a `TYPE_CHECKING` guard or a local import to dodge."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mergebench

SRC = Path(mergebench.__file__).resolve().parent
# longest matching prefix wins; a module under none of these is an entry point (layer 4), free to import anything
LAYERS = {
    "mergebench.spec": 0,
    "mergebench.registry": 0,
    "mergebench.errors": 0,
    "mergebench.seeds": 0,
    "mergebench.cache": 0,
    "mergebench.checkpoints": 0,
    "mergebench.progress": 0,
    "mergebench.pause": 0,
    "mergebench.modes": 0,
    "mergebench.zoo": 0,
    "mergebench.data": 1,
    "mergebench.context": 1,
    "mergebench.evaluate": 1,
    "mergebench.weights": 1,
    "mergebench.align.registry": 2,
    "mergebench.merging.registry": 2,
    "mergebench.models.registry": 2,
    "mergebench.align": 3,
    "mergebench.merging": 3,
    "mergebench.models": 3,
}


def layer(module: str) -> int:
    prefixes = [p for p in LAYERS if module == p or module.startswith(f"{p}.")]
    return LAYERS[max(prefixes, key=len)] if prefixes else 4


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST) -> set[str]:
    """Every mergebench module an import statement names, at any depth (a local import is an arrow too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mergebench"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("mergebench"))
    return names


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        name = module_name(path)
        for target in imported(ast.parse(path.read_text())):
            if layer(target) > layer(name):
                upward.append(f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})")
    assert not upward, "\n".join(upward)


def test_no_type_checking_guards_are_left_to_dodge_cycles() -> None:
    guarded = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "TYPE_CHECKING" in p.read_text()]
    assert guarded == []


def test_importing_the_models_loads_no_aligner_merge_method_or_dataset() -> None:
    code = "import mergebench.models, sys; print(' '.join(m for m in sys.modules if m.startswith('mergebench')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(out.split())
    assert loaded == {
        "mergebench",
        "mergebench.errors",
        "mergebench.registry",
        "mergebench.spec",
        "mergebench.models",
        "mergebench.models.registry",
    }


def test_aligners_import_no_merge_method_and_specs_no_plugin() -> None:
    """Within the plugin layer, merge methods may use aligners (strategies align, then aggregate) but not the other
    way round; the shared weight helpers sit below both (`mergebench.weights`). The spec package (trace, check)
    imports no plugin, so an aligner lookup does not load the tracer."""
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        name = module_name(path)
        for target in imported(ast.parse(path.read_text())):
            if name.startswith("mergebench.align") and target.startswith("mergebench.merging"):
                wrong.append(f"{name} imports {target}")
            if name.startswith("mergebench.spec") and layer(target) > 0:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)
