"""Shared fixtures: one tiny demo checkpoint and one engine loaded from it, for the whole session.

Both are shared: tests must not modify the checkpoint directory (copy it first) or the engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint (official layout, single bf16 model.safetensors), written once."""
    from hidream.engine.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo-checkpoint"), seed=0)


@pytest.fixture(scope="session")
def engine(demo_checkpoint: Path):
    """The demo checkpoint loaded on the CPU (fp32)."""
    from hidream.engine.pipeline import Engine

    return Engine.load(demo_checkpoint, device="cpu")
