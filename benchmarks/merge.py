"""Merge benchmark (issue 9): one command, one table.

    python benchmarks/merge.py [--shapes a,b,c] [--quick] [--timeout 600]
                               [--contenders floor,copy,ours,ours-gcs,compose,compose-gcs,polars,duckdb]

Shapes: (a) 10 value columns x 100k rows x 667 tables + targets, (b) the same at 500k rows, (c) the warehouse's real
column mix (~17,000 columns) x 20k rows; A, C, D (2k rows), E (100k rows): the same, aligned (issue 19: each
checkpoint LEFT-JOINed onto the targets' keys, carrying the grid's digest), which the compose contenders need.
Inputs are generated once into benchmarks/.cache/ (one Parquet file per
table, sorted by interval_time). Each contender runs in its own process; wall time and peak RSS are of its whole
process tree (polled), scratch is the peak size of its scratch directory. A contender over --timeout or over
--memory-cap is killed and reported as such.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import PAIR, SHAPES, BenchShape, Result, ensure_data, gib, input_bytes, quick, run_tree  # noqa: E402

KEY = "interval_time"
CONTENDERS = ("floor", "copy", "ours", "ours-gcs", "compose", "compose-gcs", "compose-gcs-tails", "polars", "duckdb")
GCS_CONTENDERS = ("ours-gcs", "compose-gcs", "compose-gcs-tails")
# compose-gcs: the run as the extract leaves it, footer index included; -tails: without it (one tail read each)
COMPOSE_GCS = ("compose-gcs", "compose-gcs-tails")
BUCKET = "bench-checkpoints"
REPEATED = ("floor", "copy", "ours", "ours-gcs", "compose", *COMPOSE_GCS)
DISK_RESERVE = 4 << 30  # a contender whose output or scratch would leave less free disk than this is stopped
PY = sys.executable


# ----------------------------------------------------------------------------------------------- contenders
def _tables(src: Path) -> tuple[Path, list[Path]]:
    files = sorted(src.glob("*.parquet"))
    targets = next(p for p in files if p.stem.startswith("targets"))
    return targets, [p for p in files if p != targets]


def _prefix(table: str) -> str:
    from bqx.layout import prefix_of

    return prefix_of(PAIR, table)


def run_floor(src: Path, dst: Path, scratch: Path) -> dict:
    """Decode every input fully and encode it again into one file (same writer settings, 2 threads)."""
    import pyarrow.parquet as pq

    from bqx.parquet.conventions import WRITER_OPTIONS

    targets, features = _tables(src)
    lock = threading.Lock()
    with open(dst, "wb") as out:
        def one(p: Path) -> None:
            t = pq.read_table(p)
            buf = io.BytesIO()
            pq.write_table(t, buf, **WRITER_OPTIONS)
            del t
            with lock:
                out.write(buf.getbuffer())

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, [targets, *features]))
    return {"bytes": dst.stat().st_size}


def run_copy(src: Path, dst: Path, scratch: Path) -> dict:
    """Every input's bytes appended to one file, the fastest way the machine has: copy_file_range (the kernel moves
    page-cache pages; nothing passes through user space), as ours does for aligned chunks."""
    targets, features = _tables(src)
    with open(dst, "wb") as out:
        for p in [targets, *features]:
            with open(p, "rb") as f:
                left = os.fstat(f.fileno()).st_size
                while left:
                    n = os.copy_file_range(f.fileno(), out.fileno(), left)
                    if not n:
                        raise OSError(f"copy_file_range stopped with {left} bytes of {p} left")
                    left -= n
    return {"bytes": dst.stat().st_size}


def run_ours_gcs(src: Path, dst: Path, scratch: Path) -> dict:
    """Ours reading every checkpoint from fake-gcs-server (STORAGE_EMULATOR_HOST) as the merge job does, through
    the same blob readers as bqx.merge.publish. The output goes to a local file: fake-gcs-server rewrites the whole
    object on every chunk of a resumable upload (128 MB took 3.4 s, 512 MB 22 s here), so uploading to it would
    time the stand-in, not the merge."""
    from bqx.merge import allocator

    allocator.configure(int(os.environ["BQX_MEMORY_BUDGET_BYTES"]))
    from bqx.config import Settings
    from bqx.gcp import storage
    from bqx.merge.plan import MergeInput, object_opener
    from bqx.merge.stream import merge

    settings = Settings.from_env()
    bucket = storage.bucket(settings, BUCKET)
    versions = storage.list_versions(settings, BUCKET, "")  # as the merge job lists a run's checkpoints
    targets, features = _tables(src)

    def opener(name: str):  # type: ignore[no-untyped-def]
        return object_opener(bucket, name, *versions[name])

    t = MergeInput(targets.stem, "", opener(targets.name), remote=True)
    fs = [MergeInput(p.stem, _prefix(p.stem), opener(p.name), remote=True) for p in features]
    with open(dst, "wb") as sink:
        stats = merge(t, fs, sink, memory_budget=int(os.environ["BQX_MEMORY_BUDGET_BYTES"]))
    return {"bytes": stats.bytes, "rows": stats.rows, "merge_seconds": round(stats.seconds, 2)}


def _key_bytes(path: Path) -> int:
    """Compressed bytes of a file's key column: what local_grid reads of the targets to check their digest."""
    import pyarrow.parquet as pq

    md = pq.read_metadata(path)
    i = pq.read_schema(path).get_field_index(KEY)
    return sum(md.row_group(r).column(i).total_compressed_size for r in range(md.num_row_groups))


