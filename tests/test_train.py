"""`hidream train lora` on the demo checkpoint (CPU, fp32): a LoRA trained on one picture (or one edit pair) for
100 steps brings generation from its caption (same seed, same steps) much closer to that picture; a resumed run
continues the uninterrupted run's loss curve; bad data is refused naming the file."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from hidream.engine.errors import InvalidRequestError
from hidream.engine.lora import LoraSpec, read_lora
from hidream.engine.pipeline import GenerationRequest
from hidream.engine.sampling import Denoiser
from hidream.engine.training import make_example, target_size
from hidream.train import (
    TrainingDataError,
    checkpoint_dir,
    resolve_targets,
    run_lora,
    scan_dataset,
    train_lora,
)

SIZE = 64
CAPTION = "a yellow circle and a red square on blue"
INSTRUCTION = "make the background green"
# The demo model's pixel head is small and random: the LoRA needs it among its targets to draw anything.
TARGETS = "attn,mlp,model.final_layer2.linear"
FAST = dict(rank=16, lr=1e-2, resolution=SIZE, targets=TARGETS, caption_dropout=0.2, progress=False)
GEN_STEPS = 10


def shapes(background: tuple[int, int, int], size: int = SIZE) -> Image.Image:
    """A yellow disc top left and a red square bottom right on `background`."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 8, size // 8, size // 2, size // 2), fill=(240, 200, 20))
    draw.rectangle((size // 2, size // 2, size - size // 8, size - size // 8), fill=(220, 30, 40))
    return image


BLUE, GREEN = (30, 60, 200), (20, 160, 60)


def mse(a: Image.Image, b: Image.Image) -> float:
    return float(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean())


def folder(tmp_path: Path, files: dict[str, Image.Image | str | bytes], name: str = "data") -> Path:
    out = tmp_path / name
    out.mkdir()
    for file, content in files.items():
        if isinstance(content, Image.Image):
            content.save(out / file)
        elif isinstance(content, bytes):
            (out / file).write_bytes(content)
        else:
            (out / file).write_text(content, encoding="utf-8")
    return out


def generate(engine, prompt: str, refs=(), lora: Path | None = None) -> Image.Image:
    req = GenerationRequest(prompt, width=SIZE, height=SIZE, references=list(refs), seed=0, steps=GEN_STEPS,
                            loras=[LoraSpec(lora, 1.0)] if lora is not None else [])
    return engine.generate(req).images[0]


def test_text_to_image_lora_draws_its_image(engine, tmp_path):
    picture = shapes(BLUE)
    data = folder(tmp_path, {"shapes.png": picture, "shapes.txt": CAPTION})
    base = generate(engine, CAPTION)
    out = tmp_path / "out" / "shapes.safetensors"
    result = train_lora(engine, data, out, steps=100, sample_steps=GEN_STEPS, **FAST)

    assert result.steps == 100 and len(result.losses) == 100
    assert np.mean(result.losses[-10:]) < 0.8 * np.mean(result.losses[:10])
    tuned = generate(engine, CAPTION, lora=out)
    assert mse(tuned, picture) <= 0.7 * mse(base, picture), (mse(tuned, picture), mse(base, picture))
    # The sample is that generation: the first caption, the run's seed, the LoRA file through the engine.
    assert result.sample == out.with_suffix(".png")
    assert np.array_equal(np.asarray(Image.open(result.sample)), np.asarray(tuned))
    # The model is left as it was found.
    assert np.array_equal(np.asarray(generate(engine, CAPTION)), np.asarray(base))
    assert "step_layer" not in engine.model.__dict__

    # A PEFT file with official names and its settings, read back by the loader; the decoder trained too.
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["hidream.lora_rank"] == "16" and float(meta["hidream.lora_alpha"]) == 16.0
    assert meta["hidream.steps"] == "100" and meta["hidream.base_model"] == engine.checkpoint.name
    assert "model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "model.final_layer2.linear.lora_B.weight" in keys
    lora = read_lora(out)
    assert lora.format == "peft" and len(lora.modules) == 3 * 7 + 1
    assert lora.modules["model.language_model.layers.1.mlp.down_proj"].parts["B"].abs().max() > 0


def test_edit_pair_lora_makes_the_edit(engine, tmp_path):
    before, after = shapes(BLUE), shapes(GREEN)
    data = folder(tmp_path, {"pair.ref.png": before, "pair.png": after, "pair.txt": INSTRUCTION})
    base = generate(engine, INSTRUCTION, [before])
    out = tmp_path / "edit.safetensors"
    train_lora(engine, data, out, steps=100, sample=False, **FAST)
    tuned = generate(engine, INSTRUCTION, [before], lora=out)
    assert mse(tuned, after) <= 0.7 * mse(base, after), (mse(tuned, after), mse(base, after))


def test_training_sees_what_generation_sees(engine):
    """The example's conditioning and x0 prediction equal those of the request generate() would make."""
    from hidream.engine import images as img

    ref = shapes(BLUE, 96)
    example = make_example(engine, shapes(GREEN), INSTRUCTION, [ref], resolution=SIZE)
    _, _, refs, refs_vit = img.prepare_references([ref], SIZE, SIZE, False)
    cond = engine.conditioning([INSTRUCTION], SIZE, SIZE, refs, refs_vit)
    assert torch.equal(example.denoiser.cond.text_embeds[0], cond.text_embeds[0])
    assert torch.equal(example.denoiser.cond.refs, cond.refs)
    assert example.noise_scale == 8.0  # the full model's recipe
    z = engine.initial_noise(3, SIZE, SIZE, 8.0) * 0.5
    t = torch.tensor(0.5)
    with torch.no_grad():
        trained = example.denoiser(z, t)
        sampled = Denoiser(engine.model, cond, mode="cached")(z, t)
    torch.testing.assert_close(trained, sampled, rtol=1e-4, atol=1e-5)


def test_resume_continues_the_loss_curve(engine, tmp_path):
    data = folder(tmp_path, {"a.png": shapes(BLUE), "a.txt": CAPTION, "b.png": shapes(GREEN), "b.txt": "on green"})
    whole = train_lora(engine, data, tmp_path / "whole.safetensors", steps=6, save_every=3, batch=2, sample=False,
                       **FAST)
    states = checkpoint_dir(tmp_path / "whole.safetensors")
    assert sorted(p.name for p in states.iterdir()) == [
        "step-000003.pt", "step-000003.safetensors", "step-000006.pt", "step-000006.safetensors"]
    resumed = train_lora(engine, data, tmp_path / "resumed.safetensors", steps=6, save_every=3, batch=2,
                         sample=False, resume=states / "step-000003.pt", **FAST)
    assert resumed.losses[:3] == whole.losses[:3]  # from the checkpoint
    np.testing.assert_allclose(resumed.losses[3:], whole.losses[3:], rtol=1e-6)
    a, b = read_lora(whole.output), read_lora(resumed.output)
    for name, delta in a.modules.items():
        torch.testing.assert_close(b.modules[name].parts["B"], delta.parts["B"], rtol=1e-5, atol=1e-7)
    # A directory resumes from its newest state: nothing is left to do at step 6.
    again = train_lora(engine, data, tmp_path / "again.safetensors", steps=6, batch=2, sample=False, resume=states,
                       **FAST)
    assert again.steps == 6 and again.losses == whole.losses
    assert torch.equal(read_lora(again.output).modules[name].parts["B"], a.modules[name].parts["B"])
    with pytest.raises(InvalidRequestError, match="rank") as err:
        train_lora(engine, data, tmp_path / "other.safetensors", steps=6, sample=False, resume=states,
                   **{**FAST, "rank": 8})
    assert err.value.field == "rank"
    other = folder(tmp_path, {"c.png": shapes(BLUE), "c.txt": CAPTION}, "other")
    with pytest.raises(InvalidRequestError, match="other examples") as err:
        train_lora(engine, other, tmp_path / "other.safetensors", steps=6, batch=2, sample=False, resume=states,
                   **FAST)
    assert err.value.field == "data"
    with pytest.raises(InvalidRequestError, match="does not exist") as err:
        train_lora(engine, data, tmp_path / "other.safetensors", resume=tmp_path / "nothing.pt", **FAST)
    assert err.value.field == "resume"


def test_gradient_checkpointing_changes_nothing_but_memory(engine, tmp_path):
    data = folder(tmp_path, {"a.png": shapes(BLUE), "a.txt": CAPTION})
    plain = train_lora(engine, data, tmp_path / "plain.safetensors", steps=3, sample=False,
                       gradient_checkpointing=False, **FAST)
    saved = train_lora(engine, data, tmp_path / "ckpt.safetensors", steps=3, sample=False,
                       gradient_checkpointing=True, **FAST)
    np.testing.assert_allclose(saved.losses, plain.losses, rtol=1e-6)
    assert "step_layer" not in engine.model.__dict__


@pytest.mark.parametrize("files, culprit, words", [
    ({"cat.txt": "a cat"}, "cat.txt", "has no image"),
    ({"cat.png": shapes(BLUE), "dog.png": shapes(BLUE), "cat.txt": "a cat"}, "dog.png", "has no caption"),
    ({"cat.ref.png": shapes(BLUE), "cat.txt": "a cat"}, "cat.ref.png", "no target image"),
    ({"cat.png": b"not a png at all", "cat.txt": "a cat"}, "cat.png", "not an image"),
    ({"cat.png": shapes(BLUE), "cat.txt": "  \n"}, "cat.txt", "empty"),
    ({"cat.png": shapes(BLUE), "cat.jpg": shapes(BLUE), "cat.txt": "a cat"}, "cat.jpg", "several images"),
    ({"cat.png": shapes(BLUE).resize((64, 20)), "cat.txt": "a cat"}, "cat.png", "becomes 96x32"),
    ({"notes.md": "nothing here"}, "data", "no training example"),
])
def test_bad_data_is_refused_naming_the_file(engine, tmp_path, files, culprit, words):
    data = folder(tmp_path, files)
    with pytest.raises(TrainingDataError, match=words) as err:
        train_lora(engine, data, tmp_path / "x.safetensors", steps=1, sample=False, **FAST)
    assert err.value.path.name == culprit
    assert str(data / culprit) in str(err.value) if culprit != "data" else str(data) in str(err.value)
    assert not (tmp_path / "x.safetensors").exists()


def test_dataset_layout(tmp_path):
    data = folder(tmp_path, {
        "b.png": shapes(BLUE), "b.txt": "t2i", "a.ref2.png": shapes(GREEN), "a.ref1.jpg": shapes(BLUE),
        "a.png": shapes(GREEN), "a.txt": "from two", ".hidden.png": shapes(BLUE), "notes.json": "{}"})
    items = scan_dataset(data)
    assert [i.image.name for i in items] == ["a.png", "b.png"]
    assert [r.name for r in items[0].references] == ["a.ref1.jpg", "a.ref2.png"] and items[1].references == ()
    with pytest.raises(TrainingDataError, match="does not exist"):
        scan_dataset(tmp_path / "missing")


def test_sizes_and_targets(engine):
    assert target_size(640, 480, 512) == (576, 416)  # the aspect kept, centre-cropped to 32-pixel multiples
    assert target_size(100, 60, 128) == (160, 96)
    example = make_example(engine, shapes(BLUE).resize((100, 60)), CAPTION, resolution=128)
    assert (example.width, example.height) == (160, 96) and example.x0.shape == (1, 15, 3072)
    assert resolve_targets("attn,mlp") == ["model.language_model.layers.*.self_attn.*_proj",
                                           "model.language_model.layers.*.mlp.*_proj"]
    assert resolve_targets("model.final_layer2.*, attn")[0] == "model.final_layer2.*"


def test_bad_options_are_refused(engine, tmp_path):
    data = folder(tmp_path, {"a.png": shapes(BLUE), "a.txt": CAPTION})
    for option, value in (("rank", 0), ("steps", 0), ("lr", 0.0), ("resolution", 100), ("batch", 0)):
        with pytest.raises(InvalidRequestError) as err:
            train_lora(engine, data, tmp_path / "x.safetensors", **{**FAST, option: value})
        assert err.value.field == option
    with pytest.raises(InvalidRequestError, match="ViT"):
        train_lora(engine, data, tmp_path / "x.safetensors", **{**FAST, "targets": "model.visual.blocks.*"})
    with pytest.raises(InvalidRequestError, match="matches no linear layer"):
        train_lora(engine, data, tmp_path / "x.safetensors", **{**FAST, "targets": "model.nothing.*"})
    with pytest.raises(InvalidRequestError, match="safetensors"):
        train_lora(engine, data, tmp_path / "x.pt", **FAST)
    assert "step_layer" not in engine.model.__dict__


@pytest.mark.parametrize("options, field", [({"quantize": "fp8"}, "model"), ({"offload": "layers"}, "offload")])
def test_training_needs_plain_resident_weights(demo_checkpoint, tmp_path, options, field):
    from hidream.engine.pipeline import Engine

    engine = Engine.load(demo_checkpoint, device="cpu", **options)
    data = folder(tmp_path, {"a.png": shapes(BLUE), "a.txt": CAPTION})
    with pytest.raises(InvalidRequestError) as err:
        train_lora(engine, data, tmp_path / "x.safetensors", **FAST)
    assert err.value.field == field


def cli_args(**given) -> argparse.Namespace:
    defaults = dict(model=None, data=None, output=None, rank=16, alpha=None, targets="attn,mlp", steps=500, lr=1e-4,
                    batch=1, resolution=512, seed=0, device="cpu", precision=None, gradient_checkpointing=None,
                    save_every=100, resume=None, sample_prompt=None, no_sample=False, caption_dropout=0.0)
    return argparse.Namespace(**{**defaults, **given})


def test_run_lora(demo_checkpoint, tmp_path, capsys):
    data = folder(tmp_path, {"a.png": shapes(BLUE), "a.txt": CAPTION})
    out = tmp_path / "cli.safetensors"
    args = cli_args(model=str(demo_checkpoint), data=str(data), output=str(out), steps=2, resolution=SIZE,
                    targets=TARGETS, lr=1e-2, sample_prompt="a blue field")
    assert run_lora(args) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and str(out.with_suffix(".png")) in printed
    assert out.is_file() and out.with_suffix(".png").is_file()
    assert (checkpoint_dir(out) / "step-000002.pt").is_file()
    with pytest.raises(InvalidRequestError) as err:
        run_lora(cli_args(model=str(demo_checkpoint), data=str(data), output=str(out), save_every=0))
    assert err.value.field == "--save-every"
    with pytest.raises(TrainingDataError):
        run_lora(cli_args(model=str(demo_checkpoint), data=str(tmp_path / "none"), output=str(out)))
