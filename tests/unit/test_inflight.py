"""The offsets a service commits while its commands finish out of order (orchestrator/_inflight)."""

from __future__ import annotations

from orchestrator._inflight import State, Tracker, parse_metadata

TP = ("svc.commands", 0)


def _tracker(*offsets: int, committed: int = -1, metadata: str | None = None) -> Tracker:
    tracker = Tracker()
    tracker.start(TP, committed, metadata)
    for offset in offsets:
        tracker.add(TP, offset, msg=None)
    return tracker


def _finish(tracker: Tracker, offset: int) -> None:
    entry = tracker._parts[TP].entries[offset]
    entry.state, entry.record = State.DONE, f"reply-{offset}"


def test_the_offset_stops_at_the_lowest_unanswered_command() -> None:
    tracker = _tracker(10, 11, 12, 13)
    _finish(tracker, 11)
    _finish(tracker, 13)
    commit = tracker.pending_commit()
    assert commit is not None
    assert [e.record for e in commit.entries] == ["reply-11", "reply-13"], "answers go out now"
    assert commit.offsets == {TP: (10, "sent1:1,3")}, "10 holds the offset; 11 and 13 listed"
    tracker.committed(commit)
    assert tracker.pending_commit() is None

    _finish(tracker, 10)
    commit = tracker.pending_commit()
    assert commit is not None
    assert commit.offsets == {TP: (12, "sent1:1")}
    tracker.committed(commit)
    _finish(tracker, 12)
    commit = tracker.pending_commit()
    assert commit is not None and commit.offsets == {TP: (14, "")}


def test_a_new_reader_skips_what_the_metadata_lists() -> None:
    tracker = _tracker(committed=10, metadata="sent1:1,3")
    added = {o: tracker.add(TP, o, msg=None) for o in (10, 11, 12, 13, 14)}
    assert [o for o, entry in added.items() if entry is not None] == [10, 12, 14]
    for offset in (10, 12, 14):
        _finish(tracker, offset)
    commit = tracker.pending_commit()
    assert commit is not None and commit.offsets == {TP: (15, "")}


def test_a_record_seen_twice_is_answered_once() -> None:
    tracker = _tracker(5)
    assert tracker.add(TP, 5, msg=None) is None


def test_revoked_partitions_are_forgotten_and_their_entries_marked() -> None:
    tracker = _tracker(1, 2)
    dropped = tracker.drop([TP])
    assert [e.alive for e in dropped] == [False, False]
    assert not tracker.knows(TP)
    assert tracker.pending_commit() is None


def test_odd_metadata_skips_nothing() -> None:
    assert parse_metadata(10, None) == frozenset()
    assert parse_metadata(10, "something else") == frozenset()
    assert parse_metadata(10, "sent1:1,x") == frozenset()
    assert parse_metadata(-1, "sent1:1") == frozenset()
    assert parse_metadata(10, "sent1:2,5") == {12, 15}
