"""Every official recipe through a GenerationRequest: schedulers, explicit timesteps and the noise settings.

The expected values are worked out by hand from the official HiDream-O1-Image code (inference.py and
models/pipeline.py, build_scheduler and generate_image), not taken from this engine:

- full model: UniPC ("default"), 50 steps, guidance 5.0, shift 3.0, no timesteps list; generate_image's
  noise defaults apply (initial noise scale 8.0; no re-noise).
- Dev: 28 steps, no guidance (0.0 there; any value <= 1.0 builds no unconditional branch, 1.0 here), shift
  1.0 and always the fixed DEFAULT_TIMESTEPS list. Text-to-image and personalization use flash with the
  CLI's noise_scale_start 7.5, noise_scale_end 7.5, noise_clip_std 2.5. Editing (one reference) defaults
  to flow_match Euler, called without noise arguments: generate_image's defaults, 8.0, 8.0 and 0; editing
  with --editing_scheduler flash passes 7.5, 7.5 and 2.5 like text-to-image. So the noise settings follow
  the scheduler, not the mode.
- The initial noise is noise_scale_start * randn (every scheduler); flash re-noises step i with
  start + (end - start) * i / (n - 1).
- A timesteps list replaces the scheduler's schedule whatever the scheduler: timesteps = the list,
  sigmas = [t / 1000 for t in the list] + [0.0] as a float32 tensor; shift plays no part.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import hidream.engine.pipeline as pipeline
from hidream.engine.config import detect_variant, recipe_for
from hidream.engine.errors import InvalidRequestError
from hidream.engine.pipeline import Engine, GenerationRequest
from hidream.engine.schedulers import DEV_TIMESTEPS

FOUR = (999, 857, 515, 110)  # a 4-step Dev schedule, a subset of DEFAULT_TIMESTEPS
# sigmas of FOUR as the official build_scheduler makes them: t / 1000 in float32, then 0
FOUR_SIGMAS = torch.tensor([0.999, 0.857, 0.515, 0.110, 0.0], dtype=torch.float32).tolist()


def picture(w: int = 64, h: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def dev_engine(demo_checkpoint):
    return Engine.load(demo_checkpoint, device="cpu", variant="dev")


def settings(recipe) -> tuple:
    return (recipe.scheduler, recipe.steps, recipe.guidance, recipe.shift, recipe.timesteps,
            recipe.noise_scale, recipe.noise_scale_end, recipe.noise_clip_std)


# --- the official recipes, resolved ----------------------------------------------------------------------


def test_full_text_to_image_is_unipc_50_steps(engine):
    got = engine.resolve(GenerationRequest("a cat"))
    assert settings(got) == ("unipc", 50, 5.0, 3.0, None, 8.0, 8.0, 0.0)


def test_dev_text_to_image_is_flash_on_the_28_fixed_timesteps(dev_engine):
    got = dev_engine.resolve(GenerationRequest("a cat"))
    assert settings(got) == ("flash", 28, 1.0, 1.0, DEV_TIMESTEPS, 7.5, 7.5, 2.5)
    assert len(DEV_TIMESTEPS) == 28 and DEV_TIMESTEPS[0] == 999 and DEV_TIMESTEPS[-1] == 8


def test_dev_edit_defaults_to_flow_match_euler_with_its_own_noise(dev_engine):
    got = dev_engine.resolve(GenerationRequest("make it blue", references=[picture()]))
    assert settings(got) == ("euler", 28, 1.0, 1.0, DEV_TIMESTEPS, 8.0, 8.0, 0.0)


def test_dev_flash_edit_takes_the_flash_noise(dev_engine):
    """The bug: a Dev edit asked to use flash kept the Euler recipe's noise (8.0, no clip)."""
    got = dev_engine.resolve(GenerationRequest("make it blue", references=[picture()], scheduler="flash"))
    assert settings(got) == ("flash", 28, 1.0, 1.0, DEV_TIMESTEPS, 7.5, 7.5, 2.5)


def test_noise_follows_the_scheduler_in_every_mode(engine, dev_engine):
    for eng in (engine, dev_engine):
        for refs in (0, 1, 2):
            for scheduler, noise in (("flash", (7.5, 7.5, 2.5)), ("euler", (8.0, 8.0, 0.0)),
                                     ("unipc", (8.0, 8.0, 0.0))):
                got = eng.resolve(GenerationRequest("x", references=[picture()] * refs, scheduler=scheduler))
                assert (got.noise_scale, got.noise_scale_end, got.noise_clip_std) == noise, (eng.variant, refs)
    assert recipe_for("dev", 1).with_scheduler("flash") == recipe_for("dev", 0)


