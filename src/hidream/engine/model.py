"""HiDream-O1: the Qwen3-VL backbone plus the three generation parts, named as in the official checkpoint.

One `DecoderLayer.forward` serves every path; the paths differ only in how attention is done (an
`Attend` passed in, one per layer):
- `prefill`, once per request and guidance branch: the text tokens, causally; each layer's keys and
  values are written once into a preallocated `KVBuffer`;
- `forward_generation`, every step: the generation tokens of one or more branches (their GEMMs
  batched); each branch attends over its own text K/V and the generation tokens' K/V, with no mask
  (the text never attends to generation tokens, so its K/V are constant);
- `forward_full`, the reference: the whole sequence of one branch, as the official code does it
  (a causal pass over the text, a full pass for the generation rows).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from hidream.engine.config import PATCH_SIZE, ModelSpec
from hidream.engine.layers import Linear, RMSNorm, apply_rope, attention, fuse_linears

if TYPE_CHECKING:
    from hidream.engine.offload import LayerOffload
    from hidream.engine.stepcache import StepCache

PATCH_DIM = 3 * PATCH_SIZE * PATCH_SIZE
# Tokens per MLP pass: big enough for full-speed GEMMs (x2 rows with guidance), small enough for memory.
MLP_CHUNK = 1024


class Attend(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, /) -> Tensor:
        """q [B, S, H, D], k/v [B, S, KVH, D] of this layer's tokens -> attention output [B, S, H, D]."""


@dataclass
class KVBuffer:
    """One branch's text keys and values, per layer [1, text_len, KVH, D], written once by the prefill,
    and one scratch pair [1, text_len + gen_len, KVH, D] that every layer's step attends over: the
    layer's text K/V copied in front, the generation tokens' K/V after. One scratch for all layers
    keeps the step's K/V memory at a layer's worth, not 36 layers' worth of generation rows."""

    keys: list[Tensor]
    values: list[Tensor]
    scratch_keys: Tensor
    scratch_values: Tensor

    @classmethod
    def empty(cls, layers: int, text_len: int, gen_len: int, kv_heads: int, head_dim: int,
              device: torch.device, dtype: torch.dtype) -> KVBuffer:
        def new(rows: int) -> Tensor:
            return torch.empty((1, rows, kv_heads, head_dim), device=device, dtype=dtype)

        return cls([new(text_len) for _ in range(layers)], [new(text_len) for _ in range(layers)],
                   new(text_len + gen_len), new(text_len + gen_len))


@dataclass
class PrefillAttend:
    """The text of one branch: causal attention; K/V kept in the layer's text buffers."""

    keys: Tensor
    values: Tensor

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.keys.copy_(k)
        self.values.copy_(v)
        return attention(q, k, v, causal=True)


@dataclass
class CachedAttend:
    """Generation tokens of B branches: row b attends over branch b's text K/V of this layer and its
    own, laid side by side in b's scratch (one mask-free call per branch; the projections around it
    stay batched)."""

    text_keys: list[Tensor]
    text_values: list[Tensor]
    scratch_keys: list[Tensor]
    scratch_values: list[Tensor]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        outs = []
        for b, (tk, tv, sk, sv) in enumerate(zip(self.text_keys, self.text_values, self.scratch_keys,
                                                 self.scratch_values, strict=True)):
            n = tk.shape[1]
            sk[:, :n].copy_(tk)
            sk[:, n:].copy_(k[b:b + 1])
            sv[:, :n].copy_(tv)
            sv[:, n:].copy_(v[b:b + 1])
            outs.append(attention(q[b:b + 1], sk, sv))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


@dataclass
class FullAttend:
    """The whole sequence of one branch, text first: text rows causal over the text, generation rows
    over everything (the official two passes)."""

    text_len: int

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n = self.text_len
        text = attention(q[:, :n], k[:, :n], v[:, :n], causal=True)
        return torch.cat([text, attention(q[:, n:], k, v)], dim=1)


