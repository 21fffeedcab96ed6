"""Tests for hidream.engine.images: sizing rules pinned by hand from the official formulas."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from hidream.engine import images
from hidream.engine.errors import InvalidRequestError
from hidream.engine.images import (
    PATCH_SIZE,
    check_size,
    condition_side,
    condition_size,
    fit_to_area,
    load_image,
    patchify,
    prepare_references,
    reference_side,
    to_pil,
    to_tensor,
    unpatchify,
)
from hidream.sizes import NATIVE_SIZES, native_size


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- reference sizing -------------------------------------------------------------------------

# K=1: max; K=2: max*48//64; K<=4: max//2; K<=8: max*24//64; else max//4.
# 2048: 2048, 2048*48//64=1536, 1024, 2048*24//64=768, 512.
# 2304 (2304x1728 target): 2304, 2304*48//64=1728, 1152, 2304*24//64=864, 576.
SIDES = {
    (2048, 2048): {1: 2048, 2: 1536, 4: 1024, 8: 768, 10: 512},
    (2304, 1728): {1: 2304, 2: 1728, 4: 1152, 8: 864, 10: 576},
}

# fit_to_area of a 1000x600 source (no BOX halving: 600 < 2*side for every side here).
# scale = side / sqrt(600000) = side / 774.597; each dimension -> round(x*scale) // 32 * 32
# (the floor candidates agree, and the area always fits, so the round candidate wins):
#  2048: 2643.95 -> 2644 -> 2624 ; 1586.37 -> 1586 -> 1568   (2624*1568 = 4114432 <= 4194304)
#  1536: 1982.96 -> 1983 -> 1952 ; 1189.78 -> 1190 -> 1184
#  1024: 1321.97 -> 1322 -> 1312 ;  793.18 ->  793 ->  768
#   768:  991.48 ->  991 ->  960 ;  594.89 ->  595 ->  576
#   512:  660.99 ->  661 ->  640 ;  396.59 ->  397 ->  384
#  2304: 2974.45 -> 2974 -> 2944 ; 1784.67 -> 1785 -> 1760
#  1728: 2230.84 -> 2231 -> 2208 ; 1338.51 -> 1339 -> 1312
#  1152: 1487.22 -> 1487 -> 1472 ;  892.33 ->  892 ->  864
#   864: 1115.42 -> 1115 -> 1088 ;  669.25 ->  669 ->  640
#   576:  743.61 ->  744 ->  736 ;  446.17 ->  446 ->  416
FIT_1000x600 = {
    2048: (2624, 1568), 1536: (1952, 1184), 1024: (1312, 768), 768: (960, 576), 512: (640, 384),
    2304: (2944, 1760), 1728: (2208, 1312), 1152: (1472, 864), 864: (1088, 640), 576: (736, 416),
}


@pytest.mark.parametrize("target", list(SIDES))
@pytest.mark.parametrize("count", [1, 2, 4, 8, 10])
def test_reference_side_and_fitted_size(target, count):
    width, height = target
    side = SIDES[target][count]
    assert reference_side(count, width, height) == side
    assert reference_side(count, height, width) == side  # only the longest side matters
    assert fit_to_area(noise(1000, 600), side).size == FIT_1000x600[side]


def test_reference_side_bucket_edges():
    assert [reference_side(k, 2048, 2048) for k in (3, 5, 7, 9, 20)] == [1024, 768, 768, 512, 512]


@pytest.mark.parametrize("count", [1, 2, 4, 8, 10])
def test_prepare_references_sizes_every_reference(count):
    refs_in = [noise(1000, 600, seed=i) for i in range(count)]
    w, h, refs, for_vit = prepare_references(refs_in, 2304, 1728, keep_original_aspect=False)
    assert (w, h) == (2304, 1728)
    assert [r.size for r in refs] == [FIT_1000x600[SIDES[(2304, 1728)][count]]] * count
    assert len(for_vit) == count
    for ref, small in zip(refs, for_vit):
        assert small.size == condition_size(condition_side(count), ref.width / ref.height)


def test_fit_to_area_falls_back_when_rounding_overshoots():
    # 114x187 at side 1024: scale = 1024/sqrt(21318) = 7.01336; 799.52 x 1311.50.
    # candidates (800,1312) area 1049600 > 1048576; next largest (800,1280) = 1024000 fits.
    assert fit_to_area(noise(114, 187), 1024).size == (800, 1280)
    assert fit_to_area(noise(187, 114), 1024).size == (1280, 800)


@pytest.mark.parametrize("size", [(1000, 600), (601, 1999), (33, 4000), (3000, 1000), (777, 777), (64, 64)])
@pytest.mark.parametrize("side", [384, 512, 1536])
def test_fit_to_area_is_patch_aligned_and_within_budget(size, side):
    out = fit_to_area(noise(*size), side)
    assert out.width % PATCH_SIZE == 0 and out.height % PATCH_SIZE == 0
    assert 0 < out.width * out.height <= side * side


@pytest.mark.parametrize("transpose", [False, True])
def test_fit_to_area_crops_the_centre(transpose):
    # 1100x1000 at side 512: scale 0.488174 -> (536.99, 488.17) -> (512, 480); s1 = 2.148 > s2 = 2.083,
    # so it resizes to round(1100/2.0833) = 528 x 480 and crops 8 px off each side.
    w, h = (1000, 1100) if transpose else (1100, 1000)
    src = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(src).rectangle((w // 2 - 50, h // 2 - 50, w // 2 + 49, h // 2 + 49), fill="black")
    out = fit_to_area(src, 512)
    assert out.size == ((480, 512) if transpose else (512, 480))
    dark = 255.0 - np.asarray(out.convert("L"), dtype=np.float64)
    ys, xs = np.indices(dark.shape)
    cx, cy = (dark * xs).sum() / dark.sum(), (dark * ys).sum() / dark.sum()
    # An off-centre crop (e.g. left=0) would shift the mark by 8 px.
    assert abs(cx - (out.width - 1) / 2) < 0.5
    assert abs(cy - (out.height - 1) / 2) < 0.5


def test_fit_to_area_box_halves_large_sources_first():
    # 5001x4201 at side 1024: min side 4201 >= 2048 -> 2500x2100; 2100 >= 2048 -> 1250x1050; stop.
    # scale = 1024/sqrt(1250*1050) = 0.893823 -> (1117.28, 938.51) -> (1088, 928).
    big = noise(5001, 4201, seed=3)
    halved = big.resize((2500, 2100), Image.BOX).resize((1250, 1050), Image.BOX)
    out = fit_to_area(big, 1024)
    assert out.size == (1088, 928)
    assert np.array_equal(np.asarray(out), np.asarray(fit_to_area(halved, 1024)))
    direct = fit_to_area(big.resize((1250, 1050), Image.BICUBIC), 1024)
    assert not np.array_equal(np.asarray(out), np.asarray(direct))


def test_fit_to_area_rejects_degenerate_results():
    with pytest.raises(ValueError):
        fit_to_area(noise(64, 64), 16)


# --- condition (vision encoder) sizing ---------------------------------------------------------


def test_condition_side():
    # 384 for K<=4, 384*48//64 = 288 for K<=8, 384//2 = 192 beyond.
    assert [condition_side(k) for k in (1, 4, 5, 8, 9, 10)] == [384, 384, 288, 288, 192, 192]


def test_condition_size():
    assert condition_size(384, 1.0) == (384, 384)
    assert condition_size(288, 1.0) == (288, 288)
    assert condition_size(192, 1.0) == (192, 192)
    # sqrt(384*384*4/3) = 443.41 -> 13.86*32 -> 416 ; 443.41/(4/3) = 332.55 -> 10.39*32 -> 320
    assert condition_size(384, 4 / 3) == (416, 320)
    # sqrt(288*288*0.75) = 249.42 -> 7*32 = 224 ; 249.42/0.75 = 332.55 -> 10*32 = 320
    assert condition_size(288, 0.75) == (224, 320)
    # sqrt(192*192*2) = 271.53 -> 8*32 = 256 ; 271.53/2 = 135.76 -> 4*32 = 128
    assert condition_size(192, 2.0) == (256, 128)


@pytest.mark.parametrize(
    "count, fitted, expected",
    [(1, (2336, 1760), (416, 320)), (5, (864, 640), (320, 224)), (10, (576, 416), (224, 160))],
)
def test_condition_images_follow_reference_count(count, fitted, expected):
    # 1000x750 references on a 2048x2048 target (sqrt(1000*750) = 866.03):
    #  K=1 : side 2048, scale 2.36483 -> 2364.8 x 1773.6 -> 2336 x 1760, ratio 1.32727;
    #        cond 384: sqrt(384^2*1.32727) = 442.39 -> 416 ; 442.39/1.32727 = 333.31 -> 320
    #  K=5 : side 768, scale 0.88681 -> 886.8 x 665.1 -> 864 x 640, ratio 1.35;
    #        cond 288: sqrt(288^2*1.35) = 334.63 -> 320 ; 334.63/1.35 = 247.87 -> 224
    #  K=10: side 512, scale 0.59120 -> 591.2 x 443.4 -> 576 x 416, ratio 1.38462;
    #        cond 192: sqrt(192^2*1.38462) = 225.93 -> 224 ; 225.93/1.38462 = 163.17 -> 160
    refs_in = [noise(1000, 750, seed=i) for i in range(count)]
    _, _, refs, for_vit = prepare_references(refs_in, 2048, 2048, keep_original_aspect=False)
    assert [r.size for r in refs] == [fitted] * count
    assert [v.size for v in for_vit] == [expected] * count


# --- keep_original_aspect ----------------------------------------------------------------------


def test_keep_original_aspect_takes_the_reference_shape():
    # 3000x1000 at side 2048: scale = sqrt(2048^2/3e6) = 1.182413 -> 3547.24 x 1182.41 -> 3520 x 1152
    # (area 4055040 <= 4194304). Condition: ratio 3520/1152 = 3.0556; sqrt(384^2*3.0556) = 671.24 -> 640;
    # 671.24/3.0556 = 219.68 -> 192.
    w, h, refs, for_vit = prepare_references([noise(3000, 1000)], 1024, 1024, keep_original_aspect=True)
    assert (w, h) == (3520, 1152)
    assert refs[0].size == (3520, 1152)
    assert for_vit[0].size == (640, 192)


def test_keep_original_aspect_ignored_with_two_references():
    pair = [noise(3000, 1000), noise(3000, 1000, seed=1)]
    w, h, refs, _ = prepare_references(pair, 2048, 2048, keep_original_aspect=True)
    assert (w, h) == (2048, 2048)
    # K=2 -> side 1536: scale = 1536/1732.05 = 0.886810 -> 2660.43 x 886.81 -> 2656 x 864
    assert [r.size for r in refs] == [(2656, 864)] * 2


def test_prepare_references_without_images():
    assert prepare_references([], 2048, 1024, keep_original_aspect=True) == (2048, 1024, [], [])


def test_prepare_references_reports_unusable_reference():
    with pytest.raises(InvalidRequestError) as err:
        prepare_references([noise(64, 64)] * 10, 64, 64, keep_original_aspect=False)
    assert err.value.field == "images[0]"
    with pytest.raises(InvalidRequestError, match="aspect") as err:
        # 6000x40 at K=1 on 512x512: scale 512/489.90 = 1.04511 -> 6270.7 x 41.8 -> 6240 x 32 (195:1);
        # its 384 condition height is sqrt(384^2*195)/195 = 27.5 -> 0.
        prepare_references([noise(6000, 40)], 512, 512, keep_original_aspect=False, field="refs")
    assert err.value.field == "refs[0]"


# --- tensors -----------------------------------------------------------------------------------


def test_to_tensor_exact_values():
    img = Image.fromarray(np.array([[[0, 128, 255], [255, 0, 128]]], dtype=np.uint8))
    x = to_tensor(img)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 2)
    f = np.float32
    mid = (f(128) * f(1 / 255) - f(0.5)) / f(0.5)  # torchvision's ToDtype multiplies by 1/255
    assert float(mid) == pytest.approx(0.0039216, abs=1e-7)
    assert x[:, 0, 0].tolist() == [-1.0, float(mid), 1.0]
    assert x[:, 0, 1].tolist() == [1.0, -1.0, float(mid)]


def test_to_tensor_matches_torchvision_formula_for_every_level():
    levels = np.arange(256, dtype=np.uint8)
    img = Image.fromarray(np.stack([levels] * 3, axis=-1)[None])
    expected = (np.arange(256, dtype=np.float32) * np.float32(1 / 255) - np.float32(0.5)) / np.float32(0.5)
    assert np.array_equal(to_tensor(img)[0, 0].numpy(), expected)


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 64, 96)
    z = patchify(x)
    assert z.shape == (2, 2 * 3, 3 * 32 * 32)
    assert torch.equal(unpatchify(z, 64, 96), x)
    # pixel (c, i, j) of patch 0 sits at c*1024 + i*32 + j; patches run row-major over the grid.
    for c, i, j in [(0, 0, 0), (1, 5, 7), (2, 31, 31), (0, 31, 0)]:
        assert z[1, 0, c * 1024 + i * 32 + j] == x[1, c, i, j]
    assert z[0, 1, 2 * 1024 + 3 * 32 + 4] == x[0, 2, 3, 32 + 4]  # second patch of the first row
    assert z[0, 3, 0] == x[0, 0, 32, 0]  # first patch of the second row (grid is 2x3)


def test_unpatchify_rejects_unaligned_size():
    with pytest.raises(ValueError):
        unpatchify(torch.zeros(1, 4, 3072), 64, 80)


def test_to_pil_rounding():
    # -0.007843107 and 0.007843091 are float32 values that land exactly on 126.5 and 128.5: half to even.
    values = [-1.0, 1.0, 0.0, -0.5, 0.5, 2.0, -3.0, -0.007843107, 0.007843091]
    x = torch.tensor(values, dtype=torch.float32).reshape(1, 1, -1).expand(3, 1, -1)
    out = to_pil(x)
    assert out.mode == "RGB" and out.size == (len(values), 1)
    # 0 -> 127.5 -> 128; -0.5 -> 63.75 -> 64; 0.5 -> 191.25 -> 191; out of range clips.
    assert np.asarray(out)[0, :, 0].tolist() == [0, 255, 128, 64, 191, 255, 0, 126, 128]
    assert np.asarray(to_pil(x.to(torch.bfloat16)))[0, :7, 1].tolist() == [0, 255, 128, 64, 191, 255, 0]


def test_to_pil_inverts_to_tensor():
    img = noise(64, 32)
    assert np.array_equal(np.asarray(to_pil(to_tensor(img))), np.asarray(img))


# --- loading -----------------------------------------------------------------------------------


def test_load_image_sources(tmp_path):
    rgba = Image.new("RGBA", (40, 30), (10, 20, 30, 128))
    path = tmp_path / "ref.png"
    rgba.save(path)
    for source in (path, str(path), path.read_bytes(), rgba):
        img = load_image(source, "images[0]")
        assert img.mode == "RGB" and img.size == (40, 30)
        assert img.getpixel((0, 0)) == (10, 20, 30)


def test_load_image_missing_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(InvalidRequestError) as err:
        load_image(missing, "images[1]")
    assert err.value.field == "images[1]"
    assert str(missing) in str(err.value) and str(err.value).startswith("images[1]: ")


def test_load_image_not_an_image(tmp_path):
    with pytest.raises(InvalidRequestError, match=r"^ref: .*supported format"):
        load_image(b"definitely not an image", "ref")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(InvalidRequestError, match="notes.png"):
        load_image(text, "ref")


def test_load_image_truncated_png(tmp_path):
    data = png_bytes(noise(64, 64))
    with pytest.raises(InvalidRequestError) as err:
        load_image(data[: len(data) // 2], "ref")
    assert err.value.field == "ref"
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidRequestError, match="cut.png"):
        load_image(cut, "ref")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("pixels", [64 * 64, 40 * 40])  # beyond 2x the limit (error) and 1x (warning)
def test_load_image_decompression_bomb(monkeypatch, pixels):
    side = math.isqrt(pixels)
    data = png_bytes(Image.new("RGB", (side, side)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InvalidRequestError, match="too large") as err:
        load_image(data, "ref")
    assert err.value.field == "ref"


def test_load_image_refuses_unlisted_formats():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PPM")
    with pytest.raises(InvalidRequestError, match="supported format"):
        load_image(buf.getvalue(), "ref")
    assert "EPS" not in images._open_formats()


# --- target size -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (2048, 2048), (4096, 1024), (64, 4096), (2304, 1728), (1312, 3104)])
def test_check_size_accepts(size):
    check_size(*size)


@pytest.mark.parametrize(
    "size, field",
    [((2000, 1024), "width"), ((1024, 1000), "height"), ((32, 64), "width"), ((64, 4128), "height"),
     ((0, 64), "width"), ((1024.0, 1024), "width"), ((1024, True), "height"), ((4096, 4096), "size"),
     ((2080, 2048), "size")],
)
def test_check_size_rejects(size, field):
    with pytest.raises(InvalidRequestError) as err:
        check_size(*size)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


# --- the plan: reference checks without pixels (what the service runs at submit) ---------------------------


@pytest.mark.parametrize("size", [(1, 100000), (100000, 1), (2, 4000), (4000, 2)])
def test_plan_refuses_thin_references(size):
    with pytest.raises(InvalidRequestError) as err:
        images.plan_references([(64, 64), size], 2304, 1728, keep_original_aspect=False, field="refs")
    assert err.value.field == "refs[1]"
    assert f"{size[0]}x{size[1]}" in err.value.rule


@pytest.mark.parametrize("size", [(32, 2048), (4000, 2), (2048, 200)])
def test_plan_refuses_keep_aspect_outputs_that_break_the_size_rule(size):
    with pytest.raises(InvalidRequestError) as err:
        images.plan_references([size], 1024, 1024, keep_original_aspect=True, field="refs")
    assert err.value.field == "refs[0]"
    assert "keep_original_aspect" in err.value.rule or "small or thin" in err.value.rule


@pytest.mark.parametrize(("sizes", "keep"), [([(3000, 1000)], True), ([(640, 480)], False),
                                             ([(640, 480), (300, 900), (1000, 1000)], False)])
def test_plan_agrees_with_the_pixels(sizes, keep):
    plan = images.plan_references(sizes, 1024, 768, keep)
    w, h, refs, for_vit = prepare_references([noise(*s) for s in sizes], 1024, 768, keep)
    assert (plan.width, plan.height) == (w, h)
    assert plan.sizes == [r.size for r in refs] and plan.vit_sizes == [r.size for r in for_vit]


def _official_snap(width: int, height: int) -> tuple[int, int]:
    """The official code's loop over its table (models/utils.py, find_closest_resolution), written out."""
    best, least = None, float("inf")
    for w, h in NATIVE_SIZES:
        diff = abs(w / h - width / height)
        if diff < least:
            best, least = (w, h), diff
    return best


