"""Single-file checkpoints (ComfyUI-style repacks): what such a file carries besides its tensors.

A repack holds the official tensor names in one `.safetensors` file, often without `lm_head` (never
used to draw) and the ViT's DeepStack mergers. It rarely carries a config or a tokenizer, so:
- the configuration comes from the file's metadata (`hidream.config`, which `hidream convert` writes),
  else from a `config.json` beside the tokenizer (`--tokenizer DIR`: the official repository's small
  files), else it is inferred from the tensor shapes, which fix every size but not three choices the
  published model makes (rotary sections, ViT heads, DeepStack layers): those are taken as published
  when the shapes are the published ones, and otherwise asked for;
- the tokenizer and image processor come from `--tokenizer DIR`, else the file's own metadata
  (`hidream.files`), else the file's directory;
- the variant from the metadata (`hidream.variant`), else the file name (`..._dev_...`): see
  `config.detect_variant`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hidream.engine.config import VARIANT_KEY  # noqa: F401  (re-exported: the metadata keys live here)
from hidream.engine.errors import CheckpointError

CONFIG_KEY = "hidream.config"
FILES_KEY = "hidream.files"
# Small text files of a checkpoint directory that tokenize prompts and size images.
ASSET_SUFFIXES = (".json", ".txt", ".jinja")
NOT_ASSETS = ("config.json", "model.safetensors.index.json")
MAX_ASSET_BYTES = 32 * 2**20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The tokens whose ids the config records.
CONFIG_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>",
                 "<|im_end|>")

TEXT = "model.language_model."
VISUAL = "model.visual."
DEEPSTACK = VISUAL + "deepstack_merger_list."
# The published model's choices that no tensor shape records, and the shapes that identify it.
PUBLISHED_MROPE = {128: [24, 20, 20]}  # head_dim -> mrope_section
PUBLISHED_VIT_HEADS = {1152: 16}  # ViT hidden size -> heads
PUBLISHED_DEEPSTACK = {(27, 3): [8, 16, 24]}  # (ViT depth, mergers) -> the ViT layers they read


def asset_texts(directory: Path) -> dict[str, str]:
    """The tokenizer and processor files of a directory, by name: what a single file can embed."""
    texts = {}
    for file in sorted(directory.iterdir()):
        if (file.is_file() and file.suffix in ASSET_SUFFIXES and file.name not in NOT_ASSETS
                and not file.name.endswith(".index.json") and file.stat().st_size <= MAX_ASSET_BYTES):
            try:
                texts[file.name] = file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
    return texts


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def embedded_assets(file: Path, metadata: dict[str, str]) -> dict[str, str] | None:
    raw = metadata.get(FILES_KEY)
    if raw is None:
        return None
    try:
        files = json.loads(raw)
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise ValueError("not an object of file names to texts")
    except ValueError as err:
        raise CheckpointError(f"{file}: metadata {FILES_KEY}: {err}") from err
    if any("/" in k or "\\" in k or k.startswith(".") for k in files):
        raise CheckpointError(f"{file}: metadata {FILES_KEY}: file names must be plain names")
    return files


def embedded_config(file: Path, metadata: dict[str, str]) -> dict | None:
    raw = metadata.get(CONFIG_KEY)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except ValueError as err:
        raise CheckpointError(f"{file}: metadata {CONFIG_KEY}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: metadata {CONFIG_KEY}: must be a JSON object")
    return config


def _layers(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    found = {int(m.group(1)) for name in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", name))}
    if found and found != set(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - found)
        raise CheckpointError(f"{prefix}{missing[0]}.*: missing (the file has {prefix}N for N in "
                              f"{min(found)}..{max(found)} with gaps)")
    return len(found)


def infer_config(shapes: dict[str, tuple[int, ...]], token_ids: dict[str, int], source: Path) -> dict:
    """A config.json for the tensors `shapes` (official names) with the tokenizer's `token_ids`."""
    from hidream.engine.demo import demo_config

    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise CheckpointError(f"{name}: missing from {source.name}; needed to infer the configuration")
        return shapes[name]

    def cannot(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{source.name}: cannot infer {field} from the tensor shapes ({why}); give "
                               "--tokenizer DIR with the checkpoint's config.json (the official repository's small files)")

    vocab, hidden = shape(TEXT + "embed_tokens.weight")
    layer = TEXT + "layers.0."
    head_dim = shape(layer + "self_attn.q_norm.weight")[0]
    mrope = PUBLISHED_MROPE.get(head_dim)
    if mrope is None:
        raise cannot("text_config.rope_scaling.mrope_section", f"head_dim {head_dim} is not the published 128")
    text = {
        "vocab_size": vocab, "hidden_size": hidden, "head_dim": head_dim,
        "num_hidden_layers": _layers(shapes, TEXT + "layers."),
        "num_attention_heads": shape(layer + "self_attn.q_proj.weight")[0] // head_dim,
        "num_key_value_heads": shape(layer + "self_attn.k_proj.weight")[0] // head_dim,
        "intermediate_size": shape(layer + "mlp.gate_proj.weight")[0],
        "attention_bias": layer + "self_attn.q_proj.bias" in shapes,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": mrope, "rope_type": "default"},
    }
    width = shape(VISUAL + "blocks.0.norm1.weight")[0]
    heads = PUBLISHED_VIT_HEADS.get(width)
    if heads is None:
        raise cannot("vision_config.num_heads", f"ViT width {width} is not the published 1152")
    depth = _layers(shapes, VISUAL + "blocks.")
    mergers = _layers(shapes, DEEPSTACK)
    deepstack = [] if mergers == 0 else PUBLISHED_DEEPSTACK.get((depth, mergers))
    if deepstack is None:
        raise cannot("vision_config.deepstack_visual_indexes",
                     f"{mergers} DeepStack mergers on a {depth}-block ViT; the published model has 3 on 27")
    _, channels, temporal, patch, _ = shape(VISUAL + "patch_embed.proj.weight")
    merged = shape(VISUAL + "merger.linear_fc1.weight")[1]
    merge = round((merged / width) ** 0.5)
    vision = {
        "depth": depth, "hidden_size": width, "num_heads": heads, "in_channels": channels,
        "intermediate_size": shape(VISUAL + "blocks.0.mlp.linear_fc1.weight")[0],
        "patch_size": patch, "temporal_patch_size": temporal, "spatial_merge_size": merge,
        "num_position_embeddings": shape(VISUAL + "pos_embed.weight")[0],
        "out_hidden_size": shape(VISUAL + "merger.linear_fc2.weight")[0],
        "deepstack_visual_indexes": deepstack,
    }
    raw = demo_config(token_ids, vocab)
    raw["text_config"].update(text)
    raw["vision_config"].update(vision)
    return raw
