"""Schedules and samplers, pinned against values worked out by hand from the official formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hidream.engine.schedulers import (
    DEV_TIMESTEPS,
    EulerFlow,
    FlashEuler,
    Schedule,
    UniPCMultistep,
    fixed_schedule,
    linear_schedule,
    noise_scale_schedule,
    unipc_schedule,
)

SHAPE = (1, 6, 4)


def shift(s: float, k: float) -> float:
    return k * s / (1 + (k - 1) * s)


def f32(x: float) -> float:
    return float(np.float32(x))


def rand(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


# ---- schedules ------------------------------------------------------------------------------


def test_unipc_schedule_double_shift_and_truncation() -> None:
    sched = unipc_schedule(50, 3.0)
    assert len(sched.timesteps) == 50 and len(sched.sigmas) == 51 and sched.sigmas[-1] == 0.0
    # sigma_max is the shifted first training sigma; set_timesteps spaces [sigma_max, 0] in 50
    # intervals and shifts again, so sigma_k = shift(shift(0.999) * (1 - k / 50)).
    sigma_max = shift(0.999, 3.0)
    first, last = shift(sigma_max, 3.0), shift(sigma_max / 50, 3.0)
    assert sched.sigmas[0] == pytest.approx(first, abs=1e-7)  # 0.99988...
    assert sched.sigmas[49] == pytest.approx(last, abs=1e-7)  # 0.05769...
    assert sched.sigmas[49] != pytest.approx(shift(0.999 / 50, 3.0), abs=1e-6)  # a single shift differs
    # Timesteps are sigma * 1000 truncated, not rounded: 999.88 -> 999 and 57.69 -> 57.
    assert sched.timesteps[0] == math.floor(first * 1000) == 999
    assert sched.timesteps[-1] == math.floor(last * 1000) == 57
    assert all(t == int(t) for t in sched.timesteps)
    assert all(a > b for a, b in zip(sched.sigmas, sched.sigmas[1:]))
    assert all(a > b for a, b in zip(sched.timesteps, sched.timesteps[1:]))
    assert all(s == f32(s) for s in sched.sigmas)  # exact float32 values


def test_linear_schedule_endpoints() -> None:
    sched = linear_schedule(28, 1.0)
    assert len(sched.timesteps) == 28 and sched.sigmas[-1] == 0.0
    assert sched.timesteps[0] == 1000.0 and sched.sigmas[0] == 1.0
    assert sched.timesteps[-1] == pytest.approx(1.0, abs=1e-4)
    assert sched.timesteps[1] == pytest.approx(1000 - 999 / 27, abs=1e-3)  # not truncated
    # With a shift, both endpoints are shifted twice: training sigmas, then again in set_timesteps.
    shifted = linear_schedule(10, 3.0)
    assert shifted.timesteps[0] == 1000.0
    assert shifted.sigmas[9] == pytest.approx(shift(shift(0.001, 3.0), 3.0), rel=1e-6)


def test_fixed_schedule_dev() -> None:
    sched = fixed_schedule(DEV_TIMESTEPS)
    assert len(DEV_TIMESTEPS) == 28 and DEV_TIMESTEPS[:2] == (999, 987) and DEV_TIMESTEPS[-1] == 8
    assert sched.timesteps == [float(t) for t in DEV_TIMESTEPS]
    assert len(sched.sigmas) == 29 and sched.sigmas[-1] == 0.0
    assert sched.sigmas[0] == f32(0.999) and sched.sigmas[-2] == f32(0.008)


@pytest.mark.parametrize("build", [unipc_schedule, linear_schedule])
def test_invalid_inputs(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="steps"):
        build(0, 3.0)
    with pytest.raises(ValueError, match="shift"):
        build(10, 0.0)
    with pytest.raises(ValueError, match="timesteps"):
        fixed_schedule([])
    with pytest.raises(ValueError, match="timesteps"):
        fixed_schedule([500, 500])


def test_noise_scale_schedule() -> None:
    assert noise_scale_schedule(7.5, 6.0, 4) == [7.5, 7.0, 6.5, 6.0]
    assert noise_scale_schedule(8.0, 2.0, 1) == [8.0]


# ---- samplers -------------------------------------------------------------------------------


def test_euler_flow_step() -> None:
    sched = fixed_schedule([700, 300])
    x, mo = rand(0), rand(1)
    out = EulerFlow(sched).step(mo, x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x + (f32(0.3) - f32(0.7)) * mo, rtol=0, atol=1e-6)


def test_flash_euler_step_clips_noise_and_ends_denoised() -> None:
    sched = fixed_schedule([600, 200])
    gen = torch.Generator().manual_seed(7)
    sampler = FlashEuler(sched, [7.5, 6.0], noise_clip_std=0.5, generator=gen)
    x, mo = rand(0), rand(1)
    out = sampler.step(mo, x)

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    clip = 0.5 * noise.std().item()
    assert (noise.abs() > clip).any()  # the clip bites
    denoised = x - mo * f32(0.6)
    expected = f32(0.2) * noise.clamp(-clip, clip) * 7.5 + (1 - f32(0.2)) * denoised
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    implied = (out - (1 - f32(0.2)) * denoised) / (f32(0.2) * 7.5)
    assert implied.abs().max().item() <= clip + 1e-5

    x2, mo2 = rand(2), rand(3)
    last = sampler.step(mo2, x2)
    assert torch.equal(last, x2 - mo2 * torch.tensor(0.2))  # sigma_next = 0: exactly denoised
    # One randn per step, the last included.
    ref = torch.Generator().manual_seed(7)
    torch.randn(SHAPE, generator=ref), torch.randn(SHAPE, generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())
    with pytest.raises(RuntimeError):
        sampler.step(mo2, last)


def lam(s: float) -> float:
    return math.log(1 - s) - math.log(s)


def test_unipc_steps_against_plain_formulas() -> None:
    sched = unipc_schedule(4, 3.0)
    s = [float(v) for v in sched.sigmas]  # exact float32 values, used in float64 below
    sampler = UniPCMultistep(sched)
    outs = [rand(10 + k).double() for k in range(4)]  # arbitrary model outputs
    x = [rand(0).double()]
    got = [x[0].float()]
    for k in range(4):
        got.append(sampler.step(outs[k].float(), got[-1]))
    x0 = lambda k, xk: xk - s[k] * outs[k]  # noqa: E731

    # Step 0, order 1: with alpha = 1 - sigma and lambda = log(alpha / sigma),
    # -alpha_1 * expm1(-h) = alpha_1 - sigma_1 * alpha_0 / sigma_0 = 1 - s1/s0, so UniP-1 is DDIM in x0:
    m0 = x0(0, x[0])
    x1 = (s[1] / s[0]) * x[0] + (1 - s[1] / s[0]) * m0
    torch.testing.assert_close(got[1].double(), x1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1].double(), x[0] + (s[1] - s[0]) * outs[0], rtol=1e-5, atol=1e-5)

    def base(a: int, b: int, xa: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, float]:
        h = lam(s[b]) - lam(s[a])
        return (s[b] / s[a]) * xa - (1 - s[b]) * math.expm1(-h) * m, (1 - s[b]) * math.expm1(-h)

    # Step 1: UniC-1 (rho = 1/2) redoes 0 -> 1 with the new x0, then UniP-2 (rho_p = 1/2).
    m1 = x0(1, got[1].double())
    xb, coef = base(0, 1, x[0], m0)
    x1c = xb - coef * 0.5 * (m1 - m0)
    r1 = (lam(s[0]) - lam(s[1])) / (lam(s[2]) - lam(s[1]))
    xb, coef = base(1, 2, x1c, m1)
    x2 = xb - coef * 0.5 * (m0 - m1) / r1
    torch.testing.assert_close(got[2].double(), x2, rtol=1e-4, atol=1e-4)

    # Step 2: UniC-2 with rhos_c = solve(R, b), R = [[1, 1], [r, 1]], b_k = k! * phi_{k+1}(hh) * hh / expm1(hh).
    m2 = x0(2, got[2].double())
    h = lam(s[2]) - lam(s[1])
    hh = -h
    phi2 = math.expm1(hh) / hh - 1
    phi3 = phi2 / hh - 0.5
    r = (lam(s[0]) - lam(s[1])) / h
    rhos = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.array([phi2, 2 * phi3]) / math.expm1(hh))
    xb, coef = base(1, 2, x1c, m1)
    x2c = xb - coef * (rhos[0] * (m0 - m1) / r + rhos[1] * (m2 - m1))
    r2 = (lam(s[1]) - lam(s[2])) / (lam(s[3]) - lam(s[2]))
    xb, coef = base(2, 3, x2c, m2)
    x3 = xb - coef * 0.5 * (m1 - m2) / r2
    torch.testing.assert_close(got[3].double(), x3, rtol=1e-4, atol=1e-4)

    # Last step: sigma 0 gives lambda = +inf, expm1(-inf) = -1, so UniP returns this step's x0 exactly.
    assert torch.equal(got[4], got[3] - torch.tensor(s[3]) * outs[3].float())
    with pytest.raises(RuntimeError):
        sampler.step(outs[3].float(), got[4])


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_samplers_reach_a_perfectly_predicted_x0(steps: int) -> None:
    target, x = rand(0), rand(1) * 8
    for sampler in (
        UniPCMultistep(unipc_schedule(steps, 3.0)),
        EulerFlow(linear_schedule(steps, 1.0)),
        FlashEuler(linear_schedule(steps, 1.0), [1.0] * steps, 2.5, torch.Generator().manual_seed(0)),
    ):
        sigmas, z = sampler.sigmas, x.clone()
        for k in range(steps):
            z = sampler.step((z - target) / sigmas[k], z)
        torch.testing.assert_close(z, target, rtol=0, atol=1e-4)


def test_schedule_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        Schedule(timesteps=[500.0], sigmas=[0.5])
    with pytest.raises(ValueError):
        Schedule(timesteps=[500.0], sigmas=[0.5, 0.1])
