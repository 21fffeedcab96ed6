"""Step caching (hidream.engine.stepcache): which steps may reuse, what a reused step computes, and that the
rest of the engine (batched or sequential guidance, the full path, offload, seam smoothing) keeps its results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hidream.engine import stepcache
from hidream.engine.errors import InvalidRequestError
from hidream.engine.offload import enable_offload
from hidream.engine.pipeline import Engine, GenerationRequest
from hidream.engine.sampling import Denoiser, denoise
from hidream.engine.seams import SeamSmoothing
from hidream.engine.stepcache import CachePolicy, StepCache
from test_hot_path import HostReads
from test_model import conditioning, noisy, picture

ALWAYS = CachePolicy(threshold=1e9, max_run=3, head=0.1, tail=0.1)  # reuses wherever the policy allows
NEVER = CachePolicy(threshold=0.0, max_run=3)


@pytest.fixture
def fast_is(monkeypatch):
    """Make `cache="fast"` mean the given policy for one test."""
    return lambda policy: monkeypatch.setitem(stepcache.POLICIES, "fast", policy)


def count_layer_calls(engine, monkeypatch) -> list:
    """Every decoder layer call of the steps from here on (the model's one step_layer, spied on)."""
    calls = []
    real = engine.model.step_layer
    monkeypatch.setitem(engine.model.__dict__, "step_layer",
                        lambda layer, *a, **k: calls.append(layer) or real(layer, *a, **k))
    return calls


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(i, np.int16) for i in result.images])


def test_the_steps_that_may_reuse():
    assert [i for i in range(10) if ALWAYS.may_reuse(i, 10)] == list(range(1, 9))  # never the first or last
    assert [i for i in range(20) if CachePolicy(0.1, 3, head=0.2, tail=0.1).may_reuse(i, 20)] == list(range(4, 18))
    assert not any(ALWAYS.may_reuse(i, 2) for i in range(2))
    cache = StepCache(ALWAYS)
    probe = torch.ones(1, 4, 8)
    for step in range(10):  # a constant probe: below any threshold, so only the policy decides
        cache.begin(step, 10)
        if not cache.reuse(0, probe):
            cache.store(0, probe, probe, probe * 2)
    assert cache.skipped == [1, 2, 3, 5, 6, 7]  # at most max_run (3) in a row; steps 0, 4, 8 and 9 in full


def test_a_reused_residual_follows_the_line_through_the_last_two_full_steps():
    cache = StepCache(CachePolicy(threshold=1e9, max_run=1))
    probe, zero, h = torch.ones(1, 3, 4), torch.zeros(1, 3, 4), torch.full((1, 3, 4), 10.0)
    for step, rest in ((0, 1.0), (2, 3.0)):  # full steps 0 and 2: the rest added 1, then 3
        cache.begin(step, 10)
        cache.store(0, probe, zero, torch.full((1, 3, 4), rest))
    cache.begin(3, 10)
    assert cache.reuse(0, probe)
    assert torch.equal(cache.reused(0, h), torch.full((1, 3, 4), 10.0 + 3.0 + (3.0 - 1.0) / 2))
    # one full step so far: its residual as it is; the last layer kept 2 of the 3 tokens, so do reused steps
    one = StepCache(CachePolicy(threshold=1e9, max_run=1))
    one.begin(0, 10)
    one.store(0, probe, zero, torch.full((1, 2, 4), 3.0))
    one.begin(1, 10)
    assert one.reuse(0, probe) and torch.equal(one.reused(0, h), torch.full((1, 2, 4), 13.0))


def test_unknown_modes_are_refused_naming_the_field(engine):
    for bad in ("slow", "", None, True):
        with pytest.raises(InvalidRequestError) as err:
            engine.validate(GenerationRequest("x", width=64, height=64, cache=bad))
        assert err.value.field == "cache" and "off, fast" in err.value.rule
    with pytest.raises(ValueError, match="off, fast"):
        stepcache.policy("medium")


def test_a_cache_that_never_reuses_changes_nothing(engine, fast_is):
    fast_is(NEVER)
    for refs in ([], [picture(80, 64, 1)]):
        req = dict(prompt="a red kite", width=96, height=64, references=refs, steps=5, seed=4, guidance=4.0)
        plain = engine.generate(GenerationRequest(**req))
        cached = engine.generate(GenerationRequest(**req, cache="fast"))
        assert cached.cached_steps == [[]] and plain.cached_steps == []
        assert np.array_equal(pixels(plain), pixels(cached))  # the probe split alone is exact


