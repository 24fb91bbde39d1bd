"""The SQLite queries behind each TUI view use an index, never a sort or a scan of the
messages table, so a view stays fast with 100,000 messages (bench/tui_latency.py has
the timings). Name and reason filters scan the DLQ by design (observe.dlq_find)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.app import Stem
from appliance.stores.sqlite import broker as sq

QUERIES = [
    # (what the TUI shows, the broker's statement, parameters, a step the plan must hold)
    ("dead letters, newest first", sq._DLQ_LIST, (50, 0), "SCAN dead_letters"),
    ("dead letters of a queue", sq._DLQ_LIST_QUEUE, ("q", 50, 0), "USING INDEX dead_letters_queue"),
    ("dead letter count", sq._DLQ_COUNT, ("q",), "USING COVERING INDEX dead_letters_queue"),
    ("one dead letter", sq._DLQ_GET, ("x",), "USING INDEX sqlite_autoindex_dead_letters_1"),
    ("replay or purge one", sq._DLQ_DELETE, ("x",), "USING INDEX sqlite_autoindex_dead_letters_1"),
    ("ready per queue", sq._COUNT_READY, (), "USING INDEX messages_ready"),
    ("delayed per queue", sq._COUNT_DELAYED, (1.0, 1.0), "USING INDEX messages_delayed"),
    ("in flight per queue", sq._COUNT_LEASED, (), "USING INDEX messages_leased"),
    ("dead per queue", sq._COUNT_DEAD, (), "USING COVERING INDEX dead_letters_queue"),
    ("task lookup", sq._FIND_MESSAGE, ("t",), "USING INDEX messages_task_id"),
]


@pytest.mark.parametrize(("what", "sql", "params", "step"), QUERIES, ids=[q[0] for q in QUERIES])
def test_each_view_query_uses_an_index(
    tmp_path: Path, what: str, sql: str, params: tuple[object, ...], step: str
) -> None:
    stem = Stem(broker=f"sqlite:///{tmp_path / 'stem.db'}")
    stem.enqueue("t")
    stem.close()
    with sqlite3.connect(tmp_path / "stem.db") as conn:
        steps = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    assert any(step in s for s in steps), steps
    # The newest-first page walks the rowid backwards and stops at LIMIT: no sort.
    assert not any("TEMP B-TREE FOR ORDER BY" in s for s in steps), steps
    assert not any(s == "SCAN messages" for s in steps), steps
