"""Flow-matching timestep schedules and the three samplers of the official pipeline.

Convention (the official one): `sample` is z (float32), `model_output` is the negated guided
velocity, so the predicted clean image is x0 = sample - sigma * model_output. Each sampler keeps
its own step counter: step i moves from sigmas[i] to sigmas[i + 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from hidream.engine.errors import InvalidRequestError

NUM_TRAIN_TIMESTEPS = 1000
_Sigmas = TypeVar("_Sigmas", torch.Tensor, np.ndarray)

# The distilled Dev model's fixed timesteps (official DEFAULT_TIMESTEPS).
DEV_TIMESTEPS: tuple[int, ...] = (
    999, 987, 974, 960, 945, 929, 913, 895, 877, 857, 836, 814, 790, 764, 737,
    707, 675, 640, 602, 560, 515, 464, 409, 347, 278, 199, 110, 8,
)


@dataclass(frozen=True)
class Schedule:
    """Model timesteps (in [0, 1000], one per step) and solver sigmas (float32 values, one more, ending in 0)."""

    timesteps: list[float]
    sigmas: list[float]

    def __post_init__(self) -> None:
        if not self.timesteps or len(self.sigmas) != len(self.timesteps) + 1 or self.sigmas[-1] != 0.0:
            raise ValueError("a schedule needs n >= 1 timesteps and n + 1 sigmas ending in 0")

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def _check(steps: int, shift: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidRequestError("steps", f"must be an integer >= 1, got {steps!r}")
    if not shift > 0:  # also rejects NaN
        raise InvalidRequestError("shift", f"must be > 0, got {shift!r}")


def _shift(sigmas: _Sigmas, shift: float) -> _Sigmas:
    """The flow-matching time shift; dtype follows the input (float32 tensor or float64 array)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def unipc_schedule(steps: int, shift: float) -> Schedule:
    """FlowUniPCMultistepScheduler(shift=shift).set_timesteps(steps)."""
    _check(steps, shift)
    # Endpoints of the training sigmas 1 - linspace(1, 1/1000, 1000)[::-1], shifted in float32.
    train = _shift(torch.tensor([1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, 0.0], dtype=torch.float64).float(), shift)
    sigma_max, sigma_min = train[0].item(), train[1].item()
    # The official code shifts a second time here, in float64.
    sigmas = _shift(np.linspace(sigma_max, sigma_min, steps + 1)[:-1], shift)
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)  # truncation, as in the original
    return Schedule(
        timesteps=[float(t) for t in timesteps],
        sigmas=np.append(sigmas, 0.0).astype(np.float32).tolist(),
    )


def linear_schedule(steps: int, shift: float) -> Schedule:
    """Flow-match Euler (flash or diffusers) set_timesteps(steps) without dynamic shifting."""
    _check(steps, shift)
    # Endpoints of the training sigmas linspace(1, 1000, 1000)[::-1] / 1000, shifted in float32.
    train = _shift(torch.tensor([1000.0, 1.0]) / NUM_TRAIN_TIMESTEPS, shift)
    sigma_max, sigma_min = train[0].item(), train[1].item()
    grid = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps)
    sigmas = torch.from_numpy(_shift(grid / NUM_TRAIN_TIMESTEPS, shift)).float()
    return Schedule(
        timesteps=(sigmas * NUM_TRAIN_TIMESTEPS).tolist(),
        sigmas=torch.cat([sigmas, torch.zeros(1)]).tolist(),
    )


def fixed_schedule(timesteps: Sequence[int]) -> Schedule:
    """The official timesteps_list override: sigmas = t / 1000 (float32), then 0."""
    ts = [int(t) for t in timesteps]
    if not ts:
        raise InvalidRequestError("timesteps", "must not be empty")
    if any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in ts):
        raise InvalidRequestError("timesteps", f"each must be in (0, {NUM_TRAIN_TIMESTEPS}]")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise InvalidRequestError("timesteps", "must be strictly decreasing")
    sigmas = torch.tensor([t / NUM_TRAIN_TIMESTEPS for t in ts] + [0.0], dtype=torch.float32)
    return Schedule(timesteps=[float(t) for t in ts], sigmas=sigmas.tolist())


def noise_scale_schedule(start: float, end: float, steps: int) -> list[float]:
    """Per-step noise scale for FlashEuler: linear from start to end (just start for one step)."""
    _check(steps, 1.0)
    if steps == 1:
        return [start]
    return [start + (end - start) * i / (steps - 1) for i in range(steps)]


class Sampler(Protocol):
    def step(self, model_output: torch.Tensor, sample: torch.Tensor, /) -> torch.Tensor: ...


class _Stepper:
    """Step counter over a schedule's float32 sigmas (on the CPU until `to(device)`)."""

    def __init__(self, schedule: Schedule) -> None:
        self.sigmas = torch.tensor(schedule.sigmas, dtype=torch.float32)
        self.num_steps = schedule.steps
        self.step_index = 0

    def to(self, device: torch.device) -> None:
        """Move the sigmas to the latent's device once, so no step copies a scalar to it."""
        self.sigmas = self.sigmas.to(device)

    def _advance(self) -> int:
        if self.step_index >= self.num_steps:
            raise RuntimeError(f"all {self.num_steps} steps have been taken")
        self.step_index += 1
        return self.step_index - 1


