"""The demo world: one or a few flat coloured shapes on a flat background, drawn and read back.

Colours (8, fixed RGB in `PALETTE`): red, green, blue, yellow, purple, orange, white, black.
Shapes (4, filled): circle, square, triangle (apex up), diamond. Positions (5): center (the
default), left, right, top, bottom. A lone subject is 40% of the image side, off-center ones
25% of the side from the center; 2 or 3 objects side by side are 24% of the side, centered
on the middle row at x = (i + 1/2) / n. Sizes: 256 by default, any multiple of 32 in 64..512.

Prompts (canonical forms; parsing ignores case, extra spaces and a trailing period):
  text-to-image    "a red circle on a blue background" [+ " on the left" | " on the right" |
                   " at the top" | " at the bottom"]; "an" before orange; the colours differ
  edit             "make the circle green", "make the background white",
                   "turn the circle into a square", "move the circle on the left" (on the right,
                   at the top, at the bottom, to the center; "to the left" ... parse too); the rest stays
  personalization  "the circle and the square side by side on a blue background",
                   "the circle, the square and the diamond side by side on a blue background";
                   object i has the shape colour of reference i; objects run left to right

Held-out split: with k the index in `SHAPES`, c and b those of the subject colour and the
background in `COLOURS`, (shape, subject colour, background) is held out for evaluation iff
(k + 3c + 5b) % 7 == 0: 32 of the 224 combinations (14%), at least 3 subject colours per
background, every (shape, colour) pair still seen in training. `split="train"` samplers never
yield a held-out combination; `split="eval"` targets are only held-out ones.

Rendering is exact (no anti-aliasing: every pixel is a palette colour). The evaluator (`read`,
`read_objects`, `score`) also reads noisy, blurred, JPEG-compressed and off-colour images.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (20, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (250, 230, 20),
    "purple": (140, 30, 180),
    "orange": (255, 130, 0),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS = ("center", "left", "right", "top", "bottom")
EDIT_ACTIONS = ("colour", "background", "shape", "position")
SIZES = tuple(range(64, 513, 32))
SUBJECT = 0.4  # a lone subject's side / image side
OFFSET = 0.25  # an off-center subject's displacement / image side
OBJECT = 0.24  # a side-by-side object's side / image side
_DIRECTION = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


def _check(what: str, value: object, allowed: tuple[str | None, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    position: str = "center"


@dataclass(frozen=True)
class Scene:
    """A background and 1 shape (anywhere) or 2-3 shapes side by side (position "center")."""

    background: str
    shapes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        _check("colour", self.background, COLOURS)
        if not 1 <= len(self.shapes) <= 3:
            raise ValueError(f"a scene has 1 to 3 shapes, got {len(self.shapes)}")
        for s in self.shapes:
            _check("shape", s.kind, SHAPES)
            _check("colour", s.colour, COLOURS)
            _check("position", s.position, POSITIONS)
            if s.colour == self.background:
                raise ValueError(f"the {s.kind} and the background are both {s.colour}")
            if len(self.shapes) > 1 and s.position != "center":
                raise ValueError("shapes side by side have no position of their own")


@dataclass(frozen=True)
class Edit:
    """An instruction: `action` (one of EDIT_ACTIONS) sets `value`; `shape` is the shape it names
    (None for the background)."""

    action: str
    value: str
    shape: str | None = None

    def __post_init__(self) -> None:
        _check("edit action", self.action, EDIT_ACTIONS)
        _check(self.action, self.value, {"shape": SHAPES, "position": POSITIONS}.get(self.action, COLOURS))
        _check("shape for this edit", self.shape, (None,) if self.action == "background" else SHAPES)


@dataclass(frozen=True)
class PersonalizePrompt:
    kinds: tuple[str, ...]  # left to right, one per reference
    background: str

    def __post_init__(self) -> None:
        if len(self.kinds) not in (2, 3):
            raise ValueError(f"personalization places 2 or 3 objects, got {len(self.kinds)}")
        for kind in self.kinds:
            _check("shape", kind, SHAPES)
        _check("colour", self.background, COLOURS)


# ---- prompts

def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def prompt_of(item: Scene | Edit | PersonalizePrompt) -> str:
    """The canonical text of a one-shape scene (text-to-image), an edit or a personalization prompt."""
    if isinstance(item, Edit):
        return edit_prompt(item)
    if isinstance(item, PersonalizePrompt):
        return personalize_prompt(item)
    if len(item.shapes) != 1:
        raise ValueError("only one-shape scenes have a text-to-image prompt")
    s = item.shapes[0]
    where = f" {_PHRASE[s.position]}" if s.position != "center" else ""
    return f"{_a(s.colour)} {s.kind} on {_a(item.background)} background{where}"


def edit_prompt(edit: Edit) -> str:
    """The canonical instruction text of an edit."""
    return {
        "colour": f"make the {edit.shape} {edit.value}",
        "background": f"make the background {edit.value}",
        "shape": f"turn the {edit.shape} into {_a(edit.value)}",
        "position": f"move the {edit.shape} {_PHRASE.get(edit.value, 'to the center')}",  # the phrases
    }[edit.action]


def personalize_prompt(prompt: PersonalizePrompt) -> str:
    """The canonical personalization text."""
    names = [f"the {k}" for k in prompt.kinds]
    return f"{', '.join(names[:-1])} and {names[-1]} side by side on {_a(prompt.background)} background"


DESCRIPTION_FILE = "demo-world.json"  # beside a demo model's config.json: what it knows (`describe`)


def describe(size: int = 256) -> dict:
    """What a model trained on this world knows, for people and clients: its words, its size, and example
    prompts per mode (the service lists it with the model, the playground offers the examples)."""
    return {
        "about": "A tiny HiDream-O1 trained on flat coloured shapes: it draws nothing else. Real images need "
                 "the official HiDream-O1-Image weights.",
        "size": size,
        "colours": list(COLOURS), "shapes": list(SHAPES),
        "positions": ["center", *(_PHRASE[p] for p in POSITIONS if p != "center")],
        "grammar": {
            "text-to-image": "a {colour} {shape} on a {colour} background [on the left | on the right | "
                             "at the top | at the bottom]",
            "edit": ["make the {shape} {colour}", "make the background {colour}", "turn the {shape} into a {shape}",
                     "move the {shape} on the left | on the right | at the top | at the bottom | to the center"],
            "personalization": "the {shape} and the {shape} [and the {shape}] side by side on a {colour} "
                               "background: 2 or 3 references, one shape each; each object takes the colour "
                               "of its reference, left to right in reference order",
        },
        "examples": {
            "text-to-image": ["a red circle on a blue background", "a yellow triangle on a purple background",
                              "a white square on a black background at the top",
                              "an orange diamond on a green background on the left"],
            "edit": ["make the circle green", "make the background white", "turn the circle into a square",
                     "move the circle at the bottom"],
            "personalization": ["the circle and the square side by side on a white background",
                                "the triangle, the diamond and the circle side by side on a black background"],
        },
    }


_C = "(" + "|".join(COLOURS) + ")"
_S = "(" + "|".join(SHAPES) + ")"
_WHERE = {**{v: k for k, v in _PHRASE.items()}, "in the center": "center", "at the center": "center",
          "in the middle": "center"}
_MOVE = {**_WHERE, **{f"to the {p}": p for p in POSITIONS}, "to the middle": "center"}
_RE_T2I = re.compile(rf"an? {_C} {_S} on an? {_C} background(?: ({'|'.join(_WHERE)}))?")
_RE_COLOUR = re.compile(rf"make the {_S} {_C}")
_RE_BACKGROUND = re.compile(rf"make the background {_C}")
_RE_SHAPE = re.compile(rf"turn the {_S} into an? {_S}")
_RE_MOVE = re.compile(rf"move the {_S} ({'|'.join(_MOVE)})")
_RE_PERSONALIZE = re.compile(rf"the {_S}(?:, the {_S})? and the {_S} side by side on an? {_C} background")
_WORDS = {*COLOURS, *SHAPES, *" ".join(_MOVE).split(), *"a an on background make turn into move and side by".split()}


def parse(prompt: str) -> Scene | Edit | PersonalizePrompt:
    """Parse any prompt of the world's grammar; a ValueError says what did not parse."""
    text = " ".join(prompt.lower().split()).rstrip(".").rstrip()
    if m := _RE_T2I.fullmatch(text):
        colour, kind, background, where = m.groups()
        if colour == background:
            raise ValueError(f"{prompt!r}: the {kind} and the background are both {colour}")
        return Scene(background, (Shape(kind, colour, _WHERE[where] if where else "center"),))
    if m := _RE_COLOUR.fullmatch(text):
        return Edit("colour", m[2], m[1])
    if m := _RE_BACKGROUND.fullmatch(text):
        return Edit("background", m[1])
    if m := _RE_SHAPE.fullmatch(text):
        return Edit("shape", m[2], m[1])
    if m := _RE_MOVE.fullmatch(text):
        return Edit("position", _MOVE[m[2]], m[1])
    if m := _RE_PERSONALIZE.fullmatch(text):
        return PersonalizePrompt(tuple(k for k in m.groups()[:3] if k), m[4])
    unknown = [w for w in re.split(r"[ ,]+", text) if w and w not in _WORDS]
    if unknown:
        raise ValueError(f"{prompt!r} does not parse: unknown word(s) {', '.join(map(repr, unknown))}")
    raise ValueError(f"{prompt!r} does not parse: it fits no text-to-image, edit or personalization form")


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene after the edit; everything the edit does not name stays."""
    if len(scene.shapes) != 1:
        raise ValueError("edits apply to one-shape scenes")
    s = scene.shapes[0]
    if edit.action == "background":
        return Scene(edit.value, scene.shapes)
    if edit.shape != s.kind:
        raise ValueError(f"the instruction names a {edit.shape} but the scene has a {s.kind}")
    field = {"colour": "colour", "shape": "kind", "position": "position"}[edit.action]
    return Scene(scene.background, (replace(s, **{field: edit.value}),))


def personalized_scene(references: list[Scene], prompt: str | PersonalizePrompt) -> Scene:
    """The target: the prompt's shapes side by side, object i in reference i's shape colour."""
    p = parse(prompt) if isinstance(prompt, str) else prompt
    if not isinstance(p, PersonalizePrompt):
        raise ValueError(f"{prompt!r} is not a personalization prompt")
    if len(references) != len(p.kinds) or any(len(r.shapes) != 1 for r in references):
        raise ValueError(f"the prompt places {len(p.kinds)} objects: give as many one-shape references")
    return Scene(p.background, tuple(Shape(k, r.shapes[0].colour) for k, r in zip(p.kinds, references)))


# ---- rendering

def render(scene: Scene, size: int = 256) -> Image.Image:
    """The scene as a size x size RGB image, hard-edged, every pixel a palette colour."""
    if size not in SIZES:
        raise ValueError(f"size must be a multiple of 32 from 64 to 512, got {size}")
    image = Image.new("RGB", (size, size), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    n = len(scene.shapes)
    for i, s in enumerate(scene.shapes):
        if n == 1:
            dx, dy = _DIRECTION[s.position]
            side, cx, cy = round(SUBJECT * size), (0.5 + OFFSET * dx) * size, (0.5 + OFFSET * dy) * size
        else:
            side, cx, cy = round(OBJECT * size), (i + 0.5) / n * size, size / 2
        x0, y0 = round(cx - side / 2), round(cy - side / 2)
        x1, y1 = x0 + side - 1, y0 + side - 1  # inclusive: the shape is `side` pixels across
        xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
        fill = PALETTE[s.colour]
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(xm, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=fill)
    return image


# ---- sampling

def held_out(kind: str, colour: str, background: str) -> bool:
    """Whether (shape, subject colour, background) is reserved for evaluation."""
    return (SHAPES.index(kind) + 3 * COLOURS.index(colour) + 5 * COLOURS.index(background)) % 7 == 0


def in_split(scene: Scene, split: str) -> bool:
    """Whether every shape of the scene, with its background, is a combination of the split."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return all(held_out(s.kind, s.colour, scene.background) == (split == "eval") for s in scene.shapes)


