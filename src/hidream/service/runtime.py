"""Starting the service's processes from settings: `serve` (API + in-process worker) and `worker`."""

from __future__ import annotations

import errno
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hidream.engine.errors import CheckpointError, InvalidRequestError
from hidream.service.errors import ServiceError
from hidream.service.settings import OFFLOAD, QUANTIZE, Settings, choice_problem, precision_of

if TYPE_CHECKING:  # imported where used: `serve` checks its port before it imports the service's modules
    from hidream.service.store import ApiKey, Store
    from hidream.service.worker import Worker

log = logging.getLogger("hidream")

VARIANTS = ("full", "dev")


def engine_loader(settings: Settings) -> Callable[[], Any]:
    """A function that loads the configured checkpoint (the shipped demo model when none is configured).

    It raises CheckpointError, or InvalidRequestError naming "variant", "dtype", "precision", "quantize",
    "offload", "tokenizer", "device" or "model" (the shipped demo model's files missing).
    """

    def load():
        if settings.variant not in (None, *VARIANTS):
            raise InvalidRequestError("variant", f"must be full or dev (got {settings.variant!r})")
        precision = precision_of(settings.precision, settings.dtype)
        for name, choices in (("quantize", QUANTIZE), ("offload", OFFLOAD)):
            if problem := choice_problem(getattr(settings, name), choices):
                raise InvalidRequestError(name, problem)
        tokenizer = Path(settings.tokenizer).expanduser() if settings.tokenizer else None
        if tokenizer is not None and not tokenizer.is_dir():
            why = "is a file" if tokenizer.exists() else "does not exist"
            raise InvalidRequestError("tokenizer", f"must be a directory with the tokenizer and image-processor "
                                                   f"files ({tokenizer} {why})")
        if settings.dtype is not None:
            log.warning("HIDREAM_DTYPE (--dtype) is deprecated: use HIDREAM_PRECISION (--precision) %s", precision)
        from hidream.data import demo_model
        from hidream.engine.pipeline import Engine

        try:
            path = Path(settings.model).expanduser() if settings.model else demo_model()
        except FileNotFoundError as err:
            raise InvalidRequestError("model", str(err)) from None
        # the options are passed only when set, so an engine without them still loads
        quantize = None if settings.quantize == "none" else settings.quantize
        offload = None if settings.offload == "none" else settings.offload
        options = {k: v for k, v in (("precision", precision), ("compile", settings.compile),
                                     ("quantize", quantize), ("offload", offload), ("tokenizer", tokenizer)) if v}
        engine = Engine.load(path, device=settings.device, variant=settings.variant, **options)
        summary = engine_summary(engine, quantize=quantize, offload=offload or "none", compiled=settings.compile,
                                 tokenizer=tokenizer)
        log.info("model loaded from %s on %s (%s), variant %s", path, engine.device, ", ".join(summary),
                 engine.variant)
        return engine

    return load


def engine_summary(engine: Any, *, quantize: str | None = None, offload: str = "none", compiled: bool = False,
                   tokenizer: Path | None = None) -> list[str]:
    """How the loaded engine runs, for the log: `bf16`, `fp8 weights`, `offload layers`, `compiled`, ...; what
    the engine says of itself, else what was asked (`quantize`, `offload`)."""
    parts = [str(getattr(engine, "precision", None) or getattr(engine, "dtype", "?"))]
    if quantize := getattr(engine, "quantize", quantize):
        parts.append(f"{quantize} weights")
    if (offload := getattr(engine, "offload", offload)) not in (None, "none"):
        parts.append(f"offload {offload}")
    if compiled:
        parts.append("compiled")
    if tokenizer is not None:
        parts.append(f"tokenizer from {tokenizer}")
    return parts


def load_engine(settings: Settings) -> Any:
    """The engine, loaded now; a ServiceError naming the flag at fault (`--model`, `--device`, ...) otherwise."""
    try:
        return engine_loader(settings)()
    except CheckpointError as err:
        raise ServiceError(f"--model: {err}") from None
    except InvalidRequestError as err:
        raise ServiceError(f"--{err.field.replace('_', '-')}: {err.rule}") from None


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)


