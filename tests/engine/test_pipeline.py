"""The engine's request path: recipes, noise, velocity and guidance, modes, seeds, progress and cancel."""

import numpy as np
import pytest
import torch
from PIL import Image

from hidream.engine.config import recipe_for
from hidream.engine.errors import GenerationCanceled, InvalidRequestError
from hidream.engine.pipeline import Engine, GenerationRequest
from hidream.engine.sampling import T_EPS, denoise, velocity
from hidream.engine.schedulers import DEV_TIMESTEPS, EulerFlow, Schedule, fixed_schedule


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def dev_engine(demo_checkpoint):
    return Engine.load(demo_checkpoint, device="cpu", variant="dev")


# --- the recipe's formulas -------------------------------------------------------------------------


def test_recipes_match_the_official_defaults():
    full = recipe_for("full", 0)
    assert (full.steps, full.guidance, full.shift, full.scheduler, full.noise_scale) == (50, 5.0, 3.0, "unipc", 8.0)
    assert recipe_for("full", 1).shift == 3.0
    assert recipe_for("full", 2).shift == 1.0  # the official personalization examples
    dev = recipe_for("dev", 0)
    assert (dev.steps, dev.guidance, dev.scheduler, dev.noise_scale, dev.noise_clip_std) == (28, 1.0, "flash", 7.5, 2.5)
    dev_edit = recipe_for("dev", 1)
    assert (dev_edit.scheduler, dev_edit.noise_scale) == ("euler", 8.0)
    assert recipe_for("dev", 3).scheduler == "flash"


def test_initial_noise_is_drawn_on_the_cpu_from_seed_plus_one(engine):
    z = engine.initial_noise(41, 64, 32, 8.0)
    expected = 8.0 * torch.randn((1, 3, 32, 64), generator=torch.Generator().manual_seed(42))
    assert z.shape == (1, 2, 3072)
    # patch 1 (second column), channel 2, row 5, column 7 -> index 2*1024 + 5*32 + 7
    assert z[0, 1, 2 * 1024 + 5 * 32 + 7] == expected[0, 2, 5, 32 + 7]
    torch.testing.assert_close(z[0, 0, :1024].reshape(32, 32), expected[0, 0, :, :32], rtol=0, atol=0)


def test_initial_noise_is_rounded_to_the_model_dtype_before_scaling(demo_checkpoint):
    bf16 = Engine.load(demo_checkpoint, device="cpu", dtype=torch.bfloat16)
    z = bf16.initial_noise(0, 64, 64, 7.5)
    draw = torch.randn((1, 3, 64, 64), generator=torch.Generator().manual_seed(1))
    official = (7.5 * draw.to(torch.bfloat16))[0, 0, :32, :32].reshape(-1)
    other_order = (7.5 * draw).to(torch.bfloat16)[0, 0, :32, :32].reshape(-1)
    assert z.dtype == torch.bfloat16
    assert torch.equal(z[0, 0, :1024], official)
    assert not torch.equal(official, other_order)  # the order matters at 7.5, so this test can fail


def test_velocity_and_guidance():
    z = torch.tensor([[[1.0, -2.0]]])
    x0 = torch.tensor([[[0.5, 0.0]], [[0.0, 1.0]]])  # conditional, unconditional
    sigma = torch.tensor(0.25)
    # v_c = (x0_c - z)/s = (-2, 8); v_u = (-4, 12); guided = v_u + 3 (v_c - v_u) = (2, 0)
    torch.testing.assert_close(velocity(x0, z, sigma, 3.0), torch.tensor([[[2.0, 0.0]]]))
    torch.testing.assert_close(velocity(x0[:1], z, sigma, 3.0), torch.tensor([[[-2.0, 8.0]]]))


def test_sigma_and_model_timestep_conversion():
    """The model sees 1 - t/1000; the velocity divides by max(t/1000, 0.001)."""
    schedule = Schedule(timesteps=[750.0, 0.5], sigmas=[0.75, 0.0005, 0.0])
    seen_t, outputs = [], []

    def denoiser(z, t):
        seen_t.append(float(t))
        return torch.zeros(1, 1, 2)

    class Recorder:
        def step(self, model_output, sample):
            outputs.append(model_output.clone())
            return sample

    z = torch.ones(1, 1, 2)
    denoise(denoiser, z, schedule, Recorder(), guidance=1.0)
    assert seen_t == pytest.approx([0.25, 0.9995])
    # model_output = -v = -(0 - 1)/sigma
    assert outputs[0][0, 0, 0].item() == pytest.approx(1 / 0.75)
    assert outputs[1][0, 0, 0].item() == pytest.approx(1 / T_EPS)


