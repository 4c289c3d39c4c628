"""Bad input: every item gets a clear shrink error, and the caller's model is never touched.

One table for errors (type + message fragment), one for inputs shrink must tolerate. Each row
builds a fresh model, snapshots it, runs the action and asserts the model is unchanged.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import shrink
from shrink.testing import assert_unchanged, randomize_, state_snapshot
from tests.helpers import assert_matches_masked_original

pytest.importorskip("safetensors")
import safetensors.torch


def net() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    return randomize_(model).eval()


X = torch.randn(2, 3, 16, 16)


class Untraceable(nn.Module):
    """Data-dependent control flow, and no submodule to capture instead (partial capture)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight) if x.sum() > 0 else x


def masked_net() -> nn.Module:
    model = net()
    prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    return model


# ------------------------------------------------------------------ files for the load rows
def _saved(tmp: Path) -> Path:
    model = net()
    res = shrink.prune(model, X, shrink.PruneConfig(0.5))
    return shrink.save(res, tmp / "good.safetensors")


def _rewrite_meta(tmp: Path, edit: Callable[[dict[str, Any]], None], name: str) -> Path:
    """The good file with its metadata edited (tensors kept), written with safetensors."""
    good = _saved(tmp)
    (n,) = struct.unpack("<Q", good.read_bytes()[:8])
    meta = json.loads(good.read_bytes()[8 : 8 + n])["__metadata__"]
    edit(meta)
    tensors = safetensors.torch.load_file(good)
    out = tmp / name
    out.write_bytes(safetensors.torch.save(tensors, metadata=meta))
    return out


