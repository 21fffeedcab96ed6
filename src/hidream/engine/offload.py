"""Layer offload: the decoder layers live in (pinned) host memory and stream onto the compute device a
few layers ahead of their use; `embed_tokens` (a lookup) stays on the host, the ViT (once per request)
visits the device for `encode_images`; everything else, and the text K/V cache, is on the device.

The device holds `ahead + 1` slots, each one layer's tensors. Every pass over the layers (prefill,
step, full recompute: always 0..n-1) takes layers from one stream 0..n-1, 0..n-1, ...: when layer i
has been used, its slot receives the next layer of the stream, `ahead` layers before that one's use
(the next pass's first layers load behind this pass's last ones). On CUDA the copy runs on a side
stream after the compute stream is done with the slot (an event), and compute waits for the copy (an
event); on the CPU (host == device) the same code copies synchronously. A layer in no slot points to
zero-size placeholders, so computing with it fails.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict, deque
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor, nn

from hidream.engine.errors import InvalidRequestError
from hidream.engine.model import HiDreamO1

OFFLOAD_MODES = ("none", "layers", "auto")
# What "auto" keeps free beyond the weights: the dry run's largest 2048² working set above the weights
# (an edit: 1.56 GiB of activations, K/V buffers, latent and solver state), plus about as much again
# for what it does not count (cuBLAS and attention workspaces, allocator slack, compiled buffers).
WORKING_SET_RESERVE = 3 * 2**30
# Pinned host memory is handed out in powers of two: whole 1 GiB chunks, filled first-fit, waste little.
HOST_CHUNK = 2**30
HOST_ALIGN = 512
# Kept on the host (not moved to the device with the rest); the layers stream, the ViT visits.
LAYERS, EMBED, VISUAL = "model.language_model.layers", "model.language_model.embed_tokens", "model.visual"

TensorRef = tuple[dict, str]  # a module's _parameters or _buffers, and the name in it


class Copier(Protocol):
    """Host -> slot copies, and their order against the compute that uses the slots."""

    def start(self) -> None:
        """Copies issued from now on come after all compute issued so far."""

    def load(self, slot: int, dst: list[Tensor], src: list[Tensor]) -> None:
        """Copy src into slot's dst once compute has released the slot."""

    def acquire(self, slot: int) -> None:
        """Compute issued from now on sees slot's last load."""

    def release(self, slot: int) -> None:
        """Compute issued so far is the last to read slot's current contents."""


class SyncCopier:
    """Host == device (the CPU): every copy is done when issued, so there is nothing to order."""

    def start(self) -> None:
        pass

    def load(self, slot: int, dst: list[Tensor], src: list[Tensor]) -> None:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)

    def acquire(self, slot: int) -> None:
        pass

    def release(self, slot: int) -> None:
        pass


