"""ONNX export, checked: ``torch.onnx.export`` (dynamo) → shrink's passes → ``onnx.checker`` →
onnxruntime parity.

Above ``rtol`` the export raises :class:`~shrink.errors.ExportError` and leaves no file behind:
the model is written to a temporary file in the target directory and renamed into place only
after every check passed. Parity: :mod:`shrink.deploy.parity`; graph passes:
:mod:`shrink.deploy.onnx_passes`.

BatchNorm folding: the dynamo exporter's onnxscript optimiser already folds eval-mode
``BatchNormalization`` into the preceding ``Conv`` (measured: a pruned resnet18 exports as 49
nodes with no BatchNormalization), and onnxruntime's own level-1 optimiser fuses Conv+BN anyway,
so shrink does not fold BN itself.

``onnx`` and ``onnxruntime`` are imported inside the functions that need them, so
``import shrink`` stays cheap.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink.capture import normalize_inputs
from shrink.capture_export import without_kv_cache
from shrink.deploy.onnx_passes import ort_optimize, rewrite_file
from shrink.deploy.parity import Parity, check_parity, first_line, flatten_outputs
from shrink.errors import ExportError
from shrink.progress import stage

log = logging.getLogger(__name__)

_INSTALL_HINT = "install the ONNX extra: pip install 'shrink[onnx]' (onnx, onnxruntime, onnxscript)"


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What :func:`export_onnx` did; path-like, so it stands for the file it wrote.

    Attributes:
        path: the ONNX file that was written.
        exporter: ``"dynamo"``, or ``"torchscript"`` when the dynamo exporter failed and the
            TorchScript-based path inside ``torch.onnx.export`` was used instead.
        fallback_reason: the dynamo exporter's error when it fell back, else ``None``.
        opset: the default-domain ONNX opset of the file (the exporter may raise the one asked
            for).
        file_bytes: size of the file.
        seconds: wall time of export and checks.
        parity: the onnxruntime check, or ``None`` when ``check=False``.
    """

    path: Path
    exporter: str
    fallback_reason: str | None
    opset: int
    file_bytes: int
    seconds: float
    parity: Parity | None

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int = 18,
    dynamo: bool = True,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-4,
    optimize: bool = False,
) -> ExportResult:
    """Export ``model`` to ONNX, validate it and check it in onnxruntime.

    Args:
        model: the model to export; exported in eval mode (its modes are restored afterwards).
        example_inputs: a tensor or tuple of positional tensors.
        path: the ``.onnx`` file to write; replaced atomically, never left half-written.
        opset: ONNX opset version.
        dynamo: use the dynamo exporter (``torch.export`` + onnxscript). When it fails, export
            falls back to the TorchScript-based path of ``torch.onnx.export`` and logs a warning.
        dynamic_batch: make dimension 0 of every input and output symbolic (``"batch"``).
        check: run ``onnx.checker`` and the onnxruntime parity check (at the example batch and,
            with a dynamic batch, at batch 4).
        rtol: largest accepted ``max |ort - torch| / max |torch|``.
        optimize: additionally save onnxruntime's offline-optimised graph (``ORT_ENABLE_EXTENDED``)
            instead of the exporter's graph; the parity check then runs on the optimised file.

    Returns:
        An :class:`ExportResult`: the path written, the exporter used, the parity measured and
        the file size. It is path-like (``os.fspath(result)`` is the file), so it can be passed
        wherever a path goes (``shrink.compare``, ``onnxruntime.InferenceSession(str(result))``).

    Raises:
        ExportError: the exporter failed (the message names the op), the checker rejected the
            graph, onnxruntime disagrees beyond ``rtol``, or the path is not writable.
        ImportError: onnx, onnxscript or onnxruntime is missing (with the pip command).

    Example:
        >>> shrink.export_onnx(pruned, (torch.randn(1, 3, 224, 224),), "pruned.onnx")
        ExportResult(path=PosixPath('pruned.onnx'), exporter='dynamo', ...)
    """
    _require_onnx()
    inputs = normalize_inputs(example_inputs)
    target = Path(path)
    _check_writable(target)
    start = time.perf_counter()
    with _eval_mode(model), _temp_path(target) as tmp:
        with stage("export"):
            with _tensor_attributes_kept(model), without_kv_cache(model):
                exporter, reason = _export(model, inputs, tmp, opset, dynamo, dynamic_batch)
            opset = rewrite_file(tmp)
            if optimize:
                ort_optimize(tmp)
        parity = None
        if check:
            with stage("check"):
                _check_model(tmp, target)
                with without_kv_cache(model):
                    parity = check_parity(tmp, model, inputs, rtol=rtol,
                                          dynamic_batch=dynamic_batch and _batch_is_dynamic(tmp))
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, target)
    result = ExportResult(
        path=target, exporter=exporter, fallback_reason=reason, opset=opset,
        file_bytes=target.stat().st_size, seconds=time.perf_counter() - start, parity=parity,
    )
    log.info("exported %s (%s, %.1f MB, %.1f s)%s", target, exporter, result.file_bytes / 1e6,
             result.seconds, f", parity rel {parity.max_rel_error:.1e}" if parity else "")
    return result


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _require_onnx() -> None:
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError as e:
            raise ImportError(f"shrink's ONNX export needs {name!r}: {_INSTALL_HINT}") from e


