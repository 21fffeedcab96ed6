"""HiDream-O1: the Qwen3-VL backbone plus the three generation parts, named as in the official checkpoint.

Two ways through the decoder, with identical results:
- `forward_full`: the whole sequence every step with the attention rule as a mask (the reference);
- `prefill` once per request and guidance branch, then `forward_generation` every step: the text
  tokens never attend to generation tokens, so their keys and values are constant and cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from hidream.engine.config import PATCH_SIZE, ModelSpec
from hidream.engine.layers import RMSNorm, apply_rope, attention

PATCH_DIM = 3 * PATCH_SIZE * PATCH_SIZE


@dataclass
class TextCache:
    """Per-layer keys and values of the text (autoregressive) tokens: [B, KVH, T, D] each.

    `key_mask` ([B, T], True = real token) is set when branches of different text lengths were
    right-padded to share one batch.
    """

    keys: list[Tensor]
    values: list[Tensor]
    key_mask: Tensor | None = None

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


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
        self.q_proj = nn.Linear(t.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(t.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(t.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, t.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, t.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, t.rms_norm_eps)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, S, hidden] -> q [B, H, S, D], k/v [B, KVH, S, D], normed and rotated."""
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, o: Tensor) -> Tensor:
        b, _, s, _ = o.shape  # [B, H, S, D] -> [B, S, H*D]
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        t = spec.text
        self.gate_proj = nn.Linear(t.hidden_size, t.intermediate_size, bias=False)
        self.up_proj = nn.Linear(t.hidden_size, t.intermediate_size, bias=False)
        self.down_proj = nn.Linear(t.intermediate_size, t.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        eps = spec.text.rms_norm_eps
        self.self_attn = Attention(spec)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.text.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(spec.text.hidden_size, eps)

    def finish(self, h: Tensor, attn_out: Tensor) -> Tensor:
        """Residual, then the MLP block."""
        h = h + self.self_attn.out(attn_out)
        return h + self.mlp(self.post_attention_layernorm(h))


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
        self.proj1 = nn.Linear(PATCH_DIM, hidden // 4, bias=False)
        self.proj2 = nn.Linear(hidden // 4, hidden, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj2(self.proj1(x))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of 1000*t (cos first), then a two-layer SiLU MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        """t: [B] in [0, 1] (1 - sigma) -> [B, hidden]."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = (t * 1000).float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, PATCH_DIM, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class HiDreamCore(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
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

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.language_model.layers

    # --- inputs -------------------------------------------------------------------------------

    def encode_images(self, pixel_values: Tensor, grid_thw: Tensor) -> tuple[Tensor, list[Tensor]]:
        """ViT features of the conditioning images: ([n_tokens, hidden], DeepStack [n_tokens, hidden] per layer)."""
        visual = self.model.visual
        out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw, return_dict=True)
        return out.pooler_output, list(out.deepstack_features)

    def embed_text(self, input_ids: Tensor, image_embeds: Tensor | None) -> Tensor:
        """Token embeddings [B, T, hidden], the image placeholders replaced by ViT features."""
        h = self.model.language_model.embed_tokens(input_ids)
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

    def _inject(self, h: Tensor, i: int, visual: VisualInjection | None) -> Tensor:
        if visual is None or i >= len(visual.features):
            return h
        pos = visual.positions
        if pos.shape[1] < h.shape[1]:  # full sequence: no image tokens past the text
            pos = F.pad(pos, (0, h.shape[1] - pos.shape[1]))
        h = h.clone()
        h[pos] = h[pos] + visual.features[i].to(h.dtype)
        return h

    def forward_full(self, h: Tensor, cos: Tensor, sin: Tensor, text_len: int,
                     visual: VisualInjection | None) -> Tensor:
        """Reference path: every token, every layer; h: [B, S, hidden] with text first.

        The attention rule as a mask: text rows are causal over text columns only; generation
        rows see every column.
        """
        s = h.shape[1]
        mask = torch.ones(s, s, dtype=torch.bool, device=h.device)
        mask[:text_len] = False
        mask[:text_len, :text_len] = torch.ones(text_len, text_len, dtype=torch.bool, device=h.device).tril()
        for i, layer in enumerate(self.layers):
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin)
            h = layer.finish(h, attention(q, k, v, mask[None, None]))
            h = self._inject(h, i, visual)
        return h

    def prefill(self, h: Tensor, cos: Tensor, sin: Tensor, visual: VisualInjection | None,
                key_mask: Tensor | None = None) -> TextCache:
        """Run the text tokens once, causally; keep each layer's keys and values.

        key_mask: [B, T] True for real tokens when rows were right-padded to one length.
        The last layer's MLP is skipped: nothing downstream reads the text's output.
        """
        keys, values = [], []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin)
            keys.append(k)
            values.append(v)
            if i == last:
                break
            # Right padding sits after every real token, so causal masking alone is exact for them.
            h = layer.finish(h, attention(q, k, v, causal=True))
            h = self._inject(h, i, visual)
        return TextCache(keys, values, key_mask)

    def forward_generation(self, h: Tensor, cos: Tensor, sin: Tensor, cache: TextCache) -> Tensor:
        """Generation tokens [B, G, hidden] attend to the cached text and to each other."""
        mask = None
        if cache.key_mask is not None:
            ones = torch.ones(h.shape[0], h.shape[1], dtype=torch.bool, device=h.device)
            mask = torch.cat([cache.key_mask, ones], dim=1)[:, None, None, :]  # [B, 1, 1, T + G]
        for i, layer in enumerate(self.layers):
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin)
            k = torch.cat([cache.keys[i], k], dim=2)
            v = torch.cat([cache.values[i], v], dim=2)
            h = layer.finish(h, attention(q, k, v, mask))
        return h