class StreamCopier:
    """CUDA: copies from pinned memory on a side stream; per slot a `ready` event (copy -> compute)
    and a `free` event (compute -> the slot's next copy)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.ready: defaultdict[int, torch.cuda.Event] = defaultdict(torch.cuda.Event)
        self.free: defaultdict[int, torch.cuda.Event] = defaultdict(torch.cuda.Event)

    def start(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def load(self, slot: int, dst: list[Tensor], src: list[Tensor]) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.free[slot])  # a never-recorded event: no wait
            for d, s in zip(dst, src, strict=True):
                d.copy_(s, non_blocking=True)
            self.ready[slot].record(self.stream)

    def acquire(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def release(self, slot: int) -> None:
        self.free[slot].record(torch.cuda.current_stream(self.device))


def _refs(module: nn.Module) -> list[TensorRef]:
    """Every parameter and buffer of `module` and its children, as (table, name)."""
    return [(table, name) for m in module.modules() for table in (m._parameters, m._buffers)
            for name, t in table.items() if t is not None]


def _point(refs: list[TensorRef], tensors: list[Tensor]) -> None:
    for (table, name), t in zip(refs, tensors, strict=True):
        table[name] = t


def _like(t: Tensor, data: Tensor) -> Tensor:
    """`data` as a Parameter when `t` is one (what a module's _parameters must hold), else as is."""
    return nn.Parameter(data, requires_grad=False) if isinstance(t, nn.Parameter) else data


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class HostArena:
    """Host memory for a planned list of tensors, in HOST_CHUNK chunks filled first fit, pinned on CUDA;
    a chunk is allocated when first used, so the originals can go as their copies are made."""

    def __init__(self, sizes: list[int], pin: bool) -> None:
        self.pin = pin
        caps: list[int] = []
        self.used: list[int] = []
        self.places: list[tuple[int, int]] = []  # per planned tensor: (chunk, byte offset)
        for size in sizes:
            n = -(-size // HOST_ALIGN) * HOST_ALIGN
            c = next((c for c, cap in enumerate(caps) if self.used[c] + n <= cap), len(caps))
            if c == len(caps):
                caps.append(max(HOST_CHUNK, n))
                self.used.append(0)
            self.places.append((c, self.used[c]))
            self.used[c] += n
        self.chunks: dict[int, Tensor] = {}

    def copy(self, k: int, t: Tensor) -> Tensor:
        """A contiguous host copy of `t`, the plan's k-th tensor."""
        c, offset = self.places[k]
        if c not in self.chunks:
            self.chunks[c] = torch.empty(self.used[c], dtype=torch.uint8, pin_memory=self.pin)
        host = self.chunks[c][offset:offset + _nbytes(t)].view(t.dtype).view(t.shape)
        host.copy_(t)
        return _like(t, host)


class LayerOffload:
    """A model's decoder layers streamed from host memory through `ahead + 1` device slots."""

    def __init__(self, model: HiDreamO1, device: torch.device, ahead: int = 2,
                 copier: Copier | None = None) -> None:
        if ahead < 0:
            raise ValueError(f"ahead must be 0 or more (got {ahead})")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.ahead = ahead
        self._layers = list(model.layers)
        self._refs = [_refs(layer) for layer in self._layers]
        visual = model.model.visual
        self._visual_refs = _refs(visual)

        def layout(refs: list[TensorRef]) -> list[tuple]:
            return [(name, t.shape, t.dtype, type(t)) for (table, name) in refs for t in [table[name]]]

        for i, refs in enumerate(self._refs):
            if layout(refs) != layout(self._refs[0]):
                raise ValueError(f"layer {i}'s tensors differ from layer 0's: the layers must share one slot layout")
        every = [table[name] for refs in self._refs + [self._visual_refs] for table, name in refs]
        arena = HostArena([_nbytes(t) for t in every], pin=device.type == "cuda")
        del every
        k = 0
        self._host: list[list[Tensor]] = []
        self._placeholders: list[list[Tensor]] = []
        for refs in self._refs + [self._visual_refs]:
            host = []
            for table, name in refs:
                host.append(arena.copy(k, table[name]))
                k += 1
            _point(refs, host)  # the originals (on the host or the device) are released here
            self._host.append(host)
        self._visual_host = self._host.pop()
        for refs, host in zip(self._refs, self._host, strict=True):
            placeholders = [_like(t, torch.empty(0, dtype=t.dtype, device=device)) for t in host]
            self._placeholders.append(placeholders)
            _point(refs, placeholders)
        self._slots = [[_like(t, torch.empty(t.shape, dtype=t.dtype, device=device))
                        for t in self._host[0]] for _ in range(min(ahead + 1, len(self._layers)))]
        self._copier: Copier = copier or (StreamCopier(device) if device.type == "cuda" else SyncCopier())
        self._window: deque[tuple[int, int]] = deque()  # (layer, slot) loaded or loading, in order of use
        self._free: deque[int] = deque()
        self._next = 0  # the stream's next layer to load
        self._pass: object | None = None  # the newest pass
        self.max_resident = 0

        self._embed = model.model.language_model.embed_tokens
        model.place(device, host=(EMBED + ".",), keep=(LAYERS + ".", VISUAL + "."))
        self._reset()

    # --- the stream of layers ---------------------------------------------------------------------

    def layers(self) -> Iterator[nn.Module]:
        """The decoder layers in order, each with its weights in a device slot while the caller uses it.
        Use each layer before taking the next; a pass left early (or superseded) starts the stream over."""
        me = self._pass = object()
        if not self._window or self._window[0][0] != 0:  # the first pass, or one was left early
            self._reset()
        for i, layer in enumerate(self._layers):
            index, slot = self._window[0]
            assert index == i, (index, i)
            self._copier.acquire(slot)
            self.max_resident = max(self.max_resident, self.resident())
            yield layer
            if self._pass is not me:
                raise RuntimeError("this pass over the offloaded layers was superseded by a newer one")
            self._copier.release(slot)
            _point(self._refs[i], self._placeholders[i])
            self._window.popleft()
            self._free.append(slot)
            self._fill()

    def _fill(self) -> None:
        """Load the stream's next layers into the free slots."""
        while self._free:
            layer, slot = self._next, self._free.popleft()
            self._copier.load(slot, self._slots[slot], self._host[layer])
            _point(self._refs[layer], self._slots[slot])
            self._window.append((layer, slot))
            self._next = (layer + 1) % len(self._layers)

    def _reset(self) -> None:
        """Every layer evicted, the stream back at layer 0, its first layers loading."""
        for layer, _ in self._window:
            _point(self._refs[layer], self._placeholders[layer])
        self._window.clear()
        self._free = deque(range(len(self._slots)))
        self._next = 0
        self._copier.start()
        self._fill()

    def resident(self) -> int:
        """How many layers point to real tensors now (read from the layers themselves)."""
        return sum(any(table[name].numel() > 0 for table, name in refs) for refs in self._refs)

    def reset_max_resident(self) -> None:
        self.max_resident = 0

    # --- the host-held parts ----------------------------------------------------------------------

    @contextlib.contextmanager
    def visual_on_device(self) -> Iterator[None]:
        """The ViT's tensors on the device for the block (one request's references), on the host again after.
        Copied even when host == device (the CPU), so the code path, and a memory estimate, is the device's."""
        on_device = [_like(t, t.to(self.device, non_blocking=True, copy=True)) for t in self._visual_host]
        _point(self._visual_refs, on_device)
        try:
            yield
        finally:
            _point(self._visual_refs, self._visual_host)

    def layer_bytes(self) -> int:
        """Bytes of all the decoder layers: what one pass over them streams to the device."""
        return sum(_nbytes(t) for host in self._host for t in host)

    def host_tensors(self) -> list[Tensor]:
        """The tensors kept in host memory: every layer's, the ViT's and `embed_tokens`'s."""
        return [t for host in self._host for t in host] + list(self._visual_host) + [self._embed.weight]


def enable_offload(model: HiDreamO1, device: torch.device, ahead: int = 2, *,
                   copier: Copier | None = None) -> LayerOffload:
    """Keep `model`'s decoder layers, `embed_tokens` and ViT on the host and move the rest to `device`;
    its layer loops then stream the layers (`model.resident_layers()`). Fuse or quantize before this."""
    if model.offload is not None:
        raise ValueError("the model's layers are offloaded already")
    offload = LayerOffload(model, torch.device(device), ahead, copier)
    model.offload = offload
    return offload


def offloadable_bytes(model: nn.Module, device: torch.device) -> int:
    """Bytes of the model's parameters and buffers not on `device` yet (meta tensors count)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        on = t.device.type == device.type and (device.index is None or t.device.index == device.index)
        if id(t) not in seen and not on:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def choose_offload(mode: str, model: nn.Module, device: torch.device) -> str:
    """"none" or "layers" for an offload mode; "auto" offloads when the CUDA device's free memory is
    below the weights still to be moved there plus WORKING_SET_RESERVE (never on the CPU)."""
    if mode not in OFFLOAD_MODES:
        raise InvalidRequestError("offload", f"must be none, layers or auto (got {mode!r})")
    if mode != "auto":
        return mode
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "none"
    free, _ = torch.cuda.mem_get_info(device)
    return "layers" if free < offloadable_bytes(model, device) + WORKING_SET_RESERVE else "none"
