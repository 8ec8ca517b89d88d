"""The vocabulary: the destination lifecycle table is complete and means
what the job model says."""

from __future__ import annotations

from rdsd.domain import (
    DEST_TRANSITIONS,
    FINAL_STATES,
    SUCCESS_STATE,
    TARGET_ROLE,
    DestState,
    JobType,
    Role,
    can_move,
    can_report,
)

S = DestState


def test_every_state_has_a_row() -> None:
    assert set(DEST_TRANSITIONS) == set(DestState)


def test_final_states() -> None:
    assert {s for s in DestState if s.final} == FINAL_STATES
    assert not S.WAITING.final and not S.TRANSFERRING.final and not S.INSTALLING.final


def test_every_success_is_reachable_from_waiting() -> None:
    for state in SUCCESS_STATE.values():
        assert can_move(S.WAITING, state) or (
            can_move(S.WAITING, S.INSTALLING) and can_move(S.INSTALLING, state)
        )
    assert can_move(S.OFFERED, S.INSTALLING) and can_move(S.INSTALLING, S.INSTALLED)


def test_installed_only_after_an_install() -> None:
    """A node cannot report ``installed`` for work it never installed."""
    assert not can_move(S.WAITING, S.INSTALLED)
    assert not can_move(S.TRANSFERRING, S.INSTALLED)
    assert can_move(S.INSTALLING, S.INSTALLED)


def test_a_report_may_skip_only_a_passing_state() -> None:
    """A report from below may arrive before the report of a step its node
    passed through (``installing``): that skip, and no other move outside
    the table, is let through."""
    extra = {(o, n) for o in S for n in S if can_report(o, n) and not can_move(o, n)}
    assert extra == {(S.WAITING, S.INSTALLED), (S.TRANSFERRING, S.INSTALLED)}
    assert all(can_report(o, n) for o in S for n in S if can_move(o, n))


def test_a_cancel_is_only_left_for_a_real_outcome() -> None:
    assert not can_move(S.CANCELLED, S.WAITING)
    assert not can_move(S.CANCELLED, S.TRANSFERRING)
    assert not can_move(S.CANCELLED, S.INSTALLING)
    assert can_move(S.CANCELLED, S.INSTALLED)


def test_retry_starts_over_from_every_final_state_but_cancelled() -> None:
    for state in FINAL_STATES - {S.CANCELLED}:
        assert can_move(state, S.WAITING), state


def test_an_install_never_goes_back_to_transferring() -> None:
    assert not can_move(S.INSTALLING, S.TRANSFERRING)
    assert not can_move(S.INSTALLED, S.TRANSFERRING)


def test_job_types_name_their_destination_role() -> None:
    assert TARGET_ROLE == {
        JobType.INSTALL: Role.CLIENT,
        JobType.OFFER: Role.CLIENT,
        JobType.TRANSFER: Role.RELAY,
    }


def test_progress_detail_names_the_pace_and_keeps_its_suffix() -> None:
    from rdsd.domain import parse_progress, progress_detail

    detail = progress_detail(1258291, 3145728, "paced at 1MB/s")
    assert detail == "39% (1.2 of 3.0 MiB, paced at 1MB/s) [bytes 1258291/3145728]"
    assert parse_progress(detail) == (1258291, 3145728)
