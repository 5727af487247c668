"""The one-copy rule as pure logic: the phase table and what the source may do."""

from __future__ import annotations

import asyncio

import pytest

from tug.engine.phases import Phase, PhaseMachine
from tug.engine.source.rollback import Destination, finish_uncancelled, frozen_message, may_resume_source


def test_a_lost_commit_acknowledgement_fails_without_a_rollback() -> None:
    m = PhaseMachine()
    for ph in (Phase.PRE_CHECKPOINT, Phase.PRE_RESTORE, Phase.CHECKPOINT, Phase.TRANSFER, Phase.RESTORE, Phase.COMMIT):
        m.advance(ph)
    assert not m.can_roll_back
    m.advance(Phase.FAILED)  # used to raise IllegalTransition: no report for the user
    assert m.phase is Phase.FAILED


def test_a_lazy_restore_fills_between_restore_and_commit() -> None:
    m = PhaseMachine()
    for ph in (Phase.PRE_CHECKPOINT, Phase.PRE_RESTORE, Phase.CHECKPOINT, Phase.TRANSFER, Phase.RESTORE, Phase.FILL):
        m.advance(ph)
    # A failure while filling still goes through the rollback, which (the copy
    # ran) leaves the source frozen instead of resuming it.
    assert m.can_roll_back and not m.committed
    m.advance(Phase.COMMIT)
    assert m.committed


def test_only_an_untouched_destination_lets_the_source_resume() -> None:
    assert may_resume_source(Destination.UNTOUCHED)
    assert not may_resume_source(Destination.RAN)
    assert not may_resume_source(Destination.UNKNOWN)


@pytest.mark.parametrize("dest", [Destination.RAN, Destination.UNKNOWN])
def test_a_frozen_source_is_explained_with_the_command_that_finishes(dest: Destination) -> None:
    msg = frozen_message(dest, "web", "b", "ssh://root@b")
    assert "tug recover web --to ssh://root@b" in msg


async def test_a_second_cancellation_does_not_abandon_the_rollback() -> None:
    steps: list[str] = []

    async def rollback() -> str:
        steps.append("resume source")
        await asyncio.sleep(0.05)
        steps.append("abort destination")
        await asyncio.sleep(0.05)
        steps.append("unlock network")
        return "rolled-back"

    async def driver() -> tuple[str, bool]:
        return await finish_uncancelled(asyncio.ensure_future(rollback()))

    task = asyncio.ensure_future(driver())
    await asyncio.sleep(0.02)
    task.cancel()  # the second Ctrl-C, while the rollback runs
    await asyncio.sleep(0.02)
    task.cancel()  # and a third
    outcome, cancelled = await task
    assert outcome == "rolled-back" and cancelled
    assert steps == ["resume source", "abort destination", "unlock network"]