@dataclass
class VisualInjection:
    """DeepStack: features added to the hidden states at the image-token positions after the first layers."""

    positions: Tensor  # bool [B, T] over the text tokens
    features: list[Tensor]  # per layer: [n_image_tokens (all batch rows), hidden]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        t = spec.text
        self.heads, self.kv_heads, self.head_dim = t.num_attention_heads, t.num_key_value_heads, spec.head_dim
        bias = bool(getattr(t, "attention_bias", False))
        self.q_proj = Linear(t.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = Linear(t.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(t.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.heads * self.head_dim, t.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, t.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, t.rms_norm_eps)
        self.qkv_proj: Linear | None = None  # set by fuse(); q/k/v_proj are gone then

    def fuse(self) -> None:
        """Replace q/k/v_proj by one GEMM (the checkpoint's names stay the on-disk ones); parts that
        cannot share one (fp8 beside bf16, as in files with fp8 on some layers only) stay apart."""
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj]) if self.qkv_proj is None else None
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, S, hidden] -> q [B, S, H, D], k/v [B, S, KVH, D], normed and rotated."""
        b, s, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([self.heads * self.head_dim] + [self.kv_heads * self.head_dim] * 2, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(b, s, self.heads, self.head_dim))
        k = self.k_norm(k.view(b, s, self.kv_heads, self.head_dim))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.view(b, s, self.kv_heads, self.head_dim)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        t = spec.text
        self.gate_proj = Linear(t.hidden_size, t.intermediate_size, bias=False)
        self.up_proj = Linear(t.hidden_size, t.intermediate_size, bias=False)
        self.down_proj = Linear(t.intermediate_size, t.hidden_size, bias=False)
        self.gate_up_proj: Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        fused = fuse_linears([self.gate_proj, self.up_proj]) if self.gate_up_proj is None else None
        if fused is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, S, hidden]; long sequences in chunks of MLP_CHUNK tokens, so the [B, S, 2 * intermediate]
        activations of a 2K image (0.4 GB in bf16, with guidance) never exist at once."""
        if x.shape[1] > MLP_CHUNK:
            return torch.cat([self._forward(c) for c in x.split(MLP_CHUNK, dim=1)], dim=1)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(torch.nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        eps = spec.text.rms_norm_eps
        self.self_attn = Attention(spec)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.text.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(spec.text.hidden_size, eps)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, attend: Attend, keep: int | None = None) -> Tensor:
        """h: [B, S, hidden] (the residual stream, in its own dtype) -> the same, one layer on.

        keep: only the first `keep` tokens' outputs are wanted ([B, keep, hidden]); every token's
        keys and values are still attended to. q/k/v reach attention in the projections' dtype: with
        bf16 weights under a float32 stream that is the official "fp32" mode's bf16 attention.
        """
        attn = self.self_attn
        dtype = attn.o_proj.compute_dtype
        q, k, v = attn.qkv(self.input_layernorm(h), cos, sin)
        if keep is not None:
            q, h = q[:, :keep], h[:, :keep]
        o = attend(q.to(dtype), k.to(dtype), v.to(dtype))  # [B, S or keep, H, D]
        h = h + attn.o_proj(o.flatten(2))
        return h + self.mlp(self.post_attention_layernorm(h))


LayerFn = Callable[..., Tensor]  # DecoderLayer.forward(layer, h, cos, sin, attend, keep=None), maybe compiled


class TextModel(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        t = spec.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)


