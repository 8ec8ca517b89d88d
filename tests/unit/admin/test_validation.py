"""Every refusal of the admin API, table-driven: the exception class (a
malformed value is a ConfigError, exit 2 at the command line; a request that
cannot be done here an AdminError, exit 1), one line naming what is wrong,
and nothing changed on disk or in the database.

One server home is made per module (keys take a moment) and copied for each
case: relay1, client1 and client2 enrolled, client3 enrolled and revoked,
group ``lab`` of client1 and client2, package ``tool-1.0`` used by an
unfinished install job, package ``spare-1.0`` used by nothing.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from rdsd.admin import Admin, enroll, init_node, init_server
from rdsd.config import NodeConfig
from rdsd.domain import Role
from rdsd.errors import AdminError, ConfigError, UserError
from rdsd.packages.manifest import seal
from rdsd.util.parse import DAY, split_package_id
from tests.helpers import snapshot

NOW = time.time()


@dataclass
class Ctx:
    """A copy of the template deployment for one case."""

    root: Path
    admin: Admin
    job: str  # the unfinished install job of tool-1.0

    @property
    def home(self) -> Path:
        return self.root / "server"

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def bundles(self) -> Path:
        return self.root / "bundles"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("template")
    home = root / "server"
    init_server(home, name="hq", listen=("127.0.0.1", 0))
    (root / "bundles").mkdir()
    for name, role in (
        ("relay1", Role.RELAY),
        ("client1", Role.CLIENT),
        ("client2", Role.CLIENT),
        ("client3", Role.CLIENT),
    ):
        enroll(home, name, role, root / "bundles" / f"{name}.bundle")
    src = root / "src"
    src.mkdir()
    (src / "install.sh").write_text("#!/bin/sh\necho installed\n")
    with Admin(home) as admin:
        admin.add_package(src, "tool", "1.0", "sh install.sh")
        admin.add_package(src, "spare", "1.0")
        admin.add_group("lab", ["client1", "client2"])
        job = admin.create_job("install", "tool-1.0", ["client1"])
        admin.revoke("client3")
    return root, job


@pytest.fixture
def ctx(template: tuple[Path, str], tmp_path: Path) -> Iterator[Ctx]:
    root, job = template
    copy = tmp_path / "dep"
    shutil.copytree(root, copy)
    admin = Admin(copy / "server")
    try:
        yield Ctx(copy, admin, job)
    finally:
        admin.close()


@dataclass(frozen=True)
class Refusal:
    name: str
    call: Callable[[Ctx], object]
    error: type[UserError]
    phrases: tuple[str, ...]


def _too_far() -> float:
    return NOW + 11 * 365 * DAY


REFUSALS = [
    # -- packages --------------------------------------------------------------------
    Refusal(
        "keep-99999999d",
        lambda c: c.admin.add_package(c.src, "big", "1.0", keep=99999999 * DAY),
        ConfigError,
        ("keep", "out of range", "at most 3650d (10 years)"),
    ),
    Refusal(
        "keep-zero",
        lambda c: c.admin.add_package(c.src, "big", "1.0", keep=0),
        ConfigError,
        ("keep 0 must be more than zero",),
    ),
    Refusal(
        "install-unclosed-quote",
        lambda c: c.admin.add_package(c.src, "q", "1.0", install="sh -c 'echo"),
        ConfigError,
        ("no closing quotation",),
    ),
    Refusal(
        "install-empty",
        lambda c: c.admin.add_package(c.src, "q", "1.0", install="  "),
        ConfigError,
        ("has no command",),
    ),
    Refusal(
        "version-with-dash",
        lambda c: c.admin.add_package(c.src, "my-app", "1-2"),
        ConfigError,
        ("version '1-2' contains '-'", "like '1_2'"),
    ),
    Refusal(
        "name-ends-with-dash",
        lambda c: c.admin.add_package(c.src, "app-", "1.0"),
        ConfigError,
        ("package name 'app-'", "not starting or ending with '-'"),
    ),
    Refusal(
        "name-with-slash",
        lambda c: c.admin.add_package(c.src, "../app", "1.0"),
        ConfigError,
        ("package name '../app' is not allowed",),
    ),
    Refusal(
        "source-not-a-directory",
        lambda c: c.admin.add_package(c.root / "nosuch", "app", "1.0"),
        AdminError,
        ("is not a directory",),
    ),
    Refusal(
        "package-exists",
        lambda c: c.admin.add_package(c.src, "tool", "1.0"),
        AdminError,
        ("tool-1.0 already exists",),
    ),
    Refusal(
        "keep-unknown-package",
        lambda c: c.admin.keep_package("nosuch-1.0", 3600),
        AdminError,
        ("no package 'nosuch-1.0' in this storehouse", "rdsd package list"),
    ),
    Refusal(
        "keep-malformed-id",
        lambda c: c.admin.keep_package("../etc", 3600),
        ConfigError,
        ("package id '../etc' is not NAME-VERSION",),
    ),
    Refusal(
        "keep-out-of-range",
        lambda c: c.admin.keep_package("tool-1.0", 20 * 365 * DAY),
        ConfigError,
        ("keep", "at most 3650d"),
    ),
    Refusal(
        "remove-unknown-package",
        lambda c: c.admin.remove_package("nosuch-1.0"),
        AdminError,
        ("no package 'nosuch-1.0'",),
    ),
    Refusal(
        "remove-package-in-use",
        lambda c: c.admin.remove_package("tool-1.0"),
        AdminError,
        ("package tool-1.0 is used by unfinished job j", "cancel it"),
    ),
    # -- jobs ------------------------------------------------------------------------
    Refusal(
        "job-type-unknown",
        lambda c: c.admin.create_job("deploy", "tool-1.0", ["client1"]),
        ConfigError,
        ("job type 'deploy' is not allowed", "install, transfer, offer"),
    ),
    Refusal(
        "install-to-a-relay",
        lambda c: c.admin.create_job("install", "tool-1.0", ["relay1"]),
        AdminError,
        ("an install job goes to clients only", "relay1 is a relay"),
    ),
    Refusal(
        "offer-to-a-relay",
        lambda c: c.admin.create_job("offer", "tool-1.0", ["client1", "relay1"]),
        AdminError,
        ("an offer job goes to clients only", "relay1 is a relay"),
    ),
    Refusal(
        "transfer-to-a-client",
        lambda c: c.admin.create_job("transfer", "tool-1.0", ["client1"]),
        AdminError,
        ("a transfer job goes to relays only", "client1 is a client"),
    ),
    Refusal(
        "transfer-to-a-group-of-clients",
        lambda c: c.admin.create_job("transfer", "tool-1.0", ["group:lab"]),
        AdminError,
        ("a transfer job goes to relays only", "client1 is a client"),
    ),
    Refusal(
        "unknown-node",
        lambda c: c.admin.create_job("install", "tool-1.0", ["client1", "ghost"]),
        AdminError,
        ("no node named ghost", "enroll it first"),
    ),
    Refusal(
        "unknown-group",
        lambda c: c.admin.create_job("install", "tool-1.0", ["group:nosuch"]),
        AdminError,
        ("no group named nosuch", "rdsd group list"),
    ),
    Refusal(
        "revoked-node",
        lambda c: c.admin.create_job("install", "tool-1.0", ["client3"]),
        AdminError,
        ("revoked node(s) cannot get jobs: client3",),
    ),
    Refusal(
        "unknown-package",
        lambda c: c.admin.create_job("install", "nosuch-1.0", ["client1"]),
        AdminError,
        ("no package 'nosuch-1.0' in this storehouse",),
    ),
    Refusal(
        "malformed-destination",
        lambda c: c.admin.create_job("install", "tool-1.0", ["client1", "a/b"]),
        ConfigError,
        ("destination 'a/b' is not allowed", "A-Z a-z 0-9 . _ -"),
    ),
    Refusal(
        "malformed-group",
        lambda c: c.admin.create_job("install", "tool-1.0", ["group:.."]),
        ConfigError,
        ("group name '..' is not allowed",),
    ),
    Refusal(
        "no-destination",
        lambda c: c.admin.create_job("install", "tool-1.0", []),
        ConfigError,
        ("no destination given",),
    ),
    Refusal(
        "at-in-the-past",
        lambda c: c.admin.create_job("install", "tool-1.0", ["client1"], at=NOW - 3600),
        ConfigError,
        ("is in the past", "give no time to run the job now"),
    ),
    Refusal(
        "at-too-far-ahead",
        lambda c: c.admin.create_job("install", "tool-1.0", ["client1"], at=_too_far()),
        ConfigError,
        ("more than ten years ahead",),
    ),
    Refusal(
        "at-not-finite",
        lambda c: c.admin.create_job("install", "tool-1.0", ["client1"], at=float("nan")),
        ConfigError,
        ("is not a number of seconds",),
    ),
    Refusal(
        "malformed-request-id",
        lambda c: c.admin.create_job("install", "tool-1.0", ["client1"], request_id="a b"),
        ConfigError,
        ("request id 'a b' is not allowed",),
    ),
    Refusal(
        "status-unknown-job",
        lambda c: c.admin.job_status("jnosuch"),
        AdminError,
        ("no job jnosuch", "rdsd job list"),
    ),
    Refusal(
        "status-malformed-job",
        lambda c: c.admin.job_status("../j"),
        ConfigError,
        ("job id '../j' is not allowed",),
    ),
    Refusal("cancel-unknown-job", lambda c: c.admin.cancel("jnosuch"), AdminError, ("no job",)),
    Refusal("retry-unknown-job", lambda c: c.admin.retry("jnosuch"), AdminError, ("no job",)),
    Refusal(
        "retry-nothing-failed",
        lambda c: c.admin.retry(c.job),
        AdminError,
        ("has no failed destinations",),
    ),
    Refusal(
        "prune-zero",
        lambda c: c.admin.prune_jobs(0),
        ConfigError,
        ("older than 0 must be more than zero",),
    ),
    # -- groups and nodes ------------------------------------------------------------
    Refusal(
        "group-with-unknown-node",
        lambda c: c.admin.add_group("g1", ["client1", "ghost"]),
        AdminError,
        ("no node named ghost", "enroll it first"),
    ),
    Refusal(
        "group-with-revoked-node",
        lambda c: c.admin.add_group("g1", ["client3"]),
        AdminError,
        ("revoked node(s) cannot join a group: client3",),
    ),
    Refusal(
        "group-name-malformed",
        lambda c: c.admin.add_group("a/b", ["client1"]),
        ConfigError,
        ("group name 'a/b' is not allowed",),
    ),
    Refusal(
        "group-member-malformed",
        lambda c: c.admin.add_group("g1", ["client1", "x y"]),
        ConfigError,
        ("group member 'x y' is not allowed",),
    ),
    Refusal(
        "group-without-members",
        lambda c: c.admin.add_group("g1", []),
        ConfigError,
        ("name at least one node",),
    ),
    Refusal(
        "remove-unknown-group",
        lambda c: c.admin.remove_group("nosuch"),
        AdminError,
        ("no group named nosuch",),
    ),
    Refusal(
        "remove-non-member",
        lambda c: c.admin.remove_group("lab", ["client1", "relay1"]),
        AdminError,
        ("not in group lab: relay1",),
    ),
    Refusal(
        "revoke-unknown-node",
        lambda c: c.admin.revoke("ghost"),
        AdminError,
        ("no node named ghost",),
    ),
    Refusal(
        "revoke-malformed-name",
        lambda c: c.admin.revoke(".."),
        ConfigError,
        ("node name '..' is not allowed",),
    ),
    # -- enrolment and homes -----------------------------------------------------------
    Refusal(
        "re-enroll-under-another-role",
        lambda c: enroll(c.home, "client1", Role.RELAY, c.bundles / "new.bundle"),
        AdminError,
        ("client1 is already enrolled as a client", "needs --force"),
    ),
    Refusal(
        "enroll-over-an-existing-bundle",
        lambda c: enroll(c.home, "client9", Role.CLIENT, c.bundles / "client1.bundle"),
        AdminError,
        ("already exists", "--force"),
    ),
    Refusal(
        "enroll-revoked-name",
        lambda c: enroll(c.home, "client3", Role.CLIENT, c.bundles / "new.bundle"),
        AdminError,
        ("client3 was revoked",),
    ),
    Refusal(
        "enroll-server-role",
        lambda c: enroll(c.home, "other", "server", c.bundles / "new.bundle"),
        ConfigError,
        ("role 'server' is not allowed: use relay or client",),
    ),
    Refusal(
        "enroll-malformed-name",
        lambda c: enroll(c.home, "a b", Role.CLIENT, c.bundles / "new.bundle"),
        ConfigError,
        ("node name 'a b' is not allowed",),
    ),
    Refusal(
        "enroll-into-missing-directory",
        lambda c: enroll(c.home, "client9", Role.CLIENT, c.root / "nodir" / "x.bundle"),
        AdminError,
        ("does not exist",),
    ),
    Refusal(
        "init-over-a-home",
        lambda c: init_server(c.home, name="again"),
        AdminError,
        ("is already an rdsd home",),
    ),
    Refusal(
        "init-node-wrong-bundle-role",
        lambda c: init_node(
            c.root / "newhome", Role.RELAY, c.bundles / "client1.bundle", ("127.0.0.1", 1)
        ),
        AdminError,
        ("is for a client, not a relay",),
    ),
    Refusal(
        "load-unknown-override",
        lambda c: NodeConfig.load(c.home, colour="blue"),
        ConfigError,
        ("not settings: colour",),
    ),
    Refusal(
        "load-overrides-that-clash",
        lambda c: NodeConfig.load(c.home, ping_interval=90.0),
        ConfigError,
        ("timeouts.ping_interval 90s must be less than timeouts.idle 30s",),
    ),
]


@pytest.mark.parametrize("case", REFUSALS, ids=lambda c: c.name)
def test_refused_cleanly(ctx: Ctx, case: Refusal) -> None:
    before = snapshot(ctx.root)
    with pytest.raises(UserError) as info:
        case.call(ctx)
    exc = info.value
    assert type(exc) is case.error, f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert message and "\n" not in message, message
    for phrase in case.phrases:
        assert phrase in message, message
    assert snapshot(ctx.root) == before


def test_every_refusal_names_a_distinct_case() -> None:
    names = [c.name for c in REFUSALS]
    assert len(names) == len(set(names))


def test_the_snapshot_sees_what_a_command_changes(ctx: Ctx) -> None:
    """The "nothing changed" above means something: a change of the store,
    of the database or of a bundle file shows."""
    before = snapshot(ctx.root)
    ctx.admin.add_group("lab", ["relay1"])
    after_db = snapshot(ctx.root)
    assert after_db != before
    ctx.admin.keep_package("spare-1.0", 3600)
    assert snapshot(ctx.root) != after_db


# -- what is accepted -------------------------------------------------------------------


def test_package_ids_cannot_collide(ctx: Ctx) -> None:
    """(my-app-1, 2) and (my-app, 1-2) once both made my-app-1-2; now the
    version may not hold '-', so every id splits back at its last '-'."""
    pid = ctx.admin.add_package(ctx.src, "my-app-1", "2")
    assert pid == "my-app-1-2"
    assert split_package_id(pid) == ("my-app-1", "2")
    with pytest.raises(ConfigError, match="contains '-'"):
        ctx.admin.add_package(ctx.src, "my-app", "1-2")
    other = ctx.admin.add_package(ctx.src, "my-app", "1.2")
    assert other == "my-app-1.2" and split_package_id(other) == ("my-app", "1.2")
    info = {p.id: (p.name, p.version) for p in ctx.admin.packages()}
    assert info[pid] == ("my-app-1", "2") and info[other] == ("my-app", "1.2")


def test_a_near_past_at_means_now(ctx: Ctx) -> None:
    """A time a few seconds ago (a command typed slowly, a clock a little
    behind) is not a mistake; a minute and more is."""
    job = ctx.admin.create_job("install", "spare-1.0", ["client2"], at=time.time() - 5)
    assert ctx.admin.job_status(job)["at"] is not None


def test_re_enroll_same_role_and_force(ctx: Ctx) -> None:
    out = ctx.bundles / "again.bundle"
    enroll(ctx.home, "client1", Role.CLIENT, out)
    assert out.exists()
    first = out.read_bytes()
    enroll(ctx.home, "client1", Role.RELAY, out, force=True)
    assert out.read_bytes() != first
    node = ctx.admin.db.node("client1")
    assert node is not None and node.role == Role.RELAY


def test_a_job_for_an_expired_package_is_refused(ctx: Ctx) -> None:
    """A package past its keep time would be evicted from relays while the
    job still needs it: creating a job for it is refused, naming the fix."""
    m = ctx.admin.store.manifest("spare-1.0")
    assert m is not None
    aged = replace(m, added=m.added - 2 * DAY, keep=DAY)
    ctx.admin.store.replace_envelope("spare-1.0", seal(aged, ctx.admin._signer()))
    before = snapshot(ctx.root)
    with pytest.raises(AdminError) as info:
        ctx.admin.create_job("install", "spare-1.0", ["client1"])
    assert "package spare-1.0 expired at" in str(info.value)
    assert "rdsd package keep spare-1.0" in str(info.value)
    assert snapshot(ctx.root) == before
    ctx.admin.keep_package("spare-1.0", 30 * DAY)
    assert ctx.admin.create_job("install", "spare-1.0", ["client1"])
