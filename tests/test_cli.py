"""The command line: every command has help; bad input fails fast with a clear message and starts nothing."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from bqx.cli import main


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
    return out


@pytest.mark.parametrize("path", _commands(main))
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_unknown_merge_method_is_refused_before_any_work(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(main, ["merge", "eurusd", "--method", "pandas"], env={"BQX_HOME": str(tmp_path)})
    assert result.exit_code == 2 and "pandas" in result.output
    assert not (tmp_path / "stack").exists()  # nothing was started


def test_unknown_pair_lists_the_valid_ones(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for args in (["run", "eurxxx"], ["submit", "eurxxx"], ["status", "eurxxx"], ["report", "eurxxx"]):
        result = CliRunner().invoke(main, args, env={"BQX_HOME": str(tmp_path)})
        assert result.exit_code == 1, args
        assert "unknown pair 'eurxxx'" in result.output and "gbpusd" in result.output
    assert not (tmp_path / "stack").exists()


def test_merge_needs_a_pair_or_files() -> None:
    result = CliRunner().invoke(main, ["merge"])
    assert result.exit_code == 2 and "--from" in result.output


def test_version() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"bqx, version {version('bqx')}"


def test_rows_other_than_the_generated_warehouse_are_refused_with_how_to_regenerate(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {"BQX_HOME": str(tmp_path), "BQX_LOCAL": "1"}
    made = CliRunner().invoke(main, ["warehouse", "generate", "eurusd", "--rows", "40", "--table-scale", "0.01",
                                     "--column-scale", "0.1"], env=env)
    assert made.exit_code == 0, made.output
    for args in (["run", "eurusd", "--dry-run", "--rows", "60"], ["run", "eurusd", "--rows", "60"]):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 1, result.output
        assert "generated with rows=40, not rows=60" in result.output
        assert "bqx warehouse generate eurusd --rows 60" in result.output
        assert not (tmp_path / "stack").exists()  # refused before the stack was started


def test_a_stack_started_before_the_code_changed_is_called_stale(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os

    from bqx.config import Settings
    from bqx.local import artifacts
    from bqx.local.stack import STALE_HINT, Stack, local_code, repo_root

    monkeypatch.setenv("BQX_HOME", str(tmp_path))
    monkeypatch.setenv("BQX_LOCAL", "1")
    st = Stack(Settings.from_env())
    st.dir.mkdir(parents=True)
    current = artifacts.function_source(repo_root(), "trigger", tmp_path / "artifacts" / "functions")
    (st.dir / "trigger.pid").write_text(str(os.getpid()))  # a running service: this process stands in for it
    (st.dir / "trigger.artifact").write_text(str(current.parent / "trigger-0123456789abcdef"))
    assert st.stale() == ["trigger"]
    assert "trigger" in STALE_HINT.format("trigger") and "bqx stack restart" in STALE_HINT
    assert "restart" in main.commands["stack"].commands  # type: ignore[attr-defined]
    (st.dir / "trigger.artifact").write_text(str(current))
    assert st.stale() == []
    (st.dir / "trigger.pid").write_text("999999999")  # not running: nothing to call stale
    (st.dir / "trigger.artifact").write_text("elsewhere")
    assert st.stale() == []
    # the stand-ins run this checkout's library itself: a change to it makes them stale too
    (st.dir / "gate.pid").write_text(str(os.getpid()))
    (st.dir / "gate.artifact").write_text(local_code())
    assert st.stale() == []
    (st.dir / "gate.artifact").write_text("checkout-0123456789abcdef")
    assert st.stale() == ["IAM gate"]
