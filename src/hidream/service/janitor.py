"""Removes stored files that no task needs: what a process killed at the wrong moment left behind.

Reference files are written just before their task row (the worker reads them), and deleted when the task
ends. A submit killed in between leaves files with no row; a worker killed before it cleaned up leaves an
ended task's files. Both are found here, from the one place they can be: `references/<task id>/`.
Outputs of tasks that failed are deleted by the worker that failed them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi.concurrency import run_in_threadpool

from hidream.service.storage import Storage, discard_task_files
from hidream.service.store import TERMINAL, Store

log = logging.getLogger("hidream.janitor")
SWEEP_EVERY_S = 600.0
ORPHAN_AFTER_S = 900.0  # a submit writes its files and its row within seconds: older files with no row are lost


def sweep(store: Store, storage: Storage, orphan_after_s: float = ORPHAN_AFTER_S, now: float | None = None) -> int:
    """Delete the reference files of tasks that ended, and those older than `orphan_after_s` of tasks that do
    not exist; the number of tasks whose files went."""
    now = time.time() if now is None else now
    newest: dict[str, float] = {}
    for key, modified in storage.list("references/"):
        task_id = key.split("/")[1]
        newest[task_id] = max(newest.get(task_id, 0.0), modified)
    statuses = store.task_statuses(list(newest))
    done = [tid for tid, modified in newest.items()
            if statuses.get(tid) in TERMINAL or (tid not in statuses and now - modified > orphan_after_s)]
    for task_id in done:
        discard_task_files(storage, task_id, outputs=statuses.get(task_id) != "completed")
    if done:
        log.info("removed the stored files of %d task(s) that no longer need them", len(done))
    return len(done)


class Janitor:
    """Runs `sweep` at start-up and every SWEEP_EVERY_S in an API process (an asyncio task), until stop()."""

    def __init__(self, store: Store, storage: Storage, every_s: float = SWEEP_EVERY_S) -> None:
        self.store, self.storage, self.every_s = store, storage, every_s
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await run_in_threadpool(sweep, self.store, self.storage)
            except Exception as err:  # the database or the bucket may be away: next time
                log.warning("janitor: %s (%s)", type(err).__name__, (str(err).splitlines() or [""])[0][:200])
            try:
                await asyncio.wait_for(self._stop.wait(), self.every_s)
            except TimeoutError:
                pass
