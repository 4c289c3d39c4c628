"""Replays: plans of fixed models must stay byte-identical across speed work (tinygrad's process
replay, for plans). ``plan_replay.json`` holds the sha256 of each plan's canonical JSON as made
by shrink before the compile-time work of the ``ct`` branch; regenerate it only for an intended
change of plans::

    python tests/unit/test_plan_replay.py > tests/unit/plan_replay.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import shrink
from shrink.testing import randomize_

HASHES = Path(__file__).with_name("plan_replay.json")

#: (case id, torchvision model, PruneConfig options); the slow ones run with the zoo
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("resnet18", "resnet18", {"norm": 2}),
    ("resnet18-global-r1", "resnet18", {"norm": 1, "scope": "global", "round_to": 1}),
    ("mobilenet_v3_small", "mobilenet_v3_small", {"norm": 2}),
    ("mobilenet_v3_small-r0.3-round8", "mobilenet_v3_small",
     {"ratio": 0.3, "norm": 2, "round_to": 8}),
    ("efficientnet_b0", "efficientnet_b0", {"norm": 2}),
    ("regnet_y_400mf", "regnet_y_400mf", {"norm": 2}),
    ("shufflenet_v2_x0_5", "shufflenet_v2_x0_5", {"norm": 2}),
    ("googlenet-macs", "googlenet", {"norm": 2, "target": "macs"}),
]
SLOW: list[tuple[str, str, dict[str, Any]]] = [
    ("resnet50", "resnet50", {"norm": 2}),
    ("mobilenet_v2", "mobilenet_v2", {"norm": 2}),
    ("mobilenet_v3_large", "mobilenet_v3_large", {"norm": 2}),
    ("densenet121", "densenet121", {"norm": 2}),
    ("vgg11_bn", "vgg11_bn", {"norm": 2}),
    ("convnext_tiny", "convnext_tiny", {"norm": 2}),
    ("vit_b_16", "vit_b_16", {"norm": 2}),
    ("swin_t", "swin_t", {"norm": 2}),
]


def plan_hash(model_name: str, options: dict[str, Any]) -> str:
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": False} if model_name == "googlenet" else {}
    model = randomize_(torchvision.models.get_model(model_name, weights=None, **kwargs),
                       seed=0).eval()
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    options = {"ratio": 0.5, **options}
    plan = shrink.prune(model, (x,), shrink.PruneConfig(verify=False, **options)).plan
    return hashlib.sha256(plan.to_json().encode()).hexdigest()


def _check(case: str, model_name: str, options: dict[str, Any]) -> None:
    want = json.loads(HASHES.read_text())[case]
    assert plan_hash(model_name, options) == want, f"the plan of {case} changed"


@pytest.mark.parametrize(("case", "model_name", "options"), CASES, ids=[c[0] for c in CASES])
def test_plan_is_byte_identical_to_before(case: str, model_name: str,
                                          options: dict[str, Any]) -> None:
    _check(case, model_name, options)


@pytest.mark.slow
@pytest.mark.parametrize(("case", "model_name", "options"), SLOW, ids=[c[0] for c in SLOW])
def test_plan_of_a_large_model_is_byte_identical_to_before(
    case: str, model_name: str, options: dict[str, Any]
) -> None:
    _check(case, model_name, options)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = {case: plan_hash(name, opts) for case, name, opts in CASES + SLOW}
    sys.stdout.write(json.dumps(out, indent=1, sort_keys=True) + "\n")
