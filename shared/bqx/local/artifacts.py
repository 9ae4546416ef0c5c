"""The deployable artifacts, built and installed here as the cloud builds them, so the local stack runs what deploys.

- A function: the source directory deploy/package_functions.py produces (main.py, a copy of shared/bqx, the packaged
  requirements.txt), in a virtualenv installed only from that requirements.txt (Cloud Functions' build runs
  `pip install -r requirements.txt`), then `pip check`.
- A job: what jobs/Dockerfile copies (shared/bqx, jobs/) in a virtualenv installed only from requirements/jobs.txt
  with --no-deps, then `pip check`, exactly as the image is built. One local-only addition, requirements/local-jobs.txt:
  the DuckDB driver that stands in for BigQuery.

Virtualenvs are cached under the cache folder by the hash of what they install, so a warm start costs nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from bqx.errors import BqxError

JOB_REQUIREMENTS = ("requirements/jobs.txt", "requirements/local-jobs.txt")
APP = "/app/"  # the image's WORKDIR: where jobs/Dockerfile's COPY lines put the code
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "local")  # what .dockerignore keeps out of the image


class ArtifactError(BqxError):
    """A deployable artifact could not be built or installed."""


def package_functions(repo: Path) -> ModuleType:
    """deploy/package_functions.py, the one packager (it is a script, not part of the bqx package)."""
    spec = importlib.util.spec_from_file_location("bqx_package_functions", repo / "deploy" / "package_functions.py")
    if spec is None or spec.loader is None:
        raise ArtifactError(f"cannot load {repo / 'deploy' / 'package_functions.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def function_source(repo: Path, name: str, out: Path, requirements: Path | None = None) -> Path:
    """The function's deployable source directory (as `python deploy/package_functions.py` builds it), under `out`
    in a folder named by the digest of what goes into it."""
    packager = package_functions(repo)
    spec = packager.functions()[name]
    req = requirements or packager.REQUIREMENTS
    files = [repo / spec["source"] / "main.py", req, *(packager.LIBRARY / rel for rel in packager.library_files())]
    return _built(out, name, files, lambda tmp: packager.build_dir(name, spec, tmp, req))


def job_trees(repo: Path) -> list[tuple[str, str]]:
    """(source in the repo, destination under /app) of every `COPY` into /app in jobs/Dockerfile, read from the file:
    a file the image lacks is missing here too (pricing's deploy/names.json was, once)."""
    trees = []
    for line in (repo / "jobs" / "Dockerfile").read_text().splitlines():
        parts = line.split()
        if not parts or parts[0] != "COPY" or any(p.startswith("--from") for p in parts):
            continue
        src, dest = [p for p in parts[1:] if not p.startswith("--")][-2:]
        if dest.startswith(APP):
            trees.append((src, dest[len(APP):]))
    if not trees:
        raise ArtifactError("jobs/Dockerfile copies nothing into /app")
    return trees


def job_source(repo: Path, out: Path) -> Path:
    """The job image's /app (what jobs/Dockerfile copies into it), under `out` in a folder named by the digest of
    those files."""
    trees = job_trees(repo)
    files = []
    for src, _ in trees:
        root = repo / src
        found = [root] if root.is_file() else sorted(root.rglob("*"))
        files += [f for f in found if f.is_file() and not _IGNORED(str(f.parent), [f.name])
                  and "local" not in f.relative_to(repo).parts and "__pycache__" not in f.parts]

    def copy(tmp: Path) -> Path:
        for src, dest in trees:
            if (repo / src).is_file():
                (tmp / dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(repo / src, tmp / dest)
            else:
                shutil.copytree(repo / src, tmp / dest, ignore=_IGNORED)
        return tmp

    return _built(out, "app", files, copy)


def _built(out: Path, name: str, files: list[Path], build: Callable[[Path], Path]) -> Path:
    """`build` into out/<name>-<digest of files> unless it is there already. Never rebuilt in place: running
    functions and jobs import lazily from these folders, and `bqx stack up` on a running stack builds again."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.name).encode() + b"\0" + f.read_bytes() + b"\0")
    target = out / f"{name}-{digest.hexdigest()[:16]}"
    if target.exists():
        return target
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    built = build(tmp / name)
    try:
        built.rename(target)
    except OSError:  # built meanwhile by another stack start: theirs is the same content
        shutil.rmtree(built, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def job_command(repo: Path, app: Path, job: str, python: Path) -> list[str]:
    """The job's ENTRYPOINT from jobs/Dockerfile (the stage named after the job), run with the venv's python from the
    local copy of /app: the same interpreter flags and script as the container."""
    stage, entry = "", None
    for line in (repo / "jobs" / "Dockerfile").read_text().splitlines():
        words = line.split()
        if len(words) >= 4 and words[0].upper() == "FROM" and words[2].upper() == "AS":
            stage = words[3]
        elif words and words[0].upper() == "ENTRYPOINT" and stage == job:
            entry = json.loads(line.split(None, 1)[1])
    if not entry or entry[0] != "python":
        raise ArtifactError(f"jobs/Dockerfile has no exec-form ENTRYPOINT [\"python\", ...] in stage {job!r}")
    return [str(python), *(str(app / a) if (app / a).is_file() else a for a in entry[1:])]


def venv(cache: Path, name: str, requirements: list[Path], no_deps: bool,
         progress: Callable[[str], None] = lambda m: None) -> Path:
    """A virtualenv with exactly `requirements` installed (and `pip check` passing), cached by their content."""
    digest = hashlib.sha256(f"{sys.version_info[:3]}|{sys.platform}|no_deps={no_deps}".encode())
    for req in requirements:
        digest.update(req.read_bytes())
    target = cache / "venvs" / f"{name}-{digest.hexdigest()[:16]}"
    done = target / ".bqx-installed"
    if done.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two stacks starting at once build it once
        if done.exists():
            return target
        if target.exists():
            shutil.rmtree(target)
        progress(f"installing the {name} environment from {', '.join(r.name for r in requirements)} "
                 "(first start only; cached by their hash)")
        started = time.time()
        _run([sys.executable, "-m", "venv", str(target)], name)
        pip = [str(target / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--no-input"]
        args = [*pip, "install", "--quiet", *(["--no-deps"] if no_deps else [])]
        for req in requirements:
            args += ["-r", str(req)]
        _run(args, name)
        _run([*pip, "check"], name)
        done.write_text(json.dumps({"requirements": [str(r) for r in requirements], "no_deps": no_deps,
                                    "seconds": round(time.time() - started, 1)}))
    return target


def function_venv(cache: Path, source: Path, progress: Callable[[str], None] = lambda m: None) -> Path:
    return venv(cache, "function", [source / "requirements.txt"], no_deps=False, progress=progress)


def job_venv(cache: Path, repo: Path, progress: Callable[[str], None] = lambda m: None) -> Path:
    return venv(cache, "job", [repo / r for r in JOB_REQUIREMENTS], no_deps=True, progress=progress)


def _run(argv: list[str], name: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        # pip's own warnings about this machine's index settings are noise; its errors are what matter
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "is ignored: it is neither" not in ln]
        raise ArtifactError(f"building the {name} environment failed ({' '.join(argv[-3:])}):\n"
                            + "\n".join(lines[-30:]))
