"""The demo world: palette, rendering, the prompt grammar, edits, personalization, the held-out
split, and the evaluator on clean and distorted images."""

import io
import itertools
import math
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from hidream import world
from hidream.world import Edit, PersonalizePrompt, Scene, Shape

ALL_SCENES = [Scene(b, (Shape(k, c, p),)) for k in world.SHAPES for c in world.COLOURS for b in world.COLOURS
              for p in world.POSITIONS if c != b]


def colours_in(image: Image.Image) -> set[tuple[int, int, int]]:
    return {tuple(c) for c in np.asarray(image).reshape(-1, 3).tolist()}


def mask_of(image: Image.Image, colour: str) -> np.ndarray:
    return (np.asarray(image) == world.PALETTE[colour]).all(-1)


def box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


# ---- palette and rendering

def test_palette_colours_are_what_they_are_called_and_far_apart():
    assert world.COLOURS == ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    p = world.PALETTE
    r, g, b = p["red"]
    assert r > 200 and g < 60 and b < 60
    r, g, b = p["green"]
    assert g > 150 and r < 60 and b < 80
    r, g, b = p["blue"]
    assert b > 200 and r < 60 and g < 100
    r, g, b = p["yellow"]
    assert r > 200 and g > 200 and b < 60
    r, g, b = p["purple"]
    assert r > 100 and b > 150 and g < 60
    r, g, b = p["orange"]
    assert r > 230 and 100 < g < 160 and b < 40
    assert min(p["white"]) > 230 and max(p["black"]) < 30
    assert min(math.dist(p[a], p[b]) for a, b in itertools.combinations(p, 2)) > 100


def test_render_is_exact_and_deterministic():
    scene = Scene("blue", (Shape("circle", "red"),))
    image = world.render(scene)
    assert image.size == (256, 256) and image.mode == "RGB"
    assert colours_in(image) == {world.PALETTE["red"], world.PALETTE["blue"]}
    assert image.getpixel((128, 128)) == world.PALETTE["red"]
    assert image.getpixel((0, 0)) == world.PALETTE["blue"]
    assert world.render(scene).tobytes() == image.tobytes()


@pytest.mark.parametrize("size", [64, 128, 256, 384, 512])
@pytest.mark.parametrize("position,centre", [("center", (0.5, 0.5)), ("left", (0.25, 0.5)), ("right", (0.75, 0.5)),
                                             ("top", (0.5, 0.25)), ("bottom", (0.5, 0.75))])
def test_subject_is_40_percent_and_placed_by_position(size, position, centre):
    image = world.render(Scene("white", (Shape("square", "black", position),)), size)
    x0, y0, x1, y1 = box(mask_of(image, "black"))
    assert x1 - x0 + 1 == y1 - y0 + 1 == round(0.4 * size)
    assert abs((x0 + x1 + 1) / 2 - centre[0] * size) <= 1 and abs((y0 + y1 + 1) / 2 - centre[1] * size) <= 1