def test_explicit_timesteps_set_the_steps_and_keep_the_scheduler(engine, dev_engine):
    got = dev_engine.resolve(GenerationRequest("x", timesteps=list(FOUR)))
    assert settings(got) == ("flash", 4, 1.0, 1.0, FOUR, 7.5, 7.5, 2.5)
    assert engine.resolve(GenerationRequest("x", timesteps=FOUR, steps=4)).scheduler == "unipc"


def test_explicit_noise_settings_win(dev_engine):
    got = dev_engine.resolve(GenerationRequest("x", noise_scale=8.0, noise_scale_end=4.0, noise_clip_std=0.0))
    assert (got.noise_scale, got.noise_scale_end, got.noise_clip_std) == (8.0, 4.0, 0.0)


# --- the schedule of an explicit list, for each scheduler --------------------------------------------------


@pytest.mark.parametrize("scheduler", ["unipc", "flash", "euler"])
def test_explicit_timesteps_are_the_official_override(engine, scheduler):
    """Full recipe, shift 3.0: the list is used as it is, not shifted and not replaced by a linear schedule."""
    recipe = engine.resolve(GenerationRequest("x", timesteps=FOUR, scheduler=scheduler))
    schedule = engine._schedule(recipe, recipe.steps, recipe.shift, recipe.scheduler)
    assert schedule.timesteps == [999.0, 857.0, 515.0, 110.0]
    assert schedule.sigmas == FOUR_SIGMAS


def test_dev_28_steps_without_a_list_use_the_fixed_timesteps(dev_engine):
    recipe = dev_engine.resolve(GenerationRequest("x", scheduler="euler"))
    schedule = dev_engine._schedule(recipe, recipe.steps, recipe.shift, recipe.scheduler)
    assert schedule.timesteps == [float(t) for t in DEV_TIMESTEPS]
    assert schedule.sigmas[:2] == torch.tensor([0.999, 0.987], dtype=torch.float32).tolist()
    assert schedule.sigmas[-2:] == [torch.tensor(0.008, dtype=torch.float32).item(), 0.0]


# --- end to end on the demo checkpoint: what the sampler and the initial noise receive --------------------


@pytest.fixture
def spy(monkeypatch):
    """Records the schedule each image is denoised on, the initial noise scale and the flash noise arguments."""
    seen: dict[str, list] = {"schedules": [], "scales": [], "noise": [], "flash": []}
    denoise, noise_schedule, flash = pipeline.denoise, pipeline.noise_scale_schedule, pipeline.FlashEuler
    initial = Engine.initial_noise

    def record_denoise(*args, **kwargs):
        seen["schedules"].append(args[2] if len(args) > 2 else kwargs["schedule"])
        return denoise(*args, **kwargs)

    def record_initial(self, seed, width, height, scale):
        seen["scales"].append(scale)
        return initial(self, seed, width, height, scale)

    def record_noise(start, end, steps):
        out = noise_schedule(start, end, steps)
        seen["noise"].append(out)
        return out

    def record_flash(*args, **kwargs):
        seen["flash"].append((args, kwargs))
        return flash(*args, **kwargs)

    monkeypatch.setattr(pipeline, "denoise", record_denoise)
    monkeypatch.setattr(Engine, "initial_noise", record_initial)
    monkeypatch.setattr(pipeline, "noise_scale_schedule", record_noise)
    monkeypatch.setattr(pipeline, "FlashEuler", record_flash)
    return seen


def test_dev_flash_edit_end_to_end(dev_engine, spy):
    res = dev_engine.generate(GenerationRequest("make it blue", width=64, height=64, references=[picture()],
                                                scheduler="flash", timesteps=FOUR, seed=1))
    assert (res.scheduler, res.steps, res.timesteps) == ("flash", 4, FOUR)
    assert (res.noise_scale, res.noise_scale_end, res.noise_clip_std) == (7.5, 7.5, 2.5)
    assert spy["scales"] == [7.5]  # the initial noise: noise_scale_start * randn
    assert spy["noise"] == [[7.5] * 4]
    args, kwargs = spy["flash"][0]
    assert 2.5 in args or kwargs.get("noise_clip_std") == 2.5
    assert spy["schedules"][0].sigmas == FOUR_SIGMAS


def test_dev_flow_match_edit_end_to_end(dev_engine, spy):
    res = dev_engine.generate(GenerationRequest("make it blue", width=64, height=64, references=[picture()],
                                                timesteps=FOUR, seed=1))
    assert (res.scheduler, res.noise_scale, res.noise_clip_std) == ("euler", 8.0, 0.0)
    assert spy["scales"] == [8.0] and spy["flash"] == []
    assert spy["schedules"][0].sigmas == FOUR_SIGMAS