@pytest.mark.parametrize("mode", ["cached", "full"])
@pytest.mark.parametrize("n_refs", [0, 2])
def test_a_reused_step_adds_the_last_full_steps_residual_and_skips_the_rest(engine, monkeypatch, mode, n_refs):
    cond = conditioning(engine, n_refs)
    denoiser = Denoiser(engine.model, cond, mode=mode)
    z, t = noisy(cond), torch.tensor(0.4)
    exact = denoiser(z, t)
    calls = count_layer_calls(engine, monkeypatch)
    cache = StepCache(ALWAYS)
    cache.begin(0, 10)
    full = denoiser(z, t, cache=cache)
    assert torch.equal(full, exact) and len(calls) == len(engine.model.layers) * len(denoiser.groups)
    calls.clear()
    cache.begin(1, 10)
    again = denoiser(z, t, cache=cache)  # the same input: the probe is unchanged, so the cache reuses
    assert cache.skipped == [1] and calls == [engine.model.layers[0]] * len(denoiser.groups)
    torch.testing.assert_close(again, exact, rtol=1e-5, atol=1e-5)
    cache.begin(2, 10)
    moved = denoiser(z + 1.0, torch.tensor(0.5), cache=cache)  # reused again: the old residual on a new probe
    assert cache.skipped == [1, 2] and not torch.allclose(moved, exact, atol=1e-3)


def test_reuse_is_deterministic_and_saves_steps(engine, fast_is):
    fast_is(ALWAYS)
    req = GenerationRequest("a green hill", width=64, height=64, steps=10, seed=3, guidance=5.0, num_images=2,
                            cache="fast")
    a, b = engine.generate(req), engine.generate(req)
    assert a.cached_steps == b.cached_steps == [[1, 2, 3, 5, 6, 7]] * 2 and np.array_equal(pixels(a), pixels(b))
    exact = engine.generate(GenerationRequest(**{**req.__dict__, "cache": "off"}))
    assert exact.cached_steps == [] and not np.array_equal(pixels(a), pixels(exact))


def test_sequential_guidance_and_offload_follow_the_same_steps(demo_checkpoint, engine, fast_is):
    fast_is(ALWAYS)
    req = GenerationRequest("make it blue", width=64, height=64, steps=8, seed=7, guidance=4.0,
                            references=[picture(64, 48, 2)], cache="fast")
    batched = engine.generate(req)
    sequential = engine.generate(req, batch_guidance=False)
    assert batched.cached_steps == sequential.cached_steps == [[1, 2, 3, 5, 6]]
    assert np.abs(pixels(batched) - pixels(sequential)).max() <= 1
    streamed = Engine.load(demo_checkpoint, device="cpu")
    enable_offload(streamed.model, torch.device("cpu"), 1)  # a pass left after the probe starts over
    assert np.array_equal(pixels(streamed.generate(req)), pixels(batched))
    assert np.array_equal(pixels(streamed.generate(req)), pixels(batched))


def test_seam_smoothings_shifted_passes_run_in_full(engine, fast_is, monkeypatch):
    fast_is(ALWAYS)
    seams = SeamSmoothing(0.5, 1.0, 2)
    calls = count_layer_calls(engine, monkeypatch)
    req = GenerationRequest("a dark sea", width=128, height=128, steps=6, seed=1, guidance=3.0, cache="fast",
                            seam_smoothing=seams)
    result = engine.generate(req)
    assert result.cached_steps == [[1, 2, 3]] and result.extra_forwards == 3
    # per step, batched guidance: the natural pass (1 layer when reused, all otherwise) + on steps 3-5 a rolled one
    layers = len(engine.model.layers)
    assert len(calls) == 3 * layers + 3 * 1 + 3 * layers


def test_only_the_decision_is_read_back(engine):
    cond = conditioning(engine, 1)
    denoiser = Denoiser(engine.model, cond)
    recipe = engine.recipe(1)
    schedule = engine._schedule(recipe, 6, 3.0, "unipc")
    with HostReads() as mode:
        denoise(denoiser, noisy(cond), schedule, engine._sampler(recipe, schedule, "unipc", 0), 4.0,
                cache=StepCache(CachePolicy(1e9, 10)))
    assert mode.reads == ["__bool__"] * 4  # one per step that may reuse (1-4 of 0-5), none elsewhere