def test_shapes_have_their_form():
    def mask(kind):
        m = mask_of(world.render(Scene("black", (Shape(kind, "white"),))), "white")
        x0, y0, x1, y1 = box(m)
        return m[y0:y1 + 1, x0:x1 + 1]

    assert mask("square").mean() == 1.0
    assert abs(mask("circle").mean() - math.pi / 4) < 0.02
    triangle, diamond = mask("triangle"), mask("diamond")
    assert abs(triangle.mean() - 0.5) < 0.03 and abs(diamond.mean() - 0.5) < 0.03
    widths = triangle.sum(1)
    assert widths[0] <= 2 and widths[-1] == triangle.shape[1]  # apex up, flat base
    widths = diamond.sum(1)
    assert widths[0] <= 2 and widths[-1] <= 2 and widths[len(widths) // 2] >= diamond.shape[1] - 3


@pytest.mark.parametrize("n", [2, 3])
def test_side_by_side_objects_are_evenly_spaced_left_to_right(n):
    colours = ["red", "green", "yellow"][:n]
    image = world.render(Scene("blue", tuple(Shape("square", c) for c in colours)))
    for i, colour in enumerate(colours):
        x0, y0, x1, y1 = box(mask_of(image, colour))
        assert x1 - x0 + 1 == round(0.24 * 256)
        assert abs((x0 + x1 + 1) / 2 - (i + 0.5) / n * 256) <= 1 and abs((y0 + y1 + 1) / 2 - 128) <= 1


def test_render_sizes():
    for size in (64, 96, 480, 512):
        assert world.render(ALL_SCENES[0], size).size == (size, size)
    for size in (32, 100, 544):
        with pytest.raises(ValueError, match="multiple of 32"):
            world.render(ALL_SCENES[0], size)


def test_scenes_are_validated():
    with pytest.raises(ValueError, match="both red"):
        Scene("red", (Shape("circle", "red"),))
    with pytest.raises(ValueError, match="pink"):
        Scene("pink", (Shape("circle", "red"),))
    with pytest.raises(ValueError, match="hexagon"):
        Scene("blue", (Shape("hexagon", "red"),))
    with pytest.raises(ValueError, match="side by side"):
        Scene("blue", (Shape("circle", "red", "left"), Shape("circle", "green")))


# ---- prompts

def test_canonical_prompts():
    assert world.prompt_of(Scene("blue", (Shape("circle", "red"),))) == "a red circle on a blue background"
    assert (world.prompt_of(Scene("orange", (Shape("triangle", "yellow", "top"),)))
            == "a yellow triangle on an orange background at the top")
    assert (world.prompt_of(Scene("white", (Shape("diamond", "orange", "left"),)))
            == "an orange diamond on a white background on the left")
    assert world.edit_prompt(Edit("colour", "green", "circle")) == "make the circle green"
    assert world.edit_prompt(Edit("background", "white")) == "make the background white"
    assert world.edit_prompt(Edit("shape", "square", "circle")) == "turn the circle into a square"
    assert world.edit_prompt(Edit("position", "bottom", "circle")) == "move the circle at the bottom"
    assert (world.prompt_of(PersonalizePrompt(("circle", "square"), "blue"))
            == "the circle and the square side by side on a blue background")
    assert (world.personalize_prompt(PersonalizePrompt(("circle", "square", "diamond"), "orange"))
            == "the circle, the square and the diamond side by side on an orange background")


def test_every_scene_round_trips_through_its_prompt():
    assert len(ALL_SCENES) == 4 * 8 * 7 * 5
    for scene in ALL_SCENES:
        assert world.parse(world.prompt_of(scene)) == scene


def test_every_edit_and_personalization_prompt_round_trips():
    edits = ([Edit("colour", c, k) for k in world.SHAPES for c in world.COLOURS]
             + [Edit("background", c) for c in world.COLOURS]
             + [Edit("shape", v, k) for k in world.SHAPES for v in world.SHAPES]
             + [Edit("position", p, k) for k in world.SHAPES for p in world.POSITIONS])
    for edit in edits:
        assert world.parse(world.edit_prompt(edit)) == edit
    for n in (2, 3):
        for kinds in itertools.product(world.SHAPES, repeat=n):
            for background in world.COLOURS:
                prompt = PersonalizePrompt(kinds, background)
                assert world.parse(world.prompt_of(prompt)) == prompt


def test_parse_tolerates_case_spaces_a_period_and_other_phrasings():
    red_left = Scene("blue", (Shape("circle", "red", "left"),))
    assert world.parse("  A   Red CIRCLE on a blue background   on the left. ") == red_left
    assert world.parse("a red circle on a blue background in the center.") == Scene("blue", (Shape("circle", "red"),))
    assert world.parse("Move the circle on the left") == Edit("position", "left", "circle")
    assert world.parse("move the square at the top.") == Edit("position", "top", "square")
    assert world.parse("move the square to the middle") == Edit("position", "center", "square")
    assert world.parse("turn the circle into an  square") == Edit("shape", "square", "circle")


@pytest.mark.parametrize("prompt,match", [
    ("a pink circle on a blue background", "'pink'"),
    ("a red hexagon on a blue background", "'hexagon'"),
    ("a red circle on a red background", "both red"),
    ("a red circle", "fits no"),
    ("make the circle", "fits no"),
    ("the circle side by side on a blue background", "fits no"),
    ("the circle, the square, the diamond and the circle side by side on a blue background", "fits no"),
    ("", "fits no"),
])
def test_parse_rejects_what_is_not_in_the_grammar(prompt, match):
    with pytest.raises(ValueError, match=match):
        world.parse(prompt)


# ---- edits and personalization

def test_edits_change_only_what_they_name():
    ref = Scene("blue", (Shape("circle", "red", "left"),))

    def edited(instruction):
        return world.apply_edit(ref, world.parse(instruction))

    assert edited("make the circle green") == Scene("blue", (Shape("circle", "green", "left"),))
    assert edited("make the background white") == Scene("white", ref.shapes)
    assert edited("turn the circle into a triangle") == Scene("blue", (Shape("triangle", "red", "left"),))
    assert edited("move the circle to the center") == Scene("blue", (Shape("circle", "red"),))
    with pytest.raises(ValueError, match="names a square"):
        world.apply_edit(ref, world.parse("make the square green"))
    with pytest.raises(ValueError, match="both blue"):
        world.apply_edit(ref, world.parse("make the circle blue"))
    with pytest.raises(ValueError, match="shape for this edit 'circle'"):
        Edit("background", "red", "circle")
    with pytest.raises(ValueError, match="shape for this edit None"):
        Edit("colour", "red")
    with pytest.raises(ValueError, match="unknown position 'middle'"):
        Edit("position", "middle", "circle")


def test_personalized_scene_takes_colours_from_the_references_in_order():
    refs = [Scene("white", (Shape("square", "green", "top"),)), Scene("black", (Shape("circle", "yellow"),)),
            Scene("green", (Shape("diamond", "red", "right"),))]
    target = world.personalized_scene(refs, "the circle, the square and the triangle side by side on a blue background")
    assert target == Scene("blue", (Shape("circle", "green"), Shape("square", "yellow"), Shape("triangle", "red")))
    with pytest.raises(ValueError, match="3 objects"):
        world.personalized_scene(refs[:2], "the circle, the square and the triangle side by side on a blue background")
    with pytest.raises(ValueError, match="both green"):
        world.personalized_scene(refs[:2], "the circle and the square side by side on a green background")
    with pytest.raises(ValueError, match="not a personalization"):
        world.personalized_scene(refs[:2], "make the background red")


# ---- the held-out split and the samplers

def test_held_out_rule():
    held = [(k, c, b) for k in world.SHAPES for c in world.COLOURS for b in world.COLOURS
            if c != b and world.held_out(k, c, b)]
    assert len(held) == 32  # of 224: (k + 3c + 5b) % 7 == 0
    assert world.held_out("circle", "red", "black") and world.held_out("square", "red", "purple")
    assert not world.held_out("circle", "red", "blue") and not world.held_out("square", "red", "black")
    train = {(k, c, b) for k in world.SHAPES for c in world.COLOURS for b in world.COLOURS
             if c != b and not world.held_out(k, c, b)}
    assert {(k, c) for k, c, _ in train} == set(itertools.product(world.SHAPES, world.COLOURS))
    assert {(c, b) for _, c, b in train} == {(c, b) for c in world.COLOURS for b in world.COLOURS if c != b}
    assert {(k, b) for k, _, b in train} == set(itertools.product(world.SHAPES, world.COLOURS))


def combo(scene: Scene) -> set[tuple[str, str, str]]:
    return {(s.kind, s.colour, scene.background) for s in scene.shapes}


def test_t2i_sampler_respects_the_split_and_is_seeded():
    rng = random.Random(0)
    train = [world.sample_t2i(rng) for _ in range(400)]
    assert not any(world.held_out(*c) for s in train for c in combo(s))
    assert {s.shapes[0].position for s in train} == set(world.POSITIONS)
    rng = random.Random(1)
    evals = [world.sample_t2i(rng, split="eval") for _ in range(400)]
    assert all(world.held_out(*c) for s in evals for c in combo(s))
    assert len({c for s in evals for c in combo(s)}) == 32
    again = random.Random(1)
    assert [world.sample_t2i(again, "eval") for _ in range(400)] == evals
    with pytest.raises(ValueError, match="split"):
        world.sample_t2i(rng, "test")


def test_edit_sampler_respects_the_split():
    for split in ("train", "eval"):
        rng = random.Random(2)
        actions = set()
        for _ in range(200):
            ref, instruction, target = world.sample_edit(rng, split)
            edit = world.parse(instruction)
            actions.add(edit.action)
            assert world.apply_edit(ref, edit) == target != ref
            assert all(world.held_out(*c) == (split == "eval") for c in combo(target))
            if split == "train":
                assert not any(world.held_out(*c) for c in combo(ref))
        assert actions == set(world.EDIT_ACTIONS)


def test_personalization_sampler_respects_the_split():
    for split in ("train", "eval"):
        rng = random.Random(3)
        for i in range(100):
            n = 2 + i % 2
            refs, prompt, target = world.sample_personalize(rng, n, split)
            assert len(refs) == len(target.shapes) == n
            assert world.personalized_scene(refs, prompt) == target
            assert len({s.colour for s in target.shapes}) == n
            assert all(world.held_out(*c) == (split == "eval") for c in combo(target))
            if split == "train":
                assert not any(world.held_out(*c) for r in refs for c in combo(r))
    with pytest.raises(ValueError, match="2 or 3"):
        world.sample_personalize(rng, 4)


# ---- the evaluator

def noisy(image: Image.Image, rng: np.random.Generator, sigma: float = 20) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def blurred(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.BoxBlur(2))  # a 5-pixel box


def jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=75)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_reads_every_colour_shape_and_position_of_clean_renders():
    colours = world.COLOURS
    for i, (kind, position, colour) in enumerate(itertools.product(world.SHAPES, world.POSITIONS, colours)):
        background = colours[(colours.index(colour) + 1 + i % 7) % 8]
        scene = Scene(background, (Shape(kind, colour, position),))
        reading = world.read(world.render(scene, 128))
        assert (reading.background, reading.colour, reading.shape, reading.position) == (
            background, colour, kind, position), scene
        assert reading.found and 0.5 < reading.confidence <= 1


