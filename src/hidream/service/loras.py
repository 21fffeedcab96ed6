"""The LoRAs requests name: files in the operator's directory, https downloads cached by content hash, the listing.

A request's `loras[i].path` is a plain file name in HIDREAM_LORA_DIR or, where HIDREAM_LORA_URLS allows it,
an https URL. Both are checked at submit by the engine's header-only reader (`check_lora_file`: no weight is
read), so a queued task does not fail on a file that is no LoRA; whether its ranks and shapes fit the served
model only a worker can tell (the task then fails saying why). A download goes to a temporary folder beside
the cache and becomes `<sha256>.safetensors` only when its task is stored (and goes to the storage under
`loras/` too, for workers on other machines); a rejected request leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fastapi.concurrency import run_in_threadpool

from hidream.service import schemas
from hidream.service.errors import BadRequest, ServiceError
from hidream.service.fetch import FetchPolicy, fetch_file
from hidream.service.settings import Settings
from hidream.service.storage import Storage

SUFFIX = ".safetensors"
URL_SCHEMES = ("https",)  # the tests widen it to reach their plain-http loopback server
DOWNLOAD_TIMEOUT_S = 600.0  # a whole download; each connect and read has HIDREAM_FETCH_TIMEOUT_S
NONE_SERVED = "this service serves no LoRAs (its operator has not set HIDREAM_LORA_DIR)"


def storage_key(sha256: str) -> str:
    """Where a downloaded LoRA is kept in the storage that the API and the workers share."""
    return f"loras/{sha256}{SUFFIX}"


def is_url(path: str) -> bool:
    return "://" in path


def name_problem(name: str) -> str | None:
    """Why `name` is not a plain LoRA file name (a directory entry, no path), or None."""
    if "\0" in name:
        return "must not contain NUL"
    if "/" in name or "\\" in name:
        return "must be a plain file name of HIDREAM_LORA_DIR, with no / or \\ (GET /api/v1/loras lists them)"
    if name.startswith("."):
        return "must not start with a dot"
    if ".." in name:
        return "must not contain .."
    if not name.endswith(SUFFIX) or name == SUFFIX:
        return f"must be a {SUFFIX} file name"
    return None


def inspect(path: Path) -> Any:
    """The engine's reading of a LoRA file's header (LoraInfo); LoraError naming the key otherwise."""
    from hidream.engine.lora import check_lora_file

    return check_lora_file(path)


def _checked(path: Path, field: str, shown: str) -> None:
    from hidream.engine.errors import InvalidRequestError

    try:
        inspect(path)
    except InvalidRequestError as err:
        raise BadRequest(f"{field}: {shown}: {err.rule.removeprefix(f'{path.name}: ')}") from None
    except OSError as err:
        raise BadRequest(f"{field}: {shown}: cannot be read ({err.strerror or err})") from None


@dataclass
class Lora:
    """One entry of a request's LoRA set, checked."""

    given: str  # the path as the request gave it
    scale: float
    file: Path  # the directory's file, or the download's temporary file until `LoraSet.keep`
    sha256: str | None = None  # downloads only

    def echo(self) -> dict[str, Any]:
        """What the task's input records of it (and the worker reads)."""
        return {"path": self.given, "scale": self.scale} | ({"sha256": self.sha256} if self.sha256 else {})


