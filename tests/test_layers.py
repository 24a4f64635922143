"""The layering docs/development.md states ("## Development", Layers), checked on the source:
every module under fgray/ is parsed with `ast` (nothing is imported or run) and each of its
`fgray.*` and `ray` imports -- at module level, inside functions, under TYPE_CHECKING, or a
literal `importlib.import_module(...)` -- must point down the layer order, never up.

A layer may import its own modules, the layers below it and the base modules; the base modules
import only one another; the three bottom packages (models, eval, data) do not import one
another. Ray is imported only under fgray/train and fgray/tune (and studies/, not checked here).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "fgray"

# Top to bottom; a tuple holds peers, which do not import one another.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli",), ("tune",), ("train",), ("results",), ("engine",), ("methods",),
    ("models", "eval", "data"),
)
# Top-level modules every layer may import ("fgray" is the package itself: __version__).
BASE = frozenset({"fgray", "errors", "config", "storage", "eval_mode", "cliutil", "progress",
                  "allocator"})
RAY_LAYERS = frozenset({"train", "tune"})

RANK = {unit: rank for rank, peers in enumerate(LAYERS) for unit in peers}
# Packages whose modules import in one direction, each only the ones listed before it (the
# order docs/development.md states); the package's __init__ re-exports and is not checked.
ORDERED = ("fgray/tune/study",)


def imports(source: str) -> list[tuple[int, str, int]]:
    """(line, imported module, relative level) of every import in `source`: `import a.b`
    gives `a.b`; `from a import b, c` gives `a.b` and `a.c` (`unit_of` falls back to `a`
    where `a.b` is a name, not a module); a literal `importlib.import_module("a.b")` gives
    `a.b`. Relative imports keep their level (see `absolute`)."""
    found: list[tuple[int, str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found += [(node.lineno, f"{base}.{alias.name}" if base else alias.name, node.level)
                      for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module"
                   or getattr(node.func, "id", None) == "import_module")):
            found.append((node.lineno, node.args[0].value, 0))
    return found


def module_name(path: Path) -> str:
    """`fgray/tune/study.py` -> `fgray.tune.study`; a package's __init__ is the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def absolute(name: str, level: int, importer: Path) -> str:
    """The absolute name of an import `level` packages up from `importer` (0: as written)."""
    if not level:
        return name
    package = module_name(importer).split(".")
    if importer.name != "__init__.py":
        package.pop()
    package = package[:len(package) - (level - 1)]
    return ".".join([*package, name]) if name else ".".join(package)


