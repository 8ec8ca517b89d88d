"""The command line's rules, checked in process: every option has help
text, --version, and how run_cli turns each kind of failure into one line
on stderr and an exit status."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

import rdsd
from rdsd.admin import init_server
from rdsd.cli import daemon, output, rdsft
from rdsd.cli import rdsd as rdsd_cli
from rdsd.errors import AdminError, ConfigError, StoreError


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """run_cli configures structlog for a CLI process; undo it for the
    tests that run after these in the same process."""
    yield
    structlog.reset_defaults()


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "rdsd": rdsd_cli.build_parser,
    "rdsft": rdsft.build_parser,
}


def walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser and every sub-parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from walk(sub)


@pytest.mark.parametrize("prog", PARSERS)
def test_every_option_and_argument_has_help(prog: str) -> None:
    missing = []
    parsers = list(walk(PARSERS[prog]()))
    assert len(parsers) > 3
    for parser in parsers:
        assert parser.format_help()  # help text with a stray % would fail here
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                missing += [f"{parser.prog} {n}" for n in action.choices if not helps.get(n)]
                continue
            if not action.help:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"no help text: {missing}"


@pytest.mark.parametrize("prog", PARSERS)
def test_version(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        PARSERS[prog]().parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {rdsd.__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["nosuch"],
        ["job", "create", "--type", "deploy", "--package", "a-1", "--to", "c1"],
        ["package", "add"],
        ["group", "add", "g1"],
        [],
    ],
)
def test_usage_errors_are_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        rdsd_cli.build_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "error:" in err and "--help" in err, err


def test_rdsft_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["-a", "status"]):
        with pytest.raises(SystemExit) as info:
            rdsft.main(argv)
        assert info.value.code == 2
        assert len(capsys.readouterr().err.splitlines()) == 1


def test_home_before_or_after_an_rdsft_command() -> None:
    parser = rdsft.build_parser()
    assert parser.parse_args(["--home", "/x", "status"]).home == "/x"
    assert parser.parse_args(["status", "--home", "/y"]).home == "/y"
    assert parser.parse_args(["status"]).home is None


# -- run_cli: one line and a status for every kind of failure -------------------------------


def run(fn: Callable[[argparse.Namespace], int]) -> int:
    return output.run_cli("rdsd", argparse.Namespace(fn=fn))


def raising(exc: BaseException) -> Callable[[argparse.Namespace], int]:
    def fn(args: argparse.Namespace) -> int:
        raise exc

    return fn


@pytest.mark.parametrize(
    ("exc", "status", "text"),
    [
        (ConfigError("--keep '9x' has unit 'x'"), 2, "rdsd: error: --keep '9x' has unit 'x'"),
        (AdminError("no job j1"), 1, "rdsd: error: no job j1"),
        (StoreError("disk\nfull"), 1, "rdsd: error: disk full"),
        (FileNotFoundError(2, "No such file or directory", "/x"), 1, "No such file"),
    ],
)
def test_errors_become_one_line(
    exc: BaseException, status: int, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(raising(exc)) == status
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and text in err, err


def test_an_internal_error_names_the_trace_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)

    def buggy(args: argparse.Namespace) -> int:
        missing: dict[str, int] = {}
        return missing["missing"]

    assert run(buggy) == output.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "internal error: KeyError" in err
    (trace,) = tmp_path.glob("rdsd-error-*.txt")
    assert str(trace) in err
    assert "Traceback" in trace.read_text() and "buggy" in trace.read_text()
    assert trace.stat().st_mode & 0o077 == 0


def test_interrupt_is_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(raising(KeyboardInterrupt())) == output.EXIT_INTERRUPTED
    assert capsys.readouterr().err == ""


# -- rdsd run takes its log settings from rdsd.toml, flags first --------------------------------


def test_run_log_settings(tmp_path: Path) -> None:
    cfg = init_server(tmp_path / "hq", listen=("127.0.0.1", 0))
    path = cfg.paths.config
    path.write_text(path.read_text().replace('# level = "info"', 'level = "warning"'))
    parser = rdsd_cli.build_parser()
    home = str(cfg.home)
    from_file = daemon.run_config(parser.parse_args(["run", "--home", home]))
    assert (from_file.log_level, from_file.log_format) == ("warning", "console")
    flagged = daemon.run_config(
        parser.parse_args(["run", "--home", home, "--log-level", "debug", "--log-format", "json"])
    )
    assert (flagged.log_level, flagged.log_format) == ("debug", "json")


@pytest.mark.parametrize("prog", PARSERS)
def test_every_command_is_in_the_readme(prog: str) -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    leaves = [
        p.prog
        for p in walk(PARSERS[prog]())
        if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
    ]
    assert leaves
    missing = [leaf for leaf in leaves if f"| `{leaf} " not in readme]
    assert not missing, f"not in the README's command reference: {missing}"
