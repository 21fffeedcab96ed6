"""The worker: owns the model, claims tasks from the store, runs them, stores and bills the images."""

from __future__ import annotations

import base64
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Any, Protocol

from PIL import Image
from sqlalchemy.exc import SQLAlchemyError

from hidream.service.loras import local_file
from hidream.service.settings import Settings
from hidream.service.storage import Storage, discard_task_files
from hidream.service.store import CANCELED, Store

log = logging.getLogger("hidream.worker")

DB_RETRY_FIRST_S, DB_RETRY_MAX_S = 0.5, 30.0  # backoff while the database is unreachable
FORMATS = {"png": ("PNG", {}), "jpeg": ("JPEG", {"quality": 95}), "webp": ("WEBP", {"quality": 95})}


class EngineLike(Protocol):
    """What the worker needs of the engine: a request in, images out, progress and cancel hooks."""

    def generate(self, request: Any, progress: Callable | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> Any: ...


class WorkerState(Enum):
    STARTING = "starting"
    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


_ALLOWED = {
    WorkerState.STARTING: {WorkerState.IDLE, WorkerState.STOPPED},
    WorkerState.IDLE: {WorkerState.RUNNING, WorkerState.STOPPING},
    WorkerState.RUNNING: {WorkerState.IDLE, WorkerState.STOPPING},
    WorkerState.STOPPING: {WorkerState.STOPPED},
    WorkerState.STOPPED: set(),
}


class ShutdownRequested(Exception):
    pass


def heartbeat_interval_s(lease_s: float) -> float:
    """How often a worker advertises itself in the workers table (a few beats per lease, 1 s at least)."""
    return max(1.0, lease_s / 3)


def stale_after_s(lease_s: float) -> float:
    """A worker that missed three heartbeats in a row is taken for gone."""
    return 3 * heartbeat_interval_s(lease_s)


ENGINE_FACTS = ("precision", "quantize", "offload", "variant")


def engine_info(engine: Any) -> dict[str, str | None]:
    """What the workers table records of how a loaded engine runs: its precision (bf16 | bf16-fp32acc | fp32),
    quantize (None | fp8), offload (none | layers) and variant; None where the engine does not say."""
    facts = {name: getattr(engine, name, None) for name in ENGINE_FACTS}
    return {name: None if value is None else str(value) for name, value in facts.items()}


def encode_image(image: Image.Image, fmt: str) -> bytes:
    """The image in `fmt`, with no metadata beyond what the format needs."""
    name, options = FORMATS[fmt]
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=name, **options)
    return buf.getvalue()


def preview_data_uri(image: Image.Image, max_side: int) -> str:
    """A small JPEG of the image as a data: URI (what the progress stream shows while a task runs)."""
    small = image.convert("RGB")
    small.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


class CancelRequested(Exception):
    pass


def task_loras(task: dict[str, Any], settings: Settings, storage: Storage) -> list[tuple[str, Any]]:
    """The task's LoRAs as (the path the request gave, a LoraSpec of this machine's file); LoraError naming
    `loras[i].path` when a file is not here."""
    from hidream.engine.lora import LoraSpec

    return [(entry["path"], LoraSpec(local_file(entry, i, settings, storage), float(entry.get("scale", 1.0))))
            for i, entry in enumerate(task["input"].get("loras", []))]


def build_request(task: dict[str, Any], references: list[bytes], loras: list[Any] | None = None):
    from hidream.engine.pipeline import GenerationRequest
    from hidream.engine.seams import SeamSmoothing

    inp = task["input"]
    lora_field = {"loras": loras} if loras else {}  # an engine that predates LoRAs runs the other tasks
    return GenerationRequest(
        # the refiner's rewrite where the request asked for one and got it (refine_prompt)
        prompt=inp.get("refined_prompt", inp["prompt"]), width=inp["width"], height=inp["height"],
        references=references,
        keep_original_aspect=inp["keep_original_aspect"], snap_to_native=inp.get("snap_to_native", False),
        layout=inp.get("layout_boxes"),
        seam_smoothing=SeamSmoothing(**inp["seam_smoothing"]) if inp.get("seam_smoothing") else None,
        cache=inp.get("cache", "off"),
        steps=inp["num_inference_steps"],
        guidance=inp["guidance_scale"], seed=inp["seed"], num_images=inp["num_images"],
        # extensions, stored only when a request gave them (tasks queued before them have none)
        scheduler=inp.get("scheduler"), timesteps=inp.get("timesteps"), noise_scale=inp.get("noise_scale"),
        noise_scale_end=inp.get("noise_scale_end"), noise_clip_std=inp.get("noise_clip_std"), **lora_field,
    )