def test_one_euler_step_through_the_loop():
    schedule = fixed_schedule([800, 300])
    z = torch.full((1, 1, 2), 2.0)
    out = denoise(lambda z, t: torch.full((1, 1, 2), 0.5), z, schedule, EulerFlow(schedule), guidance=1.0)
    # step 1: v = (0.5 - 2)/0.8; z' = z + (0.3 - 0.8) * (-v) = 2 - 0.5*1.875 = 1.0625
    # step 2: v = (0.5 - 1.0625)/0.3; z'' = z' + (0 - 0.3) * (-v) = 0.5
    torch.testing.assert_close(out, torch.full((1, 1, 2), 0.5))


# --- modes, sizes, schedulers ----------------------------------------------------------------------


def test_text_to_image_size_and_determinism(engine):
    req = GenerationRequest("a lighthouse at dusk", width=96, height=64, steps=3, seed=7)
    a = engine.generate(req)
    b = engine.generate(req)
    c = engine.generate(GenerationRequest("a lighthouse at dusk", width=96, height=64, steps=3, seed=8))
    assert a.images[0].size == (96, 64) and a.images[0].mode == "RGB"
    assert (a.width, a.height, a.steps, a.guidance, a.scheduler) == (96, 64, 3, 5.0, "unipc")
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert np.abs(pixels(a.images[0]) - pixels(c.images[0])).mean() > 5


def test_num_images_use_consecutive_seeds(engine):
    two = engine.generate(GenerationRequest("x", width=64, height=64, steps=2, seed=10, num_images=2))
    single = engine.generate(GenerationRequest("x", width=64, height=64, steps=2, seed=11))
    assert two.seeds == [10, 11]
    assert np.array_equal(pixels(two.images[1]), pixels(single.images[0]))


def test_edit_output_size_with_and_without_keep_original_aspect(engine):
    ref = picture(300, 100)
    plain = engine.generate(GenerationRequest("make it blue", width=128, height=64, steps=1, references=[ref]))
    assert plain.images[0].size == (128, 64)
    kept = engine.generate(GenerationRequest("make it blue", width=128, height=64, steps=1, references=[ref],
                                             keep_original_aspect=True))
    # official rule: the reference fitted to the 2048x2048 budget, patch-aligned -> 3520 x 1152 for 3:1
    assert kept.images[0].size == (3520, 1152) == (kept.width, kept.height)
    two = engine.generate(GenerationRequest("both", width=128, height=64, steps=1, references=[ref, ref],
                                            keep_original_aspect=True))
    assert two.images[0].size == (128, 64)  # ignored with more than one reference


def test_snap_to_native_generates_the_nearest_native_size(engine):
    wide = engine.generate(GenerationRequest("x", width=640, height=320, steps=1, guidance=1.0, snap_to_native=True))
    assert wide.images[0].size == (2560, 1440) == (wide.width, wide.height)  # 2:1, nearest 16:9
    ref = picture(300, 100)
    kept = engine.generate(GenerationRequest("make it blue", width=128, height=64, steps=1, guidance=1.0,
                                             references=[ref], keep_original_aspect=True, snap_to_native=True))
    assert kept.images[0].size == (3104, 1312)  # the reference's 3:1, snapped


@pytest.mark.parametrize("n_refs", [2, 10])
def test_personalization(engine, n_refs):
    refs = [picture(64 + 8 * i, 96, i) for i in range(n_refs)]
    res = engine.generate(GenerationRequest("them together", width=256, height=192, steps=2, references=refs))
    assert res.images[0].size == (256, 192)
    assert res.scheduler == "unipc"


def test_dev_recipe_uses_the_fixed_timesteps_and_flash(dev_engine):
    totals, previews = [], []

    def progress(step, total, preview):
        totals.append((step, total))
        if step == total:
            previews.append(preview())

    res = dev_engine.generate(GenerationRequest("a dog", width=64, height=64, seed=3), progress=progress)
    assert res.steps == len(DEV_TIMESTEPS) == 28 and res.guidance == 1.0 and res.scheduler == "flash"
    assert totals == [(i, 28) for i in range(1, 29)]
    assert previews[0].size == (64, 64)
    again = dev_engine.generate(GenerationRequest("a dog", width=64, height=64, seed=3))
    assert np.array_equal(pixels(res.images[0]), pixels(again.images[0]))  # flash noise is seeded too
    other = dev_engine.generate(GenerationRequest("a dog", width=64, height=64, steps=5, seed=3))
    assert other.steps == 5  # other step counts use the scheduler's own linear schedule