class EulerFlow(_Stepper):
    """diffusers FlowMatchEulerDiscreteScheduler.step."""

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self._advance()
        return sample.float() + (self.sigmas[i + 1] - self.sigmas[i]) * model_output


class FlashEuler(_Stepper):
    """FlashFlowMatchEulerDiscreteScheduler.step: jump to x0, then re-noise to the next sigma."""

    def __init__(
        self,
        schedule: Schedule,
        noise_scales: Sequence[float],
        noise_clip_std: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__(schedule)
        if len(noise_scales) != schedule.steps:
            raise ValueError(f"need {schedule.steps} noise scales, got {len(noise_scales)}")
        self.noise_scales = [float(s) for s in noise_scales]
        self.noise_clip_std = float(noise_clip_std)
        self.generator = generator

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self._advance()
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        denoised = sample.float() - model_output * sigma
        # Drawn even on the last step (sigma_next = 0) so the RNG stream matches the official one.
        noise = torch.randn(
            model_output.shape, generator=self.generator, device=model_output.device, dtype=torch.float32
        )
        if self.noise_clip_std > 0:
            clip = self.noise_clip_std * noise.std()  # a device tensor: no wait for the device
            noise = torch.clamp(noise, min=-clip, max=clip)
        return sigma_next * noise * self.noise_scales[i] + (1.0 - sigma_next) * denoised


class UniPCMultistep(_Stepper):
    """FlowUniPCMultistepScheduler.step: order 2, bh2, predict-x0, lower-order final, UniC corrector on.

    The scalar math runs in 0-dim float32 tensors in the original's operation order, so results
    match it bit for bit.
    """

    def to(self, device: torch.device) -> None:
        """The UniPC coefficients are scalar math on host 0-dim tensors (bit-exact with the original,
        which also keeps its sigmas on the CPU); they never wait for the device, so they stay."""

    def __init__(self, schedule: Schedule) -> None:
        super().__init__(schedule)
        self._x0s: list[torch.Tensor] = []  # converted outputs, newest last, at most 2
        self._last_sample: torch.Tensor | None = None
        self._last_order = 0  # order of the previous predictor, reused by this step's corrector
        self._warm = 0  # steps taken, capped at 2 (warmup of the multistep order)

    def _lambda(self, i: int) -> torch.Tensor:
        # log(alpha / sigma); the final sigma 0 gives +inf, which makes the last update return x0.
        sigma = self.sigmas[i]
        return torch.log(1 - sigma) - torch.log(sigma)

    def _update(
        self, x: torch.Tensor, src: int, dst: int, x0s: list[torch.Tensor], rhos: torch.Tensor | None,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Shared UniP/UniC bh2 update from sigmas[src] to sigmas[dst] with x0s newest last."""
        sigma_t, sigma_s0 = self.sigmas[dst], self.sigmas[src]
        alpha_t = 1 - sigma_t
        h = self._lambda(dst) - self._lambda(src)
        h_phi_1 = torch.expm1(-h)
        b_h = torch.expm1(-h)  # bh2
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * x0s[-1]
        res = None
        if len(x0s) == 2:
            rk = (self._lambda(src - 1) - self._lambda(src)) / h
            res = rhos[0] * ((x0s[0] - x0s[1]) / rk)
        if extra is not None:
            res = extra if res is None else res + extra
        return x_t if res is None else x_t - alpha_t * b_h * res

    def _corrector_rhos(self, i: int) -> torch.Tensor:
        """rhos_c = solve(R, b) for the order-2 UniC moving from sigmas[i - 1] to sigmas[i]."""
        h = self._lambda(i) - self._lambda(i - 1)
        rk = (self._lambda(i - 2) - self._lambda(i - 1)) / h
        hh = -h
        b_h = torch.expm1(hh)
        h_phi_k = torch.expm1(hh) / hh - 1
        b1 = h_phi_k * 1 / b_h
        h_phi_k = h_phi_k / hh - 1 / 2
        b2 = h_phi_k * 2 / b_h
        rks = torch.stack([rk, torch.ones((), dtype=torch.float32)])  # stacked, not read back into Python
        r = torch.stack([torch.pow(rks, 0), torch.pow(rks, 1)])
        return torch.linalg.solve(r, torch.stack([b1, b2]))

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self._advance()
        sample = sample.float()
        x0 = sample - self.sigmas[i] * model_output
        if i > 0 and self._last_sample is not None:
            # UniC: redo the previous update with this step's x0 as well.
            if self._last_order == 1:
                rhos_c = torch.tensor([0.5])
                hist = self._x0s[-1:]
            else:
                rhos_c = self._corrector_rhos(i)
                hist = self._x0s[-2:]
            extra = rhos_c[-1] * (x0 - hist[-1])
            sample = self._update(self._last_sample, i - 1, i, hist, rhos_c[:-1], extra)
        self._x0s = (self._x0s + [x0])[-2:]
        order = min(2, self.num_steps - i, self._warm + 1)
        self._last_order = order
        self._last_sample = sample
        out = self._update(sample, i, i + 1, self._x0s[-order:], torch.tensor([0.5]))
        self._warm = min(self._warm + 1, 2)
        return out
