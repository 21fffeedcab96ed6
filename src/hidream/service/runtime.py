"""Starting the service's processes from settings: `serve` (API + in-process worker) and `worker`."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

from hidream.service.errors import ServiceError
from hidream.service.settings import Settings
from hidream.service.storage import open_storage
from hidream.service.store import ApiKey, Store
from hidream.service.worker import Worker

log = logging.getLogger("hidream")


def engine_loader(settings: Settings):
    """A function that loads the configured checkpoint (the demo one when none is configured)."""

    def load():
        import torch

        from hidream.engine.demo import write_demo_checkpoint
        from hidream.engine.pipeline import Engine

        path = Path(settings.model) if settings.model else settings.home / "demo-model"
        if not settings.model and not (path / "config.json").is_file():
            write_demo_checkpoint(path)
        dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[settings.dtype]
        engine = Engine.load(path, device=settings.device, dtype=dtype, variant=settings.variant)
        log.info("model loaded from %s on %s (%s)", path, engine.device, engine.dtype)
        return engine

    return load


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)


def open_store(settings: Settings, wait_s: float = 60.0) -> Store:
    """The store, retrying with backoff while the database is not reachable yet (it may be starting)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    deadline, delay = time.monotonic() + wait_s, 0.5
    while True:
        try:
            return Store.open(settings.db_url)
        except OperationalError as err:
            reason = str(err.orig or err).splitlines()[0][:300]
            if time.monotonic() + delay > deadline:
                shown = make_url(settings.db_url).render_as_string(hide_password=True)
                raise ServiceError(f"HIDREAM_DATABASE_URL: cannot connect to {shown} ({reason})") from err
            log.warning("database not reachable yet (%s); retrying in %.1f s", reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def serve(settings: Settings) -> int:
    import uvicorn

    from hidream.service.app import create_app

    setup_logging()
    store = open_store(settings)
    storage = open_storage(settings)  # an S3 bucket is checked here: a bad one stops start-up
    worker = Worker(settings, store, storage, engine_loader(settings)) if settings.worker else None
    app = create_app(settings, store, storage, worker)
    token = store.create_first_key()  # on a first start; printed once
    print(f"HiDream O1 image API on {settings.base_url}  (models: {', '.join(settings.model_ids)})", flush=True)
    if not settings.model:
        print("note: serving the demo checkpoint (random weights: images are noise); set HIDREAM_MODEL or "
              "--model to the official weights for real images", flush=True)
    if token:
        print(f"created the first API key (shown once, keep it): {token}\n"
              "more keys: hidream keys create --name NAME", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=30)
    return 0


def run_worker(settings: Settings) -> int:
    setup_logging()
    store = open_store(settings)
    worker = Worker(settings, store, open_storage(settings), engine_loader(settings))

    def on_signal(signum, _frame) -> None:
        log.info("signal %s: finishing (the running task goes back to the queue)", signum)
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=worker.run, name="worker")
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    return 0 if worker.engine is not None else 1


def _limits(settings: Settings, key: ApiKey) -> str:
    def one(own: int | None, default: int, unit: str) -> str:
        value = default if own is None else own
        shown = "no limit" if value == 0 else f"{value} {unit}"
        return shown + (" (service default)" if own is None else "")

    return (f"rate: {one(key.rate_per_minute, settings.rate_per_minute, 'submits/min')}; "
            f"concurrent: {one(key.max_concurrent, settings.max_concurrent, 'tasks')}")


def keys_command(settings: Settings, action: str, name: str | None, key: str | None,
                 rate_per_minute: int | None = None, max_concurrent: int | None = None) -> int:
    for flag, value in (("--rate", rate_per_minute), ("--concurrent", max_concurrent)):
        if value is not None and value < -1:
            print(f"error: {flag}: must be -1 (the service default), 0 (no limit) or a positive number",
                  file=sys.stderr)
            return 2
    store = open_store(settings)
    if action == "create":
        own = {k: (None if v == -1 else v) for k, v in
               (("rate_per_minute", rate_per_minute), ("max_concurrent", max_concurrent))}
        record, token = store.create_key(name or "key", **own)
        print(f"{token}\n(id {record.id}; shown once: it is stored only as a hash; {_limits(settings, record)})")
    elif action == "list":
        for k in store.list_keys():
            state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
            print(f"{k.id}  {k.prefix}…  {k.name!r}  created {k.created_at:%Y-%m-%d %H:%M}  {state}  "
                  f"{_limits(settings, k)}")
    elif action == "revoke":
        if not key or not store.revoke_key(key):
            print(f"error: key: no active key with id or prefix {key!r}", file=sys.stderr)
            return 2
        print(f"revoked {key}")
    elif action == "limits":
        record = store.set_key_limits(key, rate_per_minute, max_concurrent) if key else None
        if record is None:
            print(f"error: key: no key with id or prefix {key!r}", file=sys.stderr)
            return 2
        print(f"{record.id}  {record.prefix}…  {_limits(settings, record)}")
    return 0