def run_compose(src: Path, dst: Path, scratch: Path) -> dict:
    """The compose merge on local files (bqx merge --from on aligned checkpoints): the files appended with
    copy_file_range and one new footer; it reads footers and the targets' key column."""
    from bqx.merge import compose
    from bqx.merge.plan import local_inputs

    t, features = local_inputs(src, pair=PAIR)
    grid = compose.local_grid(t)
    if grid is None:
        raise SystemExit("inputs are not aligned: use an aligned shape (A, C, D, E)")
    with open(dst, "wb") as sink:
        stats = compose.merge_local(t, features, sink, grid)
    read = stats.bytes_read + _key_bytes(src / f"{t.table}.parquet")
    return {"bytes": stats.bytes, "rows": stats.rows, "bytes_read": read, "read_share": read / input_bytes(src),
            "merge_seconds": round(stats.seconds, 2)}


def run_compose_gcs(src: Path, dst: Path, scratch: Path) -> dict:
    """The compose merge against fake-gcs-server as the merge job runs it (bqx.merge.compose.merge_gcs): footers
    taken from the extract's footer index, the footer uploaded, the file composed in a tree in the bucket. The composed
    object stays there (the parent downloads it to compare)."""
    from bqx.catalog import Manifest
    from bqx.config import Settings
    from bqx.gcp import storage
    from bqx.gcp.clients import storage_client
    from bqx.merge import compose

    settings = Settings.from_env()
    settings = type(settings)(**{**settings.__dict__, "staging_bucket": BUCKET})
    manifest = Manifest.from_json(storage.read_json(settings, BUCKET, "manifest.json")[0])
    blobs = {b.name: b for b in storage_client(settings).list_blobs(BUCKET, prefix="checkpoints/")}
    done = compose.merge_gcs(settings, manifest, blobs)
    total = input_bytes(src)
    return {"bytes": done.stats.bytes, "rows": done.stats.rows, "bytes_read": done.stats.bytes_read,
            "footers_indexed": done.stats.footers_indexed,
            "read_share": done.stats.bytes_read / total, "merge_seconds": round(done.stats.seconds, 2),
            "object": done.blob.name}


