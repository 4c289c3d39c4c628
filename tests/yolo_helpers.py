"""Ultralytics YOLO for tests and benchmarks: build offline, prune, put back, predict, export.

Ultralytics is AGPL-3.0: only tests, benchmarks and examples import it, never ``shrink/``.
Everything here runs offline: the models are built from their yaml with random weights (no
checkpoint download), settings go to a temporary directory, auto-install and telemetry are off,
and predict runs with ``save=False`` so no font is fetched for plotting.

What Ultralytics needs from a module put back into ``YOLO(...).model`` (read from
ultralytics 8.4.190):

* the ``BaseModel`` subclass itself (``DetectionModel``, ``SegmentationModel``, ``PoseModel``,
  ``ClassificationModel``): predict and export call ``model.fuse()`` (folds every ``Conv``'s
  BatchNorm through ``fuse_conv_and_bn``, which reads ``conv.in_channels``/``out_channels``/
  ``groups``: rebuilt layers must carry consistent attributes) and run ``_predict_once``, which
  walks ``model.model`` reading each layer's ``.f`` (from) and ``.i`` (index) and ``model.save``;
* ``model.stride`` (a tensor), ``model.names`` (dict), ``model.yaml`` (dict; ``channels``,
  ``yaml_file``), ``model.args`` (dict with ``imgsz``; export reads it), ``model.task``,
  ``model.kpt_shape`` (pose), ``model.end2end`` (absent on v8/11 heads);
* the head's channel constants, which must NOT change: ``Detect.nc``, ``reg_max``, ``no``,
  ``nl``, ``stride``; ``Segment.nm``/``npr``; ``Pose.kpt_shape``/``nk``; ``DFL.c1``;
* ``C2f.c`` / ``C3k2.c`` / ``C2PSA.c``: the hidden half-width. ``C2f.forward`` uses
  ``chunk(2, 1)`` but the exporter swaps in ``C2f.forward_split``, which uses
  ``split((self.c, self.c), 1)``; ``C2PSA.forward`` always splits by ``self.c``. A pruner that
  changes the hidden width must set ``c`` to the kept half-width (:func:`sync_hidden_widths_`
  does it after the fact for pruners that do not).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

V8 = ("yolov8n", "yolov8n-seg", "yolov8n-pose", "yolov8n-cls")
V11 = ("yolo11n", "yolo11n-seg", "yolo11n-pose", "yolo11n-cls")
ALL = V8 + V11


def offline() -> None:
    """Environment that keeps Ultralytics off the network and out of ``~/.config``.

    Must run before the first ``import ultralytics`` (it reads the variables at import).
    Existing values win, so a caller can point ``YOLO_CONFIG_DIR`` elsewhere.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")  # is_online() -> False: no checks, no downloads
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")  # never pip-install a missing requirement
    os.environ.setdefault("YOLO_VERBOSE", "0")
    if "YOLO_CONFIG_DIR" not in os.environ:  # settings.json is written at import
        settings = tempfile.mkdtemp(prefix="shrink-yolo-settings-")
        atexit.register(shutil.rmtree, settings, ignore_errors=True)
        os.environ["YOLO_CONFIG_DIR"] = settings


def build(name: str, *, imgsz: int = 320, calibrate: bool = True, seed: int = 0) -> Any:
    """``ultralytics.YOLO`` built from ``<name>.yaml`` (random weights, nothing downloaded).

    With ``calibrate``, BatchNorm statistics come from a few train-mode passes on random images,
    so activations are neither exploding nor denormal (both distort timings and comparisons).
    The DFL's fixed ``arange`` weights are left alone: never re-draw every parameter of a YOLO.
    """
    offline()
    from ultralytics import YOLO

    torch.manual_seed(seed)
    yolo = YOLO(f"{name}.yaml", task=None)
    model = yolo.model
    if calibrate:
        from shrink.testing import calibrate_bn_

        gen = torch.Generator().manual_seed(seed)
        calibrate_bn_(model, lambda: (torch.rand(2, 3, imgsz, imgsz, generator=gen),), 3)
    model.eval()
    return yolo


def example_inputs(imgsz: int = 320, seed: int = 0) -> tuple[torch.Tensor]:
    """One RGB image in [0, 1], as Ultralytics' preprocessing feeds the model."""
    return (torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(seed)),)


