"""export_onnx's failure modes: clear errors, fallback reported, no file left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import shrink
import shrink.deploy.onnx_passes
from shrink.errors import ExportError
from tests.helpers import ort_relative_error

pytestmark = pytest.mark.onnx


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class CallCounter(nn.Module):
    """Returns x * (number of calls so far): the export bakes in one count, torch moves on."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * float(self.calls)


X = (torch.randn(2, 3, 8, 8),)


def test_export_writes_a_checked_file_with_dynamic_batch(tmp_path: Path) -> None:
    out = shrink.export_onnx(Small().eval(), X, tmp_path / "m.onnx")
    assert out.path == tmp_path / "m.onnx"
    assert Path(out) == out.path  # path-like: it stands for the file it wrote
    assert out.path.stat().st_size == out.file_bytes > 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_export_restores_training_mode(tmp_path: Path) -> None:
    model = Small().train()
    shrink.export_onnx(model, X, tmp_path / "m.onnx")
    assert all(m.training for m in model.modules())


def test_parity_failure_raises_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="differs from PyTorch: max relative error"):
        shrink.export_onnx(CallCounter(), X, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_no_check_skips_parity(tmp_path: Path) -> None:
    res = shrink.export_onnx(CallCounter(), X, tmp_path / "m.onnx", check=False)
    assert res.parity is None
    assert res.path.is_file()


def test_existing_file_survives_a_failed_export(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(ExportError):
        shrink.export_onnx(CallCounter(), X, out)
    assert out.read_bytes() == b"previous"


@pytest.mark.parametrize("where", ["missing-dir", "is-dir"])
def test_unwritable_target_raises_before_exporting(where: str, tmp_path: Path) -> None:
    out = tmp_path / "nope" / "m.onnx" if where == "missing-dir" else tmp_path
    with pytest.raises(ExportError, match="cannot write ONNX"):
        shrink.export_onnx(Small().eval(), X, out)


def test_dynamo_failure_falls_back_and_says_so(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("aten.fancy_op has no ONNX lowering")

    monkeypatch.setattr(shrink.deploy.export, "_export_dynamo", fail)
    small = Small().eval()
    res = shrink.export_onnx(small, X, tmp_path / "m.onnx")
    assert res.exporter == "torchscript"
    assert res.fallback_reason is not None
    assert "aten.fancy_op" in res.fallback_reason
    assert res.parity is not None  # export checked the fallback's file ...
    assert ort_relative_error(res.path, small, X) < 1e-4  # ... and a fresh session agrees


def test_both_exporters_failing_names_the_error(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("aten.fancy_op has no ONNX lowering")

    monkeypatch.setattr(shrink.deploy.export, "_export_dynamo", fail)
    monkeypatch.setattr(shrink.deploy.export, "_export_torchscript", fail)
    with pytest.raises(ExportError, match=r"fancy_op.*dynamo exporter failed first.*Ops "
                       r"involved: aten.fancy_op"):
        shrink.export_onnx(Small().eval(), X, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_optimize_saves_an_ort_optimized_graph(tmp_path: Path) -> None:
    import onnx

    out = shrink.export_onnx(Small().eval(), X, tmp_path / "m.onnx", optimize=True)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "BatchNormalization" not in ops


def test_missing_onnxruntime_gives_actionable_import_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'shrink\[onnx\]'"):
        shrink.export_onnx(Small().eval(), X, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_import_shrink_does_not_import_onnx_or_torchvision() -> None:
    code = ("import sys, shrink; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript', 'torchvision', "
            "'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _reduce_mean_model(rank: int, axes: list[int], keepdims: int) -> object:
    import onnx
    from onnx import TensorProto, helper

    shape = [2, 3, 5, 4][:rank]
    out_shape = [d if i not in [a % rank for a in axes] else 1 for i, d in enumerate(shape)]
    if not keepdims:
        out_shape = [d for i, d in enumerate(shape) if i not in [a % rank for a in axes]]
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), onnx


@pytest.mark.parametrize(("axes", "keepdims"), [([2, 3], 1), ([-1, -2], 1), ([2, 3], 0)])
def test_global_pool_pass_rewrites_spatial_mean_to_the_same_values(
        axes: list[int], keepdims: int) -> None:
    import numpy as np
    import onnxruntime as ort

    proto, onnx = _reduce_mean_model(4, axes, keepdims)
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype(np.float32)
    before = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    assert shrink.deploy.onnx_passes.global_pool_pass(proto) == 1
    onnx.checker.check_model(proto, full_check=True)
    assert "GlobalAveragePool" in [n.op_type for n in proto.graph.node]
    assert list(proto.graph.initializer) == []  # the axes constant went with its node
    after = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("rank", "axes"), [(3, [1, 2]), (4, [1, 2]), (4, [3])])
def test_global_pool_pass_leaves_other_reductions_alone(rank: int, axes: list[int]) -> None:
    proto, _ = _reduce_mean_model(rank, axes, 1)
    assert shrink.deploy.onnx_passes.global_pool_pass(proto) == 0
    assert [n.op_type for n in proto.graph.node] == ["ReduceMean"]


class WithDiff(nn.Module):
    """``aten::diff`` has no TorchScript ONNX symbolic (transformers' mask code uses it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.diff(x, dim=1)


def test_a_failing_torchscript_export_prints_nothing(tmp_path: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    """torch's TorchScript exporter prints the whole graph ("Torch IR graph at exception") to
    the process's stdout when it fails; shrink holds that back and raises its own error."""
    x = torch.randn(2, 5, 3)
    with pytest.raises(ExportError, match="aten::diff"):
        shrink.export_onnx(WithDiff().eval(), (x,), tmp_path / "m.onnx", dynamo=False)
    out, err = capfd.readouterr()
    assert "Torch IR graph" not in out + err
    assert "aten::diff" not in out + err
