"""LoRA: community files read in their own key formats, applied per request, and trained ones saved.

Formats, recognized per key:
- PEFT / diffusers: `P.lora_A.weight` [r, in] and `P.lora_B.weight` [out, r] (also `P.lora.down.weight` /
  `P.lora.up.weight`), an optional `P.alpha`; P an official module name, bare or under one of the prefixes
  community files use (`diffusion_model.`, `model.`, `base_model.model.`, `transformer.`) or without the
  leading `model.` (Kijai's `language_model.layers.0.mlp.down_proj`);
- kohya / musubi: `lora_unet_<the module path with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha`;
- LyCORIS LoKr: `P.lokr_w1` (or `lokr_w1_a` @ `lokr_w1_b`), `P.lokr_w2` (or `lokr_w2_a` @ `lokr_w2_b`), `P.alpha`:
  the update is kron(w1, w2).
Every module is addressed by its official (unfused) name; the model's fused q/k/v and gate/up layers take
each part's update on that part's rows. The update of a module is delta = scale * (alpha / r) * B @ A
(alpha absent: alpha = r, so 1), LoKr's likewise with r the inner size of its factored parts (1 when
neither is factored).

Applied two ways, the same numbers within float rounding:
- runtime: a forward hook adds x @ A.T @ B.T * scale to the layer's output (on its rows): nothing in the
  weights changes, so a request's set is put on and taken off cheaply, and fp8 layers keep their weights;
- merged: the update is added to the weight rows (the originals kept to restore them); the steps then
  cost what they cost without LoRA. fp8 layers always take the runtime branch (merging would round the
  update away into fp8).
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hidream.engine.errors import CheckpointError, InvalidRequestError
from hidream.engine.tensorfile import Entry, read_header, read_tensor
from hidream.rules import MAX_LORA_SCALE

# Every linear layer a LoRA may address, by official name.
OFFICIAL_LINEAR = re.compile(
    r"model\.(language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
    r"|x_embedder\.proj[12]|t_embedder1\.mlp\.[02]|final_layer2\.linear"
    r"|visual\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc[12])|merger\.linear_fc[12]"
    r"|deepstack_merger_list\.\d+\.linear_fc[12]))")
PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "model.")
KOHYA_PREFIX = "lora_unet_"
# Parts of official names that hold an underscore themselves (kohya joins the path with underscores).
WORDS = ("deepstack_merger_list", "language_model", "self_attn", "x_embedder", "t_embedder1", "final_layer2",
         "linear_fc1", "linear_fc2", "gate_proj", "down_proj", "up_proj", "q_proj", "k_proj", "v_proj", "o_proj")
PEFT_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora.down.weight": "A", ".lora.up.weight": "B",
                 ".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}
LOKR_SUFFIXES = {f".lokr_{part}": part for part in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b")}
ATTN_TARGETS = ("model.language_model.layers.*.self_attn.*_proj",)
MLP_TARGETS = ("model.language_model.layers.*.mlp.*_proj",)
MAX_SCALE = MAX_LORA_SCALE


class LoraError(InvalidRequestError):
    """A LoRA file that cannot be applied; `key` names the tensor at fault (None: the file as a whole)."""

    def __init__(self, rule: str, key: str | None = None, field: str = "lora") -> None:
        super().__init__(field, rule)
        self.key = key


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a request: a file and its scale (negative allowed)."""

    path: Path
    scale: float = 1.0


# --- reading files -----------------------------------------------------------------------------------


def official_name(path: str) -> str | None:
    """The official module name a key's module path means, or None."""
    candidates = [path]
    for prefix in PREFIXES:
        if path.startswith(prefix):
            candidates.append(path.removeprefix(prefix))
    for name in candidates:
        for guess in (name, "model." + name):
            if OFFICIAL_LINEAR.fullmatch(guess):
                return guess
    return None


