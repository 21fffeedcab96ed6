"""The safetensors file format, read tensor by tensor and written as a stream.

`safetensors.safe_open` maps the whole file: a tensor copied out of it (to another dtype or device)
leaves its mapped pages resident until the file is closed, so a float32 load of a bf16 file peaks at
3.0x the file's size and a GPU load keeps the whole file resident on the host
(benchmarks/load_memory.py). Here each tensor is read with `readinto` into a buffer of its own and
converted, so loading peaks at the weights kept plus one tensor (2.07x in float32, 1.17x in bf16);
and a file is written header first, then one tensor at a time, so converting never holds a whole
model. The format is the published one (an 8-byte little-endian header length, a JSON header, the
raw bytes): `safetensors` reads what this writes, and tests check it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from hidream.engine.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # the format's own limit


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: its dtype, shape and byte range in the data section."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    file: Path
    metadata: dict[str, str]
    entries: dict[str, Entry]


def read_header(file: Path) -> Header:
    """Every tensor's dtype, shape and place, and the metadata; CheckpointError naming the tensor (or the
    file) when the header is malformed or a tensor's bytes lie past the end of the file (a truncated download)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", raw_len)
            if length > MAX_HEADER or 8 + length > size:
                raise CheckpointError(f"{file}: not a safetensors file (header length {length} for a {size}-byte file)")
            text = f.read(length)
    except OSError as err:
        raise CheckpointError(f"{file}: cannot be read ({err.strerror or err})") from err
    try:
        header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{file}: not a safetensors file (its header is not valid JSON: {err})") from err
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{file}: __metadata__ must map names to strings")
    base, entries = 8 + length, {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{name}: malformed entry in {file} ({info!r:.100}): {err}") from err
        want = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != want or begin < 0:
            raise CheckpointError(f"{name}: {end - begin} bytes in {file} for a {info['dtype']} tensor of "
                                  f"shape {list(shape)} ({want} bytes)")
        if base + end > size:
            raise CheckpointError(f"{name}: its bytes end at {base + end} but {file} has {size}: "
                                  "the file is truncated (an interrupted download?)")
        entries[name] = Entry(file, dtype, shape, base + begin, base + end)
    return Header(file, metadata, entries)


def read_tensor(f: BinaryIO, entry: Entry) -> torch.Tensor:
    """The tensor `entry` describes, read from the open file `f` into a new CPU tensor."""
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    f.seek(entry.start)
    if entry.nbytes and f.readinto(memoryview(buf.numpy())) != entry.nbytes:
        raise CheckpointError(f"{entry.file}: ended early while reading a tensor (changed on disk?)")
    return buf.view(entry.dtype).reshape(entry.shape)


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_file(file: Path, tensors: Iterable[tuple[str, torch.Tensor]], shapes: dict[str, tuple[torch.dtype, tuple]],
               metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file from `tensors`, one at a time, in the order of `shapes` (name -> dtype and
    shape, known up front for the header). Written to a temporary name and renamed: no half file is left."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape) in shapes.items():
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    partial = file.with_name(file.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            order = iter(shapes.items())
            for name, tensor in tensors:
                announced, (dtype, shape) = next(order, (None, (None, None)))
                if name != announced or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{name}: {tensor.dtype} {list(tensor.shape)} written where the header has "
                                     f"{announced}: {dtype} {shape}")
                f.write(_bytes(tensor))
            left = [name for name, _ in order]
            if left:
                raise ValueError(f"tensors announced but not written: {', '.join(left[:5])}")
        os.replace(partial, file)
    finally:
        partial.unlink(missing_ok=True)