def _edit_plan(fn: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        plan = json.loads(meta["plan"])
        fn(plan)
        meta["plan"] = json.dumps(plan)
    return edit


def _first_run(plan: dict[str, Any]) -> list[int]:
    return next(m["runs"][0] for g in plan["groups"] for m in g["members"] if m["runs"])


def _truncated(tmp: Path) -> Path:
    good = _saved(tmp)
    bad = tmp / "truncated.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    return bad


def _garbage(tmp: Path) -> Path:
    bad = tmp / "garbage.safetensors"
    bad.write_bytes(bytes(range(256)) * 8)
    return bad


def _huge_header(tmp: Path) -> Path:
    bad = tmp / "huge.safetensors"
    bad.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    return bad


PWNED = "shrink_bad_input_pwned"


def _pickle_bomb(tmp: Path) -> Path:
    """A protocol-0 pickle that would create a file if anything unpickled it."""
    bad = tmp / "model.pt"
    target = tmp / PWNED
    bad.write_bytes(b"cos\nsystem\n(S'touch " + str(target).encode() + b"'\ntR.")
    return bad


def _plain_safetensors(tmp: Path) -> Path:
    out = tmp / "plain.safetensors"
    safetensors.torch.save_file(net().state_dict(), out)
    return out


def _tampered_tensor(tmp: Path) -> Path:
    good = _saved(tmp)
    (n,) = struct.unpack("<Q", good.read_bytes()[:8])
    meta = json.loads(good.read_bytes()[8 : 8 + n])["__metadata__"]
    tensors = safetensors.torch.load_file(good)
    tensors["7.weight"] = torch.zeros(4, 3)
    out = tmp / "tampered.safetensors"
    out.write_bytes(safetensors.torch.save(tensors, metadata=meta))
    return out


def _deep(meta: dict[str, Any]) -> None:
    meta["plan"] = '{"schema": 1, "groups": ' + "[" * 50_000 + "]" * 50_000 + "}"


def _load(make: Callable[[Path], Path]) -> Callable[[nn.Module, Path], Any]:
    return lambda model, tmp: shrink.load(model, make(tmp))


def _other_net() -> nn.Module:
    model = net()
    model[3] = nn.Conv2d(8, 8, 5, padding=2)
    return model


# --------------------------------------------------------------------------------- the table
class Row(NamedTuple):
    make: Callable[[], nn.Module]
    action: Callable[[nn.Module, Path], Any]
    error: type[Exception]
    fragment: str


ERRORS = {
    "ratio_above_one": Row(net, lambda m, _: shrink.compress(m, 1.5, X), shrink.ConfigError,
                           "out of range"),
    "ratio_negative": Row(net, lambda m, _: shrink.compress(m, -0.1, X), shrink.ConfigError,
                          "out of range"),
    "ratio_nan": Row(net, lambda m, _: shrink.compress(m, float("nan"), X), shrink.ConfigError,
                     "out of range"),
    "ratio_string": Row(net, lambda m, _: shrink.compress(m, "0.5", X), shrink.ConfigError,
                        "got str '0.5'"),
    "ratio_none": Row(net, lambda m, _: shrink.compress(m, None, X), shrink.ConfigError,
                      "say how much to remove"),
    "ratio_empties_a_layer": Row(net, lambda m, _: shrink.compress(m, example_inputs=X, amount=8),
                                 shrink.ConfigError, "would empty group"),
    "ratio_int": Row(net, lambda m, _: shrink.compress(m, 1, X), shrink.ConfigError,
                     "is an int: ratio is the fraction removed"),
    "untraceable_model": Row(Untraceable, lambda m, _: shrink.compress(m, 0.5, X),
                             shrink.CaptureError, "could not trace"),
    "not_a_module": Row(net, lambda m, _: shrink.compress("resnet18", 0.5, X),
                        shrink.CaptureError, "expected an nn.Module, got str"),
    "inputs_wrong_shape": Row(net, lambda m, _: shrink.compress(m, 0.5, torch.randn(2, 5, 16, 16)),
                              shrink.CaptureError, "(2, 5, 16, 16)"),
    "inputs_wrong_dtype": Row(net, lambda m, _: shrink.compress(m, 0.5, X.long()),
                              shrink.CaptureError, "int64'] in layer '0' (Conv2d)"),
    "inputs_wrong_type": Row(net, lambda m, _: shrink.compress(m, 0.5, "x.png"),
                             shrink.CaptureError, "must be a tensor or a tuple"),
    "model_with_prune_masks": Row(masked_net, lambda m, _: shrink.compress(m, 0.5, X),
                                  shrink.CaptureError, "shrink.from_masks"),
    "from_masks_bad_policy": Row(masked_net, lambda m, _: shrink.from_masks(m, X, policy="most"),
                                 shrink.ConfigError, "policy='most' is unknown"),
    "from_masks_wrong_shape": Row(masked_net,
                                  lambda m, _: shrink.from_masks(m, torch.randn(1, 4, 8, 8)),
                                  shrink.CaptureError, "(1, 4, 8, 8)"),
    "save_without_plan": Row(net, lambda m, tmp: shrink.save(m, tmp / "x.safetensors"),
                             shrink.ConfigError, "cannot tell which plan"),
    "load_truncated_file": Row(net, _load(_truncated), shrink.PlanError,
                               "not a valid safetensors file"),
    "load_garbage_file": Row(net, _load(_garbage), shrink.PlanError,
                             "not a valid safetensors file"),
    "load_huge_header_length": Row(net, _load(_huge_header), shrink.PlanError,
                                   "not a valid safetensors file"),
    "load_pickle_file": Row(net, _load(_pickle_bomb), shrink.PlanError,
                            "not a valid safetensors file"),
    "load_missing_file": Row(net, _load(lambda tmp: tmp / "nope.safetensors"), shrink.PlanError,
                             "cannot read"),
    "load_plain_safetensors": Row(net, _load(_plain_safetensors), shrink.PlanError,
                                  "not one written by shrink.save"),
    "load_future_format": Row(
        net, _load(lambda t: _rewrite_meta(t, lambda m: m.update(format_version="9"), "f.st")),
        shrink.PlanError, "format_version '9'"),
    "load_plan_not_json": Row(
        net, _load(lambda t: _rewrite_meta(t, lambda m: m.update(plan="{nope"), "j.st")),
        shrink.PlanError, "'plan' is not valid JSON"),
    "load_plan_deeply_nested": Row(
        net, _load(lambda t: _rewrite_meta(t, _deep, "d.st")),
        shrink.PlanError, "plan"),
    "load_plan_huge_run": Row(
        net, _load(lambda t: _rewrite_meta(
            t, _edit_plan(lambda p: _first_run(p).__setitem__(1, 10**15)), "h.st")),
        shrink.PlanError, "more than"),
    "load_plan_huge_size": Row(
        net, _load(lambda t: _rewrite_meta(
            t, _edit_plan(lambda p: p["groups"][0].update(size=10**18)), "s.st")),
        shrink.PlanError, "group size"),
    "load_plan_wrong_types": Row(
        net, _load(lambda t: _rewrite_meta(
            t, _edit_plan(lambda p: p["groups"][0].update(size="8")), "w.st")),
        shrink.PlanError, "group size '8'"),
    "load_plan_infinite_number": Row(
        net, _load(lambda t: _rewrite_meta(
            t, lambda m: m.update(plan=m["plan"].replace('"extent": 8', '"extent": 1e999')),
            "i.st")),
        shrink.PlanError, "malformed"),
    "load_plan_position_out_of_range": Row(
        net, _load(lambda t: _rewrite_meta(
            t, _edit_plan(lambda p: _first_run(p).__setitem__(0, 100)), "r.st")),
        shrink.PlanError, "outside the axis"),
    "load_plan_unknown_schema": Row(
        net, _load(lambda t: _rewrite_meta(
            t, _edit_plan(lambda p: p.update(schema=99)), "u.st")),
        shrink.PlanError, "schema 99"),
    "load_aliases_wrong_type": Row(
        net, _load(lambda t: _rewrite_meta(t, lambda m: m.update(aliases="[1, 2]"), "a.st")),
        shrink.PlanError, "'aliases' must map"),
    "load_tampered_tensor": Row(net, _load(_tampered_tensor), shrink.PlanError,
                                "tensor '7.weight'"),
    "load_into_other_model": Row(_other_net, _load(_saved), shrink.PlanError,
                                 "'3.weight' has shape (8, 8, 5, 5)"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_raises_a_clear_error_and_leaves_the_model_untouched(
    case: str, tmp_path: Path
) -> None:
    row = ERRORS[case]
    model = row.make()
    snap = state_snapshot(model)
    with pytest.raises(row.error) as err:
        row.action(model, tmp_path)
    assert row.fragment in str(err.value), str(err.value)
    assert_unchanged(model, snap)
    assert not (tmp_path / PWNED).exists()


# ------------------------------------------------------------- inputs shrink must tolerate
class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.c.weight = self.b.weight
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return self.head(y.mean(dim=(2, 3)))


class UnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.fft.fft2(self.a(x)).real  # no rule: pins the channels it touches
        return self.head(self.b(y).mean(dim=(2, 3)))


def _hooked() -> nn.Module:
    model = net()
    model[3].register_forward_hook(lambda m, i, o: o * 2)
    return model


def _check_compress(dtype: torch.dtype = torch.float32, train: bool = False,
                    device: str = "cpu") -> Callable[[nn.Module], None]:
    def check(model: nn.Module) -> None:
        x = X.to(device, dtype)
        small = shrink.compress(model, 0.5, x)
        assert small.training == train
        p = next(small.parameters())
        assert (p.dtype, p.device.type) == (dtype, device)
        assert sum(q.numel() for q in small.parameters()) < sum(
            q.numel() for q in model.parameters())
    return check


def _check_pinned(fragment: str) -> Callable[[nn.Module], None]:
    def check(model: nn.Module) -> None:
        res = shrink.prune(model, X, shrink.PruneConfig(0.5, verify=False))
        text = " ".join(d.message for d in res.analysis.diagnostics) + " ".join(
            str(g.pinned) for g in res.plan.groups)
        assert fragment in text
        assert_matches_masked_original(model, res.model, res.plan, (X,))
    return check


def _check_tied(model: nn.Module) -> None:
    """b and c share a weight: they shrink together and share the sliced weight again."""
    res = shrink.prune(model, X, shrink.PruneConfig(0.5, verify=False, round_to=1))
    assert res.model.c.weight is res.model.b.weight
    assert res.model.b.out_channels < 8
    assert_matches_masked_original(model, res.model, res.plan, (X,))


def _columns_masked(model: nn.Module) -> nn.Module:
    prune.ln_structured(model[3], "weight", amount=0.5, n=2, dim=1)
    return model


def _check_from_masks(dtype: torch.dtype) -> Callable[[nn.Module], None]:
    def check(model: nn.Module) -> None:
        res = shrink.from_masks(model, X.to(dtype))
        assert res.model[3].in_channels == 4
        assert next(res.model.parameters()).dtype == dtype
        with torch.no_grad():
            torch.testing.assert_close(res.model(X.to(dtype)), model(X.to(dtype)))
    return check


def _check_from_masks_cuda(model: nn.Module) -> None:
    x = X.cuda()
    res = shrink.from_masks(model, x)
    assert res.model[3].in_channels == 4
    assert next(res.model.parameters()).is_cuda
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), model(x))


CUDA = [pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOLERATED = {
    "fp16_model": (lambda: net().half(), _check_compress(torch.float16)),
    "bf16_model": (lambda: net().bfloat16(), _check_compress(torch.bfloat16)),
    "train_mode_model": (lambda: net().train(), _check_compress(train=True)),
    "model_with_hooks": (_hooked, _check_pinned("forward hooks")),
    "tied_weights": (lambda: randomize_(Tied()).eval(), _check_tied),
    "unknown_op": (lambda: randomize_(UnknownOp()).eval(), _check_pinned("fft2")),
    "cuda_model": (lambda: net().cuda(), _check_compress(device="cuda")),
    "cuda_masked_model": (lambda: _columns_masked(net().cuda()), _check_from_masks_cuda),
    "fp16_masked_model": (lambda: _columns_masked(net().half()), _check_from_masks(torch.float16)),
    "bf16_masked_model": (lambda: _columns_masked(net().bfloat16()),
                          _check_from_masks(torch.bfloat16)),
}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=CUDA) if "cuda" in c else c for c in sorted(TOLERATED)]
)
def test_tolerated_input_works_and_leaves_the_model_untouched(case: str) -> None:
    make, check = TOLERATED[case]
    model = make()
    snap = state_snapshot(model)
    check(model)
    assert_unchanged(model, snap)
