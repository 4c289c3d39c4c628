"""shrink: a structured-pruning compiler for PyTorch.

``shrink.compress(model, ratio)`` returns a physically smaller model, verified against the
original with the dropped channels masked. The stages are public too:
``capture -> analyze -> score -> select -> apply -> verify``, then ``export_onnx`` and
``compare``.

This namespace holds what a user needs; the plumbing (plan members, policies, criteria objects,
rule base classes, ...) stays importable from its submodule, e.g. ``shrink.plan.ChannelGroup``,
``shrink.select.Global`` or ``shrink.criteria.Taylor``. README.md lists the modules in pipeline
order.
"""

from shrink._version import __version__
from shrink.analysis import Analysis, analyze
from shrink.api import Result, compress, infer_inputs, prune
from shrink.capture import capture
from shrink.config import PruneConfig
from shrink.criteria.weight import score
from shrink.deploy.bench import BenchResult, compare
from shrink.deploy.export import ExportResult, export_onnx
from shrink.depth import DepthResult, remove_layers
from shrink.errors import (
    CaptureError,
    ConfigError,
    ExportError,
    PlanError,
    ShrinkError,
    VerificationError,
)
from shrink.interop.io import load, load_plan, save
from shrink.interop.masks import from_masks
from shrink.plan import Plan
from shrink.report import Report
from shrink.rewrite import apply, apply_
from shrink.rules import ModuleRule, register_function, register_rule
from shrink.schedule import prune_iteratively
from shrink.select import select
from shrink.sensitivity import sensitivity
from shrink.verify import verify

__all__ = [
    "Analysis",
    "BenchResult",
    "CaptureError",
    "ConfigError",
    "DepthResult",
    "ExportError",
    "ExportResult",
    "ModuleRule",
    "Plan",
    "PlanError",
    "PruneConfig",
    "Report",
    "Result",
    "ShrinkError",
    "VerificationError",
    "__version__",
    "analyze",
    "apply",
    "apply_",
    "capture",
    "compare",
    "compress",
    "export_onnx",
    "from_masks",
    "infer_inputs",
    "load",
    "load_plan",
    "prune",
    "prune_iteratively",
    "register_function",
    "register_rule",
    "remove_layers",
    "save",
    "score",
    "select",
    "sensitivity",
    "verify",
]
