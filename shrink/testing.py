"""Public test helpers: realistic random weights and the equivalence assertion.

Random initialisation hides bugs: torchvision's GoogLeNet outputs its classifier bias whatever
the input, and EfficientNet/MobileNet outputs are ~1e-9. :func:`randomize_` gives every weight,
BN affine parameter and running statistic values that make the output depend on the input, and
:func:`calibrate_bn_` sets BN statistics from a few train-mode passes so activations are O(1)
(raw init also leaves denormals that slow onnxruntime down).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from shrink.plan import Plan
from shrink.report import Report
from shrink.rules.norm import reestimate_batch_norms_
from shrink.verify import verify

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every parameter and norm statistic in place (He-scaled weights). Returns model."""
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        t.copy_(fn(torch.empty(t.shape, dtype=torch.float64)).to(t.dtype))

    for mod in model.modules():
        if isinstance(mod, _NORMS):
            weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
            mean, var = getattr(mod, "running_mean", None), getattr(mod, "running_var", None)
            if isinstance(weight, torch.Tensor):
                draw(weight, lambda x: x.uniform_(0.5, 1.5, generator=gen))
            if isinstance(bias, torch.Tensor):
                draw(bias, lambda x: x.normal_(0, 0.2, generator=gen))
            if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
                draw(mean, lambda x: x.normal_(0, 0.2, generator=gen))
                draw(var, lambda x: x.uniform_(0.5, 1.5, generator=gen))
            continue
        for _name, p in mod.named_parameters(recurse=False):
            if p.ndim >= 2:
                fan_in = p[0].numel()
                std = math.sqrt(2.0 / max(fan_in, 1))
                def he(x: torch.Tensor, s: float = std) -> torch.Tensor:
                    return x.normal_(0, s, generator=gen)

                draw(p, he)
            else:
                draw(p, lambda x: x.normal_(0, 0.2, generator=gen))
    return model


@torch.no_grad()
def calibrate_bn_(model: nn.Module, make_inputs: Callable[[], tuple[Any, ...]],
                  steps: int = 4) -> nn.Module:
    """Set BN running statistics from ``steps`` train-mode passes; restores the model's modes."""
    reestimate_batch_norms_(model, [lambda: model(*make_inputs())] * steps, whole_model=True)
    return model


def assert_equivalent(
    original: nn.Module, pruned: nn.Module, plan: Plan, inputs: tuple[Any, ...], rtol: float = 1e-5
) -> Report:
    """Assert the pruned model equals the masked original on ``inputs`` (:func:`shrink.verify`)."""
    return verify(original, pruned, plan, inputs, rtol=rtol, strict=True)


def state_snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything about a model that shrink promises not to touch, for before/after asserts."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "modules": {k: id(m) for k, m in model.named_modules()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {k: (len(m._forward_hooks), len(m._forward_pre_hooks))
                  for k, m in model.named_modules()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, snapshot: dict[str, Any]) -> None:
    """Assert ``model`` still matches a :func:`state_snapshot` taken earlier."""
    now = state_snapshot(model)
    for key in ("modules", "training", "hooks", "requires_grad"):
        assert now[key] == snapshot[key], f"model {key} changed"
    assert now["tensors"].keys() == snapshot["tensors"].keys(), "model state keys changed"
    for k, v in snapshot["tensors"].items():
        assert torch.equal(now["tensors"][k], v), f"model tensor {k!r} changed"
