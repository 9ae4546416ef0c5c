"""Build each Cloud Function's source: functions/<name>/main.py + a copy of shared/bqx + a pinned requirements.txt.

    python deploy/package_functions.py            # -> build/functions/<name>/ and build/functions/<name>.zip

Cloud Functions installs requirements.txt and imports main.py from the zip's root, so `import bqx` finds the copied
package next to it. The zips are deterministic (sorted entries, fixed timestamps): the same source gives the same
bytes, hence the same object name in Terraform (it carries the zip's MD5) and no needless redeploy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = ROOT / "deploy" / "names.json"
REQUIREMENTS = ROOT / "deploy" / "functions-requirements.txt"
LIBRARY = ROOT / "shared" / "bqx"
DEFAULT_OUT = ROOT / "build" / "functions"

# Not needed at function run time: the local emulator stack and the CLI.
EXCLUDE_DIRS = {"__pycache__", "local"}
EXCLUDE_FILES = {"cli.py"}
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def functions() -> dict[str, dict[str, str]]:
    return json.loads(NAMES.read_text())["functions"]


def library_files() -> list[Path]:
    """shared/bqx files that go into every function, relative to shared/bqx."""
    out = []
    for path in sorted(LIBRARY.rglob("*")):
        rel = path.relative_to(LIBRARY)
        if path.is_dir() or any(part in EXCLUDE_DIRS for part in rel.parts) or rel.name in EXCLUDE_FILES:
            continue
        if path.suffix in {".pyc", ".pyo"}:
            continue
        out.append(rel)
    return out


def build_dir(name: str, spec: dict[str, str], out: Path, requirements: Path = REQUIREMENTS) -> Path:
    target = out / name
    if target.exists():
        shutil.rmtree(target)
    (target / "bqx").mkdir(parents=True)
    shutil.copyfile(ROOT / spec["source"] / "main.py", target / "main.py")
    shutil.copyfile(requirements, target / "requirements.txt")
    for rel in library_files():
        dest = target / "bqx" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(LIBRARY / rel, dest)
    return target


def build_zip(source_dir: Path, zip_path: Path) -> Path:
    files = sorted(p for p in source_dir.rglob("*") if p.is_file())
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in files:
            info = zipfile.ZipInfo(path.relative_to(source_dir).as_posix(), date_time=ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return zip_path


def package(out: Path = DEFAULT_OUT) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    built = {}
    for name, spec in functions().items():
        built[name] = build_zip(build_dir(name, spec, out), out / f"{name}.zip")
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for name, path in package(args.out).items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
