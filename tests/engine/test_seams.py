"""Patch seam smoothing (hidream.engine.seams): which steps it covers, what it costs, what it averages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hidream.engine import images as img
from hidream.engine.errors import InvalidRequestError
from hidream.engine.pipeline import GenerationRequest
from hidream.engine.seams import PATCH, SHIFTS, SeamSmoothing, edge_weight, smoothed


def test_the_steps_it_covers_and_what_they_cost():
    s = SeamSmoothing(0.8, 1.0, 2)
    assert [i for i in range(50) if s.active(i, 50)] == list(range(40, 50))
    assert s.extra_forwards(50) == 10 and SeamSmoothing(0.5, 0.75, 4).extra_forwards(8) == 2 * 3
    assert SeamSmoothing(0.9, 1.0, 8).extra_forwards(10) == 7
    assert [len(SHIFTS[n]) for n in (2, 4, 8)] == [2, 4, 8] and all(SHIFTS[n][0] == (0, 0) for n in SHIFTS)


@pytest.mark.parametrize("bad", [SeamSmoothing(0.8, 0.8), SeamSmoothing(-0.1, 1), SeamSmoothing(0.2, 1.1),
                                 SeamSmoothing(0.8, 1, 3), SeamSmoothing(0.8, 1, True), SeamSmoothing(float("nan"), 1)])
def test_bad_settings_are_refused_naming_the_field(engine, bad):
    with pytest.raises(InvalidRequestError) as err:
        engine.validate(GenerationRequest("x", width=64, height=64, seam_smoothing=bad))
    assert err.value.field == "seam_smoothing" and "0 <= start < end <= 1" in err.value.rule


def test_edge_weight_keeps_the_natural_grid_near_the_edges():
    w = edge_weight(128, 96)
    assert w.shape == (128, 96) and w[:PATCH + 1].max() == 0 and w[:, -PATCH - 1:].max() == 0
    assert w[64, 48] == 1 and 0 < w[PATCH + 4, 48] < 1


def test_smoothed_averages_the_rolled_predictions_back_in_place():
    height, width = 128, 128
    z = torch.randn(1, (height // PATCH) * (width // PATCH), 3 * PATCH * PATCH)

    def shift_equivariant(x, t):  # a "model" that commutes with rolling: every pass agrees, nothing changes
        return x * 0.5

    x0 = shift_equivariant(z, None)
    assert torch.allclose(smoothed(shift_equivariant, z, None, x0, width, height, 4), x0)

    def gridded(x, t):  # a prediction with a step at every patch border: the average softens it
        return x * 0 + torch.linspace(-1, 1, x.shape[-1])

    x0 = gridded(z, None)
    out = img.unpatchify(smoothed(gridded, z, None, x0, width, height, 2), height, width)[0, 0]
    before = img.unpatchify(x0, height, width)[0, 0]
    border = lambda a: (a[:, PATCH * 2] - a[:, PATCH * 2 - 1]).abs().mean()  # noqa: E731 (a border inside)
    assert border(out[PATCH + 8:-PATCH - 8]) < 0.5 * border(before[PATCH + 8:-PATCH - 8])
    assert torch.equal(out[:PATCH], before[:PATCH])  # the edge strip: the natural grid's


def test_generation_with_seam_smoothing_is_deterministic_and_reports_its_cost(engine):
    req = dict(prompt="x", width=128, height=128, steps=4, seed=3)
    plain = engine.generate(GenerationRequest(**req))
    a = engine.generate(GenerationRequest(**req, seam_smoothing=SeamSmoothing(0.5, 1.0, 2)))
    b = engine.generate(GenerationRequest(**req, seam_smoothing=SeamSmoothing(0.5, 1.0, 2)))
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(plain.images[0]))
    assert (a.extra_forwards, plain.extra_forwards) == (2, 0)
    # a window that covers no step changes nothing
    none = engine.generate(GenerationRequest(**req, seam_smoothing=SeamSmoothing(0.99, 1.0, 2)))
    assert none.extra_forwards == 0 and np.array_equal(np.asarray(none.images[0]), np.asarray(plain.images[0]))


def test_grid_ratio_sees_a_grid_and_not_a_smooth_image():
    from hidream.engine.seams import grid_ratio

    rng = np.random.default_rng(0)
    smooth = rng.normal(128, 10, (128, 128))
    assert 0.8 < grid_ratio(smooth) < 1.2
    blocks = smooth + np.kron(rng.normal(0, 20, (4, 4)), np.ones((32, 32)))  # a step at every patch border
    assert grid_ratio(blocks) > 3
    shifted = smooth + np.kron(rng.normal(0, 20, (5, 5)), np.ones((32, 32)))[16:144, 16:144]  # borders off the grid
    assert grid_ratio(shifted) < 1.5