@pytest.mark.parametrize("offset,position", [((0.1, 0), "center"), ((0, -0.1), "center"), ((0.15, 0), "right"),
                                             ((-0.15, 0.05), "left"), ((0, -0.15), "top"), ((0.05, 0.15), "bottom"),
                                             ((0.2, 0.15), "right"), ((0.15, 0.2), "bottom")])
def test_position_thresholds_lie_halfway_to_the_offset(offset, position):
    image = Image.new("RGB", (128, 128), world.PALETTE["black"])
    cx, cy = (0.5 + offset[0]) * 128, (0.5 + offset[1]) * 128
    ImageDraw.Draw(image).rectangle((cx - 12, cy - 12, cx + 11, cy + 11), fill=world.PALETTE["white"])
    assert world.read(image).position == position


@pytest.mark.parametrize("size", [256, 128])
@pytest.mark.parametrize("distort", [noisy, blurred, jpeg])
def test_reads_distorted_images(distort, size):
    rng, noise = random.Random(size), np.random.default_rng(size)
    results = []
    for i in range(100):
        scene = world.sample_t2i(rng, ("train", "eval")[i % 2])
        results.append(world.score(scene, distort(world.render(scene, size), noise)))
    assert world.accuracy(results)["all"] >= 98
    results = []
    for i in range(24):
        _, _, scene = world.sample_personalize(rng, 2 + i % 2, ("train", "eval")[i % 2])
        results.append(world.score(scene, distort(world.render(scene, size), noise)))
    assert world.accuracy(results)["all"] >= 95


