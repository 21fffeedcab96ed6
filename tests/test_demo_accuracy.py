"""The shipped demo model (src/hidream/data/demo-model): an ordinary official-layout checkpoint that follows
the world's prompts on held-out combinations, at 20 steps and the recipe's guidance.

The set is the start of the benchmark's (`benchmarks/demo_model.py`, 100 per mode; `hidream.demo_eval`: the
same prompts and seeds), seeded, on the CPU, at the steps of the benchmark's `steps=20` row (within a few
points of the default 50 there, in 40% of the time: the suite's budget). The thresholds sit below what the
shipped model scores on these 10 prompts per mode at 20 steps (100% background and 70% subject colour in
text-to-image, 70% background in edits, 100% background in personalization; at 50 steps 100%, 80%, 70%,
100%; random weights score 0%), and they cover what it has learnt: the colours.
Shapes, positions, the edits' named changes and the references' colours are not learnt yet (the benchmark's
figures in docs/benchmarks.md), so nothing here asserts them.
"""

from __future__ import annotations

import json

import pytest
import torch

from hidream import demo_eval, world
from hidream.data import DEMO_MODEL, demo_model, demo_world

COUNT = 10  # held-out prompts per mode
STEPS = 20
# (mode, figure, at least %): what the shipped model scores on these prompts, less a margin
THRESHOLDS = (("t2i", "background", 80), ("t2i", "colour", 60), ("edit", "background", 50),
              ("personalize", "background", 80))


@pytest.fixture(scope="module")
def engine():
    from hidream.engine.pipeline import Engine

    torch.manual_seed(0)
    return Engine.load(demo_model(), device="cpu")  # the ordinary loader, fp32 on the CPU


@pytest.fixture(scope="module")
def drawn(engine):
    samples = demo_eval.held_out_set(COUNT)
    return samples, demo_eval.generate(engine, samples, steps=STEPS)


def test_the_shipped_model_is_an_official_layout_checkpoint_within_20_mb(engine) -> None:
    raw = json.loads((DEMO_MODEL / "config.json").read_text())
    assert raw["model_type"] == "qwen3_vl" and raw["architectures"] == ["Qwen3VLForConditionalGeneration"]
    files = {p.name for p in DEMO_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", world.DESCRIPTION_FILE} <= files, files
    assert sum(p.stat().st_size for p in DEMO_MODEL.iterdir()) <= 20 * 2**20
    vocab = engine.encoder.tokenizer.get_vocab()
    assert raw["image_token_id"] == vocab["<|image_pad|>"] and raw["vision_start_token_id"] == vocab["<|vision_start|>"]
    assert engine.variant == "full"
    # what it says it knows is what the world is now
    assert demo_world(None) == world.describe(256) == demo_world(DEMO_MODEL)


def test_text_to_image_draws_the_prompts_colours(drawn) -> None:
    _check(drawn, "t2i")


def test_edits_give_the_background_the_instruction_leaves_or_names(drawn) -> None:
    _check(drawn, "edit")


def test_personalization_draws_the_prompts_background(drawn) -> None:
    _check(drawn, "personalize")


def test_the_example_prompt_draws_red_on_blue(engine) -> None:
    from hidream.engine.pipeline import GenerationRequest

    image = engine.generate(GenerationRequest("a red circle on a blue background", width=256, height=256,
                                              seed=3)).images[0]
    reading = world.read(image)
    assert (reading.background, reading.colour) == ("blue", "red"), reading


def _check(drawn, mode: str) -> None:
    samples, images = drawn
    pairs = [(s, i) for s, i in zip(samples, images, strict=True) if s.mode == mode]
    acc = demo_eval.accuracy([s for s, _ in pairs], [i for _, i in pairs])[mode]
    low = {figure: (acc[figure], least) for m, figure, least in THRESHOLDS if m == mode and acc[figure] < least}
    assert not low, f"{mode}: {acc}; below the thresholds: {low}"
