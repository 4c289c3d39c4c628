"""Timing on a runtime: one layer in a graph of its own, and whole models end to end.

A :class:`Bench` is what the allocation needs from a runtime: its channel ``block``, the
environment ``key`` its numbers are valid for (the cache file's name), the best-of latency of
one layer (:meth:`Bench.layer_ms`) and the interleaved best-of latency of whole models
(:meth:`Bench.models_ms`). Tests pass synthetic benches; :func:`bench_for` builds the real one.

Protocol. One layer: a graph with that single node (built with ``onnx.helper``, no exporter) or
a fresh PyTorch layer, random weights and input, two warm-up calls, then single calls timed
until at least 5 calls and 20 ms, best of them. Whole models: the timing code of
:func:`shrink.compare` (:func:`shrink.deploy.timing.interleave`: dense and pruned alternate,
best-of), onnxruntime with flush-to-zero so that denormal activations of random weights cannot
distort it. With one CPU thread both use the thread clock (the calling thread's CPU time: other
processes on a shared machine do not count); otherwise the wall clock.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from shrink.deploy.timing import cpu_name, interleave, make_ort_runner, make_torch_runner, rebatch
from shrink.errors import ConfigError, ExportError
from shrink.latency.options import Runtime
from shrink.rules import LayerOp

log = logging.getLogger(__name__)

MIN_CALLS = 5
MIN_SECONDS = 0.02


class Bench(Protocol):
    """What the latency allocation needs from a runtime."""

    block: int

    def key(self) -> dict[str, str]:
        """The environment the numbers hold for: runtime, version, device, threads."""
        ...

    def layer_ms(self, op: LayerOp, batch: int, cold: bool = False) -> float:
        """Best-of milliseconds of one call of ``op`` on a batch of ``batch``; ``cold``: with
        its weights out of the CPU caches (see :func:`best_of`)."""
        ...

    def models_ms(self, models: Mapping[str, nn.Module], inputs: tuple[Any, ...],
                  seconds: float) -> dict[str, float]:
        """Best-of milliseconds of each model on ``inputs``, timed in interleaved rounds."""
        ...


def cpu_block() -> int:
    """The NCHWc channel block of this x86 CPU: 16 with AVX-512, else 8."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return 16 if "avx512f" in line.split() else 8
    except OSError:
        pass
    return 16