def test_native_size_snaps_as_the_official_code_does():
    assert len(NATIVE_SIZES) == 11 and len(set(NATIVE_SIZES)) == 11
    assert all(3_600_000 <= w * h <= 4_200_000 and w % 32 == 0 == h % 32 for w, h in NATIVE_SIZES)  # ~4 MP
    for size in NATIVE_SIZES:
        assert native_size(*size) == size
    assert native_size(512, 512) == (2048, 2048)
    assert native_size(1024, 768) == (2304, 1728) and native_size(768, 1024) == (1728, 2304)
    assert native_size(1920, 1080) == (2560, 1440) and native_size(1200, 800) == (2496, 1664)
    assert native_size(2100, 900) == (3104, 1312) and native_size(64, 2048) == (1312, 3104)
    # a tie (halfway between 1:1 and 2304x1792's 9:7) goes to the first in the table, as the official loop
    ratio = (1 + 2304 / 1792) / 2
    assert native_size(ratio * 7000, 7000) == _official_snap(ratio * 7000, 7000) == (2048, 2048)
    for w in range(64, 4097, 32):
        for h in (64, 512, 1000, 2048, 4096):
            assert native_size(w, h) == _official_snap(w, h), (w, h)


def test_plan_with_snap_to_native_sizes_the_references_for_the_native_size():
    sizes = [(640, 480), (300, 900)]
    snapped = images.plan_references(sizes, 512, 384, False, snap_to_native=True)
    assert snapped == images.plan_references(sizes, 2304, 1728, False)
    # keep_original_aspect (one reference): the reference's aspect, snapped
    kept = images.plan_references([(3000, 1000)], 512, 512, True, snap_to_native=True)
    assert kept == images.plan_references([(3000, 1000)], 3104, 1312, False)
    assert images.plan_references([(3000, 1000)], 512, 512, True).width != 3104  # not snapped unless asked