class FakeGcs:
    """fake-gcs-server (filesystem backend) on a free loopback port, holding one shape's inputs in BUCKET."""

    def __init__(self, root: Path) -> None:
        from bqx.local.stack import fake_gcs_binary, free_port

        self.root, self.port = root, free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(fake_gcs_binary()), "-host", "127.0.0.1", "-port", str(self.port), "-scheme", "http",
             "-backend", "filesystem", "-filesystem-root", str(root), "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{self.port}", "BQX_LOCAL": "1",
                    "NO_GCE_CHECK": "True"}

    def load(self, src: Path) -> None:
        import urllib.request

        for _ in range(300):
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/storage/v1/b", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        # A client of its own: the library's clients are cached per Settings, and STORAGE_EMULATOR_HOST differs.
        client = storage.Client(project="bench", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": self.env["STORAGE_EMULATOR_HOST"]})
        bucket = client.create_bucket(BUCKET)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: bucket.blob(p.name).upload_from_filename(str(p)), src.glob("*.parquet")))
        self.client = client

    def load_run(self, src: Path, footer_index: bool = True) -> None:
        """The aligned inputs as an extracted run: checkpoints named as the layout does, tagged with the grid's
        digest (object metadata), and a manifest with the grid (bucket/manifest.json)."""
        import pyarrow.parquet as pq

        from bqx import layout
        from bqx.catalog import GRID_FILE_KEY, GRID_OBJECT_KEY, Column, Grid, Manifest, TableEntry
        from bqx.parquet.conventions import type_name
        from bqx.parquet.tails import FooterIndex, TailKeeper

        bucket = self.client.bucket(BUCKET)
        targets, features = _tables(src)
        md = pq.read_metadata(targets)
        digest = md.metadata[GRID_FILE_KEY.encode()].decode()
        grid = Grid(md.num_rows, tuple(md.row_group(r).num_rows for r in range(md.num_row_groups)), digest)
        entries = []
        for p in [targets, *features]:
            cp = layout.checkpoint(PAIR, "bench", p.stem)
            entries.append(TableEntry(p.stem, "targets" if p == targets else "feature",
                                      tuple(Column(f.name, type_name(f.type)) for f in pq.read_schema(p)), cp))

        def up(pe: tuple[Path, TableEntry]) -> None:
            b = bucket.blob(pe[1].checkpoint)
            b.metadata = {GRID_OBJECT_KEY: digest}
            b.upload_from_filename(str(pe[0]))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(up, zip([targets, *features], entries, strict=True)))
        # The extract's footer index, as its task saves it: the merge job takes the footers from it.
        index = FooterIndex() if footer_index else None
        for p, e in zip([targets, *features], entries, strict=True):
            if index is not None:
                keeper = TailKeeper(io.BytesIO())
                keeper.write(p.read_bytes())
                index.add(e.checkpoint, keeper.footer())
        if index is not None:
            bucket.blob(layout.extract_footers(PAIR, "bench", 0, 0)).upload_from_string(index.encode())
        manifest = Manifest(PAIR, "bench", tuple(entries), grid=grid)
        bucket.blob("manifest.json").upload_from_string(json.dumps(manifest.to_json()))

    def download(self, name: str, dst: Path) -> None:
        self.client.bucket(BUCKET).blob(name).download_to_filename(str(dst))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def run_polars(src: Path, dst: Path, scratch: Path) -> dict:
    """Each table left-joined onto the targets' keys (order kept), then one horizontal concat, written once."""
    import polars as pl

    targets, features = _tables(src)
    base = pl.read_parquet(targets)
    keys = base.select(KEY)
    frames = [base]
    for p in features:
        df = pl.read_parquet(p)
        pre = _prefix(p.stem)
        aligned = keys.join(df, on=KEY, how="left", maintain_order="left").drop(KEY)
        frames.append(aligned.rename({c: f"{pre}_{c}" for c in aligned.columns}))
    out = pl.concat(frames, how="horizontal")
    out.write_parquet(dst, compression="snappy")
    return {"rows": out.height, "columns": out.width}


