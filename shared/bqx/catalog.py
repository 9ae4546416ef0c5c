"""What a pair's warehouse holds: table families, names, roles, and the run manifest built from them."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from bqx.errors import BadCheckpoint

KEY = "interval_time"

# Feature tables per pair, by family (DESIGN.md: 667 in all).
PAIR_FAMILIES: dict[str, int] = {
    "cov": 180, "corr": 32, "lag": 8, "regime": 4, "base": 2,
    "agg": 3, "align": 3, "der": 3, "div": 3, "mom": 3, "mrt": 3, "reg": 3, "rev": 3, "vol": 3,
    "cyc": 1, "ext": 1, "tmp": 1,
}
CROSS_FAMILIES: dict[str, int] = {"tri": 194, "mkt": 10, "var": 63, "csi": 144}
FAMILIES: dict[str, int] = {**PAIR_FAMILIES, **CROSS_FAMILIES}
FEATURE_TABLES = sum(FAMILIES.values())  # 667
# The synthetic DuckDB warehouse's per-table versions (bqx warehouse touch), in the file's main schema beside
# _bqx_generated: never one of a dataset's tables. Written by bqx.local.warehouse, read by the DuckDB source.
VERSIONS_TABLE = "_bqx_versions"
TARGET_WINDOWS = (45, 90, 180, 360, 720, 1440, 2880)
TARGET_HORIZONS = (15, 30, 45, 60, 75, 90, 105)
TARGET_COLUMNS = tuple(f"target_bqx{w}_h{h}" for w in TARGET_WINDOWS for h in TARGET_HORIZONS)  # 49


def targets_table(pair: str) -> str:
    return f"targets_{pair}"


def family_of(table: str) -> str:
    return table.split("_", 1)[0]


def belongs_to(pair: str, table: str) -> bool:
    """A table is the pair's when the pair is its name's second token: `<family>_<pair>[_<variant>]`.
    (`cov_eurgbp_eurusd_w45` is eurgbp's covariance with eurusd, not one of eurusd's tables.)"""
    return re.match(rf"^[a-z0-9]+_{re.escape(pair)}(_|$)", table) is not None


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # Arrow type string, e.g. "double", "int64", "timestamp[us, tz=UTC]"


@dataclass(frozen=True)
class TableEntry:
    name: str
    role: str  # "feature" | "targets"
    columns: tuple[Column, ...]
    checkpoint: str = ""
    # The source's fingerprint of the table when the run was planned (its version or last modification, row count
    # and schema): two entries with the same non-empty fingerprint, columns and run row limit hold the same data.
    fingerprint: str = ""
    reused_from: str = ""  # a run whose checkpoint of this table is copied instead of reading the warehouse

    @property
    def value_columns(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.name != KEY)


@dataclass(frozen=True)
class Grid:
    """The targets' rows every checkpoint of an aligned run is cut to (issue 19): `rows` rows in row groups of
    `row_groups` rows, whose keys (interval_time as int64 microseconds, little-endian, in order) hash to
    `keys_sha256` (hex). Each aligned checkpoint carries that digest (object metadata GRID_OBJECT_KEY, Parquet
    key-value metadata GRID_FILE_KEY)."""

    rows: int
    row_groups: tuple[int, ...]
    keys_sha256: str

    def to_json(self) -> dict[str, object]:
        return {"rows": self.rows, "row_groups": list(self.row_groups), "keys_sha256": self.keys_sha256}

    @classmethod
    def from_json(cls, d: dict) -> Grid:
        g = cls(int(d["rows"]), tuple(int(n) for n in d["row_groups"]), str(d["keys_sha256"]))
        if sum(g.row_groups) != g.rows or not re.fullmatch(r"[0-9a-f]{64}", g.keys_sha256):
            raise ValueError(f"inconsistent grid: {d}")
        return g


GRID_OBJECT_KEY = "bqx_grid"  # custom object metadata of an aligned checkpoint: its grid's keys_sha256
GRID_FILE_KEY = "bqx.grid"  # the same digest in the checkpoint's Parquet key-value metadata


@dataclass(frozen=True)
class IgnoredTable:
    """A table of the pair's dataset that the run leaves out, and why (logged, listed in the manifest and report)."""

    name: str
    reason: str


@dataclass(frozen=True)
class Manifest:
    pair: str
    run_id: str
    tables: tuple[TableEntry, ...]
    source: str = ""
    row_limit: int = 0
    created_at: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)
    grid: Grid | None = None  # None: an unaligned run (older runs, local files, BQX_EXTRACT_ALIGNED=0): stream merge
    # Every warehouse read of the run is as of this time (epoch seconds; BigQuery FOR SYSTEM_TIME AS OF), so tables
    # refreshed mid-extract do not mix. 0: not pinned (manifests written before it).
    snapshot_at: float = 0.0
    ignored_tables: tuple[IgnoredTable, ...] = ()

    @property
    def targets(self) -> TableEntry:
        return next(t for t in self.tables if t.role == "targets")

    @property
    def features(self) -> tuple[TableEntry, ...]:
        return tuple(t for t in self.tables if t.role == "feature")

    def expected_objects(self) -> set[str]:
        return {t.checkpoint for t in self.tables}

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["tables"] = [
            {"name": t.name, "role": t.role, "checkpoint": t.checkpoint, "fingerprint": t.fingerprint,
             "reused_from": t.reused_from, "columns": [[c.name, c.type] for c in t.columns]}
            for t in self.tables
        ]
        if self.grid is None:
            del d["grid"]
        else:
            d["grid"] = self.grid.to_json()
        d["ignored_tables"] = [{"name": t.name, "reason": t.reason} for t in self.ignored_tables]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        try:
            tables = tuple(
                TableEntry(t["name"], t["role"], tuple(Column(n, ty) for n, ty in t["columns"]), t["checkpoint"],
                           str(t.get("fingerprint") or ""), str(t.get("reused_from") or ""))
                for t in d["tables"]  # manifests written before fingerprints have none: nothing of them is reused
            )
            m = cls(d["pair"], d["run_id"], tables, d.get("source", ""), int(d.get("row_limit", 0)),
                    float(d.get("created_at", 0.0)), dict(d.get("extra") or {}),
                    Grid.from_json(d["grid"]) if d.get("grid") else None, float(d.get("snapshot_at") or 0.0),
                    tuple(IgnoredTable(str(t["name"]), str(t["reason"])) for t in d.get("ignored_tables") or ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadCheckpoint(f"malformed manifest: {exc}") from exc
        if sum(t.role == "targets" for t in tables) != 1:
            raise BadCheckpoint("manifest must list exactly one targets table")
        return m
