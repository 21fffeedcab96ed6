"""A tiny checkpoint in exactly the official layout (official token ids), with random weights: for tests.

Its images are noise: it proves the loading and sampling code, not image quality. The default model of the
commands is the trained demo model shipped in the package (`hidream.data`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from hidream.engine.config import spec_from_config
from hidream.engine.demo_assets import write_demo_processor_config, write_demo_tokenizer

VISION = {"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}


# The published HiDream-O1-Image shape (Qwen3-VL-8B), for benchmarks with random weights.
FULL_TEXT = {"hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
             "head_dim": 128, "intermediate_size": 12288,
             "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}}
FULL_VISION = {"depth": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304,
               "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24], "out_hidden_size": 4096}
FULL_VOCAB = 151936


def full_config(token_ids: dict[str, int]) -> dict:
    """config.json of the full-size model (with the demo tokenizer's special-token ids)."""
    raw = demo_config(token_ids, FULL_VOCAB)
    raw["text_config"].update(FULL_TEXT)
    raw["vision_config"].update(FULL_VISION)
    return raw


def demo_config(token_ids: dict[str, int], vocab_size: int, layers: int = 3, hidden: int = 64) -> dict:
    """config.json of the demo model, shaped like the published one (a stock `qwen3_vl` config)."""
    head_dim = 16
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": token_ids["<|endoftext|>"],
            "eos_token_id": token_ids["<|im_end|>"],
            "dtype": "bfloat16",
            "head_dim": head_dim,
            "hidden_act": "silu",
            "hidden_size": hidden,
            "initializer_range": 0.02,
            "intermediate_size": hidden * 2,
            "max_position_embeddings": 262144,
            "num_attention_heads": 4,
            "num_hidden_layers": layers,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
            "rope_theta": 5000000,
            "use_cache": True,
            "vocab_size": vocab_size,
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "deepstack_visual_indexes": [0, 1],
            "depth": 2,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 32,
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": 64,
            "num_heads": 2,
            "num_position_embeddings": 64,
            "out_hidden_size": hidden,
            **VISION,
        },
    }


def _shards(tensors: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    names = sorted(tensors)
    per = -(-len(names) // count)
    return [{n: tensors[n] for n in names[i:i + per]} for i in range(0, len(names), per)]


def write_demo_checkpoint(directory: str | Path, seed: int = 0, shards: int = 1,
                          dtype: torch.dtype = torch.bfloat16, layers: int = 3, hidden: int = 64) -> Path:
    """Write the demo checkpoint into `directory` (created if needed) and return its path."""
    from transformers import Qwen3VLConfig

    from hidream.engine.model import HiDreamO1

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    token_ids = write_demo_tokenizer(out)
    vocab_size = -(-(max(token_ids.values()) + 1) // 64) * 64
    raw = demo_config(token_ids, vocab_size, layers=layers, hidden=hidden)
    write_demo_processor_config(out, **{k: VISION[k] for k in ("patch_size", "temporal_patch_size")},
                                merge_size=VISION["spatial_merge_size"])
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    spec = spec_from_config(Qwen3VLConfig.from_dict(raw))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HiDreamO1(spec)
        # Small output head, so the random model's x0 stays near the pixel range.
        torch.nn.init.normal_(model.model.final_layer2.linear.weight, std=0.02)
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
        tensors["lm_head.weight"] = torch.randn(vocab_size, hidden).to(dtype)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return out
    parts = _shards(tensors, shards)
    weight_map = {}
    for i, part in enumerate(parts, start=1):
        name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, str(out / name), metadata=meta)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return out
