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
            if rule == "local only from the cli and api" and within(m, "bqx.local") and not (
                    importer in ("bqx.cli", "bqx.api") or within(importer, "bqx.local")):
                found.add((importer, m))
            if rule == "gcp imports no stage" and within(importer, "bqx.gcp") and not any(
                    within(m, ok) for ok in ("bqx.gcp", "bqx.config", "bqx.errors", "bqx.logs")):
                found.add((importer, m))
            if rule == "parquet imports only errors" and within(importer, "bqx.parquet") and not any(
                    within(m, ok) for ok in ("bqx.parquet", "bqx.errors")):
                found.add((importer, m))
    return found


RULES = ["library imports no entrypoint", "local only from the cli and api", "gcp imports no stage",
         "parquet imports only errors"]


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


def public(package: str) -> set[str]:
    """The submodules a package's __init__ lists in __all__ (read from its source: importing it is not needed)."""
    init = LIBRARY.parent / Path(*package.split(".")) / "__init__.py"
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return {f"{package}.{name}" for name in ast.literal_eval(node.value)}
    raise AssertionError(f"{init} has no __all__")


PACKAGES = sorted(module_name(p.parent / "__init__.py") for p in LIBRARY.glob("*/__init__.py"))


def test_packages_say_what_is_public_and_others_use_only_that() -> None:
    assert {"bqx.extract", "bqx.completion", "bqx.merge", "bqx.parquet", "bqx.gcp", "bqx.local"} <= set(PACKAGES)
    users = {**library(), **{f"{p.parent.parent.name}/{p.parent.name}": imports(p, "")
                             for p in [*(REPO / "functions").glob("*/main.py"), *(REPO / "jobs").glob("*/main.py")]}}
    broken = []
    for package in PACKAGES:
        listed = public(package)
        modules = {module_name(p) for p in (LIBRARY.parent / Path(*package.split("."))).glob("*.py")} - {package}
        assert listed <= modules, f"{package}.__all__ names no module: {sorted(listed - modules)}"
        for importer, imported in users.items():
            if within(importer, package):
                continue
            broken += [f"{importer} imports {m}" for m in sorted(_real(imported) & (modules - listed))]
    assert not broken, "private modules used outside their package (list them in its __all__ if public): " + \
        ", ".join(broken)


def test_importing_bqx_loads_nothing_heavy() -> None:
    import subprocess
    import sys

    code = "import sys; before = set(sys.modules); import bqx; print(' '.join(sorted(set(sys.modules) - before)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = done.stdout.split()
    assert "bqx" in loaded
    heavy = ("pyarrow", "numpy", "duckdb", "polars", "google.cloud.", "google.api_core", "click", "rich", "matplotlib")
    assert not [m for m in loaded if m.startswith(heavy)], loaded  # a Python API there must keep these lazy
