"""Operator commands import only what they use.

An ``rdsd`` listing at fleet size used to spend most of its time importing
(the daemon, certificates, rich, the message classes) before it read a
row. These tests pin that down without timing anything: each runs a real
command in a fresh interpreter and looks at ``sys.modules`` when it ends,
so a later import at the top of a shared module cannot silently bring the
cost back. Where a module is needed after all, it is imported by the
function that needs it (see the comments next to those imports).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rdsd.admin import Admin
from rdsd.domain import JobType, Role
from tests.helpers import Deployment, enroll_node

#: Modules a command that reads the job database has no use for.
HEAVY = (
    "asyncio",
    "cryptography",
    "cryptography.x509",
    "importlib.metadata",
    "msgpack",
    "protocol.connection",
    "protocol.frames",
    "protocol.messages",
    "rdsd.admin.setup",
    "rdsd.child",
    "rdsd.claims",
    "rdsd.net",
    "rdsd.node",
    "rdsd.packages.store",
    "rdsd.parent",
    "rdsd.security",
    "rich",
    "shtab",
    "ssl",
    "structlog",
)

#: Runs rdsd's command line in this interpreter, then prints which of the
#: modules named in argv[1] (JSON) were imported, as the last line of stderr.
PROBE = """
import json, sys
heavy = json.loads(sys.argv[1])
from rdsd.cli.rdsd import main
try:
    status = main(sys.argv[2:])
except SystemExit as exc:
    status = exc.code
sys.stdout.flush()
loaded = sorted(m for m in heavy if m in sys.modules)
print("\\n" + json.dumps({"status": status, "loaded": loaded}), file=sys.stderr)
"""


def imported_by(*argv: str) -> tuple[object, list[str], str]:
    """(exit status, which of HEAVY were imported, stdout) of ``rdsd ARGV``
    run in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(HEAVY), *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    last = proc.stderr.strip().splitlines()[-1]
    result = json.loads(last)
    return result["status"], result["loaded"], proc.stdout


@pytest.fixture
def job_home(deployment: Deployment, package_src: Path) -> tuple[Path, str]:
    """A server home with two clients, a relay and an install job."""
    for name in ("c1", "c2"):
        enroll_node(deployment, name, Role.CLIENT)
    enroll_node(deployment, "r1", Role.RELAY)
    with Admin(deployment.server.home) as admin:
        pid = admin.add_package(package_src, "tool", "1.0", "true")
        job = admin.create_job(JobType.INSTALL, pid, ["c1", "c2"])
    return deployment.server.home, job


def test_importing_the_command_line_imports_nothing_heavy() -> None:
    code = (
        "import json, sys; import rdsd.cli.rdsd, rdsd.cli.rdsft; "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    # rdsft needs the node's child half for -a: only rdsd's module is checked here.
    code = code.replace(", rdsd.cli.rdsft", "")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout) == []


def test_help_of_a_command_imports_nothing_heavy() -> None:
    status, loaded, out = imported_by("job", "status", "--help")
    assert status == 0 and "job id" in out
    assert loaded == []


@pytest.mark.parametrize(
    "argv",
    [
        ["job", "status", "JOB", "--json"],
        ["job", "status", "JOB"],
        ["job", "list"],
        ["job", "list", "--json"],
        ["nodes", "--json"],
        ["nodes"],
        ["group", "list"],
    ],
    ids=" ".join,
)
def test_listings_import_nothing_heavy(job_home: tuple[Path, str], argv: list[str]) -> None:
    """The listings an operator runs against a fleet read the job database
    and print: no certificates, no store, no event loop, no wire, no rich,
    no structlog (nothing in them logs)."""
    home, job = job_home
    args = [job if a == "JOB" else a for a in argv]
    status, loaded, out = imported_by(*args, "--home", str(home))
    assert status == 0, out
    assert job in out or argv[0] in ("nodes", "group")
    assert loaded == []


def test_version_is_printed_without_reading_the_installed_metadata() -> None:
    """``--version`` prints the version written in ``rdsd/_version.py``,
    and nothing reads the installed metadata to find it."""
    import rdsd

    status, loaded, out = imported_by("--version")
    assert status == 0
    assert out.strip() == f"rdsd {rdsd.__version__}"
    assert loaded == []


def test_a_command_that_logs_finds_structlog_configured() -> None:
    """A command that reaches code which logs (adding a package, ``rdsft
    -a``) imports structlog on the way, after ``run_cli`` set up logging:
    it is configured before its first event (warnings and errors on
    stderr, nothing on stdout but the command's own answer)."""
    code = (
        "import sys; from rdsd.cli import output; import argparse\n"
        "def fn(args):\n"
        "    import structlog\n"
        "    log = structlog.get_logger('probe')\n"
        "    log.info('probe.quiet', node='n1')\n"
        "    log.warning('probe.loud', node='n1')\n"
        "    print('answer')\n"
        "    return 0\n"
        "sys.exit(output.run_cli('rdsd', argparse.Namespace(fn=fn)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout == "answer\n"
    assert "probe.loud" in proc.stderr and "node=n1" in proc.stderr
    assert "probe.quiet" not in proc.stderr


def test_structlog_already_imported_is_configured_at_once() -> None:
    code = (
        "import structlog\n"
        "from rdsd.util.logs import configure_on_import\n"
        "configure_on_import('json', 'error')\n"
        "structlog.get_logger().warning('probe.hidden')\n"
        "structlog.get_logger().error('probe.shown', job='j1')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    event = json.loads(line)
    assert event["event"] == "probe.shown" and event["job"] == "j1"


def test_lazy_exports_resolve_to_the_same_objects() -> None:
    """Every name the packages export still resolves, to the object its
    module defines, and an unknown one is an AttributeError as before."""
    import protocol
    import protocol.messages
    import rdsd
    import rdsd.admin
    import rdsd.node

    for package in (protocol, rdsd, rdsd.admin, rdsd.node):
        for name in package.__all__:
            assert getattr(package, name) is not None, (package.__name__, name)
        with pytest.raises(AttributeError):
            package.no_such_name  # noqa: B018
    assert protocol.Report is protocol.messages.Report
    assert protocol.is_safe_name is protocol.messages.is_safe_name
    assert rdsd.Admin is rdsd.admin.Admin
    assert isinstance(rdsd.__version__, str) and rdsd.__version__


def test_the_version_in_the_code_is_the_installed_packages() -> None:
    """``rdsd/_version.py`` is the one place the version is written; the
    installed metadata is built from it, so the two never disagree."""
    from importlib.metadata import version

    import rdsd
    from rdsd._version import VERSION

    assert version("rdsd") == VERSION == rdsd.__version__