class BottleneckPatchEmbed(nn.Module):
    """A 32x32 RGB patch (3072 values) -> hidden/4 -> hidden."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj1 = Linear(PATCH_DIM, hidden // 4, bias=False)
        self.proj2 = Linear(hidden // 4, hidden, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj2(self.proj1(x))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of 1000*t (cos first), then a two-layer SiLU MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, hidden), nn.SiLU(), Linear(hidden, hidden))
        self._freqs: dict[torch.device, Tensor] = {}

    def freqs(self, device: torch.device) -> Tensor:
        """Computed on the CPU (as the official code does), copied to `device` once, not every step."""
        if device not in self._freqs:
            half = self.freq_dim // 2
            self._freqs[device] = torch.exp(
                -math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).to(device)
        return self._freqs[device]

    def forward(self, t: Tensor) -> Tensor:
        """t: [B] in [0, 1] (1 - sigma) -> [B, hidden]."""
        freqs = self.freqs(t.device)
        args = (t * 1000).float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = Linear(hidden, PATCH_DIM, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class HiDreamCore(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel  # 2-3 s: when built

        hidden = spec.text.hidden_size
        self.visual = Qwen3VLVisionModel._from_config(spec.vision, attn_implementation="sdpa")
        self.language_model = TextModel(spec)
        self.x_embedder = BottleneckPatchEmbed(hidden)
        self.t_embedder1 = TimestepEmbedder(hidden)
        self.final_layer2 = FinalLayer(hidden)


class HiDreamO1(nn.Module):
    """The whole model; `state_dict()` keys equal the official checkpoint's (less `lm_head`)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = HiDreamCore(spec)
        # bf16-fp32acc: the ViT keeps float32 weights and runs under bf16 autocast, as the official "fp32" mode
        self.vision_autocast: torch.dtype | None = None

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.language_model.layers

    offload: LayerOffload | None = None  # set by hidream.engine.offload.enable_offload

    def place(self, device: torch.device, host: tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> None:
        """Every parameter and buffer to `device`: those named under a `host` prefix to the CPU instead, those
        under a `keep` prefix left where they are (prefixes end in "." to name whole modules)."""
        cpu = torch.device("cpu")
        for name, module in self.named_modules():
            for table in (module._parameters, module._buffers):
                for key, t in table.items():
                    full = f"{name}.{key}"
                    if t is None or full.startswith(keep):
                        continue
                    where = cpu if full.startswith(host) else device
                    if t.device != where:
                        moved = t.to(where)
                        table[key] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved

    def resident_layers(self) -> Iterable[DecoderLayer]:
        """The decoder layers in order, each with its weights on the compute device while the caller uses
        it (use each before taking the next): `self.layers` itself, or under offload streamed to the device."""
        return self.layers if self.offload is None else self.offload.layers()

    # --- inputs -------------------------------------------------------------------------------

    def encode_images(self, pixel_values: Tensor, grid_thw: Tensor) -> tuple[Tensor, list[Tensor]]:
        """ViT features of the conditioning images: ([n_tokens, hidden], DeepStack [n_tokens, hidden] per layer)."""
        visual = self.model.visual
        on = self.vision_autocast
        staged = self.offload.visual_on_device() if self.offload is not None else contextlib.nullcontext()
        with staged, torch.autocast(pixel_values.device.type, on) if on is not None else contextlib.nullcontext():
            out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw, return_dict=True)
        return out.pooler_output, list(out.deepstack_features)

    def embed_text(self, input_ids: Tensor, image_embeds: Tensor | None) -> Tensor:
        """Token embeddings [B, T, hidden], the image placeholders replaced by ViT features."""
        embed = self.model.language_model.embed_tokens  # under offload on the host: only the rows travel
        h = embed(input_ids.to(embed.weight.device)).to(input_ids.device)
        if image_embeds is not None:
            mask = (input_ids == self.spec.image_token_id)[..., None].expand_as(h)
            h = h.masked_scatter(mask, image_embeds.to(h.dtype))
        return h

    def embed_generation(self, t: Tensor, patches: Tensor) -> Tensor:
        """The timestep token followed by the patch tokens: [B, 1 + L, hidden].

        t: [B] (1 - sigma); patches: [B, L, 3072] (noisy target, then clean references).
        """
        dtype = self.model.language_model.embed_tokens.weight.dtype
        t_emb = self.model.t_embedder1(t).to(dtype)[:, None]
        return torch.cat([t_emb, self.model.x_embedder(patches.to(dtype)).to(dtype)], dim=1)

    def predict(self, h: Tensor) -> Tensor:
        """Final norm and the pixel head: [B, S, hidden] -> x0 patches [B, S, 3072]."""
        return self.model.final_layer2(self.model.language_model.norm(h))

    # --- the decoder ----------------------------------------------------------------------------

    def fuse_projections(self) -> None:
        """q/k/v and gate/up of every layer as one GEMM each; same results, fewer and larger kernels."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def compile_layers(self, **options) -> None:
        """Regional torch.compile: the one layer function, shared by all layers (weights are inputs,
        so the graph is compiled once per input shape, not once per layer); used by the steps."""
        self.step_layer = torch.compile(DecoderLayer.forward, **options)

    step_layer: LayerFn = staticmethod(DecoderLayer.forward)  # an instance attribute once compiled

    def new_buffer(self, text_len: int, gen_len: int) -> KVBuffer:
        attn = self.layers[0].self_attn
        return KVBuffer.empty(len(self.layers), text_len, gen_len, attn.kv_heads, attn.head_dim,
                              attn.o_proj.weight.device, attn.o_proj.compute_dtype)

    def _inject(self, h: Tensor, i: int, visual: VisualInjection | None) -> Tensor:
        if visual is None or i >= len(visual.features):
            return h
        pos = visual.positions
        if pos.shape[1] < h.shape[1]:  # full sequence: no image tokens past the text
            pos = torch.nn.functional.pad(pos, (0, h.shape[1] - pos.shape[1]))
        h = h.clone()
        h[pos] = h[pos] + visual.features[i].to(h.dtype)
        return h

    def prefill(self, h: Tensor, cos: Tensor, sin: Tensor, visual: VisualInjection | None, buffer: KVBuffer) -> None:
        """Run one branch's text tokens [1, T, hidden] causally, filling `buffer`'s text rows.

        Of the last layer only the keys and values are needed: nothing reads the text's outputs.
        """
        last = len(self.layers) - 1
        for i, layer in enumerate(self.resident_layers()):
            if i < last:
                h = layer(h, cos, sin, PrefillAttend(buffer.keys[i], buffer.values[i]))
                h = self._inject(h, i, visual)
            else:
                _, k, v = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin)
                buffer.keys[i].copy_(k)
                buffer.values[i].copy_(v)

    def forward_generation(self, h: Tensor, cos: Tensor, sin: Tensor, buffers: list[KVBuffer],
                           keep: int | None = None, cache: tuple[StepCache, int] | None = None) -> Tensor:
        """Generation tokens [B, G, hidden] of B branches, row b over branch b's cached text and itself.

        keep: the last layer computes only the first `keep` tokens' outputs (the timestep token and
        the target's patches; the references' are never read) -> [B, keep, hidden].
        cache: (the run's StepCache, this group's key): may skip the layers after the probe (stepcache).
        """
        sk, sv = [b.scratch_keys for b in buffers], [b.scratch_values for b in buffers]
        last = len(self.layers) - 1

        def run(i: int, layer: DecoderLayer, h: Tensor) -> Tensor:
            attend = CachedAttend([b.keys[i] for b in buffers], [b.values[i] for b in buffers], sk, sv)
            return self.step_layer(layer, h, cos, sin, attend, keep if i == last else None)

        return self._layer_pass(h, run, cache)

    def forward_full(self, h: Tensor, cos: Tensor, sin: Tensor, text_len: int,
                     visual: VisualInjection | None, cache: tuple[StepCache, int] | None = None) -> Tensor:
        """Reference path: every token of one branch, every layer; h: [1, S, hidden] with text first."""
        attend = FullAttend(text_len)
        return self._layer_pass(h, lambda i, layer, h: self._inject(self.step_layer(layer, h, cos, sin, attend),
                                                                    i, visual), cache)

    def _layer_pass(self, h: Tensor, run: Callable[[int, DecoderLayer, Tensor], Tensor],
                    cache: tuple[StepCache, int] | None) -> Tensor:
        """h through every layer (run(i, layer, h) each); with a step cache, the probe layers first, then
        either the rest or, on a step the cache reuses, its estimate of what the rest adds
        (hidream.engine.stepcache)."""
        probe = cache[0].policy.probe_layers if cache is not None else 0
        if not 0 < probe < len(self.layers):
            for i, layer in enumerate(self.resident_layers()):
                h = run(i, layer, h)
            return h
        step_cache, group = cache
        start = h
        layers = iter(enumerate(self.resident_layers()))
        for i, layer in layers:
            h = run(i, layer, h)
            if i + 1 == probe:
                break
        probed = h - start
        if step_cache.reuse(group, probed):
            return step_cache.reused(group, h)  # the layer stream is left early: offload starts it over
        mid = h
        for i, layer in layers:
            h = run(i, layer, h)
        step_cache.store(group, probed, mid, h)
        return h