class RuntimeBench:
    """A :class:`Bench` on onnxruntime or PyTorch, CPU or CUDA.

    Use as a context manager: ONNX files of whole models live in a temporary directory until
    it closes.

    Raises:
        ConfigError: the runtime is not available here (no CUDA, no onnxruntime provider).
    """

    def __init__(self, runtime: Runtime, threads: int = 1) -> None:
        self.runtime = runtime
        self.threads = threads
        self.clock = "thread" if threads == 1 and not runtime.cuda else "wall"
        self.block = 8 if runtime.cuda else cpu_block()
        self._dir = tempfile.TemporaryDirectory(prefix="shrink-latency-")
        self._runners: dict[int, tuple[nn.Module, Callable[[], None]]] = {}
        self._flush: np.ndarray | None = None
        self._check_available()

    def __enter__(self) -> RuntimeBench:
        return self

    def __exit__(self, *exc: object) -> None:
        self._runners.clear()
        self._dir.cleanup()

    def _check_available(self) -> None:
        if self.runtime in (Runtime.ORT_CPU, Runtime.ORT_CUDA):
            try:
                import onnxruntime as ort
            except ImportError as e:
                raise ConfigError(f"runtime={self.runtime.value!r} needs onnxruntime: pip "
                                  "install 'shrink[onnx]'") from e
            if self.runtime.cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError(
                    f"runtime='onnxruntime-cuda' needs onnxruntime's CUDAExecutionProvider; this "
                    f"onnxruntime has {ort.get_available_providers()}. Install onnxruntime-gpu "
                    "or use runtime='onnxruntime-cpu'.")
        elif self.runtime.cuda and not torch.cuda.is_available():
            raise ConfigError("runtime='torch-cuda' needs CUDA, and torch.cuda.is_available() "
                              "is False here; use runtime='torch-cpu'.")

    def key(self) -> dict[str, str]:
        if self.runtime in (Runtime.ORT_CPU, Runtime.ORT_CUDA):
            import onnxruntime as ort

            version = f"onnxruntime {ort.__version__}"
        else:
            version = f"torch {torch.__version__}"
        device = torch.cuda.get_device_name() if self.runtime.cuda else cpu_name()
        return {"runtime": self.runtime.value, "version": version, "device": device,
                "threads": str(self.threads)}

    def layer_ms(self, op: LayerOp, batch: int, cold: bool = False) -> float:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(input_shape(op, batch), generator=gen)
        if self.runtime in (Runtime.ORT_CPU, Runtime.ORT_CUDA):
            run = self._ort_runner(onnx_layer(op, batch), x)
        else:
            run = make_torch_runner(torch_layer(op), (x,), self.threads, cuda=self.runtime.cuda)
        if not cold or self.runtime.cuda:
            return best_of(run, self.clock)
        if self._flush is None:
            self._flush = np.zeros(llc_bytes() // 8)
        flush = self._flush

        def evict() -> None:  # the weights leave the caches; the input comes back in
            np.add(flush, 1.0, out=flush)
            float(x.sum())

        return best_of(run, self.clock, before=evict)

    def _ort_runner(self, model: bytes, x: torch.Tensor) -> Callable[[], None]:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.runtime.cuda \
            else ["CPUExecutionProvider"]
        session = ort.InferenceSession(model, opts, providers=providers)
        feed = {"X": x.numpy()}

        def run() -> None:
            session.run(None, feed)

        return run

    def models_ms(self, models: Mapping[str, nn.Module], inputs: tuple[Any, ...],
                  seconds: float) -> dict[str, float]:
        runners = {label: self._model_runner(m, inputs) for label, m in models.items()}
        times = interleave(runners, seconds, MIN_CALLS, self.clock)
        return {label: min(ts) for label, ts in times.items()}

    def _model_runner(self, model: nn.Module, inputs: tuple[Any, ...]) -> Callable[[], None]:
        """One runner per model object for the bench's lifetime (the dense model is exported
        once, however many plans it is compared with)."""
        held = self._runners.get(id(model))
        if held is not None and held[0] is model:
            return held[1]
        if self.runtime in (Runtime.ORT_CPU, Runtime.ORT_CUDA):
            path = self._export(model, inputs)
            run = make_ort_runner(path, inputs, self.threads, cuda=self.runtime.cuda,
                                  flush_denormals=True)
        else:
            run = _flushing(make_torch_runner(model, inputs, self.threads,
                                              cuda=self.runtime.cuda))
        run()
        self._runners[id(model)] = (model, run)
        return run

    def _export(self, model: nn.Module, inputs: tuple[Any, ...]) -> Path:
        from shrink.deploy.export import export_onnx

        path = Path(self._dir.name) / f"model-{len(self._runners)}.onnx"
        one = tuple(rebatch(t, 1) for t in inputs)
        try:  # the TorchScript-based exporter is several times faster on CNNs
            return export_onnx(model, one, path, dynamo=False, check=False).path
        except ExportError as e:
            log.info("latency: TorchScript export failed (%s); using the dynamo exporter", e)
            return export_onnx(model, one, path, dynamo=True, check=False).path


def _flushing(run: Callable[[], None]) -> Callable[[], None]:
    def call() -> None:
        saved = torch.set_flush_denormal(True)
        try:
            run()
        finally:
            if not saved:
                torch.set_flush_denormal(False)

    return call


def best_of(run: Callable[[], None], clock: str = "wall",
            before: Callable[[], None] | None = None) -> float:
    """Best-of milliseconds of single calls: two warm-up calls, then at least
    :data:`MIN_CALLS` calls and :data:`MIN_SECONDS` of them. ``before`` runs ahead of every
    timed call, untimed (and then exactly :data:`MIN_CALLS` calls are timed).

    A layer's weights stay in the CPU's caches when it runs over and over, but in a model whose
    weights exceed the last-level cache they come from memory every time (measured: the
    layers of resnet18 at 64x64 sum to 2.8 ms warm and 5.4 ms cold, the model takes 5.5 ms;
    resnet50 at 224x224: 78 ms warm, 83 ms cold, the model 76 ms). The allocation then passes
    a ``before`` that streams a buffer the size of the last-level cache and reads the input back.
    """
    now = time.perf_counter_ns if clock == "wall" else time.thread_time_ns
    run()
    run()
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < MIN_CALLS or (before is None and time.perf_counter() - start < MIN_SECONDS
                                and calls < 100):
        if before is not None:
            before()
        t0 = now()
        run()
        best = min(best, (now() - t0) / 1e6)
        calls += 1
    return best


def llc_bytes() -> int:
    """Size of the CPU's last-level cache (sysfs), 32 MiB when unknown."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (d / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or 32 << 20


def input_shape(op: LayerOp, batch: int) -> tuple[int, ...]:
    """The input of ``op``: ``(N, C, *spatial)`` for a conv, ``(N, *tokens, C)`` for a linear."""
    if op.kind == "conv":
        return (batch, op.c_in, *op.spatial)
    return (batch, *op.spatial, op.c_in)


def onnx_layer(op: LayerOp, batch: int) -> bytes:
    """A serialized ONNX model of ``op`` alone: input ``X``, output ``Y``, random weights.

    Raises:
        ConfigError: ``op.kind`` is neither ``"conv"`` nor ``"linear"``.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, ...]) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np.float32),
                                       name)

    inits = []
    if op.kind == "conv":
        inits.append(init("W", (op.c_out, op.c_in // op.groups, *op.kernel)))
        names = ["X", "W"]
        if op.bias:
            inits.append(init("B", (op.c_out,)))
            names.append("B")
        nodes = [helper.make_node("Conv", names, ["Y"], kernel_shape=list(op.kernel),
                                  strides=list(op.stride), pads=list(op.pads),
                                  dilations=list(op.dilation), group=op.groups)]
    elif op.kind == "linear":
        inits.append(init("W", (op.c_in, op.c_out)))
        nodes = [helper.make_node("MatMul", ["X", "W"], ["XW" if op.bias else "Y"])]
        if op.bias:
            inits.append(init("B", (op.c_out,)))
            nodes.append(helper.make_node("Add", ["XW", "B"], ["Y"]))
    else:
        raise ConfigError(f"the latency model cannot build an ONNX graph for a {op.kind!r} op")
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(input_shape(op, batch)))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return bytes(model.SerializeToString())


def torch_layer(op: LayerOp) -> nn.Module:
    """A fresh PyTorch layer computing ``op`` (eval mode, random weights).

    Raises:
        ConfigError: ``op.kind`` is neither ``"conv"`` nor ``"linear"``.
    """
    if op.kind == "linear":
        return nn.Linear(op.c_in, op.c_out, bias=op.bias).eval()
    if op.kind != "conv":
        raise ConfigError(f"the latency model cannot build a PyTorch layer for a {op.kind!r} op")
    conv: Any = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(op.kernel)]
    layer: nn.Module = conv(op.c_in, op.c_out, op.kernel, stride=op.stride,
                            padding=op.pads[:len(op.kernel)], dilation=op.dilation,
                            groups=op.groups, bias=op.bias)
    return layer.eval()


def bench_for(runtime: Runtime, threads: int) -> RuntimeBench:
    """The real bench for ``runtime`` (see :class:`RuntimeBench`)."""
    return RuntimeBench(runtime, threads)
