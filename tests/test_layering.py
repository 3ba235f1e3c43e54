"""The package map of docs/architecture.md as a test: which maskjax packages may import which (one direction, no cycles)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "maskjax"

# package -> modules it must not import (prefix match on the dotted name)
FORBIDDEN = {
    "attention": ("maskjax.models", "maskjax.masking", "maskjax.tasks", "maskjax.train", "maskjax.data"),
    "masking": ("maskjax.models", "maskjax.tasks", "maskjax.train", "maskjax.data"),
    "models": ("maskjax.tasks", "maskjax.train", "maskjax.data", "ml_collections"),  # models read no configs
    "tasks": ("maskjax.train", "orbax"),  # tasks know no checkpoints or meshes
    "evaluate": ("maskjax.tasks", "maskjax.train"),
    "decode": ("maskjax.models", "maskjax.tasks", "maskjax.train", "maskjax.data"),  # algorithms over logits_fn
    "data": ("maskjax.models", "maskjax.tasks", "maskjax.train"),
    # the trainer reaches tasks only through maskjax.tasks.make_task, never a task's own module
    "train": tuple(f"maskjax.tasks.{p.stem}" for p in (ROOT / "tasks").glob("*.py") if p.stem != "__init__"),
}


def is_under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imported_modules(path: pathlib.Path) -> set:
    """Absolute dotted names of every module `path` imports (relative imports resolved)."""
    package = ".".join(("maskjax",) + path.relative_to(ROOT).parent.parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_map(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"maskjax/{package} has no modules"
    violations = [f"{path.relative_to(ROOT.parent)} imports {name}" for path in files
                  for name in sorted(imported_modules(path)) if is_under(name, FORBIDDEN[package])]
    assert not violations, "\n".join(violations)


def test_no_module_imports_experiments_or_tests():
    offenders = [str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py")
                 if any(is_under(n, ("experiments", "tests")) for n in imported_modules(p))]
    assert not offenders, offenders