def _check_writable(target: Path) -> None:
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ExportError(f"cannot write ONNX to {target}: it is a directory. Pass a file path "
                          "such as pruned.onnx.")
    if not parent.is_dir():
        raise ExportError(f"cannot write ONNX to {target}: directory {parent} does not exist. "
                          "Create it first or choose another --out path.")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write ONNX to {target}: directory {parent} is not writable. "
                          "Choose a path you can write to.")


@contextlib.contextmanager
def _temp_path(target: Path) -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def _tensor_attributes_kept(model: nn.Module) -> Iterator[None]:
    """Every module's plain attributes (not parameters, buffers or submodules) as they were.

    A forward that caches values on its module (Ultralytics' Detect stores ``anchors``,
    ``strides`` and the input ``shape``) would keep the exporter's fake tensors and symbolic
    sizes, which break the parity run, later forwards and ``deepcopy``: the caller's model must
    come out of export as it went in."""
    skip = {"_parameters", "_buffers", "_modules", "training"}
    saved = {m: {k: v for k, v in vars(m).items() if k not in skip} for m in model.modules()}
    # a cache filled in place (timm's ``attention_bias_cache`` dict): its contents too
    contents = {id(v): (v, copy.copy(v)) for attrs in saved.values() for v in attrs.values()
                if type(v) in (dict, list)}
    try:
        yield
    finally:
        for m, before in saved.items():
            for k in [k for k in vars(m) if k not in skip and k not in before]:
                delattr(m, k)
            for k, v in before.items():
                if vars(m).get(k, _MISSING) is not v:
                    object.__setattr__(m, k, v)
        for container, items in contents.values():
            container.clear()
            if isinstance(container, dict):
                container.update(items)
            else:
                container.extend(items)


_MISSING = object()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _export(model: nn.Module, inputs: tuple[Any, ...], tmp: Path, opset: int, dynamo: bool,
            dynamic_batch: bool) -> tuple[str, str | None]:
    """Run the exporter; fall back to the TorchScript path once when dynamo fails."""
    reason, dynamo_error = None, None
    if dynamo:
        try:
            _export_dynamo(model, inputs, tmp, opset, dynamic_batch)
            return "dynamo", None
        except Exception as e:  # any exporter failure: try the other exporter, keep the reason
            reason, dynamo_error = first_line(e), e
            log.warning("dynamo ONNX export of %s failed (%s); falling back to the TorchScript-"
                        "based exporter", type(model).__name__, reason)
    try:
        _export_torchscript(model, inputs, tmp, opset, dynamic_batch)
    except Exception as e:
        if isinstance(dynamo_error, _BatchFixedError):
            # neither keeps the batch dynamic (a Hugging Face LLM: TorchScript has no lowering
            # for aten::diff): the dynamo export with the example's batch size is still right
            _export_dynamo(model, inputs, tmp, opset, dynamic_batch=False)
            log.warning("%s exported with a fixed batch size of %s (%s; the TorchScript path "
                        "failed: %s)", type(model).__name__, _batch_of(inputs), reason,
                        first_line(e))
            return "dynamo", f"{reason}; exported with a fixed batch ({first_line(e)})"
        ops = _op_names(e) or (_op_names(dynamo_error) if dynamo_error else "")
        raise ExportError(
            f"torch.onnx.export could not export {type(model).__name__}: {first_line(e)}"
            + (f" (the dynamo exporter failed first: {reason})" if reason else "")
            + (f". Ops involved: {ops}" if ops else "")
            + f". An op without an ONNX lowering at opset {opset} is the usual cause: try "
            "another opset, replace that op in the model, or register a custom translation "
            "(torch.onnx.export(custom_translation_table=...))."
        ) from e
    return "torchscript", reason