@functools.cache
def _combos(split: str) -> list[tuple[str, str, str]]:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return [(k, c, b) for k in SHAPES for c in COLOURS for b in COLOURS
            if c != b and held_out(k, c, b) == (split == "eval")]


def sample_t2i(rng: random.Random, split: str = "train") -> Scene:
    """A one-shape scene of the split at a random position; its prompt is prompt_of(scene)."""
    kind, colour, background = rng.choice(_combos(split))
    return Scene(background, (Shape(kind, colour, rng.choice(POSITIONS)),))


def sample_edit(rng: random.Random, split: str = "train") -> tuple[Scene, str, Scene]:
    """(reference, instruction, target) for an edit that changes something; in "train" both
    scenes are of the split, in "eval" the target is (the reference may be either)."""
    while True:
        ref = sample_t2i(rng, split if split == "train" else rng.choice(("train", "eval")))
        s = ref.shapes[0]
        action = rng.choice(EDIT_ACTIONS)
        if action in ("colour", "background"):
            value = rng.choice([c for c in COLOURS if c not in (s.colour, ref.background)])
        else:
            current = s.kind if action == "shape" else s.position
            value = rng.choice([v for v in (SHAPES if action == "shape" else POSITIONS) if v != current])
        edit = Edit(action, value, None if action == "background" else s.kind)
        target = apply_edit(ref, edit)
        if in_split(target, split):
            return ref, edit_prompt(edit), target


