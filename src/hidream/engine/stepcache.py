"""Step caching: on steps where the decoder's first layer barely changes its output, reuse the rest's residual.

Between neighbouring sampling steps the decoder's work changes little, most of all in the middle of the
schedule. Each step runs the first layer (the probe) on the generation tokens, and compares what that layer
added (its residual, output minus input) with what it added on the last step that ran every layer: the
relative mean absolute difference. Below the threshold, the other layers are skipped and what they would
have added is estimated and added to the probe's output: their residual on the last full step, carried on
along the straight line through the last two full steps' residuals (a first-order forecast in the step
index, as TaylorSeer-style caches do; on the demo model it lifts the PSNR against the exact path by about
2 dB at the same reuse). At or above the threshold they run, and their residual (and the probe's) is kept.
The first steps always run in full (the composition forms there, and the first has nothing to reuse), so do
the last ones (they draw the details that stay), and so does every step after `max_run` reused ones in a
row, so an error cannot build up over a long run of reuses.

The decision is one boolean read back on each step that may reuse (on CUDA it waits for the probe layer;
nothing else in the loop does), and depends only on the computation, so the same seed gives the same image.
Each guidance branch group keeps its own residuals; the first group decides for the step and every group
follows it, so a step is cached or not as a whole. Seam smoothing's shifted passes run in full and never
touch the cache.

The saving on a step it skips is every layer but the probe: 35 of 36 on the 8B model (about 97% of the
step's decoder FLOPs), 5 of 6 on the demo model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from hidream.rules import CACHE_RULE

CacheMode = Literal["off", "fast"]  # hidream.rules.CACHE_MODES


@dataclass(frozen=True)
class CachePolicy:
    """When a step may reuse: probe change below `threshold`, at most `max_run` reused steps in a row."""

    threshold: float
    max_run: int
    probe_layers: int = 1
    head: float = 0.0  # the first steps that always run in full, a fraction of the schedule (at least one step)
    tail: float = 0.0  # the last ones, likewise

    def may_reuse(self, step: int, total: int) -> bool:
        return max(1, math.ceil(self.head * total)) <= step < total - max(1, math.ceil(self.tail * total))


# Chosen on the demo model (docs/benchmarks.md, "Step caching"): the threshold is a relative change, near
# First-Block-Cache's usual 0.08 for DiT image models; the first and last 10% of the steps always run in full.
POLICIES: dict[str, CachePolicy] = {"fast": CachePolicy(threshold=0.08, max_run=2, head=0.1, tail=0.1)}


def policy(mode: str) -> CachePolicy | None:
    """The policy of a `cache` mode: None for off; ValueError naming the rule for anything else."""
    if mode == "off":
        return None
    if mode not in POLICIES:
        raise ValueError(f"cache {CACHE_RULE} (got {mode!r})")
    return POLICIES[mode]


@dataclass
class _Group:
    probe: Tensor  # the probe's residual on the last full step (float32)
    rest: Tensor  # what the layers after the probe added on that step (float32)
    step: int  # that step
    before: tuple[Tensor, int] | None = None  # the rest's residual and step of the full step before it


@dataclass
class StepCache:
    """The cache of one image's sampling run: begin(step, total) before each step, then the model's passes."""

    policy: CachePolicy
    skipped: list[int] = field(default_factory=list)  # the steps (from 0) that reused
    _groups: dict[int, _Group] = field(default_factory=dict)
    _may: bool = False
    _decision: bool | None = None
    _run: int = 0
    _step: int = -1

    def begin(self, step: int, total: int) -> None:
        self._step = step
        self._may = self.policy.may_reuse(step, total) and self._run < self.policy.max_run
        self._decision = None

    def reuse(self, group: int, probe: Tensor) -> bool:
        """Whether this step skips the layers after the probe, given the probe's residual for `group`."""
        if self._decision is None:  # the step's first group decides
            ref = self._groups.get(group)
            decision = False
            if self._may and ref is not None and ref.probe.shape == probe.shape:
                change = (probe.float() - ref.probe).abs().mean()
                decision = bool(change < self.policy.threshold * ref.probe.abs().mean())  # the one read-back
            self._decision = decision
            if decision:
                self.skipped.append(self._step)
                self._run += 1
            else:
                self._run = 0
        return self._decision and group in self._groups

    def reused(self, group: int, h: Tensor) -> Tensor:
        """The probe's output `h` plus the rest's residual: that of the last full step, carried on along the line
        through the last two full steps' residuals when there are two (its tokens only)."""
        g = self._groups[group]
        rest = g.rest
        if g.before is not None:
            earlier, at = g.before
            rest = rest + (rest - earlier) * ((self._step - g.step) / (g.step - at))
        return (h[:, :rest.shape[1]].float() + rest).to(h.dtype)

    def store(self, group: int, probe: Tensor, before_rest: Tensor, out: Tensor) -> None:
        """After a full pass: the probe's residual, and what the rest added (out minus its input)."""
        last = self._groups.get(group)
        new = _Group(probe.float(), out.float() - before_rest[:, :out.shape[1]].float(), self._step)
        if last is not None and last.rest.shape == new.rest.shape and last.step < self._step:
            new.before = (last.rest, last.step)
        self._groups[group] = new