def test_dev_edit_uses_flow_matching_euler(dev_engine):
    res = dev_engine.generate(GenerationRequest("edit", width=64, height=64, steps=2, references=[picture(64, 64)]))
    assert res.scheduler == "euler"


def test_scheduler_override(engine):
    res = engine.generate(GenerationRequest("x", width=64, height=64, steps=2, scheduler="flash"))
    assert res.scheduler == "flash"


def test_cached_and_full_give_the_same_image(engine):
    req = GenerationRequest("a bowl of fruit", width=64, height=96, steps=4, seed=5, references=[picture(80, 80)])
    fast = engine.generate(req)
    plain = engine.generate(req, mode="full", batch_guidance=False)
    assert np.abs(pixels(fast.images[0]) - pixels(plain.images[0])).max() <= 1


# --- progress and cancel ---------------------------------------------------------------------------


def test_progress_reports_every_step_with_a_preview(engine):
    events = []

    def progress(step, total, preview):
        image = preview()
        events.append((step, total, image.size))

    engine.generate(GenerationRequest("x", width=96, height=64, steps=3, num_images=2), progress=progress)
    assert events == [(i, 6, (96, 64)) for i in range(1, 7)]


def test_cancel_stops_between_steps(engine):
    steps = []
    with pytest.raises(GenerationCanceled):
        engine.generate(GenerationRequest("x", width=64, height=64, steps=10),
                        progress=lambda s, t, p: steps.append(s), should_cancel=lambda: len(steps) >= 2)
    assert steps == [1, 2]


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "field"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \n"}, "prompt"),
    ({"prompt": "a <|image_pad|> b"}, "prompt"),
    ({"width": 100}, "width"),
    ({"height": 8192}, "height"),
    ({"steps": 0}, "steps"),
    ({"steps": 101}, "steps"),
    ({"guidance": -0.5}, "guidance"),
    ({"guidance": 0.5}, "guidance"),  # under 1.0 would silently act as 1.0 (no guidance)
    ({"width": 4096, "height": 2048}, "size"),  # sides fine, area over 2048x2048
    ({"guidance": 21.0}, "guidance"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"num_images": 5}, "num_images"),
    ({"references": [Image.new("RGB", (64, 64))] * 11}, "references"),
    ({"references": [b"not an image"]}, "references[0]"),
    ({"references": ["/no/such/file.png"]}, "references[0]"),
    ({"references": [Image.new("RGB", (64, 64))] * 10}, "references[0]"),  # 10 refs need a larger target
])
def test_bad_requests_name_the_field(engine, change, field):
    fields = {"prompt": "ok", "width": 64, "height": 64, "steps": 1} | change
    with pytest.raises(InvalidRequestError) as err:
        engine.generate(GenerationRequest(**fields))
    assert err.value.field == field
    assert str(err.value).startswith(field + ": ")


@pytest.mark.parametrize("device", ["banana", "cuda:99"])
def test_unusable_device_is_a_clear_error(demo_checkpoint, device):
    if device == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("this machine really has a device 99")
    with pytest.raises(InvalidRequestError) as err:
        Engine.load(demo_checkpoint, device=device)
    assert err.value.field == "device"


def test_place_keeps_host_prefixes_on_the_cpu_and_moves_the_rest(demo_checkpoint):
    from hidream.engine.checkpoint import load_model
    from hidream.engine.pipeline import EMBED

    model = load_model(demo_checkpoint, torch.device("cpu"), torch.float32)
    model.place(torch.device("meta"), host=(EMBED,))  # meta stands in for a CUDA device
    where = {n: t.device.type for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert where.pop("model.language_model.embed_tokens.weight") == "cpu"
    assert set(where.values()) == {"meta"}
    assert all(isinstance(p, torch.nn.Parameter) for _, p in model.named_parameters())
    # kept prefixes stay where they are (offload keeps its layers' host copies and the ViT)
    fresh = load_model(demo_checkpoint, torch.device("cpu"), torch.float32)
    fresh.place(torch.device("meta"), keep=("model.visual.",))
    devices = {(n.startswith("model.visual."), t.device.type) for n, t in fresh.named_parameters()}
    assert devices == {(True, "cpu"), (False, "meta")}