class LoraSet:
    """The checked LoRAs of one submit. `keep` puts the downloads in the cache (before the task row is
    written); `undo` removes what `keep` added (the row could not be written); `discard` removes temporary
    files that were never kept. Either way a rejected request leaves nothing."""

    def __init__(self, loras: list[Lora], settings: Settings, storage: Storage) -> None:
        self.loras, self.settings, self.storage = loras, settings, storage
        self._added_files: list[Path] = []
        self._added_keys: list[str] = []

    def echo(self) -> list[dict[str, Any]]:
        return [lora.echo() for lora in self.loras]

    def keep(self) -> None:
        """Each download as `<sha256>.safetensors` in the local cache and the shared storage (blocking)."""
        for lora in self.loras:
            if not _pending(lora):
                continue  # a directory file, or kept already
            final = self.settings.lora_cache_dir / f"{lora.sha256}{SUFFIX}"
            if final.is_file():
                _remove_download(lora.file)
            else:
                os.replace(lora.file, final)
                _remove_download(lora.file)
                self._added_files.append(final)
            lora.file = final
            key = storage_key(lora.sha256)
            if not self.storage.list(key):
                self.storage.put(key, final.read_bytes())
                self._added_keys.append(key)

    def undo(self) -> None:
        for path in self._added_files:
            path.unlink(missing_ok=True)
        for key in self._added_keys:
            self.storage.delete(key)
        self._added_files, self._added_keys = [], []

    def discard(self) -> None:
        for lora in self.loras:
            if _pending(lora):
                _remove_download(lora.file)


def _pending(lora: Lora) -> bool:
    """Whether `lora` is a download still in its temporary folder."""
    return lora.sha256 is not None and lora.file.parent.name.startswith(".part-")


def _remove_download(path: Path) -> None:
    """A download's temporary folder (`.part-*` under the cache), with what is left in it."""
    if path.parent.name.startswith(".part-"):
        shutil.rmtree(path.parent, ignore_errors=True)


def _download_name(url: str) -> str:
    """The file name a URL ends in (for messages about it), else `lora.safetensors`."""
    last = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    return last if name_problem(last) is None and len(last) <= 200 else f"lora{SUFFIX}"


async def download(url: str, settings: Settings, policy: FetchPolicy, field: str) -> Lora:
    """The LoRA at `url`, in a temporary folder under the cache, checked; BadRequest naming `field`."""
    cache = settings.lora_cache_dir
    await run_in_threadpool(cache.mkdir, parents=True, exist_ok=True)
    folder = Path(await run_in_threadpool(tempfile.mkdtemp, prefix=".part-", dir=cache))
    dest = folder / _download_name(url)
    try:
        sha256, _ = await fetch_file(url, FetchPolicy(timeout_s=policy.timeout_s, max_bytes=settings.lora_max_bytes,
                                                      allow_networks=policy.allow_networks),
                                     field, dest, schemes=URL_SCHEMES, total_timeout_s=DOWNLOAD_TIMEOUT_S)
        await run_in_threadpool(_checked, dest, field, url[:200])
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Lora(url, 0.0, dest, sha256)


def in_directory(name: str, settings: Settings, field: str) -> Path:
    """The directory's file `name`, checked to be a LoRA; BadRequest naming `field` otherwise."""
    if settings.lora_dir is None:
        raise BadRequest(f"{field}: {name[:80]!r}: this service has no LoRA directory (HIDREAM_LORA_DIR); "
                         "it takes https URLs only")
    if problem := name_problem(name):
        raise BadRequest(f"{field}: {problem} (got {name[:80]!r})")
    path = Path(settings.lora_dir) / name
    if not path.is_file():
        why = "is not a regular file" if path.exists() else "is not in the LoRA directory"
        raise BadRequest(f"{field}: {name} {why} (GET /api/v1/loras lists the files)")
    _checked(path, field, name)
    return path


async def resolve(refs: Sequence[schemas.LoraRef], settings: Settings, policy: FetchPolicy,
                  storage: Storage) -> LoraSet:
    """A request's `loras`, every one checked (names first: they cost no download); BadRequest naming
    `loras[i].path` for the first problem, with nothing left behind."""
    if refs and settings.lora_dir is None and not settings.lora_urls:
        raise BadRequest(f"loras: {NONE_SERVED}")
    loras: list[Lora | None] = [None] * len(refs)
    for i, ref in enumerate(refs):
        if not is_url(ref.path):
            path = await run_in_threadpool(in_directory, ref.path, settings, f"loras[{i}].path")
            loras[i] = Lora(ref.path, ref.scale, path)
        elif not settings.lora_urls:
            raise BadRequest(f"loras[{i}].path: URLs are not accepted here (HIDREAM_LORA_URLS is off); name a file "
                             f"that GET /api/v1/loras lists (got {ref.path[:200]})")
    done = LoraSet([], settings, storage)
    try:
        for i, ref in enumerate(refs):  # one at a time: each may be up to HIDREAM_LORA_MAX_BYTES
            if loras[i] is None:
                lora = await download(ref.path, settings, policy, f"loras[{i}].path")
                lora.scale = ref.scale
                loras[i] = lora
                done.loras.append(lora)
    except BaseException:
        done.discard()
        raise
    return LoraSet([lora for lora in loras if lora is not None], settings, storage)


