"""The import rules of docs/ARCHITECTURE.md, read from the source (ast): every import counts, lazy ones inside
functions too, since a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "shared" / "bqx"

# Imports that break a rule today, each in another engineer's area, with who owns the fix. The test fails when one
# is gone (remove it here) as well as when a new one appears.
PENDING = {
    # the column model (KEY, Column) lives in bqx.catalog; moving it under parquet/ belongs to the parquet/ owner
    ("bqx.parquet.conventions", "bqx.catalog"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package: str) -> set[str]:
    """Every module `path` imports, absolute (`from bqx import runs` -> bqx.runs; relative imports resolved)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # a submodule, or just a name in base
    return found


def library() -> dict[str, set[str]]:
    """module -> the bqx (and functions/jobs) modules it imports, for every module of shared/bqx."""
    out = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        out[name] = {m for m in imports(path, package) if m.split(".")[0] in ("bqx", "functions", "jobs", "main")}
    return out


def _real(modules: set[str]) -> set[str]:
    """Only names that are modules or packages of the library (drop `bqx.config.Settings`-style names)."""
    return {m for m in modules if (LIBRARY.parent / Path(*m.split("."))).with_suffix(".py").exists()
            or (LIBRARY.parent / Path(*m.split("."))).is_dir()}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(rule: str) -> set[tuple[str, str]]:
    """(importer, imported) pairs of the library that break `rule`."""
    found = set()
    for importer, imported in library().items():
        for m in _real(imported) | {i for i in imported if i.split(".")[0] != "bqx"}:
            if m == "bqx":
                continue
            if rule == "library imports no entrypoint" and m.split(".")[0] in ("functions", "jobs", "main"):
                found.add((importer, m))
            if rule == "local only from cli" and within(m, "bqx.local") and not (
                    importer == "bqx.cli" or within(importer, "bqx.local")):
                found.add((importer, m))
            if rule == "gcp imports no stage" and within(importer, "bqx.gcp") and not any(
                    within(m, ok) for ok in ("bqx.gcp", "bqx.config", "bqx.errors", "bqx.logs")):
                found.add((importer, m))
            if rule == "parquet imports only errors" and within(importer, "bqx.parquet") and not any(
                    within(m, ok) for ok in ("bqx.parquet", "bqx.errors")):
                found.add((importer, m))
    return found


RULES = ["library imports no entrypoint", "local only from cli", "gcp imports no stage", "parquet imports only errors"]


@pytest.mark.parametrize("rule", RULES)
def test_the_library_keeps_its_import_rules(rule: str) -> None:
    broken = violations(rule) - PENDING
    assert not broken, f"{rule}: " + ", ".join(f"{a} imports {b}" for a, b in sorted(broken))


def test_pending_exceptions_are_still_real() -> None:
    found = set().union(*(violations(rule) for rule in RULES))
    assert PENDING <= found, f"fixed, remove from PENDING: {sorted(PENDING - found)}"


def test_entrypoints_import_the_library_and_nothing_else_of_the_repo() -> None:
    entrypoints = sorted([*(REPO / "functions").glob("*/main.py"), *(REPO / "jobs").glob("*/main.py")])
    assert len(entrypoints) == 4
    for path in entrypoints:
        found = imports(path, "")
        assert any(within(m, "bqx") for m in found), f"{path} does not import the library"
        ours = {m.split(".")[0] for m in found} & {"functions", "jobs", "main", "tests", "scripts", "deploy"}
        assert not ours, f"{path} imports {ours}"


def test_the_scanner_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The rules above are only as good as this reading of imports."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from bqx.local import stack\n    import bqx.gcp.storage\nfrom . import x\n")
    found = imports(src, "bqx.merge")
    assert {"bqx.local", "bqx.local.stack", "bqx.gcp.storage", "bqx.merge", "bqx.merge.x"} <= found
