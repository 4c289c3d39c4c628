"""The one exception tree of shrink.

Every message says what failed, where (node, module FQN, source line), why, and how to fix it.
"""

from __future__ import annotations


class ShrinkError(Exception):
    """Base class of every error shrink raises on purpose."""


class CaptureError(ShrinkError):
    """The model could not be captured as a graph (tracing failed)."""


class UnsupportedOpError(ShrinkError, NotImplementedError):
    """The user asked to prune channels that flow through an op shrink cannot handle."""


class ConfigError(ShrinkError, ValueError):
    """An option is out of range or of the wrong type."""


class PlanError(ShrinkError, ValueError):
    """A plan is malformed, of an unknown schema, or made for a different model."""


class RewriteError(ShrinkError):
    """A layer could not be rebuilt smaller; ``module`` is its FQN when one layer is to blame."""

    def __init__(self, message: str, *, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module


class VerificationError(ShrinkError):
    """The pruned model does not equal the masked original (a shrink bug; please report it)."""


class ExportError(ShrinkError):
    """ONNX export or the onnxruntime parity check failed."""


class InvariantError(ShrinkError):
    """A stage broke its own postcondition: a shrink bug."""
