"""The engine's exceptions: one base class, so callers can catch every user-facing error at once."""

from __future__ import annotations


class HiDreamError(Exception):
    """Base class of every error the engine raises on purpose."""


class CheckpointError(HiDreamError):
    """The checkpoint directory cannot be served: missing, malformed, or inconsistent."""


class InvalidRequestError(HiDreamError, ValueError):
    """A generation request breaks a rule; `field` names the input at fault."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class GenerationCanceled(HiDreamError):
    """The caller's cancellation check asked the sampler to stop."""