def _kohya_path(body: str) -> str:
    """`model_language_model_layers_0_self_attn_q_proj` -> `model.language_model.layers.0.self_attn.q_proj`."""
    for i, word in enumerate(WORDS):
        body = body.replace(word, f"\x00{i}\x00")
    dotted = ".".join(body.split("_"))
    return re.sub(r"\x00(\d+)\x00", lambda m: WORDS[int(m.group(1))], dotted)


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(format, module path, part) of a LoRA key, or None when it is no LoRA key."""
    if key.startswith(KOHYA_PREFIX):
        body, _, rest = key.removeprefix(KOHYA_PREFIX).partition(".")
        part = PEFT_SUFFIXES.get("." + rest)
        return ("kohya", _kohya_path(body), part) if part else None
    for suffix, part in LOKR_SUFFIXES.items():
        if key.endswith(suffix):
            return "lokr", key.removesuffix(suffix), part
    for suffix, part in PEFT_SUFFIXES.items():
        if key.endswith(suffix):
            return "peft", key.removesuffix(suffix), part
    return None


@dataclass
class Delta:
    """One module's update, as stored (float32 tensors on the CPU until applied)."""

    kind: str  # lora | lokr
    parts: dict[str, Tensor] = field(default_factory=dict)
    alpha: float | None = None

    @property
    def rank(self) -> int:
        if self.kind == "lora":
            return int(self.parts["A"].shape[0])
        factored = [self.parts[k].shape[0] for k in ("w1_b", "w2_b") if k in self.parts]
        return int(factored[0]) if factored else 1

    @property
    def factor(self) -> float:
        """alpha / r (1 without alpha; 1 for a LoKr of two full factors)."""
        if self.alpha is None or (self.kind == "lokr" and not any(k.endswith("_b") for k in self.parts)):
            return 1.0
        return self.alpha / self.rank

    def shape(self) -> tuple[int, int]:
        """(out, in) of the update."""
        if self.kind == "lora":
            return int(self.parts["B"].shape[0]), int(self.parts["A"].shape[1])

        def size(n: str) -> tuple[int, int]:
            p = self.parts
            return tuple(p[n].shape) if n in p else (p[n + "_a"].shape[0], p[n + "_b"].shape[1])  # type: ignore

        (o1, i1), (o2, i2) = size("w1"), size("w2")
        return o1 * o2, i1 * i2

    def matrix(self, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
        """The full update [out, in] times alpha / r (times no request scale), computed in float32."""
        p = {k: v.to(device, torch.float32) for k, v in self.parts.items()}

        def factor(n: str) -> Tensor:
            return p[n] if n in p else p[n + "_a"] @ p[n + "_b"]

        m = p["B"] @ p["A"] if self.kind == "lora" else torch.kron(factor("w1"), factor("w2"))
        return (m * self.factor).to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


@dataclass
class LoraFile:
    path: Path
    format: str
    modules: dict[str, Delta]

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.modules.values())


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file's header says: its key format, the modules it changes, its ranks, its size."""

    format: str
    modules: list[str]
    ranks: set[int]
    nbytes: int


def _plan(path: Path) -> tuple[str, dict[str, dict[str, tuple[str, Entry]]]]:
    """From the header: the format, and per official module name its parts {part: (key, entry)}."""
    header = read_header(path)
    if not header.entries:
        raise LoraError(f"{path.name}: holds no tensors", None)
    formats: set[str] = set()
    modules: dict[str, dict[str, tuple[str, Entry]]] = {}
    for key, entry in header.entries.items():
        split = _split_key(key)
        if split is None:
            if key.endswith(".dora_scale"):
                raise LoraError(f"{key}: DoRA is not supported (plain LoRA and LoKr are)", key)
            raise LoraError(f"{key}: not a LoRA key (expected lora_A/lora_B, lora_down/lora_up, lokr_w1/w2 or alpha; "
                            f"{path.name} may not be a LoRA file)", key)
        kind, module, part = split
        name = official_name(module)
        if name is None:
            raise LoraError(f"{key}: {module!r} matches no layer of HiDream-O1 (a LoRA for another model?)", key)
        formats.add(kind)
        if part in modules.setdefault(name, {}):
            raise LoraError(f"{key}: a second {part} for {name} (also {modules[name][part][0]})", key)
        modules[name][part] = (key, entry)
    for name, parts in modules.items():
        _check_parts(name, parts)
    fmt = "lokr" if "lokr" in formats else ("kohya" if "kohya" in formats else "peft")
    return fmt, modules