# --- the listing ----------------------------------------------------------------------------------------


def listing(settings: Settings) -> list[dict[str, Any]]:
    """The LoRA directory's files, by name: size, format, modules and ranks, or why one cannot be used."""
    if settings.lora_dir is None:
        return []
    from hidream.engine.errors import InvalidRequestError

    root = Path(settings.lora_dir)
    out = []
    for path in sorted(root.iterdir() if root.is_dir() else (), key=lambda p: p.name):
        if name_problem(path.name) is not None or not path.is_file():
            continue
        entry: dict[str, Any] = {"name": path.name, "size_bytes": path.stat().st_size, "format": None,
                                 "modules": None, "ranks": None, "error": None}
        try:
            info = inspect(path)
            entry |= {"format": info.format, "modules": len(info.modules), "ranks": sorted(info.ranks)}
        except InvalidRequestError as err:
            entry["error"] = err.rule
        except OSError as err:
            entry["error"] = f"cannot be read ({err.strerror or err})"
        out.append(entry)
    return out


# --- the worker's side ----------------------------------------------------------------------------------


def local_file(entry: dict[str, Any], index: int, settings: Settings, storage: Storage) -> Path:
    """Where this machine has the task's `loras[index]`: the directory's file, or the download by its sha256
    (copied from the shared storage into the local cache first, when another machine fetched it)."""
    from hidream.engine.lora import LoraError

    field = f"loras[{index}].path"
    sha256 = entry.get("sha256")
    if sha256 is None:
        if settings.lora_dir is None or name_problem(entry["path"]) is not None:
            raise LoraError(f"{entry['path']}: this worker has no LoRA directory (HIDREAM_LORA_DIR)", None, field)
        path = Path(settings.lora_dir) / entry["path"]
        if not path.is_file():
            raise LoraError(f"{entry['path']}: not in this worker's LoRA directory", None, field)
        return path
    path = settings.lora_cache_dir / f"{sha256}{SUFFIX}"
    if path.is_file():
        return path
    try:
        data = storage.get(storage_key(sha256))
    except (ServiceError, OSError) as err:
        raise LoraError(f"{entry['path']}: the download (sha256 {sha256}) is gone from the storage ({err})",
                        None, field) from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise LoraError(f"{entry['path']}: the stored download does not match its sha256 {sha256}", None, field)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".part-{secrets.token_hex(8)}")
    part.write_bytes(data)
    os.replace(part, path)
    return path


def check_settings(settings: Settings) -> None:
    """At start-up: ServiceError naming the variable of a LoRA setting that cannot work."""
    if settings.lora_dir is not None and not Path(settings.lora_dir).is_dir():
        why = "is a file" if Path(settings.lora_dir).exists() else "does not exist"
        raise ServiceError(f"HIDREAM_LORA_DIR: must be a directory of LoRA {SUFFIX} files ({settings.lora_dir} "
                           f"{why})")
    if settings.lora_max_bytes < 1:
        raise ServiceError(f"HIDREAM_LORA_MAX_BYTES: must be 1 or more (got {settings.lora_max_bytes})")
    if settings.lora_cache_bytes < 0:
        raise ServiceError(f"HIDREAM_LORA_CACHE_BYTES: must be 0 or more (got {settings.lora_cache_bytes})")
