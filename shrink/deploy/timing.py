"""Timing primitives: runners for onnxruntime and PyTorch, interleaved best-of rounds, memory.

:func:`interleave` times single calls in alternating-order rounds (A B C, then C B A, ...) so
that machine drift hits every variant alike; callers report the minimum. On one CPU thread the
thread clock (``time.thread_time_ns``) is steadier than the wall clock on a shared machine.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink.errors import ConfigError

Runner = Callable[[], None]


def make_ort_runner(path: Path, feed: tuple[Any, ...], threads: int, *,
                    cuda: bool = False, flush_denormals: bool = False) -> Runner:
    """An onnxruntime session on ``path`` (all graph optimisations, sequential execution)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if flush_denormals:
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else [
        "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), opts, providers=providers)
    tensors = [t for t in feed if isinstance(t, torch.Tensor)]
    feeds = {i.name: t.detach().cpu().numpy()
             for i, t in zip(session.get_inputs(), tensors, strict=False)}

    def run() -> None:
        session.run(None, feeds)

    return run


def make_torch_runner(model: nn.Module, feed: tuple[Any, ...], threads: int, *,
                      cuda: bool = False) -> Runner:
    """Eager PyTorch under ``torch.inference_mode`` (eval mode; on CUDA, a copy of the model)."""
    model = model.eval()
    if cuda:
        import copy

        model = copy.deepcopy(model).cuda()
        feed = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in feed)

    def run() -> None:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                model(*feed)
            if cuda:
                torch.cuda.synchronize()
        finally:
            torch.set_num_threads(saved)

    return run


def onnx_inputs(path: Path, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random float inputs shaped like the ONNX file's inputs, symbolic dims set to ``batch``.

    Raises:
        ConfigError: an input has a symbolic non-batch dimension or is not float.
    """
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(seed)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = []
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) else batch if j == 0 else None
                 for j, d in enumerate(inp.shape)]
        if None in shape or "float" not in inp.type:
            raise ConfigError(
                f"cannot make a random input {inp.name!r} ({inp.type}, shape {inp.shape}) for "
                f"{path}: only float inputs with a symbolic batch dimension are supported. Pass "
                "example inputs (CLI: --input-shape).")
        out.append(torch.randn([int(d) for d in shape if d is not None], generator=gen))
    return tuple(out)


def interleave(runners: Mapping[str, Runner], seconds: float, min_calls: int,
                clock: str = "wall") -> dict[str, list[float]]:
    """Time single calls in alternating-order rounds until ``seconds`` and ``min_calls`` are met."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    per_round = {}
    for label, run in runners.items():  # calibrate calls per round to ~0.2 s per variant
        t0 = time.perf_counter()
        run()
        per_round[label] = max(1, min(50, int(0.2 / max(time.perf_counter() - t0, 1e-6))))
    order = list(runners)
    now = time.perf_counter_ns if clock == "wall" else time.thread_time_ns
    start = time.perf_counter()
    while (time.perf_counter() - start < seconds
           or min(len(v) for v in times.values()) < min_calls):
        for label in order:
            run = runners[label]
            for _ in range(per_round[label]):
                t0 = now()
                run()
                times[label].append((now() - t0) / 1e6)
        order.reverse()
    return times


def rebatch(t: Any, batch: int) -> Any:
    if not isinstance(t, torch.Tensor) or t.ndim == 0 or t.shape[0] == batch:
        return t
    reps = (batch + t.shape[0] - 1) // t.shape[0]
    return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch].contiguous()


def rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return -1


def peak_memory(backend: str, rss0: int) -> int | None:
    if backend == "torch-cuda":
        value = int(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        return value
    if backend.endswith("cuda") or rss0 < 0:
        return None
    return max(0, rss() - rss0)


def environment() -> tuple[tuple[str, str], ...]:
    """Versions, CPU and thread facts that a benchmark number depends on."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "max_rss_mb": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}",
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["ort_providers"] = ",".join(ort.get_available_providers())
    except ImportError:
        env["onnxruntime"] = "not installed"
    return tuple(sorted(env.items()))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