def test_reads_heavy_noise():
    rng, noise = random.Random(5), np.random.default_rng(5)
    scenes = [world.sample_t2i(rng) for _ in range(100)] + [world.sample_personalize(rng, 3)[2] for _ in range(30)]
    results = [world.score(scene, noisy(world.render(scene, 128), noise, sigma=60)) for scene in scenes]
    assert world.accuracy(results[:100])["all"] >= 99 and world.accuracy(results[100:])["all"] >= 96


def test_small_blurred_objects_read_their_own_colour_not_the_blend_at_their_rim():
    # red on yellow blurs to an orange rim, blue on red to a purple one
    for background, colour in itertools.permutations(world.COLOURS, 2):
        scene = Scene(background, (Shape("circle", colour), Shape("square", colour), Shape("diamond", colour)))
        objects = world.read_objects(world.render(scene, 64).filter(ImageFilter.BoxBlur(2)))
        assert [o.colour for o in objects] == [colour] * 3, scene


def test_read_objects_left_to_right():
    scene = Scene("white", (Shape("triangle", "purple"), Shape("circle", "orange"), Shape("diamond", "black")))
    objects = world.read_objects(world.render(scene))
    assert [(o.colour, o.shape) for o in objects] == [
        ("purple", "triangle"), ("orange", "circle"), ("black", "diamond")]
    assert [round(o.centroid[0] * 6) for o in objects] == [1, 3, 5]
    assert all(abs(o.area - 0.24 ** 2 * {"circle": math.pi / 4}.get(o.shape, 0.5)) < 0.01 for o in objects)