def sample_personalize(rng: random.Random, n: int, split: str = "train") -> tuple[list[Scene], str, Scene]:
    """(references, prompt, target) with n = 2 or 3 objects of distinct colours; the target's
    objects (and in "train" the references too) are combinations of the split."""
    if n not in (2, 3):
        raise ValueError(f"personalization takes 2 or 3 references, got {n}")
    combos = _combos(split)
    while True:
        background = rng.choice(COLOURS)
        picks = [rng.choice([(k, c) for k, c, b in combos if b == background]) for _ in range(n)]
        if len({c for _, c in picks}) == n:
            break
    refs = []
    for kind, colour in picks:
        while True:
            ref = Scene(rng.choice([c for c in COLOURS if c != colour]), (Shape(kind, colour, rng.choice(POSITIONS)),))
            if split == "eval" or in_split(ref, "train"):
                break
        refs.append(ref)
    prompt = PersonalizePrompt(tuple(k for k, _ in picks), background)
    return refs, personalize_prompt(prompt), personalized_scene(refs, prompt)


# ---- reading

@dataclass(frozen=True)
class ObjectReading:
    colour: str
    shape: str
    centroid: tuple[float, float]  # (x, y) as fractions of the image's width and height
    area: float  # fraction of the image's area
    confidence: float  # colour agreement x shape fit, 0..1


