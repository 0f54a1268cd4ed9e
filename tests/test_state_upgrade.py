"""State written by a6a26dd (journal schema 1) loads after the upgrade: changing the image
is the whole upgrade. The fixture was written by a6a26dd's own JournalStore (see
tests/fixtures/README.md): an outbox row, an orphan claim, and a row whose id passed that
release's check with a trailing newline (every start crashed on it)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from processor.daemon import Daemon
from processor.effects.store import JournalStore
from processor.pure.tasks import Backend
from tests.conftest import CountingBackend, make_settings, running, wait_until

FIXTURE = Path(__file__).parent / "fixtures" / "journal_a6a26dd.db"
GOOD_RESULT = "68b89107952364b0aad89c1a"
ORPHAN = "68b89107952364b0aad89c1b"
BAD_ID = "68b89107952364b0aad89c1d\n"


def _copy(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(FIXTURE, state / "journal.db")
    return state / "journal.db"


def test_schema_1_migrates_in_place_and_old_rows_count_as_dispatched(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    store = JournalStore(str(path))
    try:
        assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2
        orphans = {c.task_id: c for c in store.orphan_claims()}
        assert set(orphans) == {ORPHAN, BAD_ID}
        # a6a26dd did not record whether a claim reached a backend: it may have
        assert all(c.dispatched for c in orphans.values())
        (row,) = store.outbox()
        assert row.task_id == GOOD_RESULT and row.state == "succeeded" and row.result == [0.6, 0.8]
    finally:
        store.db.close()


async def test_a_daemon_starts_on_a6a26dd_state_delivers_releases_and_quarantines(sandbox, tmp_path: Path) -> None:
    _copy(tmp_path)
    st = sandbox.state
    for tid in (GOOD_RESULT, ORPHAN):
        st.insert_raw({"_id": tid, "type": "text_embedding", "state": "in_progress", "content": {"text": "x", "model": "m"}})
        st.pending.pop(tid, None)
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="ollama", SUPPORTED_MODELS="nomic-embed-text")
    daemon = Daemon(settings, backends={Backend.OLLAMA: CountingBackend(2)})
    async with running(daemon):
        await wait_until(lambda: st.tasks[GOOD_RESULT]["state"] == "succeeded" and st.tasks[ORPHAN]["state"] == "pending")
        assert daemon.pipeline is not None
        await wait_until(lambda: len(daemon.pipeline.book) == 0)
    assert st.tasks[GOOD_RESULT]["result"] == [0.6, 0.8]
    # the row with the bad id is gone: the next start has nothing to trip on
    store = JournalStore(str(tmp_path / "state" / "journal.db"))
    try:
        assert store.orphan_claims() == [] and store.outbox() == []
    finally:
        store.db.close()
