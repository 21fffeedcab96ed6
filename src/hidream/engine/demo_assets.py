"""Tokenizer and processor files for the tiny demo checkpoint.

The demo checkpoint mirrors the Hugging Face layout of HiDream-O1-Image (a Qwen3-VL-8B model) but must be
written locally, offline and deterministically, in a fraction of a second. This module writes the text side
(``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``chat_template.jinja``) and the
image side (``preprocessor_config.json``, ``video_preprocessor_config.json``).

The tokenizer is a small byte-level BPE with exactly the pipeline of Qwen2's (NFC normalizer, Qwen's split
regex, ByteLevel pre-tokenizer/decoder), so ``transformers``' ``Qwen2Tokenizer`` rebuilds the same tokenizer from
it. Its merges are learned here from a short built-in English text by the `tokenizers` BPE trainer, which is
deterministic, so two runs write byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

__all__ = [
    "SPECIAL_TOKENS",
    "write_demo_tokenizer",
    "write_demo_processor_config",
]

SPECIAL_TOKENS: tuple[str, ...] = (
    # Qwen3-VL's, in Qwen's id order.
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    # HiDream-O1's.
    "<|boi_token|>",
    "<|bor_token|>",
    "<|eor_token|>",
    "<|bot_token|>",
    "<|tms_token|>",
)

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 262144  # Qwen3-VL's
NUM_MERGES = 480  # at most; learning stops when no pair occurs twice

# Qwen2's pre-tokenization regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The text the merges are learned from: plain English, prompt-like, so that common words become one token.
_CORPUS = """\
A photo of a cat sitting on a wooden table next to a window. The light is soft and warm, and the cat looks
at the camera with green eyes. A small dog is sleeping on the floor in the corner of the room.
A beautiful landscape with mountains, a lake and a forest under a blue sky with white clouds. The water is
calm and clear, and the trees are reflected in it. In the distance there is a small house with a red roof.
A portrait of a young woman with long dark hair, wearing a white dress, standing in a field of flowers at
sunset. Her face is lit by the golden light of the evening sun, and she is smiling.
An old man with a grey beard reading a book in a library. The shelves behind him are full of books, and a
lamp on the desk gives the scene a warm glow. The style is realistic, with fine detail and sharp focus.
A city street at night in the rain. The lights of the shops and the cars are reflected on the wet road, and
people with umbrellas are walking on the sidewalk. The image has a cinematic look, with deep shadows and
bright colors.
A bowl of fresh fruit on a kitchen table: apples, oranges, bananas and grapes. The background is simple and
clean, and the picture is taken from above with natural light.
A red sports car driving on a road along the coast. The sea is on the left and the hills are on the right.
The sky is clear and the sun is high. The photo is sharp and the colors are vivid.
A painting of a ship on a stormy sea, in the style of an old master. The waves are high, the sky is dark,
and the light breaks through the clouds over the water.
A cute cartoon character with big eyes and a happy face, holding a balloon. The drawing is simple, with
thick lines and flat colors on a white background.
The children are playing in the park. Some of them are running on the grass, others are sitting under a big
tree and eating ice cream. It is a sunny day in the summer, and everyone is having a good time.
This is the first time that we have seen such a picture. It shows what the world would look like if there
were no people in it. There are only animals, plants, rivers and the wind that moves the leaves.
Please write the text "Hello World" on a sign in the middle of the image, with large letters in black.
Make the image more detailed and increase the resolution. Change the color of the sky to orange and add a
few birds flying over the hills. Remove the person on the left and keep everything else the same.
A close up photograph of a flower with drops of water on its petals, high quality, studio lighting, soft
shadows, shallow depth of field, professional photography, award winning, highly detailed, 4k, 8k.
A futuristic city with tall buildings made of glass and metal, flying cars, and green gardens on the roofs.
The scene is shown from a high point of view, with the morning sun rising between the towers.
A cozy room with a fireplace, a soft chair, a cup of tea on a small table and a cat sleeping on a blanket.
Outside the window it is snowing, and the trees are covered in white snow.
"""


def _pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """Give `tokenizer` the exact normalizer/pre-tokenizer/decoder/post-processor that Qwen2's has."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tokenizer


