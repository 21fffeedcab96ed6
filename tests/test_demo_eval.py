"""hidream.demo_eval: the held-out set and the figures the demo model's benchmark and tests report."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from hidream import demo_eval, world


def test_the_held_out_set_is_seeded_held_out_and_each_smaller_set_its_start() -> None:
    small, large = demo_eval.held_out_set(3), demo_eval.held_out_set(6)
    for mode in demo_eval.MODES:
        a = [s for s in small if s.mode == mode]
        b = [s for s in large if s.mode == mode]
        assert len(a) == 3 and [(s.prompt, s.target) for s in a] == [(s.prompt, s.target) for s in b[:3]]
    assert all(world.in_split(s.target, "eval") for s in large)
    assert [s.prompt for s in demo_eval.held_out_set(6, seed=7)] != [s.prompt for s in large]
    assert {len(s.references) for s in large if s.mode == "t2i"} == {0}
    assert {len(s.references) for s in large if s.mode == "edit"} == {1}
    assert {len(s.references) for s in large if s.mode == "personalize"} <= {2, 3}


def test_the_targets_drawn_exactly_score_everything() -> None:
    samples = demo_eval.held_out_set(8)
    acc = demo_eval.accuracy(samples, [world.render(s.target) for s in samples])
    assert set(acc) == set(demo_eval.MODES)
    assert all(v == 100.0 for figures in acc.values() for v in figures.values()), acc
    assert {"changed", "kept", "all"} <= set(acc["edit"]) and "colours" in acc["personalize"]
    assert [(m, f, t) for m, f, _, t in demo_eval.headline(acc)] == list(demo_eval.TARGETS)


def test_an_edit_that_changes_nothing_is_kept_but_not_changed() -> None:
    edits = demo_eval.held_out_set(10, modes=("edit",))
    scores = [demo_eval.score(s, world.render(s.references[0])) for s in edits]
    assert all(not r["changed"] and r["kept"] and not r["all"] for r in scores), scores
    # and one that changes the wrong thing: neither
    s = edits[0]
    edit = world.parse(s.prompt)
    other = next(a for a in world.EDIT_ACTIONS if a != edit.action and a != "background")
    ref = s.references[0]
    wrong = world.apply_edit(ref, world.Edit(other, _another(other, ref), ref.shapes[0].kind))
    r = demo_eval.score(s, world.render(wrong))
    assert not r["changed"] and not r["kept"], r


def _another(action: str, scene: world.Scene) -> str:
    shape = scene.shapes[0]
    if action == "colour":
        return next(c for c in world.COLOURS if c not in (shape.colour, scene.background))
    if action == "shape":
        return next(k for k in world.SHAPES if k != shape.kind)
    return next(p for p in world.POSITIONS if p != shape.position)


def test_psnr() -> None:
    a = [world.render(s.target) for s in demo_eval.held_out_set(2, modes=("t2i",))]
    assert math.isinf(demo_eval.psnr(a, a))
    b = [Image.fromarray(np.clip(np.asarray(i, dtype=np.int16) + 4, 0, 255).astype(np.uint8)) for i in a]
    assert 35 < demo_eval.psnr(a, b) < 37.5  # a shift of 4 grey levels: 10 log10(255² / 16) = 36.1, less at clips
