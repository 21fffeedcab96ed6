"""The token layout and the 3-axis positions, pinned by hand against the official rule."""

import torch
from PIL import Image

from hidream.engine.config import IMAGE_POSITION_OFFSET
from hidream.engine.sequence import generation_positions, grid_positions, text_positions

IMG = 99


def cols(t: torch.Tensor) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in t[:, i]) for i in range(t.shape[1])]


def test_grid_positions_are_row_major_with_a_constant_temporal_axis():
    assert cols(grid_positions(2, 3, 10)) == [
        (10, 10, 10), (10, 10, 11), (10, 10, 12),
        (10, 11, 10), (10, 11, 11), (10, 11, 12),
    ]


def test_text_counts_up_and_an_image_takes_its_grid_after_the_text():
    # a b [2x2 image] c: the image starts at the next text position (2); text resumes at max + 1 = 4.
    ids = [1, 2, IMG, IMG, IMG, IMG, 3]
    assert cols(text_positions(ids, IMG, [(1, 2, 2)])) == [
        (0, 0, 0), (1, 1, 1),
        (2, 2, 2), (2, 2, 3), (2, 3, 2), (2, 3, 3),
        (4, 4, 4),
    ]


def test_two_images_in_the_text():
    # [1x3 image] x [2x1 image] y: second image starts at 4 + 1 = 5 (after x at 4).
    ids = [IMG, IMG, IMG, 7, IMG, IMG, 8]
    assert cols(text_positions(ids, IMG, [(1, 1, 3), (1, 2, 1)])) == [
        (0, 0, 0), (0, 0, 1), (0, 0, 2),
        (3, 3, 3),
        (4, 4, 4), (4, 5, 4),
        (6, 6, 6),
    ]


def test_generation_tokens_sit_at_the_fixed_offset_and_references_follow():
    pos = cols(generation_positions(10, (2, 3), [(2, 2), (1, 4)]))
    o = IMAGE_POSITION_OFFSET
    assert o == 4096
    assert pos[0] == (10, 10, 10)  # the timestep token continues the text
    assert pos[1:7] == [(o, o + r, o + c) for r in range(2) for c in range(3)]
    # first reference: one past the target's largest position, o + 2
    r1 = o + 3
    assert pos[7:11] == [(r1, r1 + r, r1 + c) for r in range(2) for c in range(2)]
    # second reference: one past the first's largest position, r1 + 1
    r2 = r1 + 2
    assert pos[11:15] == [(r2, r2, r2 + c) for c in range(4)]
    assert len(pos) == 15


def test_text_to_image_branch_layout(engine):
    enc = engine.encoder
    branch = enc.branch("a red fox", (64, 96), [], None)
    ids = branch.input_ids[0].tolist()
    tok = enc.tokenizer
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n")
    assert ids[-1] == tok.convert_tokens_to_ids("<|boi_token|>")
    assert enc.timestep_token_id not in ids  # the timestep token is the first generation token
    assert cols(branch.text_positions[:, 0]) == [(i, i, i) for i in range(len(ids))]
    gen = cols(branch.gen_positions[:, 0])
    assert gen[0] == (len(ids),) * 3
    assert len(gen) == 1 + 2 * 3
    assert gen[1] == (4096, 4096, 4096) and gen[-1] == (4096, 4097, 4098)


def test_reference_branch_carries_vit_tokens_per_reference(engine):
    enc = engine.encoder
    refs_vit = [Image.new("RGB", (384, 384)), Image.new("RGB", (288, 384))]
    vision = enc.encode_references(refs_vit)
    # the demo ViT: 16 px patches merged 2x2 -> 384/32 = 12 per side
    assert vision.token_counts() == [12 * 12, 9 * 12]
    branch = enc.branch("put them together", (64, 64), [(64, 64), (32, 64)], vision)
    ids = branch.input_ids[0].tolist()
    image_id = engine.model.spec.image_token_id
    assert ids.count(image_id) == 144 + 108
    # first image block: grid 12x12 starting at the first image token's index
    first = ids.index(image_id)
    pos = cols(branch.text_positions[:, 0])
    assert pos[first] == (first, first, first)
    assert pos[first + 12 * 12 - 1] == (first, first + 11, first + 11)
    gen = cols(branch.gen_positions[:, 0])
    assert gen[0][0] == max(max(p) for p in pos) + 1
    # target 2x2 at 4096, first reference (2x2) at 4096 + 2, second (1x2) at 4098 + 2
    assert gen[1:5] == [(4096, 4096 + r, 4096 + c) for r in range(2) for c in range(2)]
    assert gen[5:9] == [(4098, 4098 + r, 4098 + c) for r in range(2) for c in range(2)]
    assert gen[9:11] == [(4100, 4100, 4100), (4100, 4100, 4101)]
