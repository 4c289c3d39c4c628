"""Latency benchmarks: dense vs pruned, side by side, in one process.

Protocol (issue 3; the only one that gives stable numbers on a shared CPU):

* every variant (``dense``, ``pruned`` and any extra, e.g. torch-pruning's model) runs in the
  same process; rounds are **interleaved** (A B C, then C B A, ...) so machine drift hits all
  variants alike;
* each call is timed on its own; the headline figure is the **minimum** (best-of) latency, the
  median and p90 are reported next to it;
* one intra-op thread by default (``threads=(1,)``); ORT runs sequentially with one inter-op
  thread;
* ``realized = min_ms(dense) / min_ms(variant)``, ``ideal = MACs(dense) / MACs(variant)``
  (:func:`shrink.report.count_macs`), ``efficiency = realized / ideal``.

Use BN-calibrated random weights (:func:`shrink.testing.calibrate_bn_`): raw init leaves
denormal activations that slow onnxruntime down by ~40% and distort the comparison.

Backends: ``"ort-cpu"``, ``"ort-cuda"`` (onnxruntime's CUDA provider), ``"torch-cpu"`` (eager),
``"torch-cuda"``. A backend that is not available here is skipped, and the result says why.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import statistics
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink.capture import normalize_inputs
from shrink.deploy.timing import (
    Runner,
    environment,
    interleave,
    make_ort_runner,
    make_torch_runner,
    onnx_inputs,
    peak_memory,
    rebatch,
    rss,
)
from shrink.errors import ConfigError
from shrink.progress import stage

log = logging.getLogger(__name__)

BACKENDS = ("ort-cpu", "ort-cuda", "torch-cpu", "torch-cuda")
ModelLike = nn.Module | str | os.PathLike[str]
"""An ``nn.Module`` or the path of an ONNX file (ONNX files run only on the ``ort-*`` backends)."""


@dataclass(frozen=True, slots=True)
class Row:
    """One variant on one backend at one (batch, threads) setting.

    Attributes:
        variant: ``"dense"``, ``"pruned"`` or an extra variant's label.
        backend: one of :data:`BACKENDS`.
        batch: batch size of the timed input.
        threads: intra-op threads.
        min_ms, median_ms, p90_ms, mean_ms: latency statistics of single calls.
        calls: number of timed calls.
        throughput: items per second at ``min_ms`` (``batch * 1000 / min_ms``).
        macs: multiply-accumulates per item (``None`` for ONNX-only inputs).
        params: parameter count (``None`` for ONNX-only inputs).
        size_bytes: ONNX file size (ort) or parameter+buffer bytes (torch).
        peak_mem_bytes: CUDA peak allocation (torch-cuda) or resident-memory growth while the
            session was built and warmed up (CPU; approximate); ``None`` if not measurable.
        speedup: ``min_ms(dense) / min_ms`` at the same setting (realized speedup).
        ideal: ``macs(dense) / macs``.
        efficiency: ``speedup / ideal``.
        clock: ``"wall"`` or ``"thread"`` (see :func:`compare`).
    """

    variant: str
    backend: str
    batch: int
    threads: int
    min_ms: float
    median_ms: float
    p90_ms: float
    mean_ms: float
    calls: int
    throughput: float
    macs: int | None
    params: int | None
    size_bytes: int | None
    peak_mem_bytes: int | None
    speedup: float | None = None
    ideal: float | None = None
    efficiency: float | None = None
    clock: str = "wall"


@dataclass(frozen=True, slots=True)
class BenchResult:
    """Every row of one :func:`compare` run, plus the environment it ran in.

    Attributes:
        name: a label for the run (e.g. the model name).
        rows: one :class:`Row` per (backend, batch, threads, variant).
        environment: sorted ``(key, value)`` pairs: versions, CPU, cores, providers.
        skipped: ``(backend, reason)`` for each requested backend that did not run.
    """

    name: str
    rows: tuple[Row, ...]
    environment: tuple[tuple[str, str], ...]
    skipped: tuple[tuple[str, str], ...] = ()

    def row(self, variant: str, backend: str = "ort-cpu", batch: int = 1, threads: int = 1) -> Row:
        """The row of ``variant`` at a setting.

        Raises:
            KeyError: no such row (the message lists what was measured).
        """
        for r in self.rows:
            if (r.variant, r.backend, r.batch, r.threads) == (variant, backend, batch, threads):
                return r
        have = sorted({(r.variant, r.backend, r.batch, r.threads) for r in self.rows})
        raise KeyError(f"no row {(variant, backend, batch, threads)} in {self.name!r}; have {have}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": [asdict(r) for r in self.rows],
            "environment": dict(self.environment),
            "skipped": dict(self.skipped),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def to_csv(self, header: bool = True) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        names = [f.name for f in fields(Row)]
        if header:
            writer.writerow(["name", *names])
        for r in self.rows:
            writer.writerow([self.name, *(getattr(r, n) for n in names)])
        return buf.getvalue()

    def table(self) -> str:
        """A text table: one line per row, speedup columns relative to ``dense``."""
        head = (f"{'backend':<10} {'batch':>5} {'thr':>3} {'variant':<14} {'min ms':>9} "
                f"{'median':>9} {'p90':>9} {'items/s':>9} {'MB':>7} {'realized':>8} "
                f"{'ideal':>6} {'eff':>5}")
        lines = [f"{self.name}", head, "-" * len(head)]
        for r in self.rows:
            size = f"{r.size_bytes / 1e6:7.1f}" if r.size_bytes is not None else f"{'-':>7}"
            lines.append(
                f"{r.backend:<10} {r.batch:>5} {r.threads:>3} {r.variant:<14} {r.min_ms:>9.3f} "
                f"{r.median_ms:>9.3f} {r.p90_ms:>9.3f} {r.throughput:>9.1f} {size} "
                f"{_fmt(r.speedup, 8, 'x')} {_fmt(r.ideal, 6, 'x')} {_fmt(r.efficiency, 5)}"
            )
        for backend, why in self.skipped:
            lines.append(f"{backend}: skipped ({why})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt(v: float | None, width: int, suffix: str = "") -> str:
    if v is None:
        return f"{'-':>{width}}"
    return f"{v:>{width - len(suffix)}.2f}{suffix}"


def compare(
    dense: ModelLike,
    pruned: ModelLike,
    example_inputs: Any = None,
    *,
    others: Mapping[str, ModelLike] | None = None,
    backends: Sequence[str] = ("ort-cpu",),
    batches: Sequence[int] = (1,),
    threads: Sequence[int] = (1,),
    settings: Sequence[tuple[int, int]] | None = None,
    seconds: float = 3.0,
    min_calls: int = 5,
    clock: str = "wall",
    dynamo: bool = True,
    flush_denormals: bool = False,
    name: str = "",
    workdir: str | os.PathLike[str] | None = None,
) -> BenchResult:
    """Time ``dense`` and ``pruned`` (and ``others``) interleaved, at every setting.

    Args:
        dense: the reference model, an ``nn.Module`` or an ONNX file.
        pruned: the pruned model, same kinds.
        example_inputs: a tensor or tuple of tensors (any batch; re-batched per setting). May be
            ``None`` when both models are ONNX files: random inputs follow the file's input shape.
        others: extra variants timed in the same rounds, e.g. ``{"torch-pruning": model}``.
        backends: any of :data:`BACKENDS`; unavailable ones are skipped (see
            :attr:`BenchResult.skipped`).
        batches: batch sizes (1 for latency, e.g. 32 for throughput).
        threads: intra-op thread counts.
        settings: explicit ``(batch, threads)`` pairs, instead of every combination of
            ``batches`` and ``threads``.
        seconds: time budget of the interleaved rounds per (backend, batch, threads).
        min_calls: each variant is timed at least this many times per setting.
        clock: ``"wall"`` (``time.perf_counter``; the default), ``"thread"``
            (``time.thread_time``: CPU time of the calling thread) or ``"auto"`` (``"thread"``
            for one-thread CPU settings, ``"wall"`` otherwise). With one thread, onnxruntime
            and PyTorch run every kernel on the calling thread, so ``"thread"`` measures the same
            work without the time the OS gave to other processes: use it on a loaded machine.
            ``"thread"`` is only valid with one thread on CPU backends.
        dynamo: export modules with the dynamo exporter (``False``: the TorchScript-based one,
            several times faster to export; onnxruntime optimises both to the same kernels).
        flush_denormals: run onnxruntime with ``session.set_denormal_as_zero`` (flush-to-zero),
            so that denormal activations of random weights cannot distort the comparison.
        name: label of the run.
        workdir: where modules are exported to ONNX for the ort backends (a temporary directory
            by default).

    Returns:
        A :class:`BenchResult`.

    Raises:
        ConfigError: unknown backend, bad batch/thread counts, or no inputs for an
            ``nn.Module``.
        ExportError: a module could not be exported for the ort backends.

    Example:
        >>> res = shrink.deploy.bench.compare(model, small, (x,), batches=(1, 32))
        >>> print(res.table())
    """
    reserved = sorted({"dense", "pruned"} & set(others or {}))
    if reserved:
        raise ConfigError(f"others may not use the labels {reserved}; they name dense and pruned")
    variants: dict[str, ModelLike] = {"dense": dense, "pruned": pruned, **(others or {})}
    if settings is None:
        settings = [(b, t) for t in threads for b in batches]
    _validate(backends, settings, variants, example_inputs)
    if clock not in ("wall", "thread", "auto"):
        raise ConfigError(f"clock must be 'wall', 'thread' or 'auto', got {clock!r}")
    if clock == "thread" and (any(t != 1 for _, t in settings)
                              or any(b.endswith("cuda") for b in backends)):
        raise ConfigError("clock='thread' measures the calling thread only: use it with one "
                          "thread on CPU backends, or use clock='wall'")
    inputs = normalize_inputs(example_inputs) if example_inputs is not None else None
    stats = _static_stats(variants, inputs)
    rows: list[Row] = []
    skipped: list[tuple[str, str]] = []
    with _workdir(workdir) as wd:
        for backend in backends:
            why = _unavailable(backend, variants)
            if why:
                log.info("bench %s: skipping %s (%s)", name, backend, why)
                skipped.append((backend, why))
                continue
            rows += _run_backend(backend, variants, inputs, stats, settings, seconds,
                                 min_calls, clock, name, Path(wd), dynamo, flush_denormals)
    return BenchResult(name, tuple(rows), environment(), tuple(skipped))


def _validate(backends: Sequence[str], settings: Sequence[tuple[int, int]],
              variants: Mapping[str, ModelLike], example_inputs: Any) -> None:
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise ConfigError(f"unknown backend(s) {bad}; choose from {list(BACKENDS)}")
    if not settings or any(not isinstance(v, int) or isinstance(v, bool) or v < 1
                           for pair in settings for v in pair):
        raise ConfigError(f"batch sizes and thread counts must be ints >= 1, got {list(settings)}")
    if example_inputs is None and any(isinstance(m, nn.Module) for m in variants.values()):
        raise ConfigError("compare() needs example_inputs to run nn.Module variants; pass "
                          "(torch.randn(1, 3, 224, 224),) or the model's input shapes")


@contextmanager
def _workdir(workdir: str | os.PathLike[str] | None) -> Iterator[str]:
    if workdir is not None:
        yield str(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="shrink-bench-") as d:
        yield d


def _static_stats(variants: Mapping[str, ModelLike],
                  inputs: tuple[Any, ...] | None) -> dict[str, tuple[int | None, int | None]]:
    from shrink.report import count_macs, count_params

    out: dict[str, tuple[int | None, int | None]] = {}
    for label, m in variants.items():
        if isinstance(m, nn.Module) and inputs is not None:
            one = tuple(rebatch(t, 1) for t in inputs)
            out[label] = (count_macs(m.eval(), one), count_params(m))
        else:
            out[label] = (None, None)
    return out


def _unavailable(backend: str, variants: Mapping[str, ModelLike]) -> str | None:
    if backend.startswith("torch"):
        if any(not isinstance(m, nn.Module) for m in variants.values()):
            return "a variant is an ONNX file; torch backends need nn.Module variants"
        if backend == "torch-cuda" and not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        return None
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (pip install 'shrink[onnx]')"
    if backend == "ort-cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"CUDAExecutionProvider not available (have {ort.get_available_providers()})"
    return None


def _run_backend(backend: str, variants: Mapping[str, ModelLike], inputs: tuple[Any, ...] | None,
                 stats: Mapping[str, tuple[int | None, int | None]],
                 settings: Sequence[tuple[int, int]], seconds: float, min_calls: int,
                 clock: str, name: str, wd: Path, dynamo: bool = True,
                 flush_denormals: bool = False) -> list[Row]:
    rows: list[Row] = []
    sources = (_onnx_sources(variants, inputs, wd, name, dynamo) if backend.startswith("ort")
               else {})
    for batch, n_threads in settings:
        log.info("bench %s: %s batch %d, %d thread(s), %.1f s of interleaved rounds",
                 name or "-", backend, batch, n_threads, seconds)
        with stage(f"bench {backend} batch {batch}, {n_threads} thread(s)"):
            if inputs is not None:
                feed = tuple(rebatch(t, batch) for t in inputs)
            else:
                feed = onnx_inputs(next(iter(sources.values())), batch)
            runners: dict[str, Runner] = {}
            extra: dict[str, tuple[int | None, int | None]] = {}
            for label, m in variants.items():
                rss0 = rss()
                if backend.startswith("ort"):
                    runners[label] = make_ort_runner(sources[label], feed, n_threads,
                                                     cuda=backend == "ort-cuda",
                                                     flush_denormals=flush_denormals)
                    size: int | None = sources[label].stat().st_size
                else:
                    assert isinstance(m, nn.Module)
                    runners[label] = make_torch_runner(m, feed, n_threads,
                                                       cuda=backend == "torch-cuda")
                    size = sum(t.numel() * t.element_size()
                               for t in [*m.parameters(), *m.buffers()])
                runners[label]()  # warm-up, part of the memory measurement
                extra[label] = (size, peak_memory(backend, rss0))
            used = clock
            if clock == "auto":
                used = "thread" if n_threads == 1 and backend.endswith("cpu") else "wall"
            times = interleave(runners, seconds, min_calls, used)
            rows += _rows(backend, batch, n_threads, times, stats, extra, used)
            del runners
    return rows


def _onnx_sources(variants: Mapping[str, ModelLike], inputs: tuple[Any, ...] | None, wd: Path,
                  name: str, dynamo: bool = True) -> dict[str, Path]:
    from shrink.deploy.export import export_onnx

    sources: dict[str, Path] = {}
    for label, m in variants.items():
        if isinstance(m, nn.Module):
            assert inputs is not None
            path = wd / f"{name or 'model'}-{label}.onnx".replace("/", "_")
            log.info("bench %s: exporting %s to %s", name or "-", label, path)
            with stage(f"bench export {label}"):
                sources[label] = export_onnx(m, tuple(rebatch(t, 1) for t in inputs), path,
                                             dynamo=dynamo).path
        else:
            sources[label] = Path(m)
    return sources


def _rows(backend: str, batch: int, n_threads: int, times: Mapping[str, list[float]],
          stats: Mapping[str, tuple[int | None, int | None]],
          extra: Mapping[str, tuple[int | None, int | None]], clock: str) -> list[Row]:
    dense_min = min(times["dense"])
    dense_macs = stats["dense"][0]
    rows = []
    for label, ts in times.items():
        ts_sorted = sorted(ts)
        best = ts_sorted[0]
        macs, params = stats[label]
        speedup = dense_min / best
        ideal = dense_macs / macs if dense_macs and macs else None
        rows.append(Row(
            variant=label, backend=backend, batch=batch, threads=n_threads, min_ms=best,
            median_ms=statistics.median(ts_sorted),
            p90_ms=ts_sorted[min(len(ts_sorted) - 1, int(0.9 * len(ts_sorted)))],
            mean_ms=statistics.fmean(ts_sorted), calls=len(ts), throughput=batch * 1000 / best,
            macs=macs, params=params, size_bytes=extra[label][0], peak_mem_bytes=extra[label][1],
            speedup=speedup, ideal=ideal, efficiency=speedup / ideal if ideal else None,
            clock=clock,
        ))
    return rows


