"""The worker with stand-in engines: success, model failures, shutdown, lost leases, its state machine."""

from __future__ import annotations

import io
import threading
from datetime import datetime
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from PIL import Image

from hidream.engine.errors import InvalidRequestError
from hidream.service.errors import NotFound
from hidream.service.settings import Settings
from hidream.service.storage import LocalStorage
from hidream.service.store import Store
from hidream.service.worker import Worker, WorkerState, encode_image

INPUT = {"prompt": "a cat", "width": 64, "height": 32, "num_inference_steps": 3, "guidance_scale": 5.0,
         "output_format": "png", "seed": 5, "keep_original_aspect": False, "num_images": 2,
         "enable_base64_output": False}


@dataclass
class Result:
    images: list


class SolidEngine:
    """Returns one solid image per requested image; reports every step; can be told to fail."""

    def __init__(self, fail_with: Exception | None = None, step_s: float = 0.0) -> None:
        self.fail_with, self.step_s, self.calls = fail_with, step_s, 0

    def generate(self, request, progress=None, should_cancel=None):
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        steps = request.steps * request.num_images
        for i in range(1, steps + 1):
            if should_cancel is not None and should_cancel():
                from hidream.engine.errors import GenerationCanceled
                raise GenerationCanceled("stopped")
            time.sleep(self.step_s)
            if progress is not None:
                progress(i, steps, lambda i=i: Image.new("RGB", (request.width, request.height), (i, 9, 9)))
        return Result([Image.new("RGB", (request.width, request.height), (i * 40, 0, 0))
                       for i in range(request.num_images)])


@pytest.fixture
def service(tmp_path: Path):
    settings = Settings(home=tmp_path, lease_s=1.0, max_attempts=2)
    store = Store.open(settings.db_url)
    storage = LocalStorage(settings.files_dir)
    key, _ = store.create_key()
    return settings, store, storage, key.id


def submit(store: Store, key_id: str, **changes) -> str:
    return store.insert_task(key_id, "hidream-o1-image", INPUT | changes, [], max_queue=100)["id"]


def run_until(worker: Worker, condition, timeout: float = 10.0) -> None:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.stop()
    thread.join(timeout)
    assert worker.state is WorkerState.STOPPED
    assert condition(), "condition not reached"