def _check_parts(name: str, parts: dict[str, tuple[str, Entry]]) -> None:
    some_key = next(iter(parts.values()))[0]
    if "alpha" in parts and parts["alpha"][1].shape not in ((), (1,)):
        raise LoraError(f"{parts['alpha'][0]}: alpha must be one number (shape {list(parts['alpha'][1].shape)})",
                        parts["alpha"][0])
    if any(p in parts for p in ("A", "B")):
        for need in ("A", "B"):
            if need not in parts:
                raise LoraError(f"{some_key}: {name} has lora_{'B' if need == 'B' else 'A'} missing "
                                f"(a LoRA module needs both its down and up matrices)", some_key)
        (ka, a), (kb, b) = parts["A"], parts["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"{kb}: rank mismatch: {ka} is {list(a.shape)} and {kb} is {list(b.shape)} "
                            "(down [r, in], up [out, r])", kb)
        return
    if not any(p.startswith("w1") for p in parts) or not any(p.startswith("w2") for p in parts):
        raise LoraError(f"{some_key}: {name} has only part of a LoKr (w1 and w2 are both needed)", some_key)


def check_lora_file(path: Path) -> LoraInfo:
    """The header of a LoRA file, checked (no weight is read); LoraError naming the key otherwise."""
    try:
        fmt, modules = _plan(Path(path))
    except CheckpointError as err:
        raise LoraError(f"{Path(path).name}: not a readable safetensors file ({err})", None) from None
    ranks = set()
    nbytes = 0
    for parts in modules.values():
        if "A" in parts:
            ranks.add(parts["A"][1].shape[0])
        for _, entry in parts.values():
            nbytes += entry.nbytes
    return LoraInfo(fmt, sorted(modules), ranks, nbytes)


def read_lora(path: Path) -> LoraFile:
    """A LoRA file's updates (float32 CPU tensors); LoraError naming the key for anything malformed."""
    path = Path(path)
    try:
        fmt, plan = _plan(path)
    except CheckpointError as err:
        raise LoraError(f"{path.name}: not a readable safetensors file ({err})", None) from None
    modules: dict[str, Delta] = {}
    with open(path, "rb") as f:
        for name, parts in plan.items():
            delta = Delta("lora" if "A" in parts else "lokr")
            for part, (key, entry) in parts.items():
                t = read_tensor(f, entry).float()
                if not torch.isfinite(t).all():
                    raise LoraError(f"{key}: holds NaN or infinite values", key)
                if part == "alpha":
                    delta.alpha = float(t.reshape(()))
                else:
                    delta.parts[part] = t
            modules[name] = delta
    return LoraFile(path, fmt, modules)


# --- where updates go --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """An official module's place in the model: the Linear computing it and its rows there."""

    module: nn.Linear
    start: int
    end: int


def linear_targets(model: nn.Module) -> dict[str, Target]:
    """Every linear layer by official (unfused) name; fused q/k/v and gate/up parts by their rows."""
    targets: dict[str, Target] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.endswith(".qkv_proj"):
            base = name.removesuffix("qkv_proj")
            attn = model.get_submodule(name.rsplit(".", 1)[0])
            q, kv = attn.heads * attn.head_dim, attn.kv_heads * attn.head_dim
            for part, (s, e) in zip("qkv", ((0, q), (q, q + kv), (q + kv, q + 2 * kv)), strict=True):
                targets[f"{base}{part}_proj"] = Target(module, s, e)
        elif name.endswith(".gate_up_proj"):
            base = name.removesuffix("gate_up_proj")
            half = module.out_features // 2
            targets[base + "gate_proj"] = Target(module, 0, half)
            targets[base + "up_proj"] = Target(module, half, module.out_features)
        else:
            targets[name] = Target(module, 0, module.out_features)
    return targets


