"""The token sequence of one guidance branch and its 3-axis positions.

Layout: [chat-templated prompt (with each reference as Qwen3-VL image tokens) <|boi_token|>]  (text)
        + [<|tms_token|>] + [target patches] + [reference patches]                          (generation)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from hidream.engine.config import BEGIN_IMAGE_TOKEN, IMAGE_POSITION_OFFSET, PATCH_SIZE, TIMESTEP_TOKEN
from hidream.engine.errors import CheckpointError, InvalidRequestError
from hidream.prompts import control_token_in

IMAGE_PAD_TOKEN = "<|image_pad|>"
UNCONDITIONAL_PROMPT = " "


@dataclass
class Branch:
    """One guidance branch: text ids and positions for the text and the generation tokens."""

    input_ids: Tensor  # [1, T] text tokens (without the timestep token)
    text_positions: Tensor  # [3, 1, T]
    gen_positions: Tensor  # [3, 1, 1 + L_target + L_refs]


@dataclass
class VisionInputs:
    """The references as the ViT sees them (shared by both branches)."""

    pixel_values: Tensor
    grid_thw: Tensor  # [K, 3] in ViT patches
    merge_size: int

    def token_counts(self) -> list[int]:
        return [int(g.prod()) // self.merge_size**2 for g in self.grid_thw]


def grid_positions(height: int, width: int, offset: int) -> Tensor:
    """[3, h*w] positions of a patch grid, row-major: (offset, offset + row, offset + col)."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, cols]) + offset


def text_positions(ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]]) -> Tensor:
    """Qwen3-VL positions of a text with images: text counts up by one; an image's tokens get its
    (t, row, col) grid shifted by the next text position; text resumes after the image's largest position."""
    parts: list[Tensor] = []
    nxt, i, g = 0, 0, 0
    while i < len(ids):
        if ids[i] == image_token_id:
            t, h, w = grids[g]
            block = grid_positions(h, w, nxt).repeat(1, t)
            block[0] = torch.arange(t).repeat_interleave(h * w) + nxt
            parts.append(block)
            nxt = int(block.max()) + 1
            i += t * h * w
            g += 1
        else:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            parts.append(torch.arange(nxt, nxt + j - i).expand(3, -1))
            nxt += j - i
            i = j
    if g != len(grids):
        raise ValueError(f"{len(grids)} image grids for {g} image token runs")
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)


def generation_positions(next_text_pos: int, target: tuple[int, int], refs: list[tuple[int, int]]) -> Tensor:
    """[3, 1 + L] positions of the timestep token, the target grid (at the fixed offset), then each
    reference grid, each starting one past the previous grid's largest position."""
    parts = [torch.full((3, 1), next_text_pos)]
    block = grid_positions(*target, IMAGE_POSITION_OFFSET)
    parts.append(block)
    for h, w in refs:
        block = grid_positions(h, w, int(block.max()) + 1)
        parts.append(block)
    return torch.cat(parts, dim=1)


class PromptEncoder:
    """Turns a prompt (and references) into a Branch, with the checkpoint's tokenizer and image processor."""

    def __init__(self, tokenizer, image_processor, image_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        vocab = tokenizer.get_vocab()
        for token in (TIMESTEP_TOKEN, BEGIN_IMAGE_TOKEN, IMAGE_PAD_TOKEN):
            if token not in vocab:
                raise CheckpointError(f"tokenizer: lacks the special token {token}")
        if vocab[IMAGE_PAD_TOKEN] != image_token_id:
            raise CheckpointError(
                f"config.json: image_token_id: {image_token_id} differs from the tokenizer's {IMAGE_PAD_TOKEN} "
                f"({vocab[IMAGE_PAD_TOKEN]})")
        self.timestep_token_id = vocab[TIMESTEP_TOKEN]

    @staticmethod
    def check_prompt(prompt: str, field: str = "prompt") -> None:
        token = control_token_in(prompt)
        if token is not None:
            raise InvalidRequestError(field, f"must not contain the model's control token {token}")

    def encode_references(self, refs: list[Image.Image]) -> VisionInputs:
        out = self.image_processor(images=refs, return_tensors="pt")
        return VisionInputs(out["pixel_values"], out["image_grid_thw"], int(self.image_processor.merge_size))

    def branch(self, prompt: str, target: tuple[int, int], refs: list[tuple[int, int]],
               vision: VisionInputs | None) -> Branch:
        """target and refs are (height, width) in pixels."""
        if vision is None:
            content: str | list[dict] = prompt
        else:
            content = [{"type": "image"} for _ in refs] + [{"type": "text", "text": prompt}]
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        grids: list[tuple[int, int, int]] = []
        if vision is not None:
            pieces = text.split(IMAGE_PAD_TOKEN)
            if len(pieces) != len(refs) + 1:
                raise CheckpointError("chat template: must place one image token per reference image")
            text = pieces[0]
            m = vision.merge_size
            for n, g, piece in zip(vision.token_counts(), vision.grid_thw.tolist(), pieces[1:], strict=True):
                text += IMAGE_PAD_TOKEN * n + piece
                grids.append((g[0], g[1] // m, g[2] // m))
        text += BEGIN_IMAGE_TOKEN
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        text_pos = text_positions(ids, self.image_token_id, grids)
        p = PATCH_SIZE
        gen_pos = generation_positions(
            int(text_pos.max()) + 1,
            (target[0] // p, target[1] // p),
            [(h // p, w // p) for h, w in refs],
        )
        return Branch(
            input_ids=torch.tensor([ids], dtype=torch.long),
            text_positions=text_pos[:, None],
            gen_positions=gen_pos[:, None],
        )