def test_completes_stores_and_charges_each_image_once(service):
    settings, store, storage, key_id = service
    tid = submit(store, key_id)
    worker = Worker(settings, store, storage, SolidEngine)
    run_until(worker, lambda: store.get_task(tid)["status"] == "completed")
    row = store.get_task(tid)
    assert row["outputs"] == [f"outputs/{tid}/0.png", f"outputs/{tid}/1.png"]
    assert row["progress_step"] == row["progress_total"] == 6
    assert row["inference_ms"] is not None and row["attempts"] == 1
    for i, key in enumerate(row["outputs"]):
        image = Image.open(io.BytesIO(storage.get(key)))
        assert image.format == "PNG" and image.size == (64, 32)
        assert image.getpixel((0, 0)) == (i * 40, 0, 0)
        assert not set(image.info) - {"dpi"}  # no metadata beyond what the format needs
    assert store.charges(tid) == 2
    assert store.usage(key_id)["micro_usd"] == 2 * 44_000


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_output_formats(fmt):
    data = encode_image(Image.new("RGB", (40, 20), (10, 200, 30)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt.upper()


def test_a_model_error_fails_the_task_and_the_worker_keeps_serving(service):
    settings, store, storage, key_id = service
    bad = submit(store, key_id)
    good = submit(store, key_id)
    class FirstFails(SolidEngine):
        def generate(self, request, progress=None, should_cancel=None):
            if self.calls == 0:
                self.calls += 1
                raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
            return super().generate(request, progress, should_cancel)

    worker = Worker(settings, store, storage, FirstFails)
    run_until(worker, lambda: store.get_task(good)["status"] == "completed")
    failed = store.get_task(bad)
    assert failed["status"] == "failed"
    assert "the model failed on this request" in failed["error"] and "out of memory" in failed["error"]
    assert store.charges(bad) == 0 and store.charges(good) == 2
    assert worker.engine.calls == 2  # one engine, loaded once, served both


def test_an_engine_input_error_fails_with_its_message(service):
    settings, store, storage, key_id = service
    tid = submit(store, key_id)
    engine = SolidEngine(fail_with=InvalidRequestError("references", "image too thin"))
    run_until(Worker(settings, store, storage, lambda: engine),
              lambda: store.get_task(tid)["status"] == "failed")
    assert store.get_task(tid)["error"] == "references: image too thin"


def test_shutdown_puts_the_running_task_back_without_counting_the_attempt(service):
    settings, store, storage, key_id = service
    tid = submit(store, key_id, num_inference_steps=200)
    worker = Worker(settings, store, storage, lambda: SolidEngine(step_s=0.01))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while (store.get_task(tid)["progress_step"] or 0) <= 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.get_task(tid)["status"] == "processing"
    worker.stop()
    thread.join(10)
    assert worker.state is WorkerState.STOPPED
    row = store.get_task(tid)
    assert row["status"] == "created" and row["attempts"] == 0 and row["lease_owner"] is None
    assert row["started_at"] is None  # null again until a worker really starts it
    assert store.charges(tid) == 0


def test_a_lost_lease_stops_the_task_and_never_charges_twice(service):
    settings, store, storage, key_id = service
    tid = submit(store, key_id, num_inference_steps=100)
    slow = Worker(replace(settings, lease_s=0.3), store, storage, lambda: SolidEngine(step_s=0.02), worker_id="slow")
    thread = threading.Thread(target=slow.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while store.get_task(tid)["status"] != "processing" and time.monotonic() < deadline:
        time.sleep(0.01)
    # Another worker takes the task over: the first one's renewals start failing.
    with store.engine.begin() as conn:
        from sqlalchemy import update

        from hidream.service.tables import tasks
        conn.execute(update(tasks).where(tasks.c.id == tid).values(
            lease_owner="other", lease_expires_at=datetime(2100, 1, 1)))
    time.sleep(0.5)
    slow.stop()
    thread.join(5)
    row = store.get_task(tid)
    assert row["status"] == "processing" and row["lease_owner"] == "other"
    assert store.charges(tid) == 0
    assert not store.complete(tid, "slow", ["outputs/x/0.png"], 1, 44_000)


def test_expired_tasks_are_retried_then_failed(service):
    settings, store, storage, key_id = service
    tid = submit(store, key_id)
    for attempt in (1, 2):
        assert store.claim(f"dead-{attempt}", ["hidream-o1-image"], lease_s=0.05)["attempts"] == attempt
        time.sleep(0.1)
        store.recover_expired(settings.max_attempts)
    row = store.get_task(tid)
    assert row["status"] == "failed" and "stopped responding 2 times" in row["error"]
    assert store.charges(tid) == 0


def test_worker_state_machine_refuses_illegal_transitions(service):
    settings, store, storage, _ = service
    worker = Worker(settings, store, storage, SolidEngine)
    with pytest.raises(RuntimeError, match="illegal transition starting -> running"):
        worker._to(WorkerState.RUNNING)


def test_a_cancel_that_comes_after_the_last_step_keeps_no_images_and_charges_nothing(service):
    """The engine is past its last cancel check when the cancel comes: the images it made are stored, then
    completion is refused, the task ends canceled and the stored files are deleted."""
    settings, store, storage, key_id = service
    tid = submit(store, key_id)

    class CanceledAtTheEnd(SolidEngine):
        def generate(self, request, progress=None, should_cancel=None):
            result = super().generate(request, progress, should_cancel)
            assert store.cancel(tid, key_id) == "requested"
            return result

    worker = Worker(settings, store, storage, CanceledAtTheEnd)
    run_until(worker, lambda: store.get_task(tid)["status"] == "failed")
    row = store.get_task(tid)
    assert (row["error"], row["outputs"]) == ("canceled", [])
    assert store.charges(tid) == 0
    for i in range(2):
        with pytest.raises(NotFound):
            storage.get(f"outputs/{tid}/{i}.png")


def test_progress_and_previews_are_written_off_the_denoising_loop(service, monkeypatch):
    """A slow database or JPEG encoder does not hold up the steps; every report still lands, in order,
    before the outcome."""
    settings, store, storage, key_id = service
    settings = replace(settings, preview_every=1)
    written: list[tuple[int, bool]] = []
    real = Store.progress

    def slow_progress(self, task_id, worker, step, total, preview=None):
        time.sleep(0.1)
        written.append((step, preview is not None))
        return real(self, task_id, worker, step, total, preview)

    monkeypatch.setattr(Store, "progress", slow_progress)
    calls: list[float] = []

    class Timed(SolidEngine):
        def generate(self, request, progress=None, should_cancel=None):
            def timed(step, total, preview):
                started = time.perf_counter()
                progress(step, total, preview)
                calls.append(time.perf_counter() - started)
            return super().generate(request, timed, should_cancel)

    tid = submit(store, key_id, num_images=1, num_inference_steps=4)
    worker = Worker(settings, store, storage, lambda: Timed())
    run_until(worker, lambda: store.get_task(tid)["status"] == "completed")
    assert len(calls) == 4 and max(calls) < 0.05, calls  # the loop never waited for a 0.1 s write
    assert [step for step, _ in written] == [1, 2, 3, 4]  # rate limit aside, each preview step reported
    assert [p for _, p in written] == [True, True, True, False]  # no preview of the last step
    row = store.get_task(tid)
    assert row["progress_step"] == row["progress_total"] == 4
