"""shrink: a structured-pruning compiler for PyTorch.

``shrink.compress(model, ratio)`` returns a physically smaller model, verified against the
original with the dropped channels masked. The stages are public too:
``capture -> analyze -> score -> select -> apply -> verify``.
"""

from shrink._version import __version__
from shrink.analysis import Analysis, Diagnostic, analyze
from shrink.api import Result, compress, infer_inputs, make_config, prune
from shrink.capture import Captured, capture
from shrink.config import PruneConfig
from shrink.criteria import BNScale, Criterion, LnNorm, Random, UserScores, score
from shrink.errors import (
    CaptureError,
    ConfigError,
    ExportError,
    InvariantError,
    PlanError,
    RewriteError,
    ShrinkError,
    UnsupportedOpError,
    VerificationError,
)
from shrink.io import load, load_plan, save
from shrink.masks import MaskedTensor, Reconcile, find_masks, fold_masks, from_masks
from shrink.plan import ChannelGroup, Decision, IndexMap, Member, Plan, Side, fingerprint
from shrink.report import Report
from shrink.rewrite import apply, apply_
from shrink.rules import register_function, register_rule
from shrink.rules.base import Keep, ModuleRule
from shrink.select import Global, Uniform, select
from shrink.verify import masked_reference, verify
from shrink.bench import BenchResult, compare
from shrink.export import ExportResult, export_onnx, export_onnx_with_report

__all__ = [
    "Analysis",
    "BNScale",
    "CaptureError",
    "Captured",
    "ChannelGroup",
    "ConfigError",
    "Criterion",
    "Decision",
    "Diagnostic",
    "ExportError",
    "Global",
    "IndexMap",
    "InvariantError",
    "Keep",
    "LnNorm",
    "MaskedTensor",
    "Member",
    "ModuleRule",
    "Plan",
    "PlanError",
    "PruneConfig",
    "Random",
    "Reconcile",
    "Report",
    "Result",
    "RewriteError",
    "ShrinkError",
    "Side",
    "Uniform",
    "UnsupportedOpError",
    "UserScores",
    "VerificationError",
    "__version__",
    "analyze",
    "apply",
    "apply_",
    "capture",
    "compress",
    "find_masks",
    "fingerprint",
    "fold_masks",
    "from_masks",
    "infer_inputs",
    "load",
    "load_plan",
    "make_config",
    "masked_reference",
    "prune",
    "register_function",
    "register_rule",
    "save",
    "score",
    "select",
    "verify",
    "BenchResult",
    "ExportResult",
    "compare",
    "export_onnx",
    "export_onnx_with_report",
]