class Worker:
    """One model, one task at a time; leases renewed while running; a failing task never stops it."""

    def __init__(self, settings: Settings, store: Store, storage: Storage,
                 load_engine: Callable[[], EngineLike], worker_id: str | None = None,
                 poll_s: float = 0.1) -> None:
        self.settings, self.store, self.storage = settings, store, storage
        self.load_engine = load_engine
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.poll_s = poll_s
        self.state = WorkerState.STARTING
        self.stop_event = threading.Event()
        self.engine: EngineLike | None = None
        self.load_error: str | None = None  # why the model could not be loaded, if it could not
        self.current_task: str | None = None  # the id of the task it runs, if any
        self._recovered_at = float("-inf")  # when it last put expired tasks back in the queue
        self._beat_wake = threading.Event()  # set on each state change: the heartbeat reports it at once
        self._beat_done = threading.Event()
        self._beat_thread: threading.Thread | None = None

    def _to(self, state: WorkerState) -> None:
        if state not in _ALLOWED[self.state]:
            raise RuntimeError(f"worker: illegal transition {self.state.value} -> {state.value}")
        self.state = state
        self._beat_wake.set()

    def stop(self) -> None:
        """Ask the loop to end: a running task stops at its next step and goes back to the queue."""
        self.stop_event.set()

    def run(self) -> None:
        """Load the model, then serve tasks until stop(); if the model cannot load, `load_error` says why."""
        try:
            self.engine = self.load_engine()
        except Exception as err:
            log.exception("worker %s: the model failed to load", self.id)
            self.load_error = f"{type(err).__name__}: {err}"
            self._to(WorkerState.STOPPED)
            return
        cache = getattr(self.engine, "lora_cache", None)  # parsed LoRAs kept between tasks (an LRU)
        if cache is not None:
            cache.max_bytes = self.settings.lora_cache_bytes
        self._to(WorkerState.IDLE)
        models = list(self.settings.model_ids)
        log.info("worker %s: ready for %s", self.id, ", ".join(models))
        self._start_heartbeat()
        backoff = DB_RETRY_FIRST_S
        while not self.stop_event.is_set():
            try:
                self._serve_one(models)
                backoff = DB_RETRY_FIRST_S
            except SQLAlchemyError as err:
                # The database is down or unreachable: wait and try again; a task we held keeps its
                # lease until it expires, then any worker retries it, so nothing is lost.
                log.warning("worker %s: database unavailable (%s); retrying in %.1f s", self.id,
                            str(err).splitlines()[0][:200], backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, DB_RETRY_MAX_S)
        self._to(WorkerState.STOPPING)
        self._stop_heartbeat()
        self._to(WorkerState.STOPPED)

    def _serve_one(self, models: list[str]) -> None:
        """Recover expired leases (every half lease at most), then run one task or wait for one to be queued."""
        if time.monotonic() - self._recovered_at >= self.settings.lease_s / 2:
            _, failed = self.store.recover_expired(self.settings.max_attempts)
            self._recovered_at = time.monotonic()
            for tid in failed:  # an attempt of a dead worker may have stored images: none is kept
                self._discard(tid, outputs=True)
        task = self.store.claim(self.id, models, self.settings.lease_s)
        if task is None:
            # The store wakes us when a task is queued (PostgreSQL: NOTIFY from any process; SQLite: a
            # submit in this process), so on PostgreSQL a longer wait adds no latency; 1 s keeps stop() prompt.
            self.store.wait_for_task(max(self.poll_s, 1.0) if self.store.postgres else self.poll_s)
            return
        self.current_task = task["id"]
        self._to(WorkerState.RUNNING)
        try:
            self.process(task)
        finally:
            self.current_task = None
            if self.state is WorkerState.RUNNING:
                self._to(WorkerState.IDLE)

    def _register(self) -> None:
        device = getattr(self.engine, "device", None)
        self.store.register_worker(self.id, socket.gethostname(), os.getpid(), list(self.settings.model_ids),
                                   str(device) if device is not None else "unknown", engine_info(self.engine))

    def _start_heartbeat(self) -> None:
        """Register in the workers table, then beat (state, current task) until stopped or run() ends."""
        self._register()
        runner = threading.current_thread()
        interval = heartbeat_interval_s(self.settings.lease_s)

        def beat() -> None:
            while True:
                self._beat_wake.wait(interval)
                self._beat_wake.clear()
                # A run() that ended by an exception beats no more: its row goes stale, as a killed process's does.
                if self._beat_done.is_set() or not runner.is_alive():
                    return
                try:
                    if not self.store.worker_heartbeat(self.id, self.state.value, self.current_task):
                        self._register()  # the row was removed (by hand, or a clean-up): advertise again
                        self.store.worker_heartbeat(self.id, self.state.value, self.current_task)
                except Exception as err:  # the database may be back at the next beat
                    log.warning("worker %s: heartbeat failed (%s)", self.id, err)

        self._beat_thread = threading.Thread(target=beat, name=f"heartbeat-{self.id}", daemon=True)
        self._beat_thread.start()

    def _stop_heartbeat(self) -> None:
        """End the heartbeat and leave the workers table."""
        self._beat_done.set()
        self._beat_wake.set()
        if self._beat_thread is not None:
            self._beat_thread.join()
        try:
            self.store.remove_worker(self.id)
        except Exception as err:
            log.warning("worker %s: could not remove its row from the workers table (%s)", self.id, err)

    def _discard(self, task_id: str, outputs: bool) -> None:
        """A task ended: delete its references (and with `outputs`, any images it stored); never fatal."""
        try:
            discard_task_files(self.storage, task_id, outputs)
        except Exception as err:  # the janitor of an API process finds them later
            log.warning("task %s: could not delete its stored files (%s)", task_id, err)

    def process(self, task: dict[str, Any]) -> None:
        """Run one claimed task to `completed` or `failed` (or back to the queue on shutdown)."""
        tid = task["id"]
        lost = threading.Event()
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(self.settings.lease_s / 3):
                if not self.store.renew(tid, self.id, self.settings.lease_s):
                    lost.set()
                    return

        beat = threading.Thread(target=heartbeat, name=f"lease-{tid[:8]}", daemon=True)
        beat.start()
        last_report = [0.0]
        last_check = [time.monotonic()]
        canceled = threading.Event()
        every = self.settings.preview_every

        # Progress rows and preview JPEGs are written by this thread, off the denoising loop, in order.
        reporter = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"progress-{tid[:8]}")

        def report(step: int, total: int, picture: Image.Image | None) -> None:
            if canceled.is_set() or lost.is_set():
                return  # the task is stopping: its progress is moot
            image = None
            if picture is not None:
                try:
                    image = preview_data_uri(picture, self.settings.preview_size)
                except Exception:  # a preview is a nicety: its failure must not fail the task
                    log.exception("task %s: preview at step %d failed", tid, step)
            try:
                if self.store.progress(tid, self.id, step, total, image):
                    canceled.set()
            except SQLAlchemyError as err:  # the database may be back for the next report
                log.warning("task %s: progress at step %d not recorded (%s)", tid, step, err)

        def progress(step: int, total: int, preview) -> None:
            now = time.monotonic()
            # A preview every `every` steps (not of the last: the images follow at once); plain progress at
            # most 4 times a second. The loop only fetches the small picture; the rest happens in `report`.
            picture = None
            if every > 0 and step % every == 0 and step < total:
                try:
                    picture = preview()
                except Exception:
                    log.exception("task %s: preview at step %d failed", tid, step)
            if picture is not None or step == total or now - last_report[0] >= 0.25:
                last_report[0] = last_check[0] = now
                reporter.submit(report, step, total, picture)

        def should_cancel() -> bool:
            if lost.is_set():
                return True
            if self.stop_event.is_set():
                raise ShutdownRequested
            if not canceled.is_set() and time.monotonic() - last_check[0] >= 0.25:
                last_check[0] = time.monotonic()
                if self.store.cancel_requested(tid):
                    canceled.set()
            if canceled.is_set():
                raise CancelRequested
            return False

        loras: list[tuple[str, Any]] = []
        try:
            references = [self.storage.get(key) for key in task["references"]]
            loras = task_loras(task, self.settings, self.storage)
            started = time.perf_counter()
            try:
                request = build_request(task, references, [spec for _, spec in loras])
                result = self.engine.generate(request, progress=progress, should_cancel=should_cancel)
            finally:
                reporter.shutdown(wait=True)  # the last progress is recorded before the outcome
            inference_ms = int((time.perf_counter() - started) * 1000)
            fmt = task["input"]["output_format"]
            keys = []
            for i, image in enumerate(result.images):
                key = f"outputs/{tid}/{i}.{fmt}"
                self.storage.put(key, encode_image(image, fmt))
                keys.append(key)
            price = round(self.settings.price_usd * 1_000_000)
            if self.store.complete(tid, self.id, keys, inference_ms, price):
                self._discard(tid, outputs=False)
            else:
                row = self.store.get_task(tid)
                if row is not None and row["status"] == "failed" and row["error"] == CANCELED:
                    self._discard(tid, outputs=True)  # canceled while the images were being stored: none is kept
                    log.info("task %s: canceled", tid)
                else:
                    log.warning("task %s: lease lost before completion; another worker owns it", tid)
        except ShutdownRequested:
            self.store.release(tid, self.id)
            log.info("task %s: back in the queue (shutdown)", tid)
        except CancelRequested:
            if self.store.fail(tid, self.id, CANCELED):
                self._discard(tid, outputs=True)
            log.info("task %s: canceled", tid)
        except Exception as err:  # the model's failure fails this task, never the worker
            from hidream.engine.errors import GenerationCanceled, HiDreamError

            if isinstance(err, GenerationCanceled) and lost.is_set():
                log.warning("task %s: lease lost; stopped", tid)
            else:
                if isinstance(err, HiDreamError):
                    message = str(err)
                    for given, spec in loras:  # the request's names, not this machine's paths
                        message = message.replace(str(spec.path), given)
                else:
                    log.exception("task %s failed", tid)
                    message = f"the model failed on this request ({type(err).__name__}: {err})"
                if self.store.fail(tid, self.id, message):
                    self._discard(tid, outputs=True)
        finally:
            done.set()
            beat.join()