def run_duckdb(src: Path, dst: Path, scratch: Path, memory_limit: str = "6GB", batch: int = 40) -> dict:
    """Batched joins: each batch of tables left-joined onto the targets' keys into a table (ordered by key), then
    the targets and the batch tables positionally joined and written in one COPY."""
    import duckdb

    targets, features = _tables(src)
    con = duckdb.connect(str(scratch / "bench.duckdb"))
    con.execute("SET TimeZone='UTC'")
    con.execute(f"SET memory_limit='{memory_limit}'")
    con.execute("SET threads=2")
    con.execute(f"SET temp_directory='{scratch / 'tmp'}'")
    con.execute("SET preserve_insertion_order=true")
    con.execute("SET enable_progress_bar=false")
    con.execute(f"CREATE TABLE k AS SELECT {KEY} FROM read_parquet('{targets}') ORDER BY {KEY}")
    names = []
    for b in range(0, len(features), batch):
        chunk = features[b : b + batch]
        sel, joins = [], []
        for i, p in enumerate(chunk):
            cols = [c for c in duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{p}')").fetchall() if c[0] != KEY]
            pre = _prefix(p.stem)
            sel += [f't{i}."{c[0]}" AS "{pre}_{c[0]}"' for c in cols]
            joins.append(f"LEFT JOIN read_parquet('{p}') t{i} ON t{i}.{KEY} = k.{KEY}")
        name = f"b{b // batch}"
        con.execute(f"CREATE TABLE {name} AS SELECT {', '.join(sel)} FROM k {' '.join(joins)} ORDER BY k.{KEY}")
        names.append(name)
    positional = " ".join(f"POSITIONAL JOIN {n}" for n in names)
    con.execute(f"COPY (SELECT * FROM read_parquet('{targets}') {positional}) TO '{dst}' "
                "(FORMAT parquet, COMPRESSION snappy)")
    con.close()
    return {"bytes": dst.stat().st_size}


# ----------------------------------------------------------------------------------------------- comparison
def compare(ours: Path, other: Path, sample: int = 300) -> str:
    """'yes' if row count, column names/order and a sample of columns (always the key and the last one) are equal."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    a, b = pq.ParquetFile(ours), pq.ParquetFile(other)
    if a.metadata.num_rows != b.metadata.num_rows:
        return f"no: rows {b.metadata.num_rows} vs {a.metadata.num_rows}"
    na, nb = a.schema_arrow.names, b.schema_arrow.names
    if na != nb:
        return f"no: columns differ ({len(nb)} vs {len(na)})"
    step = max(1, len(na) // sample)
    cols = sorted({0, len(na) - 1, *range(1, len(na), step)})
    names = [na[i] for i in cols]
    ta, tb = a.read(columns=names), b.read(columns=names)
    for n in names:
        x, y = ta.column(n), tb.column(n)
        if x.type != y.type:
            try:
                y = y.cast(x.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                return f"no: {n} type {y.type} vs {x.type}"
        if not x.equals(y):
            return f"no: {n} values"
    return f"yes ({len(names)} cols)"


# ----------------------------------------------------------------------------------------------- driver
def _child(args: argparse.Namespace) -> None:
    src, dst, scratch = Path(args.src), Path(args.dst), Path(args.scratch)
    fn = {"floor": run_floor, "copy": run_copy, "polars": run_polars, "duckdb": run_duckdb,
          "ours-gcs": run_ours_gcs, "compose": run_compose, "compose-gcs": run_compose_gcs,
          "compose-gcs-tails": run_compose_gcs}[args.child]
    t0 = time.time()
    report = fn(src, dst, scratch)
    report["inner_seconds"] = round(time.time() - t0, 2)
    print(json.dumps(report))


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_page_cache() -> None:
    """Empty the page cache (needs root; skipped otherwise) so each run finds the same free memory: otherwise the
    first writer after a long pause pays for evicting old pages and later ones reuse the pages freed by deleting
    the previous output."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    except OSError:
        pass


def median_of(tries: list[tuple[Result, int]]) -> tuple[Result, int]:
    """The run with the median wall time (its CPU time with it); peak RSS and scratch: the largest of any run."""
    if any(r.status != "ok" for r, _ in tries):
        return next(t for t in tries if t[0].status != "ok")
    ranked = sorted(tries, key=lambda t: t[0].seconds)
    res, _ = ranked[(len(ranked) - 1) // 2]
    res.peak_rss = max(r.peak_rss for r, _ in tries)
    res.detail = f"{len(tries)} runs: " + ", ".join(f"{r.seconds:.1f}" for r, _ in tries) if len(tries) > 1 else ""
    return res, max(s for _, s in tries)


def run_contender(name: str, src: Path, dst: Path, timeout: float, cap: int, budget: str,
                  env: dict[str, str] | None = None) -> tuple[Result, int]:
    scratch = Path(tempfile.mkdtemp(prefix=f"bqx-bench-{name}-", dir=dst.parent))
    if name == "ours":
        cmd = [str(Path(PY).with_name("bqx")), "merge", PAIR, "--from", str(src), "--to", str(dst),
               "--memory-budget", budget, "--json", "--method", "stream"]
    else:
        cmd = [PY, str(Path(__file__).resolve()), "--child", name, "--src", str(src), "--dst", str(dst),
               "--scratch", str(scratch)]
    peak_scratch = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            try:
                peak_scratch[0] = max(peak_scratch[0], _dir_size(scratch))
            except OSError:
                pass

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        from bqx.config import parse_bytes

        run_env = {"BQX_MEMORY_BUDGET": budget, "BQX_MEMORY_BUDGET_BYTES": str(parse_bytes(budget)), **(env or {})}
        res = run_tree(cmd, timeout, memory_cap=cap, disk_floor=(dst.parent, DISK_RESERVE), env=run_env)
    finally:
        stop.set()
        w.join()
        shutil.rmtree(scratch, ignore_errors=True)
    return res, peak_scratch[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="a,c", help="comma-separated: a, b, c (default a,c)")
    ap.add_argument("--quick", action="store_true", help="scaled-down shapes, for a smoke run")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per contender")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of floor, copy, ours and ours-gcs; the median is reported (Polars and DuckDB run once)")
    ap.add_argument("--memory-cap", type=float, default=16.0, help="GiB; a contender above this is killed (OOM)")
    ap.add_argument("--memory-budget", default="1GiB", help="ours: --memory-budget")
    ap.add_argument("--out", type=Path, default=None, help="where outputs go (default: a temp dir in the cache)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return

    contenders = [c for c in args.contenders.split(",") if c]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        ap.error(f"unknown contenders {sorted(unknown)}")
    shapes: list[BenchShape] = []
    for k in args.shapes.split(","):
        s = SHAPES[k.strip()]
        shapes.append(quick(s) if args.quick else s)
    cap = int(args.memory_cap * 2**30)
    rows = []
    for shape in shapes:
        print(f"# shape {shape.key}: {shape.label} - preparing data", file=sys.stderr, flush=True)
        src = ensure_data(shape)
        meta = json.loads((src / ".complete").read_text())
        out_dir = Path(args.out or tempfile.mkdtemp(prefix="out-", dir=src.parent))
        out_dir.mkdir(parents=True, exist_ok=True)
        results: dict[str, tuple[Result, int]] = {}
        ours_path = out_dir / "ours.parquet"
        order = ["ours", *[c for c in contenders if c != "ours"]] if "ours" in contenders else contenders
        for name in order:
            dst = out_dir / f"{name}.parquet"
            gcs = None
            try:
                if name in GCS_CONTENDERS:
                    print(f"#   {name}: loading the inputs into fake-gcs-server ...", file=sys.stderr, flush=True)
                    gcs = FakeGcs(out_dir / "gcs")
                    gcs.load(src)
                    if name in COMPOSE_GCS:
                        gcs.load_run(src, footer_index=name == "compose-gcs")
                tries = []
                for _ in range(args.repeat if name in REPEATED else 1):
                    # The same start for everyone: the last output deleted, dirty pages flushed, the page cache
                    # emptied and then holding just the inputs.
                    dst.unlink(missing_ok=True)
                    os.sync()
                    drop_page_cache()
                    for p in src.glob("*.parquet"):
                        p.read_bytes()
                    print(f"#   {name} ...", file=sys.stderr, flush=True)
                    tries.append(run_contender(name, src, dst, args.timeout, cap, args.memory_budget,
                                               gcs.env if gcs else None))
                    if tries[-1][0].status != "ok":
                        break
                res, scratch = median_of(tries)
                if gcs and name in COMPOSE_GCS and res.status == "ok" and res.output:
                    gcs.download(res.output["object"], dst)  # to compare with ours (not timed)
            finally:
                if gcs:
                    gcs.stop()
            eq = "-"
            if res.status == "ok" and name in ("compose", *COMPOSE_GCS) and ours_path.exists():
                eq = compare(ours_path, dst, sample=10**6)  # every column: same values, other row groups
            elif res.status == "ok" and name == "ours-gcs" and ours_path.exists():
                import filecmp

                eq = "same bytes" if filecmp.cmp(ours_path, dst, shallow=False) else compare(ours_path, dst)
            elif res.status == "ok" and name in ("polars", "duckdb") and ours_path.exists():
                eq = compare(ours_path, dst)
            elif name == "ours" and res.status == "ok":
                eq = "(ours)"
            results[name] = (res, scratch)
            if res.status == "ok" and res.output and "read_share" in res.output:
                res.detail = (f"read {res.output['bytes_read'] / 2**20:.1f} MiB = {res.output['read_share']:.2%} of "
                              f"the inputs; merge {res.output['merge_seconds']} s"
                              + (f"; {res.output['footers_indexed']} footers from the index"
                                 if "footers_indexed" in res.output else "")
                              + (f"; {res.detail}" if res.detail else ""))
            print(f"#   {name}: {res.status} {res.seconds:.1f}s {gib(res.peak_rss)} {eq} {res.detail}",
                  file=sys.stderr, flush=True)
            rows.append((shape, name, res, scratch, eq))
            if name != "ours":
                dst.unlink(missing_ok=True)
            elif shutil.disk_usage(out_dir).free < 1.1 * input_bytes(src) + DISK_RESERVE:
                # No room for another output beside ours: later contenders are not compared with it.
                print("#   (not enough disk to keep ours for comparison)", file=sys.stderr, flush=True)
                ours_path.unlink(missing_ok=True)
        ours_path.unlink(missing_ok=True)
        if args.out is None:
            shutil.rmtree(out_dir, ignore_errors=True)
        print(f"#   inputs: {meta['tables']} tables, {meta['columns']} columns, {input_bytes(src) / 2**30:.2f} GiB",
              file=sys.stderr, flush=True)
        base = {n: results[n][0] for n in ("floor", "copy") if n in results and results[n][0].status == "ok"}
        rows = [(*r, base) if r[0] is shape else r for r in rows]

    print()
    print("| shape | contender | seconds | / floor | / byte copy | CPU s | CPU / floor | peak RSS | scratch "
          "| equals ours | runs (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, name, res, scratch, eq, base in rows:
        if res.status == "ok":
            secs = f"{res.seconds:.1f}"
            rf = f"{res.seconds / base['floor'].seconds:.2f}x" if "floor" in base else "-"
            rc = f"{res.seconds / base['copy'].seconds:.2f}x" if "copy" in base else "-"
            cf = f"{res.cpu / base['floor'].cpu:.2f}x" if "floor" in base else "-"
        else:
            what = {"timeout": f"no result in {args.timeout:.0f} s", "oom": f"OOM (> {args.memory_cap:.0f} GiB)",
                    "disk": f"out of disk (scratch {gib(scratch)})"}
            secs, rf, rc, cf = what.get(res.status, f"error: {res.detail}"), "-", "-", "-"
        print(f"| {shape.label} | {name} | {secs} | {rf} | {rc} | {res.cpu:.1f} | {cf} | {gib(res.peak_rss)} | "
              f"{gib(scratch)} | {eq} | {res.detail.split(': ', 1)[-1] if res.status == 'ok' else ''} |")


if __name__ == "__main__":
    main()
