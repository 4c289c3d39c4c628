"""shrink: a structured-pruning compiler for PyTorch.

``shrink.compress(model, ratio)`` returns a physically smaller model, verified against the
original with the dropped channels masked. The stages are public too:
``capture -> analyze -> score -> select -> apply -> verify``.
"""

from shrink._version import __version__
from shrink.allocate import Solution, solve_target
from shrink.analysis import Analysis, Diagnostic, analyze
from shrink.api import Result, compress, infer_inputs, make_config, prune
from shrink.capture import Captured, capture
from shrink.config import PruneConfig
from shrink.criteria.data import Activation, Taylor
from shrink.criteria.weight import (
    AxisScores,
    BNScale,
    Criterion,
    DataCriterion,
    LnNorm,
    Random,
    UserScores,
    score,
)
from shrink.deploy.bench import BenchResult, compare
from shrink.deploy.export import ExportResult, export_onnx
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
from shrink.interop.io import load, load_plan, save
from shrink.interop.masks import Reconcile, from_masks
from shrink.interop.prune_masks import MaskedTensor, find_masks, fold_masks
from shrink.plan import ChannelGroup, Decision, IndexMap, Member, Plan, Side, fingerprint
from shrink.report import Report
from shrink.rewrite import apply, apply_
from shrink.rules import register_function, register_rule
from shrink.rules.base import Keep, ModuleRule
from shrink.schedule import IterativeResult, prune_iteratively, step_ratios
from shrink.select import Global, Metric, Target, Uniform, select
from shrink.sensitivity import Sensitivity, SensitivityRow, sensitivity
from shrink.verify import masked_reference, verify

__all__ = [
    "Activation",
    "Analysis",
    "AxisScores",
    "BNScale",
    "BenchResult",
    "CaptureError",
    "Captured",
    "ChannelGroup",
    "ConfigError",
    "Criterion",
    "DataCriterion",
    "Decision",
    "Diagnostic",
    "ExportError",
    "ExportResult",
    "Global",
    "IndexMap",
    "InvariantError",
    "IterativeResult",
    "Keep",
    "LnNorm",
    "MaskedTensor",
    "Member",
    "Metric",
    "ModuleRule",
    "Plan",
    "PlanError",
    "PruneConfig",
    "Random",
    "Reconcile",
    "Report",
    "Result",
    "RewriteError",
    "Sensitivity",
    "SensitivityRow",
    "ShrinkError",
    "Side",
    "Solution",
    "Target",
    "Taylor",
    "Uniform",
    "UnsupportedOpError",
    "UserScores",
    "VerificationError",
    "__version__",
    "analyze",
    "apply",
    "apply_",
    "capture",
    "compare",
    "compress",
    "export_onnx",
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
    "prune_iteratively",
    "register_function",
    "register_rule",
    "save",
    "score",
    "select",
    "sensitivity",
    "solve_target",
    "step_ratios",
    "verify",
]