def open_store(settings: Settings, wait_s: float = 60.0) -> Store:
    """The store, retrying with backoff while the database is not reachable yet (it may be starting)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from hidream.service.store import Store

    deadline, delay = time.monotonic() + wait_s, 0.5
    while True:
        try:
            return Store.open(settings.db_url)
        except OperationalError as err:
            reason = str(err.orig or err).splitlines()[0][:300]
            left = deadline - time.monotonic()
            if left <= 0:
                shown = make_url(settings.db_url).render_as_string(hide_password=True)
                raise ServiceError(f"HIDREAM_DATABASE_URL: cannot connect to {shown} ({reason})") from err
            # the last wait is cut to the deadline, so a slow first try still gets its retry at the end
            pause = min(delay, left)
            log.warning("database not reachable yet (%s); retrying in %.1f s", reason, pause)
            time.sleep(pause)
            delay = min(delay * 2, 10.0)


# --- commands a user can paste ---------------------------------------------------------------------------


def cli_command() -> str:
    """This installation's `hidream`, as a fresh shell runs it: `hidream` when that is the one on PATH, else
    the absolute path of this environment's script, else `<this python> -m hidream.cli`."""
    bin_dir = Path(sys.executable).parent
    script = bin_dir / "hidream"
    found = shutil.which("hidream")
    if found and (_same_file(found, script) or _interpreter_dir(found) == bin_dir):
        return "hidream"
    if script.is_file():
        return shlex.quote(str(script.absolute()))
    return f"{shlex.quote(str(Path(sys.executable).absolute()))} -m hidream.cli"


