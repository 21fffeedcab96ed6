"""Files shipped in the package: the demo model.

`DEMO_MODEL` is the trained demo model (`hidream.demo_model`, `scripts/train-demo-model`): a tiny HiDream-O1 of
the official architecture, trained on the synthetic world of `hidream.world`, in the official layout
(config.json `qwen3_vl`, bf16 model.safetensors, tokenizer, processor config) plus the world's description
(`world.DESCRIPTION_FILE`). It loads through the ordinary loader; the commands and the service serve it when
no model is given.
"""

from __future__ import annotations

import json
from pathlib import Path

from hidream.world import DESCRIPTION_FILE

DEMO_MODEL = Path(__file__).resolve().parent / "demo-model"


def demo_model() -> Path:
    """The shipped demo model's directory; FileNotFoundError saying what is missing and what to do."""
    missing = [name for name in ("config.json", "model.safetensors") if not (DEMO_MODEL / name).is_file()]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise FileNotFoundError(f"the demo model's {' and '.join(missing)} {verb} missing from {DEMO_MODEL} "
                                "(a broken install: reinstall the package, or give a model with --model / "
                                "HIDREAM_MODEL)")
    return DEMO_MODEL


def demo_world(checkpoint: str | Path | None) -> dict | None:
    """What a demo model knows (its `world.DESCRIPTION_FILE`), or None for any other checkpoint (or None
    for the shipped one when its files are missing)."""
    path = (DEMO_MODEL if checkpoint is None else Path(checkpoint).expanduser()) / DESCRIPTION_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
