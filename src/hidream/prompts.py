"""Prompt rules shared by the engine and the API (no torch here)."""

from __future__ import annotations

# Tokens that carry the sequence's structure: typed into a prompt, they would corrupt it.
CONTROL_TOKENS = (
    "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|tms_token|>", "<|boi_token|>", "<|bor_token|>", "<|eor_token|>", "<|bot_token|>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
)


def control_token_in(prompt: str) -> str | None:
    """The first control token the prompt contains, else None."""
    return next((t for t in CONTROL_TOKENS if t in prompt), None)
