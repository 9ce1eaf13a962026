"""Specification of the package's layout: rooms that import only downwards, imports that
resolve, and a README Layout table that lists every module."""

import ast
import importlib
import pathlib

import pytest

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPOSITORY / "tf_mamlpp"
# Each room may import from its own and from lower ones; core and data sit side by side
# and import neither from the other.
ROOMS = {"tf_mamlpp": 0, "hardware": 0, "ops": 1, "core": 2, "data": 2, "serving": 3, "run": 4}
SIDE_BY_SIDE = {"core", "data"}


def room(name):
    """The room of a dotted name in the package: its subpackage, or the package itself."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else "tf_mamlpp"


def project_imports(path):
    """The tf_mamlpp names that the file at `path` imports, at any depth of its code."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tf_mamlpp"):
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names
                            if alias.name.startswith("tf_mamlpp"))
    return imported


def modules():
    """The package's modules, tf_mamlpp/__init__.py first."""
    return sorted(path for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"
                  or path.parent == PACKAGE)


# The public API (tf_mamlpp/__init__.py) names every room's exports, lazily, by string.
@pytest.mark.parametrize("path", modules()[1:], ids=lambda path: str(path.relative_to(REPOSITORY)))
def test_no_import_runs_up_a_room(path):
    importer = room(".".join(path.relative_to(REPOSITORY).with_suffix("").parts))
    for module in project_imports(path):
        target = room(module)
        assert ROOMS[target] <= ROOMS[importer], f"{path.name} imports {module}"
        assert not (target != importer and {target, importer} == SIDE_BY_SIDE), (
            f"{path.name} imports {module}")


def test_the_readme_layout_table_lists_every_module():
    readme = (REPOSITORY / "README.md").read_text()
    table = readme[readme.index("\n## Layout\n"):readme.index("\n## Dependencies\n")]
    for path in modules():
        relative = path.relative_to(PACKAGE)
        shown = f"tf_mamlpp/{relative}" if len(relative.parts) == 1 else str(relative)
        assert f"| `{shown}` |" in table, shown


def importers():
    """Every Python file of the repository that may import the package: the package, main.py,
    the benchmarks, tools, experiments and tests."""
    return sorted(path for path in REPOSITORY.rglob("*.py")
                  if path.relative_to(REPOSITORY).parts[0] in
                  {"tf_mamlpp", "main.py", "benchmarks", "tools", "experiments", "tests"})


def resolves(name):
    """Whether a dotted tf_mamlpp name is a module, or a name a module defines."""
    try:
        importlib.import_module(name)
        return True
    except ModuleNotFoundError:
        module, _, attribute = name.rpartition(".")
        return hasattr(importlib.import_module(module), attribute)


@pytest.mark.parametrize("path", importers(), ids=lambda path: str(path.relative_to(REPOSITORY)))
def test_every_import_of_the_package_resolves(path):
    """Imports inside functions too, which only the code path that runs them would load:
    a module moved to another room breaks no script quietly."""
    unresolved = sorted(name for name in project_imports(path) if not resolves(name))
    assert unresolved == [], f"{path.name} imports names that do not exist: {unresolved}"
