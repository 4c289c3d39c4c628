"""onnxruntime vs PyTorch on the same inputs.

Parity is measured the way :func:`shrink.verify` measures the masked oracle: over every output,
``max |ort - torch| / max |torch|`` (and the plain ``max |ort - torch|`` next to it). A dynamic
batch is also checked at batch 4, with distinct rows so that a batch-mixing bug cannot hide
behind identical samples.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shrink.capture import normalize_inputs
from shrink.errors import ExportError


@dataclass(frozen=True, slots=True)
class Parity:
    """onnxruntime vs PyTorch on the same inputs.

    Attributes:
        max_abs_error: ``max |ort - torch|`` over every output element.
        max_rel_error: ``max |ort - torch| / max |torch|``, the worst output.
        batches: the batch sizes that were compared.
    """

    max_abs_error: float
    max_rel_error: float
    batches: tuple[int, ...]


def check_parity(
    onnx_path: str | os.PathLike[str],
    model: nn.Module,
    example_inputs: Any,
    *,
    rtol: float = 1e-4,
    dynamic_batch: bool = True,
) -> Parity:
    """Run an ONNX file in onnxruntime (CPU) and compare it with ``model`` on the same inputs.

    Args:
        onnx_path: the ONNX file.
        model: the PyTorch model it was exported from (run in its current mode).
        example_inputs: a tensor or tuple of positional tensors.
        rtol: largest accepted ``max |ort - torch| / max |torch|``.
        dynamic_batch: also compare at batch 4 (inputs tiled along dim 0).

    Returns:
        The worst absolute and relative errors over every output and batch size.

    Raises:
        ExportError: onnxruntime cannot load or run the file, the outputs differ in number or
            shape, or the relative error exceeds ``rtol``.
    """
    import onnxruntime as ort

    inputs = normalize_inputs(example_inputs)
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {onnx_path}: {first_line(e)}") from e
    batches = [inputs]
    first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
    if dynamic_batch and first is not None and first.ndim > 0 and first.shape[0] != 4:
        batches.append(tuple(rebatch(t, 4) for t in inputs))
    worst_abs, worst_rel = 0.0, 0.0
    for batch_inputs in batches:
        tensors = [t for t in batch_inputs if isinstance(t, torch.Tensor)]
        feeds = {i.name: t.detach().cpu().numpy()
                 for i, t in zip(session.get_inputs(), tensors, strict=False)}
        try:
            got = session.run(None, feeds)
        except Exception as e:
            raise ExportError(f"onnxruntime failed to run {onnx_path} at batch "
                              f"{_batch(batch_inputs)}: {first_line(e)}") from e
        with torch.no_grad():
            expected = flatten_outputs(model(*batch_inputs))
        abs_err, rel_err = _errors(got, expected, onnx_path)
        worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
    parity = Parity(worst_abs, worst_rel, tuple(_batch(b) for b in batches))
    if not worst_rel <= rtol:
        raise ExportError(
            f"onnxruntime output of {onnx_path} differs from PyTorch: max relative error "
            f"{worst_rel:.3e} (max abs {worst_abs:.3e}) > rtol {rtol:.1e} at batches "
            f"{parity.batches}. Check for ops whose ONNX lowering differs numerically, or raise "
            "rtol if the model is numerically sensitive."
        )
    return parity


def _errors(got: Sequence[Any], expected: list[torch.Tensor], where: Any) -> tuple[float, float]:
    if len(got) != len(expected):
        raise ExportError(f"{where} returns {len(got)} outputs in onnxruntime, PyTorch returns "
                          f"{len(expected)}; the exported graph is wrong.")
    worst_abs, worst_rel = 0.0, 0.0
    for g, e in zip(got, expected, strict=False):
        a = torch.from_numpy(g).double()
        b = e.detach().cpu().double()
        if a.shape != b.shape:
            raise ExportError(f"{where}: onnxruntime output shape {tuple(a.shape)} != PyTorch "
                              f"{tuple(b.shape)}")
        if not b.numel():
            continue
        diff = float((a - b).abs().max())
        scale = float(b.abs().max())
        if diff != diff:
            return float("inf"), float("inf")
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale > 0 else diff)
    return worst_abs, worst_rel


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in value for t in flatten_outputs(value[k])]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flatten_outputs(v)]
    return []


def rebatch(t: Any, n: int) -> Any:
    if not isinstance(t, torch.Tensor) or t.ndim == 0:
        return t
    if not t.is_floating_point():
        return t[:1].expand(n, *t.shape[1:]).clone()
    reps = (n + t.shape[0] - 1) // t.shape[0]
    tiled = t.repeat(reps, *([1] * (t.ndim - 1)))[:n]
    # distinct rows so a batch-mixing bug cannot hide behind identical samples
    return tiled + 0.01 * torch.arange(n, dtype=t.dtype).view(n, *([1] * (t.ndim - 1)))


def _batch(inputs: tuple[Any, ...]) -> int:
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.ndim:
            return int(t.shape[0])
    return 1


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    head = lines[0] if lines else text
    return f"{type(e).__name__}: {head[:500]}"