def test_flash_noise_ramp_end_to_end(dev_engine, spy):
    totals = []
    res = dev_engine.generate(GenerationRequest("x", width=64, height=64, timesteps=FOUR, noise_scale=8.0,
                                                noise_scale_end=4.0, noise_clip_std=0.0),
                              progress=lambda step, total, _: totals.append((step, total)))
    assert totals == [(i, 4) for i in range(1, 5)]
    assert spy["scales"] == [8.0]
    # start + (end - start) * i / (n - 1) for n = 4
    assert spy["noise"] == [[8.0, 8.0 - 4.0 / 3, 8.0 - 8.0 / 3, 4.0]]
    assert res.noise_clip_std == 0.0


def test_unipc_on_an_explicit_list_end_to_end(engine, spy):
    res = engine.generate(GenerationRequest("x", width=64, height=64, timesteps=[999, 500, 100]))
    assert (res.scheduler, res.steps, res.timesteps, res.shift) == ("unipc", 3, (999, 500, 100), 3.0)
    assert spy["schedules"][0].sigmas == torch.tensor([0.999, 0.5, 0.1, 0.0], dtype=torch.float32).tolist()
    assert spy["scales"] == [8.0]


# --- bad sampling settings name their field ----------------------------------------------------------------


@pytest.mark.parametrize(("change", "field", "fragment"), [
    ({"scheduler": "ddim"}, "scheduler", "unipc, flash or euler"),
    ({"timesteps": []}, "timesteps", "1 to 100"),
    ({"timesteps": [500, 600]}, "timesteps", "strictly decreasing"),
    ({"timesteps": [1001, 500]}, "timesteps", "from 1 to 1000"),
    ({"timesteps": [500, 0]}, "timesteps", "from 1 to 1000"),
    ({"timesteps": [999.5, 500]}, "timesteps", "integers"),
    ({"timesteps": [True]}, "timesteps", "integers"),
    ({"timesteps": list(range(1000, 899, -1))}, "timesteps", "1 to 100"),  # 101 steps
    ({"timesteps": [999, 500], "steps": 3}, "steps", "number of timesteps (2)"),
    ({"timesteps": [999, 500], "shift": 3.0}, "shift", "no effect"),
    ({"noise_scale": 0.0}, "noise_scale", "above 0"),
    ({"noise_scale": float("nan")}, "noise_scale", "above 0"),
    ({"noise_scale_end": -1.0}, "noise_scale_end", "from 0"),
    ({"noise_clip_std": 11.0}, "noise_clip_std", "from 0 to 10"),
    ({"noise_clip_std": 2.5}, "noise_clip_std", "only by the flash scheduler (this request samples with unipc)"),
    ({"noise_scale_end": 7.5, "scheduler": "euler"}, "noise_scale_end", "only by the flash scheduler"),
])
def test_bad_sampling_settings_name_the_field(engine, change, field, fragment):
    with pytest.raises(InvalidRequestError) as err:
        engine.generate(GenerationRequest("ok", width=64, height=64, steps=None if "steps" not in change else
                                          change.pop("steps"), **change))
    assert err.value.field == field
    assert fragment in err.value.rule


def test_a_dev_edit_refuses_flash_noise_without_flash(dev_engine):
    with pytest.raises(InvalidRequestError) as err:
        dev_engine.validate(GenerationRequest("x", width=64, height=64, references=[picture()], noise_clip_std=2.5))
    assert err.value.field == "noise_clip_std" and "samples with euler" in err.value.rule
    dev_engine.validate(GenerationRequest("x", width=64, height=64, references=[picture()], noise_clip_std=2.5,
                                          scheduler="flash"))


# --- the variant ----------------------------------------------------------------------------------------


def test_the_variant_is_detected_and_logged(tmp_path, demo_checkpoint, caplog):
    for name, variant in (("HiDream-O1-Image", "full"), ("HiDream-O1-Image-Dev", "dev"),
                          ("models--HiDream-ai--HiDream-O1-Image-Dev/snapshots/0123abc", "dev")):
        (tmp_path / name).mkdir(parents=True)
        assert detect_variant(tmp_path / name) == variant
    with caplog.at_level("INFO", logger="hidream.engine"):
        assert Engine.load(demo_checkpoint, device="cpu").variant == "full"
        assert Engine.load(demo_checkpoint, device="cpu", variant="dev").variant == "dev"
    messages = [r.getMessage() for r in caplog.records if r.name == "hidream.engine"]
    assert any(m.startswith("variant full (from the directory name") for m in messages), messages
    assert "variant dev (from --variant)" in messages