@dataclass(frozen=True)
class Reading:
    """What the evaluator sees; colour, shape and position are None when nothing was found."""

    background: str
    colour: str | None
    shape: str | None
    position: str | None
    found: bool
    confidence: float  # border agreement x the subject's confidence, 0..1


_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # [8, 3]
_MIN_AREA = 0.01  # smaller blobs (a fraction of the image) are not objects


def _prepare(image: Image.Image) -> tuple[np.ndarray, np.ndarray, int, float]:
    """(pixels [H, W, 3], nearest palette index [H, W], background index, border agreement)."""
    image = image.convert("RGB")
    factor = max(1, min(image.size) // 128)  # work at about 128 px: faster, and averages noise
    if factor > 1:
        image = image.reduce(factor)
    pixels = np.asarray(image.filter(ImageFilter.BoxBlur(1)), dtype=np.float32)  # [H, W, 3]
    labels = np.argmin(((pixels[:, :, None, :] - _RGB) ** 2).sum(-1), axis=-1)  # [H, W]
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    counts = np.bincount(border, minlength=len(COLOURS))
    return pixels, labels, int(counts.argmax()), float(counts.max() / border.size)


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-connected components of a boolean mask: (labels [H, W], 0 outside; the area of each label)."""
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)  # [H, W + 1]
    rows, starts = (a.tolist() for a in np.nonzero(edges == 1))
    ends = np.nonzero(edges == -1)[1].tolist()  # row-major like the starts: run i is [starts[i], ends[i])
    parent = list(range(len(starts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev: list[int] = []  # the runs of the row above
    cur: list[int] = []
    row, j = -1, 0
    for i, (y, s, e) in enumerate(zip(rows, starts, ends)):
        if y != row:
            prev, cur, row, j = (cur if y == row + 1 else []), [], y, 0
        while j < len(prev) and ends[prev[j]] <= s:
            j += 1
        k = j
        while k < len(prev) and starts[prev[k]] < e:  # the runs above that overlap this one
            a, b = find(i), find(prev[k])
            parent[max(a, b)] = min(a, b)
            k += 1
        cur.append(i)
    labels = np.zeros(mask.shape, dtype=np.int32)
    for i, (y, s, e) in enumerate(zip(rows, starts, ends)):
        labels[y, s:e] = find(i) + 1
    return labels, np.bincount(labels.ravel())


def _shape(x: np.ndarray, y: np.ndarray) -> tuple[str, float]:
    """The shape that, drawn with the mask's area at its centroid, holds most of its pixels (at
    offsets x, y from the centroid), and the fraction it holds. This weighs the fill of the box
    (square 1, circle 0.79, triangle and diamond 0.5) and where the mass lies (a triangle's is low)."""
    area = x.size
    side = np.sqrt(2 * area)  # the triangle's, as wide as it is tall; its centroid is side/3 above the base
    inside = {
        "circle": x * x + y * y <= area / np.pi,
        "square": np.maximum(np.abs(x), np.abs(y)) <= np.sqrt(area) / 2,
        "triangle": (y <= side / 3) & (np.abs(x) <= (y + 2 * side / 3) / 2),
        "diamond": np.abs(x) + np.abs(y) <= np.sqrt(area / 2),
    }
    best = max(SHAPES, key=lambda kind: int(inside[kind].sum()))
    return best, float(inside[best].mean())


def _measure(pixels: np.ndarray, labels: np.ndarray, blob: np.ndarray, bg: int) -> ObjectReading:
    """Colour: the commonest in the blob's half farthest from the background. Shape and centroid:
    of the blob redrawn as the pixels nearer that colour than the background's."""
    far = ((pixels[blob] - _RGB[bg]) ** 2).sum(-1)
    colour = int(np.bincount(labels[blob][far >= np.median(far)], minlength=len(COLOURS)).argmax())
    h, w = blob.shape
    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = max(ys.min() - 2, 0), min(ys.max() + 3, h), max(xs.min() - 2, 0), min(xs.max() + 3, w)
    window = pixels[y0:y1, x0:x1]
    nearer = ((window - _RGB[colour]) ** 2).sum(-1) < ((window - _RGB[bg]) ** 2).sum(-1)
    parts, areas = _components(nearer)
    mask = parts == areas[1:].argmax() + 1 if len(areas) > 1 else blob[y0:y1, x0:x1]
    ys, xs = np.nonzero(mask)
    shape, fit = _shape(xs - xs.mean(), ys - ys.mean())
    agreement = float(np.mean(labels[y0:y1, x0:x1][mask] == colour))
    centroid = ((xs.mean() + x0 + 0.5) / w, (ys.mean() + y0 + 0.5) / h)
    return ObjectReading(COLOURS[colour], shape, centroid, ys.size / (h * w), agreement * fit)


def _position(x: float, y: float) -> str:
    """The nearest of the five positions: thresholds halfway between the center and an offset."""
    dx, dy = x - 0.5, y - 0.5
    if max(abs(dx), abs(dy)) < OFFSET / 2:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _read(image: Image.Image) -> tuple[str, float, list[ObjectReading]]:
    """(background, border agreement, objects largest first)."""
    pixels, labels, bg, agreement = _prepare(image)
    parts, areas = _components(labels != bg)
    big = [i for i in np.argsort(-areas, kind="stable") if i > 0 and areas[i] >= _MIN_AREA * labels.size]
    return COLOURS[bg], agreement, [_measure(pixels, labels, parts == i, bg) for i in big]


def read(image: Image.Image) -> Reading:
    """Read a one-shape image: the background from the border, the subject from the largest blob."""
    background, agreement, objects = _read(image)
    if not objects:
        return Reading(background, None, None, None, False, 0.0)
    o = objects[0]
    return Reading(background, o.colour, o.shape, _position(*o.centroid), True, agreement * o.confidence)


def read_objects(image: Image.Image) -> list[ObjectReading]:
    """The objects (blobs of other colours than the background, >= 1% of the image), left to right."""
    return sorted(_read(image)[2], key=lambda o: o.centroid[0])


def score(expected: Scene, image: Image.Image) -> dict[str, bool]:
    """Which parts of the expected scene the image shows, and "all". One shape: background, colour,
    shape, position. Side by side: background, count, colours and shapes (each in order)."""
    if len(expected.shapes) == 1:
        got, want = read(image), expected.shapes[0]
        result = {"background": got.background == expected.background, "colour": got.colour == want.colour,
                  "shape": got.shape == want.kind, "position": got.position == want.position}
    else:
        background, _, objects = _read(image)
        objects.sort(key=lambda o: o.centroid[0])
        pairs = list(zip(objects, expected.shapes))
        count = len(objects) == len(expected.shapes)
        result = {"background": background == expected.background, "count": count,
                  "colours": count and all(o.colour == s.colour for o, s in pairs),
                  "shapes": count and all(o.shape == s.kind for o, s in pairs)}
    result["all"] = all(result.values())
    return result


def accuracy(results: Iterable[dict[str, bool]]) -> dict[str, float]:
    """The percentage of results in which each key is true, over the results that have the key."""
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for result in results:
        for key, ok in result.items():
            hits[key] += bool(ok)
            totals[key] += 1
    return {key: 100.0 * hits[key] / totals[key] for key in totals}