def _resolve(lora: LoraFile, targets: dict[str, Target], index: int | None = None) -> dict[str, Target]:
    where = f"loras[{index}].path" if index is not None else "lora"
    found = {}
    for name, delta in lora.modules.items():
        target = targets.get(name)
        if target is None:
            raise LoraError(f"{lora.path.name}: {name}: no such layer in this model", name, where)
        out, inp = delta.shape()
        rows = target.end - target.start
        if (out, inp) != (rows, target.module.in_features):
            raise LoraError(f"{lora.path.name}: {name}: update of shape [{out}, {inp}], the layer is "
                            f"[{rows}, {target.module.in_features}] (a LoRA for another model size?)", name, where)
        found[name] = target
    if not found:
        raise LoraError(f"{lora.path.name}: targets no layer", None, where)
    return found


@dataclass
class _Branch:
    """The low-rank additions of one Linear: per part (rows start, end) its A, B and scale."""

    parts: list[tuple[int, int, Tensor, Tensor | None, float]]  # (start, end, A or full delta, B or None, scale)

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x = args[0]
        pieces: dict[tuple[int, int], Tensor] = {}
        for start, end, a, b, scale in self.parts:
            xa = x.to(a.dtype)
            d = F.linear(F.linear(xa, a), b) if b is not None else F.linear(xa, a)
            d = (d * scale).to(out.dtype)
            pieces[(start, end)] = pieces[(start, end)] + d if (start, end) in pieces else d
        if len(pieces) == 1 and next(iter(pieces)) == (0, out.shape[-1]):
            return out + next(iter(pieces.values()))
        cut, at = [], 0
        for (start, end), d in sorted(pieces.items()):
            if start > at:
                cut.append(out[..., at:start])
            cut.append(out[..., start:end] + d)
            at = end
        if at < out.shape[-1]:
            cut.append(out[..., at:])
        return torch.cat(cut, dim=-1)


class Applied:
    """LoRAs put on a model; `remove()` takes them off (hooks removed, merged rows restored)."""

    def __init__(self) -> None:
        self.hooks: list = []
        self.restore: list[tuple[nn.Linear, int, int, Tensor]] = []

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        with torch.no_grad():
            for module, start, end, rows in reversed(self.restore):
                module.weight[start:end].copy_(rows)
        self.hooks, self.restore = [], []

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _compute_dtype(module: nn.Module) -> torch.dtype:
    return getattr(module, "compute_dtype", module.weight.dtype)


def apply_loras(model: nn.Module, loras: Sequence[tuple[LoraFile, float]], mode: str = "runtime") -> Applied:
    """Put `loras` (each with its scale) on `model`, runtime or merged; fp8 layers always at runtime."""
    if mode not in ("runtime", "merged"):
        raise ValueError(f"mode must be runtime or merged (got {mode!r})")
    targets = linear_targets(model)
    resolved = [_resolve(lora, targets, i) for i, (lora, _) in enumerate(loras)]
    applied = Applied()
    branches: dict[nn.Module, _Branch] = {}
    try:
        for (lora, scale), found in zip(loras, resolved, strict=True):
            for name, target in found.items():
                delta, module = lora.modules[name], target.module
                device = module.weight.device
                merged = mode == "merged" and module.weight.dtype != torch.float8_e4m3fn
                if merged:
                    with torch.no_grad():
                        rows = module.weight[target.start:target.end]
                        applied.restore.append((module, target.start, target.end, rows.clone()))
                        update = delta.matrix(torch.float32, device) * scale
                        rows.copy_((rows.float() + update).to(rows.dtype))
                    continue
                dtype = _compute_dtype(module)
                if delta.kind == "lora":
                    a = delta.parts["A"].to(device, dtype)
                    b = delta.parts["B"].to(device, dtype)
                    part = (target.start, target.end, a, b, scale * delta.factor)
                else:  # LoKr: the full update, made once per application
                    part = (target.start, target.end, delta.matrix(dtype, device), None, scale)
                branches.setdefault(module, _Branch([])).parts.append(part)
        for module, branch in branches.items():
            applied.hooks.append(module.register_forward_hook(branch))
    except BaseException:
        applied.remove()
        raise
    return applied