def head_of(model: nn.Module) -> nn.Module:
    """The last layer (``Detect``/``Segment``/``Pose``/``Classify``)."""
    return model.model[-1]  # type: ignore[index,return-value]


@contextlib.contextmanager
def deploy_outputs(model: nn.Module) -> Iterator[nn.Module]:
    """The head's export mode, as Ultralytics' exporter sets it, for the duration.

    In eval mode ``Detect`` returns ``(y, {"boxes", "scores", "feats"})`` where ``feats`` are the
    three neck outputs: as model outputs they would be pinned by any pruner that keeps output
    shapes. With ``export = True`` it returns ``y`` only (``Segment``: ``(y, proto)``;
    ``Classify``: the softmax only), which is what ONNX export and deployment see.
    """
    head = head_of(model)
    saved = head.export
    head.export = True
    try:
        yield model
    finally:
        head.export = saved


def ignored_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose outputs are the task's fixed channels (for pruners that take a list).

    The last conv of every head branch (box ``4 * reg_max``, class ``nc``, mask ``nm``,
    keypoint ``nk``), the DFL, the mask prototypes' last conv, the classifier's Linear.
    """
    head = head_of(model)
    out: list[nn.Module] = []
    for attr in ("cv2", "cv3", "cv4"):
        for branch in getattr(head, attr, None) or ():
            out.append(branch[-1])
    for attr in ("dfl", "linear"):
        if isinstance(getattr(head, attr, None), nn.Module):
            out.append(getattr(head, attr))
    proto = getattr(head, "proto", None)
    if proto is not None:
        out.append(proto.cv3)
    return out


def sync_hidden_widths_(model: nn.Module) -> list[str]:
    """Set every ``C2f``/``C3k2``/``C2PSA`` ``.c`` to half of its ``cv1``'s output channels.

    For pruners that do not follow the attribute (the exporter's ``forward_split`` and
    ``C2PSA.forward`` read it). Returns the names of the blocks changed.
    """
    offline()
    from ultralytics.nn.modules.block import C2PSA, C2f

    changed = []
    for name, mod in model.named_modules():
        if isinstance(mod, (C2f, C2PSA)):
            half, odd = divmod(mod.cv1.conv.out_channels, 2)
            if odd:
                raise ValueError(f"{name}: cv1 has an odd number of output channels; the two "
                                 "halves of the split no longer match")
            if mod.c != half:
                mod.c = half
                changed.append(name)
    return changed


def put_back(yolo: Any, module: nn.Module) -> Any:
    """Make ``module`` ``yolo.model``; the cached predictor (a copy of the old one) goes."""
    yolo.model = module
    yolo.predictor = None
    return yolo


def predict(yolo: Any, imgsz: int = 320, seed: int = 0, conf: float = 0.0) -> Any:
    """``yolo.predict`` on a random uint8 HWC image on CPU (no files written, no plotting).

    ``conf=0``: random weights score every box low, and with the default 0.25 nothing would
    reach the mask/keypoint post-processing; at 0 the top ``max_det`` boxes all do.
    """
    img = np.random.default_rng(seed).integers(0, 256, (imgsz, imgsz, 3), dtype=np.uint8)
    (result,) = yolo.predict(img, imgsz=imgsz, device="cpu", save=False, verbose=False,
                             conf=conf)
    return result


def export_onnx(yolo: Any, directory: str | os.PathLike[str], imgsz: int = 320,
                stem: str = "model") -> Path:
    """Ultralytics' own ONNX export (TorchScript-based exporter, no onnxslim) into ``directory``.

    The exporter names the file after ``model.pt_path``/``yaml_file`` (relative to the working
    directory for a yaml): ``pt_path`` points it into ``directory`` instead.
    """
    model = yolo.model
    saved = getattr(model, "pt_path", None)
    model.pt_path = str(Path(directory) / f"{stem}.pt")
    try:
        out = yolo.export(format="onnx", imgsz=imgsz, simplify=False, device="cpu",
                          dynamic=False, verbose=False)
    finally:
        if saved is None:
            del model.pt_path
        else:
            model.pt_path = saved
    return Path(out)


def ort_outputs(path: str | os.PathLike[str], x: torch.Tensor) -> list[np.ndarray]:
    """Outputs of the ONNX file in onnxruntime (one thread) on ``x``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})  # type: ignore[no-any-return]