def unit_of(module: str) -> str:
    """The layer unit of an `fgray` module: a subpackage (`tune`), a top-level module
    (`cli`, `storage`) or the package itself (`fgray`, also for a name defined in its
    __init__, like `fgray.__version__`)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "fgray"
    head = parts[1]
    if (PACKAGE / head).is_dir() or (PACKAGE / f"{head}.py").is_file():
        return head
    return "fgray"


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO)}:{line}"


def test_every_module_has_a_place_in_the_layers():
    units = {unit_of(module_name(p)) for p in sources()}
    unplaced = sorted(units - set(RANK) - BASE)
    assert not unplaced, (
        f"fgray/{', fgray/'.join(unplaced)} has no layer: add it to LAYERS or BASE in "
        "tests/test_layers.py and to the Layers paragraph of docs/development.md")
    assert len(sources()) > 30  # the scan found the package


def test_nothing_imports_upward():
    problems = []
    for path in sources():
        own = unit_of(module_name(path))
        for line, name, level in imports(path.read_text()):
            target = absolute(name, level, path)
            if target != "fgray" and not target.startswith("fgray."):
                continue
            unit = unit_of(target)
            if unit == own or unit in BASE:
                continue
            if own in BASE:
                problems.append(f"{where(path, line)}: base module fgray/{own} imports "
                                f"{target} (layer {unit}); base modules import only "
                                f"{', '.join(sorted(BASE))}")
            elif RANK[unit] < RANK[own]:
                problems.append(f"{where(path, line)}: {target} imported from layer {own}, "
                                f"but {unit} is above {own}")
            elif RANK[unit] == RANK[own]:
                problems.append(f"{where(path, line)}: {target} imported from layer {own}, "
                                f"but {unit} and {own} are peers")
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_ray_only_in_train_and_tune():
    problems = [f"{where(path, line)}: imports {name} outside "
                f"{', '.join(f'fgray/{u}' for u in sorted(RAY_LAYERS))}"
                for path in sources() if unit_of(module_name(path)) not in RAY_LAYERS
                for line, name, level in imports(path.read_text())
                if not level and (name == "ray" or name.startswith("ray."))]
    assert not problems, "Ray imported outside its layers:\n" + "\n".join(problems)


def test_the_scan_sees_every_kind_of_import():
    source = '''
import ray.tune
from typing import TYPE_CHECKING
from fgray.engine import spec
if TYPE_CHECKING:
    from fgray.train.trainer import Trainer
def f():
    import fgray.tune.study
    from . import sibling
    return importlib.import_module("fgray.cli")
'''
    found = imports(source)
    assert (2, "ray.tune", 0) in found and (4, "fgray.engine.spec", 0) in found
    assert (6, "fgray.train.trainer.Trainer", 0) in found
    assert (8, "fgray.tune.study", 0) in found and (9, "sibling", 1) in found
    assert (10, "fgray.cli", 0) in found
    assert absolute("sibling", 1, PACKAGE / "results" / "records.py") == "fgray.results.sibling"
    assert absolute("x", 2, PACKAGE / "results" / "__init__.py") == "fgray.x"
    assert [unit_of(m) for m in ("fgray", "fgray.__version__", "fgray.cli", "fgray.tune.study")
            ] == ["fgray", "fgray", "cli", "tune"]
    # The known Ray modules are found, so the Ray check is not vacuous.
    ray_users = {module_name(p) for p in sources()
                 if any(n == "ray" or n.startswith("ray.") for _, n, _ in imports(p.read_text()))}
    assert "fgray.tune.study.trial" in ray_users and "fgray.train.trainer" in ray_users


def test_the_docs_state_these_layers():
    text = (REPO / "docs" / "development.md").read_text()
    section = text[text.index("## Development"):]
    flat = re.sub(r"\s+", " ", section.replace("`", ""))
    chain = " → ".join(["studies/", *(", ".join(f"fgray/{u}" + (".py" if u == "cli" else "")
                                                for u in peers) for peers in LAYERS)])
    assert chain in flat, f"docs/development.md's Layers paragraph should state: {chain}"
    for base in sorted(BASE - {"fgray"}):
        named = f"fgray/{base}/" if (PACKAGE / base).is_dir() else f"fgray/{base}.py"
        assert named in flat, f"docs/development.md's Layers paragraph should name {named}"


def stated_order(package: str) -> list[str]:
    """The module order docs/development.md states for `package` ("Inside fgray/x/ each
    module imports only the ones before it: a, b, c.")."""
    text = re.sub(r"\s+", " ", (REPO / "docs" / "development.md").read_text().replace("`", ""))
    found = re.search(rf"Inside {re.escape(package)}/ each module imports only the ones "
                      r"before it: ([a-z_, ]+)\.", text)
    assert found, f"docs/development.md should state the module order of {package}/"
    return [m.strip() for m in found.group(1).split(",")]


def test_ordered_packages_import_in_one_direction():
    problems = []
    for package in ORDERED:
        order = stated_order(package)
        folder = REPO / package
        modules = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
        assert sorted(order) == modules, f"{package}/: the docs list {order}, it has {modules}"
        dotted = package.replace("/", ".")
        for rank, name in enumerate(order):
            path = folder / f"{name}.py"
            for line, target, level in imports(path.read_text()):
                target = absolute(target, level, path)
                if target == dotted:
                    problems.append(f"{where(path, line)}: imports its own package's __init__")
                if not target.startswith(dotted + "."):
                    continue
                imported = target[len(dotted) + 1:].split(".")[0]
                if imported in order and order.index(imported) >= rank:
                    problems.append(f"{where(path, line)}: {name} imports {imported}, which "
                                    f"comes after it in {package}/")
    assert not problems, "imports against the stated order:\n" + "\n".join(problems)