def _same_file(a: str | Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _interpreter_dir(script: str) -> Path | None:
    """The directory of the interpreter in a script's `#!` line (pip writes this environment's python there)."""
    try:
        with open(script, "rb") as f:
            first = f.readline(500)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return Path(words[0]).parent if words else None


def keys_create_command(settings: Settings) -> str:
    """`hidream keys create --name NAME` for the database of these settings, runnable as is in a fresh shell."""
    from sqlalchemy.engine import make_url

    words = [cli_command(), "keys", "create", "--name", "NAME"]
    note = ""
    if settings.database_url:
        url = make_url(settings.database_url)
        if url.password:  # never printed: the shell needs the variable
            note = "  (with this server's HIDREAM_DATABASE_URL set)"
        else:
            words += ["--database-url", shlex.quote(settings.database_url)]
    elif settings.home.absolute() != (Path.home() / ".cache" / "hidream").absolute():
        words += ["--home", shlex.quote(str(settings.home.absolute()))]
    return " ".join(words) + note


# --- listening, stopping ---------------------------------------------------------------------------------


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, made before anything is loaded so that a port in use fails at once.

    It listens at once (connections wait in the backlog until the API runs): a socket that is only bound
    would not keep a second `serve` off the port while this one loads the model.
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not 0 <= port <= 65535:
        raise ServiceError(f"--port: must be 0 to 65535 (got {port})")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise ServiceError(f"--host: cannot resolve {host!r} ({getattr(err, 'strerror', None) or err})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ServiceError(f"--port: {where} is already in use (another hidream serve?)") from None
        if err.errno == errno.EACCES:
            raise ServiceError(f"--port: {where}: permission denied (ports under 1024 need privileges)") from None
        raise ServiceError(f"--host: cannot listen on {where} ({err.strerror or err})") from None
    return sock


class Stopping(BaseException):
    """SIGINT or SIGTERM while the process starts (a BaseException: no `except Exception` swallows it)."""


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While starting: SIGINT and SIGTERM raise Stopping; the previous handlers come back after."""

    def raise_stopping(_signum: int, _frame: Any) -> None:
        raise Stopping

    previous = {sig: signal.signal(sig, raise_stopping) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def say_stopping(worker: Worker | None) -> None:
    """The one line a stop prints on stdout (os.write: safe in a signal handler, unlike print)."""
    task = worker.current_task if worker is not None else None
    line = f"stopping: the running task {task} goes back to the queue" if task else "stopping (no task was running)"
    try:
        os.write(sys.stdout.fileno(), (line + "\n").encode())
    except (OSError, ValueError):  # stdout closed: nobody to tell
        pass


def _uvicorn_server(config: Any, worker: Worker | None) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a signal prints the stopping line, stops the worker at once, and is not
        raised again after the shutdown (uvicorn's way, which makes the exit status -15 on SIGTERM)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:
                if sig == signal.SIGINT:  # a second Ctrl-C: no more waiting for connections to close
                    self.force_exit = True
                return
            say_stopping(worker)
            if worker is not None:
                worker.stop()  # the running task stops at its next step and goes back to the queue
            self.should_exit = True

    return Server(config)


# --- the processes -----------------------------------------------------------------------------------------


def tls_options(settings: Settings) -> dict[str, str]:
    """uvicorn's TLS options for HIDREAM_TLS_CERT and HIDREAM_TLS_KEY (both or neither), checked to load
    together; ServiceError naming the variable that is wrong."""
    import ssl

    cert, key = settings.tls_cert, settings.tls_key
    if cert is None and key is None:
        return {}
    if cert is None or key is None:
        given, missing = ("HIDREAM_TLS_CERT", "HIDREAM_TLS_KEY") if cert else ("HIDREAM_TLS_KEY", "HIDREAM_TLS_CERT")
        raise ServiceError(f"{missing}: is required with {given} (--tls-cert FILE --tls-key FILE)")
    for name, path in (("HIDREAM_TLS_CERT", cert), ("HIDREAM_TLS_KEY", key)):
        if not Path(path).is_file():
            raise ServiceError(f"{name}: {path} is not a file")
    try:
        # an encrypted key gets an empty password (an error here), never OpenSSL's prompt on the terminal
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key), password=b"")
    except ssl.SSLError as err:
        raise ServiceError(f"HIDREAM_TLS_CERT: {cert} and HIDREAM_TLS_KEY: {key} do not load as a PEM certificate "
                           f"and its private key ({err.reason or err})") from None
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}


def serve(settings: Settings) -> int:
    setup_logging()
    sock = listen_socket(settings.host, settings.port)
    if settings.port == 0:  # any free port: the one bound
        settings = replace(settings, port=sock.getsockname()[1])
    try:
        with stop_on_signals():
            import uvicorn

            from hidream.service.app import create_app
            from hidream.service.loras import check_settings
            from hidream.service.storage import open_storage
            from hidream.service.worker import Worker

            check_settings(settings)
            tls = tls_options(settings)  # before anything starts: a certificate that cannot load stops it here
            store = open_store(settings)
            storage = open_storage(settings)  # an S3 bucket is checked here: a bad one stops start-up
            engine = load_engine(settings) if settings.worker else None
            worker = Worker(settings, store, storage, lambda: engine) if settings.worker else None
            app = create_app(settings, store, storage, worker)
            token = store.create_first_key()  # on a first start; printed once
            print(f"HiDream O1 image API on {settings.base_url}  (models: {', '.join(settings.model_ids)})",
                  flush=True)
            if not settings.model:
                print("note: serving the demo model, a tiny model trained on coloured shapes (try 'a red circle on "
                      "a blue background'); set HIDREAM_MODEL or --model to the official weights for real images",
                      flush=True)
            if token:
                print(f"created the first API key (shown once, keep it): {token}\n"
                      f"more keys: {keys_create_command(settings)}", flush=True)
            else:
                print(f"to make an API key: {keys_create_command(settings)}", flush=True)
            config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30, **tls)
            # uvicorn puts its own handlers in place while it runs (see _uvicorn_server), then ours back.
            _uvicorn_server(config, worker).run(sockets=[sock])
            for sig in (signal.SIGINT, signal.SIGTERM):  # stopped already: another signal says nothing more
                signal.signal(sig, signal.SIG_IGN)
    except Stopping:
        say_stopping(None)
    finally:
        sock.close()
    return 0


def run_worker(settings: Settings) -> int:
    from hidream.service.loras import check_settings
    from hidream.service.storage import open_storage
    from hidream.service.worker import Worker

    setup_logging()
    check_settings(settings)
    try:
        with stop_on_signals():
            store = open_store(settings)
            storage = open_storage(settings)
            engine = load_engine(settings)
    except Stopping:
        say_stopping(None)
        return 0
    worker = Worker(settings, store, storage, lambda: engine)

    def on_signal(_signum: int, _frame: Any) -> None:
        if not worker.stop_event.is_set():
            say_stopping(worker)
            worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=worker.run, name="worker")
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    return 0 if worker.engine is not None else 1


# --- hidream keys ------------------------------------------------------------------------------------------


def _limits(settings: Settings, key: ApiKey) -> str:
    def one(own: int | None, default: int, unit: str) -> str:
        value = default if own is None else own
        shown = "no limit" if value == 0 else f"{value} {unit}"
        return shown + (" (service default)" if own is None else "")

    return (f"rate: {one(key.rate_per_minute, settings.rate_per_minute, 'submits/min')}; "
            f"concurrent: {one(key.max_concurrent, settings.max_concurrent, 'tasks')}")


def _shown(key: ApiKey) -> str:
    return f"{key.id} {key.prefix}… {key.name!r}"


def find_key(store: Store, given: str, active_only: bool) -> ApiKey:
    """The one key that `given` names: its id, its prefix as `keys list` shows it (with or without the …),
    any unambiguous start of either, or the whole token; ServiceError naming the key otherwise."""
    from hidream.service.store import KEY_PREFIX

    text = given.strip().removesuffix("…").removesuffix("...")
    if not text:
        raise ServiceError("key: missing: give the key's id or prefix (hidream keys list shows them)")
    keys = store.list_keys()
    live = [k for k in keys if k.revoked_at is None]
    pool = live if active_only else keys
    token_id = store.key_for_token(text) if text.startswith(KEY_PREFIX) and len(text) > 20 else None
    matches = ([k for k in pool if k.id == token_id] or [k for k in pool if text in (k.id, k.prefix)]
               or [k for k in pool if k.id.startswith(text) or k.prefix.startswith(text)])
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        listed = ", ".join(_shown(k) for k in matches[:5])
        if len(matches) > 5:
            listed += f", and {len(matches) - 5} more"
        raise ServiceError(f"key: {given!r} matches {len(matches)} keys: {listed}; give more characters")
    if active_only:
        revoked = [k for k in keys if k.revoked_at is not None and (k.id.startswith(text) or k.prefix.startswith(text))]
        why = f" (it matches the revoked key {_shown(revoked[0])})" if len(revoked) == 1 else ""
        raise ServiceError(f"key: no active key with id or prefix {given!r}{why}")
    raise ServiceError(f"key: no key with id or prefix {given!r} (hidream keys list shows them)")


def keys_command(settings: Settings, action: str, name: str | None, key: str | None,
                 rate_per_minute: int | None = None, max_concurrent: int | None = None) -> int:
    for flag, value in (("--rate", rate_per_minute), ("--concurrent", max_concurrent)):
        if value is not None and value < -1:
            raise ServiceError(f"{flag}: must be -1 (the service default), 0 (no limit) or a positive number")
    if action in ("revoke", "limits") and key is None:
        raise ServiceError(f"key: missing: hidream keys {action} KEY, KEY being the key's id or prefix "
                           "(hidream keys list shows them)")
    store = open_store(settings)
    try:
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
            record = find_key(store, key or "", active_only=True)
            store.revoke_key(record.id)
            print(f"revoked {_shown(record)}")
        elif action == "limits":
            record = store.set_key_limits(find_key(store, key or "", active_only=False).id, rate_per_minute,
                                          max_concurrent)
            assert record is not None  # found just before; keys are never deleted
            print(f"{record.id}  {record.prefix}…  {_limits(settings, record)}")
    finally:
        store.close()
    return 0