def deploy_forward(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The fused model's deploy outputs (what Ultralytics' ONNX file computes), as a list."""
    import copy

    fused = copy.deepcopy(model).eval()
    fused.fuse(verbose=False)
    with deploy_outputs(fused), torch.no_grad():
        out = fused(x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check_in_ultralytics(yolo: Any, module: nn.Module, directory: str | os.PathLike[str],
                         imgsz: int = 320) -> dict[str, Any]:
    """Put ``module`` back into ``yolo``, predict, export through Ultralytics, run the ONNX file.

    Returns ``{"result": Results, "onnx": Path, "rel_err": float}``: ``rel_err`` is the largest
    ``max |ort - torch| / max |torch|`` over the outputs, onnxruntime against the fused PyTorch
    module on one image.
    """
    put_back(yolo, module)
    result = predict(yolo, imgsz)
    path = export_onnx(yolo, directory, imgsz)
    (x,) = example_inputs(imgsz, seed=1)
    want = deploy_forward(module, x)
    got = ort_outputs(path, x)
    if len(got) != len(want):
        raise AssertionError(f"ONNX has {len(got)} outputs, the module {len(want)}")
    err = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != tuple(w.shape):
            raise AssertionError(f"ONNX output shape {g.shape}, the module's {tuple(w.shape)}")
        ref = w.double().numpy()
        err = max(err, float(np.abs(g - ref).max()) / max(float(np.abs(ref).max()), 1e-12))
    return {"result": result, "onnx": path, "rel_err": err}


def _slice_conv_(conv: nn.Conv2d, out: list[int] | None = None,
                 inp: list[int] | None = None) -> nn.Conv2d:
    """A new Conv2d with the kept output/input channels of ``conv`` (groups == 1 only)."""
    if conv.groups != 1:
        raise ValueError("grouped convs are not sliced by hand here")
    w = conv.weight.detach()
    w = w[out] if out is not None else w
    w = w[:, inp] if inp is not None else w
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, 1, conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach()[out] if out is not None else conv.bias.detach())
    return new


def _slice_bn_(bn: nn.BatchNorm2d, keep: list[int]) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), bn.eps, bn.momentum)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).copy_(getattr(bn, name).detach()[keep])
    return new.train(bn.training)


def _shrink_out_(conv_block: nn.Module, keep: list[int]) -> None:
    """An ultralytics ``Conv`` (conv + bn + act) with only ``keep`` output channels."""
    conv_block.conv = _slice_conv_(conv_block.conv, out=keep)
    conv_block.bn = _slice_bn_(conv_block.bn, keep)


def _shrink_in_(conv_block: nn.Module, keep: list[int]) -> None:
    conv_block.conv = _slice_conv_(conv_block.conv, inp=keep)


def prune_c2f_by_hand_(model: nn.Module, keep_fraction: float = 0.5,
                       sync: bool = True) -> list[str]:
    """Shrink the hidden width ``c`` of every ``C2f``/``C3k2`` in place, by hand.

    A reference pruning (not shrink's) for checking the Ultralytics glue with changed widths:
    of each block's ``c`` channels the first ``round(c * keep_fraction)`` stay, in both halves
    of ``cv1``, in every inner block's input and output (``Bottleneck`` or ``C3k``, residual
    adds included), and in every piece of ``cv2``'s concatenated input. With ``sync``, ``c`` is
    set to the kept width (without it, ``forward_split`` and Ultralytics' exporter break).
    Returns the names of the blocks pruned.
    """
    offline()
    from ultralytics.nn.modules.block import Bottleneck, C2f, C3k

    done = []
    for name, blk in model.named_modules():
        if not isinstance(blk, C2f) or not all(isinstance(m, (Bottleneck, C3k)) for m in blk.m):
            continue
        c = blk.c
        k = max(1, round(c * keep_fraction))
        keep = list(range(k))
        _shrink_out_(blk.cv1, keep + [c + i for i in keep])
        for inner in blk.m:
            if isinstance(inner, Bottleneck):
                _shrink_in_(inner.cv1, keep)
                _shrink_out_(inner.cv2, keep)
            else:  # C3k: cv1 and cv2 read the input, cv3 writes the output
                _shrink_in_(inner.cv1, keep)
                _shrink_in_(inner.cv2, keep)
                _shrink_out_(inner.cv3, keep)
        pieces = 2 + len(blk.m)
        _shrink_in_(blk.cv2, [j * c + i for j in range(pieces) for i in keep])
        if sync:
            blk.c = k
        done.append(name)
    return done