def _train_bpe(extra: str = "") -> Tokenizer:
    """A byte-level BPE learned from the built-in corpus and `extra` (the `tokenizers` trainer is deterministic)."""
    tokenizer = _pipeline(Tokenizer(BPE(fuse_unk=False, byte_fallback=False)))
    trainer = trainers.BpeTrainer(
        vocab_size=256 + NUM_MERGES, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tokenizer.train_from_iterator([_CORPUS, extra] if extra else [_CORPUS], trainer=trainer)
    return tokenizer


def _chat_template() -> str:
    """A Jinja chat template that renders like Qwen3-VL-Instruct's (ChatML with vision placeholders)."""
    return (
        "{%- set image_count = namespace(value=0) -%}\n"
        "{%- set video_count = namespace(value=0) -%}\n"
        "{%- for message in messages -%}\n"
        "    {{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
        "    {%- if message['content'] is string -%}\n"
        "        {{- message['content'] -}}\n"
        "    {%- elif message['content'] is not none -%}\n"
        "        {%- for content in message['content'] -%}\n"
        "            {%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}\n"
        "                {%- set image_count.value = image_count.value + 1 -%}\n"
        "                {%- if add_vision_id -%}{{- 'Picture ' + image_count.value|string + ': ' -}}{%- endif -%}\n"
        "                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}\n"
        "            {%- elif content['type'] == 'video' or 'video' in content -%}\n"
        "                {%- set video_count.value = video_count.value + 1 -%}\n"
        "                {%- if add_vision_id -%}{{- 'Video ' + video_count.value|string + ': ' -}}{%- endif -%}\n"
        "                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}\n"
        "            {%- elif 'text' in content -%}\n"
        "                {{- content['text'] -}}\n"
        "            {%- endif -%}\n"
        "        {%- endfor -%}\n"
        "    {%- endif -%}\n"
        "    {{- '<|im_end|>\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "    {{- '<|im_start|>assistant\\n' -}}\n"
        "{%- endif -%}\n"
    )


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_demo_tokenizer(directory: Path, corpus: str = "") -> dict[str, int]:
    """Write a small Qwen2-style tokenizer into `directory`; return the id of every special token.

    corpus: more text to learn the merges from, beside the built-in one (the demo model's world, so that its
    words are whole tokens); without it the files are always the same bytes.

    Files: tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and chat_template.jinja, which is all that
    ``AutoTokenizer.from_pretrained(directory)`` reads, offline. The ids of `SPECIAL_TOKENS` follow the BPE
    vocabulary, in order, as Qwen's do.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_bpe(corpus)
    model = json.loads(tokenizer.to_str())["model"]
    vocab, merges = model["vocab"], [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False) for token in SPECIAL_TOKENS]
    )
    special_ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    expected = range(len(vocab), len(vocab) + len(SPECIAL_TOKENS))
    if list(special_ids.values()) != list(expected):  # pragma: no cover - guards the layout described above
        raise RuntimeError(f"unexpected special-token ids: {special_ids}")

    tokenizer.save(str(directory / "tokenizer.json"), pretty=True)
    _write_json(directory / "vocab.json", vocab)
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8"
    )

    added_tokens_decoder = {
        str(token_id): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, token_id in special_ids.items()
    }
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [token for token in SPECIAL_TOKENS if token not in (EOS_TOKEN, PAD_TOKEN)],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(directory / "tokenizer_config.json", tokenizer_config)
    (directory / "chat_template.jinja").write_text(_chat_template(), encoding="utf-8")
    return special_ids


def write_demo_processor_config(directory: Path, patch_size: int, merge_size: int, temporal_patch_size: int) -> None:
    """Write preprocessor_config.json and video_preprocessor_config.json as Qwen3-VL's checkpoints have them.

    Pixel budgets are Qwen3-VL's: images between 65,536 and 16,777,216 pixels, videos between 4,096 and
    25,165,824 (the whole clip).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    common = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "merge_size": int(merge_size),
        "patch_size": int(patch_size),
        "processor_class": "Qwen3VLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "temporal_patch_size": int(temporal_patch_size),
    }
    image = {
        **common,
        "image_processor_type": "Qwen2VLImageProcessor",
        "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    }
    video = {
        **common,
        "do_sample_frames": True,
        "fps": 2,
        "max_frames": 768,
        "min_frames": 4,
        "return_metadata": False,
        "size": {"longest_edge": 25165824, "shortest_edge": 4096},
        "video_processor_type": "Qwen3VLVideoProcessor",
    }
    _write_json(directory / "preprocessor_config.json", dict(sorted(image.items())))
    _write_json(directory / "video_preprocessor_config.json", dict(sorted(video.items())))