def test_noise_and_blank_images_do_not_crash():
    rng = np.random.default_rng(0)
    clean = world.read(world.render(ALL_SCENES[0], 128)).confidence
    for size in ((128, 128), (100, 60), (300, 256)):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        reading = world.read(image)
        assert reading.background in world.COLOURS and 0 <= reading.confidence < clean
        assert isinstance(world.read_objects(image), list)
        world.score(ALL_SCENES[0], image)
        world.score(Scene("red", (Shape("circle", "blue"), Shape("square", "green"))), image)
    blank = world.read(Image.new("L", (90, 70), 240))
    assert blank == world.Reading("white", None, None, None, False, 0.0)
    assert world.read_objects(Image.new("RGBA", (64, 64), (0, 0, 0, 255))) == []


def test_score_and_accuracy():
    scene = Scene("blue", (Shape("circle", "red", "top"),))
    image = world.render(scene)
    assert world.score(scene, image) == dict(background=True, colour=True, shape=True, position=True, all=True)
    wrong = Scene("blue", (Shape("square", "red", "bottom"),))
    assert world.score(wrong, image) == dict(background=True, colour=True, shape=False, position=False, all=False)
    pair = Scene("green", (Shape("circle", "red"), Shape("square", "white")))
    swapped = Scene("green", (Shape("circle", "white"), Shape("square", "red")))
    assert world.score(pair, world.render(pair)) == dict(background=True, count=True, colours=True, shapes=True,
                                                         all=True)
    assert world.score(swapped, world.render(pair))["colours"] is False
    trio = Scene("green", (Shape("circle", "red"), Shape("square", "white"), Shape("circle", "blue")))
    assert world.score(trio, world.render(pair))["count"] is False
    acc = world.accuracy([{"a": True, "b": False}, {"a": False, "b": False}, {"a": True}, {"a": True, "c": True}])
    assert acc == {"a": 75.0, "b": 0.0, "c": 100.0}
