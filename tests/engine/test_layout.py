"""Layout boxes (hidream.engine.layout): the rules, the drawing, and how references are planned with them.

The drawing was compared pixel for pixel with the official code's layout path (docs/parity.md, "Layout
boxes"); these tests pin its rules by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from hidream.engine import images
from hidream.engine.errors import InvalidRequestError
from hidream.engine.layout import (
    COLOURS,
    MAX_BOXES,
    add_border,
    check_boxes,
    check_pixel_boxes,
    draw_layout,
    official_order,
    pixel_box,
)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_official_order_and_pixels():
    assert official_order([0.1, 0.5, 0.2, 0.9]) == (0.1, 0.2, 0.5, 0.9)
    assert pixel_box((0.0, 0.0, 1.0, 1.0), 640, 480) == (0, 0, 639, 479)  # kept inside the image
    assert pixel_box((0.25, 0.5, 0.75, 1.0), 100, 10) == (25, 5, 75, 9)
    assert pixel_box((0.125, 0, 0.375, 1), 100, 100)[::2] == (12, 38)  # round half to even: 12.5 -> 12, 37.5 -> 38


@pytest.mark.parametrize(("boxes", "count", "field", "fragment"), [
    ([], 0, "layout", "1 to 5 boxes"),
    ([(0, 0, 0.5, 0.5)] * 6, 6, "layout", "1 to 5 boxes"),
    ([(0, 0, 0.5, 0.5)], 2, "layout", "2 references, 1 box"),
    ([(0, 0, 0.5, 0.5), (0.5, 0, 0.4, 1)], 2, "layout[1]", "0 <= x1 < x2 <= 1"),
    ([(0, 0, 1.5, 1)], 1, "layout[0]", "0 <= x1 < x2 <= 1"),
    ([(0, 0.2, 1, 0.2)], 1, "layout[0]", "0 <= y1 < y2 <= 1"),
    ([(0, 0, 1)], 1, "layout[0]", "got (0, 0, 1)"),
    ([(0, 0, float("nan"), 1)], 1, "layout[0]", "x1, y1, x2, y2"),
    ([(0, 0, True, 1)], 1, "layout[0]", "x1, y1, x2, y2"),
    (["0,0,1,1"], 1, "layout[0]", "x1, y1, x2, y2"),
])
def test_check_boxes_names_the_box_and_the_rule(boxes, count, field, fragment):
    with pytest.raises(InvalidRequestError) as err:
        check_boxes(boxes, count)
    assert err.value.field == field and fragment in err.value.rule, err.value


def test_a_box_with_no_area_in_pixels_is_refused():
    check_pixel_boxes([(0.5, 0.5, 0.51, 0.51)], 2048, 2048)
    with pytest.raises(InvalidRequestError) as err:
        check_pixel_boxes([(0, 0, 1, 1), (0.5, 0.5, 0.501, 0.6)], 256, 256, "layout_boxes")
    assert err.value.field == "layout_boxes[1]" and "too small for a 256x256 output" in err.value.rule


def test_draw_layout_frames_the_largest_box_first_in_the_first_colour():
    boxes = [(0.6, 0.1, 0.9, 0.4), (0.0, 0.0, 0.5, 1.0), (0.55, 0.55, 1.0, 1.0)]  # the second is the largest
    image, colours = draw_layout(boxes, 400, 300)
    assert image.size == (400, 300) and image.mode == "RGB"
    assert colours == [COLOURS[2], COLOURS[0], COLOURS[1]]  # by area: box 1, box 2, box 0
    a = np.asarray(image)
    widest = int(math.sqrt(400 * 300) * 0.05)  # 17 pixels
    x1, y1, x2, y2 = pixel_box(boxes[1], 400, 300)
    assert (a[150, x1] == COLOURS[0]).all() and (a[150, x1 + widest - 1] == COLOURS[0]).all()
    assert (a[150, x1 + widest] == 0).all()  # inside the frame: black
    step = max(1, widest // MAX_BOXES)
    px1 = pixel_box(boxes[0], 400, 300)[0]
    assert (a[60, px1 + widest - 2 * step - 1] == COLOURS[2]).all() and (a[60, px1 + widest - 2 * step] == 0).all()
    assert (a[5, 395] == 0).all()  # outside every box: black


def test_add_border_is_inside_the_image_and_keeps_its_size():
    ref = picture(200, 50)
    out = add_border(ref, (1, 2, 3))
    w = int(math.sqrt(200 * 50) * 0.04)  # 4 pixels
    a, b = np.asarray(out), np.asarray(ref)
    assert out.size == ref.size and (a[:w, :] == (1, 2, 3)).all() and (a[:, -w:] == (1, 2, 3)).all()
    assert np.array_equal(a[w:-w, w:-w], b[w:-w, w:-w])


def test_the_plan_counts_the_layout_image_as_one_more_reference():
    sizes = [(640, 480), (300, 900)]
    boxes = [(0, 0, 0.5, 1), (0.5, 0, 1, 1)]
    plan = images.plan_references(sizes, 1024, 768, False, layout=boxes)
    three = images.plan_references([*sizes, (1024, 768)], 1024, 768, False)
    assert plan.side == three.side == images.reference_side(3, 1024, 768)
    assert len(plan.sizes) == 3 and plan.sizes[2] == three.sizes[2]  # the layout image: the output's aspect
    w, h, refs, for_vit = images.prepare_references([picture(*s, i) for i, s in enumerate(sizes)], 1024, 768,
                                                    False, layout=boxes)
    assert (w, h) == (1024, 768) and [r.size for r in refs] == plan.sizes
    assert [r.size for r in for_vit] == plan.vit_sizes
    assert (np.asarray(refs[0])[0, 0] == COLOURS[0]).all()  # bordered in its box's colour (the boxes tie: in order)
    assert (np.asarray(refs[1])[0, 0] == COLOURS[1]).all()


def test_a_reference_fitted_twice_as_the_official_layout_path_does():
    # 2 references and the layout image on 2048x2048: a 1024-pixel budget each. 93x463 fits it as 448x2272, whose
    # own aspect then fits as 448x2304: the official layout path fits a bordered reference a second time.
    sizes, boxes = [(93, 463), (64, 64)], [(0, 0, 0.5, 1), (0.5, 0, 1, 1)]
    plan = images.plan_references(sizes, 2048, 2048, False, layout=boxes)
    assert plan.side == 1024 and images.fit_size(93, 463, 1024) == (448, 2272)
    assert plan.sizes[0] == (448, 2304)
    _, _, refs, _ = images.prepare_references([picture(*s) for s in sizes], 2048, 2048, False, layout=boxes)
    assert [r.size for r in refs] == plan.sizes


def test_layout_with_keep_original_aspect_or_the_wrong_count_is_refused():
    with pytest.raises(InvalidRequestError) as err:
        images.plan_references([(300, 100)], 1024, 1024, True, layout=[(0, 0, 1, 1)], layout_field="layout_boxes")
    assert err.value.field == "layout_boxes" and "keep_original_aspect" in err.value.rule
    with pytest.raises(InvalidRequestError) as err:
        images.plan_references([], 1024, 1024, False, layout=[(0, 0, 1, 1)])
    assert err.value.field == "layout" and "0 references, 1 box" in err.value.rule
    # snapped first, then the boxes are checked against the size made
    plan = images.plan_references([(64, 64)], 256, 256, False, snap_to_native=True, layout=[(0, 0, 0.01, 0.01)])
    assert (plan.width, plan.height) == (2048, 2048)


def test_the_engine_draws_with_the_layout_as_with_its_references_drawn_by_hand(engine):
    from hidream.engine.pipeline import GenerationRequest

    refs = [picture(96, 64, 1), picture(64, 96, 2)]
    boxes = [(0, 0, 0.5, 1), (0.5, 0.25, 1, 0.75)]
    laid = engine.generate(GenerationRequest("the two side by side", width=128, height=64, steps=2, seed=4,
                                             references=refs, layout=boxes))
    # by hand: each reference fitted and bordered in its box's colour, and the layout image, as 3 references
    side = images.reference_side(3, 128, 64)
    drawn, colours = draw_layout(boxes, 128, 64)
    by_hand = [add_border(images.fit_to_area(r, side), c) for r, c in zip(refs, colours)] + [drawn]
    same = engine.generate(GenerationRequest("the two side by side", width=128, height=64, steps=2, seed=4,
                                             references=by_hand))
    plain = engine.generate(GenerationRequest("the two side by side", width=128, height=64, steps=2, seed=4,
                                              references=refs))
    assert laid.images[0].size == (128, 64)
    assert np.array_equal(np.asarray(laid.images[0]), np.asarray(same.images[0]))
    assert not np.array_equal(np.asarray(laid.images[0]), np.asarray(plain.images[0]))
