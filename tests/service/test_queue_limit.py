"""The queue limit holds under concurrent submits (the count and the insert are one locked step)."""

import threading
from pathlib import Path

from hidream.service.errors import TooManyRequests
from hidream.service.store import Store


def test_concurrent_submits_never_exceed_max_queue(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path}/db.sqlite")
    key, _ = store.create_key()
    accepted, refused = [], []
    barrier = threading.Barrier(16)

    def submit() -> None:
        barrier.wait()
        try:
            store.insert_task(key.id, "hidream-o1-image", {}, [], max_queue=5)
            accepted.append(1)
        except TooManyRequests as err:
            assert err.retry_after > 0
            refused.append(1)

    for _ in range(3):
        store.engine.dispose()
        threads = [threading.Thread(target=submit) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(accepted) == 5 and len(refused) == 43
    assert store.queue_depth() == 5