# --- a cache of parsed files -------------------------------------------------------------------------


class LoraCache:
    """Parsed LoRA files, least recently used dropped first beyond `max_bytes` (a file is re-read when it
    changes on disk: keyed by path, size and modification time)."""

    def __init__(self, max_bytes: int = 2 * 2**30) -> None:
        self.max_bytes = max_bytes
        self._files: OrderedDict[tuple, LoraFile] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> LoraFile:
        path = Path(path)
        try:
            st = path.stat()
        except OSError as err:
            raise LoraError(f"{path}: cannot be read ({err.strerror or err})", None) from None
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
                return self._files[key]
        lora = read_lora(path)
        with self._lock:
            self._files[key] = lora
            while self._files and self.nbytes > self.max_bytes:
                self._files.popitem(last=False)
        return lora

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self._files.values())

    def __len__(self) -> int:
        return len(self._files)


def check_scale(scale: object, field: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) \
            or abs(scale) > MAX_SCALE:
        raise InvalidRequestError(field, f"must be a number from -{MAX_SCALE:g} to {MAX_SCALE:g} (got {scale!r})")
    return float(scale)


# --- training ------------------------------------------------------------------------------------------


class TrainableLora:
    """Trainable low-rank branches on a model's linear layers (B starts at zero: the model is unchanged)."""

    def __init__(self, model: nn.Module, names: Iterable[str], rank: int, alpha: float, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        targets = linear_targets(model)
        self.rank, self.alpha = rank, float(alpha)
        self.names = sorted(names)
        gen = torch.Generator("cpu").manual_seed(seed)
        self.a: dict[str, nn.Parameter] = {}
        self.b: dict[str, nn.Parameter] = {}
        branches: dict[nn.Module, _Branch] = {}
        for name in self.names:
            t = targets[name]
            device = t.module.weight.device
            bound = 1.0 / math.sqrt(t.module.in_features)  # kaiming-uniform(a=sqrt(5)) as nn.Linear does
            a = (torch.rand((rank, t.module.in_features), generator=gen) * 2 - 1) * bound
            self.a[name] = nn.Parameter(a.to(device, dtype))
            self.b[name] = nn.Parameter(torch.zeros((t.end - t.start, rank), device=device, dtype=dtype))
            branches.setdefault(t.module, _Branch([])).parts.append(
                (t.start, t.end, self.a[name], self.b[name], self.alpha / rank))
        self._applied = Applied()
        for module, branch in branches.items():
            self._applied.hooks.append(module.register_forward_hook(branch))

    def parameters(self) -> list[nn.Parameter]:
        return [p for name in self.names for p in (self.a[name], self.b[name])]

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for name in self.names:
            out[f"{name}.lora_A.weight"] = self.a[name].detach().float().cpu().contiguous()
            out[f"{name}.lora_B.weight"] = self.b[name].detach().float().cpu().contiguous()
            out[f"{name}.alpha"] = torch.tensor(self.alpha)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name in self.names:
                self.a[name].copy_(state[f"{name}.lora_A.weight"])
                self.b[name].copy_(state[f"{name}.lora_B.weight"])

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt", "hidream.lora_rank": str(self.rank), "hidream.lora_alpha": str(self.alpha),
                **(metadata or {})}
        save_file(self.state_dict(), str(path), metadata=meta)
        return path

    def remove(self) -> None:
        self._applied.remove()


def matching_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The official linear names that match any of the fnmatch `patterns`."""
    return [n for n in linear_targets(model) if any(fnmatch(n, p) for p in patterns)]


def add_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> TrainableLora:
    """Trainable branches on every linear layer whose official name matches one of `targets` (fnmatch)."""
    names = matching_names(model, targets)
    if not names:
        raise InvalidRequestError("targets", f"{', '.join(targets)} matches no linear layer of the model")
    if rank < 1:
        raise InvalidRequestError("rank", f"must be 1 or more (got {rank})")
    return TrainableLora(model, names, rank, alpha, seed, dtype)
