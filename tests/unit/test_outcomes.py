"""`shared.outcomes.UnconfirmedWrites.dispatch`: which undo runs for which writes.

Pure logic, against fakes; the statements (mark, confirm, undo, sweep) run against the real
server in tests/integration/test_unknown_outcomes.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import cast

import pytest

from shared.config import DatabaseConfig
from shared.db import Connection, Database
from shared.outcomes import Unconfirmed, UnconfirmedWrites, Undo

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CONN = cast(Connection, object())


class Undone:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def undo(self, kind: str) -> Undo:
        async def run(conn: Connection, writes: Sequence[Unconfirmed], now: datetime) -> None:
            assert conn is CONN
            assert now == NOW
            self.calls.append((kind, [write.subject for write in writes]))

        return run


def writes_for(undone: Undone) -> UnconfirmedWrites:
    db = cast(Database, SimpleNamespace(config=DatabaseConfig(), service="test"))
    return UnconfirmedWrites(
        db, "markers", {"create": undone.undo("create"), "rotation": undone.undo("rotation")}
    )


def write(kind: str, subject: str) -> Unconfirmed:
    return Unconfirmed(kind, subject, {})


async def test_each_kind_is_undone_once_with_its_writes_in_order() -> None:
    undone = Undone()
    await writes_for(undone).dispatch(
        CONN,
        [write("create", "a"), write("rotation", "b"), write("create", "c")],
        NOW,
    )
    assert undone.calls == [("create", ["a", "c"]), ("rotation", ["b"])]


async def test_a_kind_without_an_undo_is_refused_before_anything_is_undone() -> None:
    undone = Undone()
    with pytest.raises(LookupError, match="'renewal'"):
        await writes_for(undone).dispatch(CONN, [write("create", "a"), write("renewal", "b")], NOW)
    assert undone.calls == []


def test_the_grace_and_the_interval_come_from_the_database_settings() -> None:
    writes = writes_for(Undone())
    assert (writes.grace, writes.interval) == (30.0, 5.0)
