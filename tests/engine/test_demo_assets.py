"""The demo checkpoint's tokenizer and processor files load offline with transformers and behave like Qwen3-VL's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hidream.engine.demo_assets import SPECIAL_TOKENS, write_demo_processor_config, write_demo_tokenizer

USER_PROMPT = "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
TWO_IMAGES_PROMPT = (
    "<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>t<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _write_all(directory: Path) -> dict[str, int]:
    ids = write_demo_tokenizer(directory)
    write_demo_processor_config(directory, patch_size=16, merge_size=2, temporal_patch_size=2)
    return ids


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    directory = tmp_path_factory.mktemp("demo")
    return directory, _write_all(directory)


@pytest.fixture
def tokenizer(demo_dir, offline):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir[0])


def test_files_written(demo_dir):
    directory, ids = demo_dir
    names = {path.name for path in directory.iterdir()}
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "vocab.json",
        "merges.txt",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
    } <= names
    assert set(ids) == set(SPECIAL_TOKENS) and len(SPECIAL_TOKENS) == 19
    assert len(set(ids.values())) == len(ids)


def test_tokenizer_loads_offline_and_is_small(tokenizer):
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert 500 < len(tokenizer) < 2000
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert tokenizer.model_max_length == 262144


def test_special_tokens_are_single_ids_and_round_trip(tokenizer, demo_dir):
    ids = demo_dir[1]
    for token in SPECIAL_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False) == [ids[token]], token
        assert tokenizer.convert_tokens_to_ids(token) == ids[token]
        assert tokenizer.decode([ids[token]]) == token
    assert tokenizer.eos_token_id == ids["<|im_end|>"]
    assert tokenizer.pad_token_id == ids["<|endoftext|>"]
    text = "<|vision_start|><|image_pad|><|vision_end|>a cat<|im_end|>"
    encoded = tokenizer.encode(text, add_special_tokens=False)
    assert encoded[:3] == [ids["<|vision_start|>"], ids["<|image_pad|>"], ids["<|vision_end|>"]]
    assert encoded[-1] == ids["<|im_end|>"]
    assert tokenizer.decode(encoded) == text


def test_chat_template_matches_qwen3_vl(tokenizer):
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == USER_PROMPT
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "t"}]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == TWO_IMAGES_PROMPT
    rendered = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
        ],
        tokenize=False,
    )
    assert rendered == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"


def test_english_compresses_and_round_trips(tokenizer):
    sentence = "A photo of a small cat sitting on a wooden table next to the window, in soft morning light."
    ids = tokenizer.encode(sentence, add_special_tokens=False)
    assert len(ids) < len(sentence.encode("utf-8")) / 2
    assert tokenizer.decode(ids) == sentence
    unusual = "Ünïcödé, 日本語 and emoji 😀\n\ttabs   and  spaces 12345"
    assert tokenizer.decode(tokenizer.encode(unusual, add_special_tokens=False)) == unusual


def test_image_processor_loads_offline_and_grids(demo_dir, offline):
    from PIL import Image
    from transformers import AutoImageProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    directory = demo_dir[0]
    processor = Qwen2VLImageProcessorPil.from_pretrained(directory)
    assert processor.patch_size == 16 and processor.merge_size == 2 and processor.temporal_patch_size == 2
    assert list(processor.image_mean) == [0.5] * 3 and list(processor.image_std) == [0.5] * 3
    assert isinstance(AutoImageProcessor.from_pretrained(directory, backend="pil"), Qwen2VLImageProcessorPil)

    images = [Image.new("RGB", (384, 384), (10, 20, 30)), Image.new("RGB", (288, 384), (200, 100, 0))]
    out = processor(images)
    grids = [tuple(int(v) for v in row) for row in out["image_grid_thw"]]
    assert grids == [(1, 24, 24), (1, 24, 18)]
    patch_dim = 3 * 2 * 16 * 16
    assert tuple(out["pixel_values"].shape) == (24 * 24 + 24 * 18, patch_dim)


def test_two_runs_write_identical_files(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert _write_all(first) == _write_all(second)
    # A second interpreter with another hash seed must agree too.
    script = (
        "import sys; from pathlib import Path; from hidream.engine.demo_assets import *; "
        "d = Path(sys.argv[1]); write_demo_tokenizer(d); write_demo_processor_config(d, 16, 2, 2)"
    )
    third = tmp_path / "c"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(third)], check=True, env=env, timeout=60)
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir()) == sorted(path.name for path in third.iterdir())
    for name in names:
        data = (first / name).read_bytes()
        assert data == (second / name).read_bytes() == (third / name).read_bytes(), name