def _op_names(e: BaseException) -> str:
    """The aten/prims op names an exporter error mentions (its message and causes)."""
    texts, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        texts.append(str(cur))
        cur = cur.__cause__ or cur.__context__
    found = re.findall(r"\b(?:aten|prims|torchvision)(?:::|\.)[A-Za-z_][\w.]*", "\n".join(texts))
    return ", ".join(dict.fromkeys(found))


def _export_dynamo(model: nn.Module, inputs: tuple[Any, ...], tmp: Path, opset: int,
                   dynamic_batch: bool) -> None:
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = tuple({0: batch} if isinstance(t, torch.Tensor) else None for t in inputs)
    # a failed torch.export logs its traceback at ERROR level; shrink reports the reason itself
    with warnings.catch_warnings(), _quiet("torch.onnx", "torch.export", "onnxscript", "onnx_ir",
                                           "torch._guards", "torch._dynamo",
                                           "torch.fx.experimental.symbolic_shapes"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, inputs, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
            optimize=True, verbose=False, external_data=False,
        )
        if program is None:
            raise ExportError("torch.onnx.export(dynamo=True) returned no program")
        program.save(str(tmp), external_data=False)
    if dynamic_batch and not _batch_is_dynamic(tmp):
        # a forward that compares its input's shape with a cached one (Ultralytics' Detect)
        # makes torch.export specialise the batch; the TorchScript path keeps it dynamic
        raise _BatchFixedError("the dynamo exporter fixed the batch dimension (forward "
                               "compares the input's shape with a constant)")


class _BatchFixedError(ExportError):
    """The dynamo export is right, but only for the example inputs' batch size."""


def _batch_of(inputs: tuple[Any, ...]) -> int | None:
    t = next((t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return None if t is None else int(t.shape[0])


def _batch_is_dynamic(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    for i in inputs:
        dims = i.type.tensor_type.shape.dim
        if dims and not dims[0].dim_param:
            return False
    return True


def _export_torchscript(model: nn.Module, inputs: tuple[Any, ...], tmp: Path, opset: int,
                        dynamic_batch: bool) -> None:
    names = [f"input_{i}" for i in range(len(inputs))]
    with torch.no_grad():
        outputs = model(*inputs)
    out_names = [f"output_{i}" for i in range(len(flatten_outputs(outputs)))]
    axes = {n: {0: "batch"} for n in names + out_names} if dynamic_batch else None
    with warnings.catch_warnings(), _held_output() as held:
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, inputs, str(tmp), dynamo=False, opset_version=opset,
                              input_names=names, output_names=out_names, dynamic_axes=axes)
        except Exception:
            log.debug("TorchScript exporter output:\n%s", held.read()[-20000:])
            raise


class _Held:
    def __init__(self) -> None:
        self.file: Any = None

    def read(self) -> str:
        if self.file is None:
            return ""
        self.file.seek(0)
        return str(self.file.read().decode(errors="replace"))


@contextlib.contextmanager
def _held_output() -> Iterator[_Held]:
    """Holds back what C++ writes to the process's stdout and stderr (file descriptors 1 and
    2) meanwhile: when it fails, torch's TorchScript exporter prints the whole TorchScript
    graph ("Torch IR graph at exception", 13,000 lines for a small Llama) through its ONNX
    log, which it turns on by mistake (``setup_onnx_logging`` tests the function
    ``_jit_is_onnx_log_enabled`` instead of calling it). Where the descriptors cannot be
    redirected (a notebook's streams), output passes as before. Anything else printed during
    the export (a ``print`` in the model's forward) is held back too; on failure it all goes
    to this module's debug log."""
    held = _Held()
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, ValueError, AttributeError):
        yield held
        return
    with tempfile.TemporaryFile() as file:
        held.file = file
        try:
            os.dup2(file.fileno(), 1)
            os.dup2(file.fileno(), 2)
            yield held
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    saved = {n: logging.getLogger(n).level for n in loggers}
    for n in loggers:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _check_model(tmp: Path, target: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the exported graph for {target}: "
                          f"{first_line(e)}. This is an exporter bug; please report it.") from e


