"""The shape probe: run the pruned architecture on the meta device before the numeric oracle.

A size that ``forward`` computes from a tensor's shape (``b, c, h, w = x.shape; y.view(b, c // 2,
-1)``) is a plain int to the analysis, which cannot see that it changes when ``x`` loses channels.
:class:`ShapeProbe` applies a plan to a weightless (meta-device) copy of the model and runs it
once. The plan passes when that run returns outputs of the dense model's structure, shapes and
dtypes. Otherwise the groups to blame are found by bisection over the plan's decisions: with a
passing prefix ``P`` (at first, nothing pruned) and the failing ``P + D``, the shortest failing
``P + D[:k]`` takes log2(len(D)) meta forwards to find, ``D[k-1]`` is a culprit, and the search
goes on from ``P + D[:k-1]`` over ``D[k:]`` until what is left passes. A layer that cannot be
rebuilt smaller (:class:`~shrink.errors.RewriteError` naming it) blames every group that resizes
it, without bisection.

Each culprit gets a reason naming the op that broke and the user's source line (the innermost
frame outside torch and shrink), found by one more run that records every torch call. The caller
(:func:`shrink.prune`) pins those groups and selects again, so after the probe a
:class:`~shrink.errors.VerificationError` only ever means that numbers differ.

Models with an op that cannot run on meta are probed on a real copy instead (one real forward
per step).

Every run counts its MACs on the way (:func:`shrink.report.counted`), and the first records the
dense model's layer and torch calls and each conv and linear layer's MACs: :func:`shrink.verify`
takes them from the probe instead of running the models on meta again. With verification on,
:func:`shrink.prune` does not probe its first plan: the oracle runs the pruned model anyway, and
only a plan that fails there comes back to :meth:`ShapeProbe.culprits`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import linecache
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from types import FrameType, TracebackType
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from shrink.capture import meta_copy, to_meta
from shrink.errors import CaptureError, InvariantError, RewriteError
from shrink.modcopy import set_eval, set_modes
from shrink.plan import ChannelGroup, Decision, Plan, mark_positions_checked, positions_checked
from shrink.reduced import DenseRun, complete, layer_macs, recording_calls, signature
from shrink.report import counted
from shrink.rewrite import apply

log = logging.getLogger(__name__)

# frames in these folders are not the user's code
_SKIP = tuple(os.path.realpath(os.path.dirname(p)) + os.sep for p in (torch.__file__, __file__))


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a pruned architecture does not fit: ``what`` failed, ``where`` (the user's source line
    of an exception), or ``layer`` (FQN of a layer that could not be rebuilt)."""

    what: str
    where: str | None = None
    layer: str | None = None


class ShapeProbe:
    """Runs pruned architectures of one model on the meta device (see the module docstring).

    Example:
        >>> probe = ShapeProbe(model, (x,))
        >>> probe.culprits(plan)   # {group id: reason} of the groups to pin; {} when it fits
    """

    def __init__(self, model: nn.Module, example_inputs: tuple[Any, ...],
                 parts: Sequence[tuple[str, tuple[Any, ...], dict[str, Any]]] = (),
                 base: nn.Module | None = None) -> None:
        """``parts``: for a model captured in parts, ``(part FQN, args, kwargs)`` of each
        recorded part call (:func:`shrink.capture_parts.part_calls`). The probe then runs those
        calls instead of the whole model, whose output sizes may depend on the data (the boxes
        a detector keeps) and whose code outside the parts is never pruned. ``base``: a meta
        copy of ``model`` in eval mode to probe (the one torch.fx traced), instead of a new
        one; it is only read."""
        self._model = model
        self._parts = tuple(parts)
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        self._real_inputs = _zeros_like(parts, device) if parts else example_inputs
        self._base: nn.Module = set_eval(meta_copy(model)) if base is None else base
        self._inputs = to_meta(parts if parts else example_inputs)
        self.runs = 0
        self._dense_calls: list[_Call] | None = None
        self._last_fit: tuple[Plan, int] | None = None  # the last plan that fitted, its MACs
        try:
            with layer_macs(self._base) as layers, recording_calls(self._base) as calls:
                out, macs = self._forward(self._base)
            self._dense_run: DenseRun | None = DenseRun(macs, signature(out), tuple(calls),
                                                        complete(layers, macs))
        except Exception as e:  # an op without a meta kernel: probe real copies
            log.info("shape probe: the model does not run on meta (%s); probing on real "
                     "tensors", _first_line(e))
            self._on_real()
            self._dense_run = None
            try:
                out, _ = self._forward(self._base)
            except Exception as e2:
                where = _user_frame(e2.__traceback__)
                raise CaptureError(
                    f"the model fails in eval mode on its example inputs ({_first_line(e2)}"
                    f"{'' if where is None else ' at ' + where}); pass inputs of the shape and "
                    "dtype it takes in inference"
                ) from e2
        self._dense = list(_leaves(out))

    def _on_real(self) -> None:
        self._base, self._inputs, self._dense_calls = self._model, self._real_inputs, None

    def _forward(self, model: nn.Module, mode: TorchFunctionMode | None = None
                 ) -> tuple[Any, int]:
        """The outputs of a run and its MACs, counted as :func:`shrink.report.count_macs`
        counts them (so verify needs no runs of its own: :meth:`dense_run`,
        :meth:`pruned_macs`). The model may be the caller's own (a model that cannot run on
        meta): its modes are put back afterwards."""
        def run() -> Any:
            with torch.no_grad(), contextlib.nullcontext() if mode is None else mode:
                if self._parts:
                    return [set_eval(model.get_submodule(fqn))(*args, **kwargs)
                            for fqn, args, kwargs in self._inputs]
                return set_eval(model)(*self._inputs)

        modes = [(m, m.training) for m in model.modules()]
        try:
            return counted(run)
        finally:
            set_modes(modes)

    @property
    def on_meta(self) -> bool:
        """Whether the probe runs on the meta device (False: on real copies of the model)."""
        return self._base is not self._model

    def dense_run(self) -> DenseRun | None:
        """The dense model's MACs, output signature and layer calls on the example inputs,
        from the probe's first run (for :func:`shrink.verify`); None for a model probed in
        parts or on real tensors."""
        return None if self._parts or self._base is self._model else self._dense_run

    def pruned_macs(self, plan: Plan) -> int | None:
        """MACs of ``plan``'s pruned model when ``plan`` is the last plan that fitted and it
        ran whole on meta, as :func:`shrink.report.count_macs` counts; None otherwise."""
        if self._parts or self._base is self._model or self._last_fit is None:
            return None
        fitted, macs = self._last_fit
        return macs if fitted is plan else None

    def check(self, plan: Plan) -> Failure | None:
        """Apply ``plan`` to the probe's copy and run it once; None when it fits."""
        self.runs += 1
        try:
            pruned = apply(self._base, plan)
        except RewriteError as e:
            if self._base is not self._model:  # confirm on real tensors: meta may be to blame
                try:
                    apply(self._model, plan)
                except RewriteError:
                    return Failure(str(e), layer=e.module)
                self._on_real()
                return self.check(plan)
            return Failure(str(e), layer=e.module)
        try:
            out, macs = self._forward(pruned)
        except Exception as e:
            return Failure(_first_line(e), where=_user_frame(e.__traceback__))
        failure = _compare(list(_leaves(out)), self._dense)
        if failure is None:
            self._last_fit = (plan, macs)
        return failure

    def fits(self, plan: Plan, pruned: nn.Module) -> bool:
        """Whether ``plan`` fits, judged from ``pruned``, the model :func:`shrink.apply` built
        from the caller's model and ``plan``: the run :meth:`check` makes, on a meta copy of
        ``pruned`` instead of a plan applied to the probe's own copy (which costs as much as
        the real apply). False when it does not fit or the probe runs on real tensors; the
        caller then calls :meth:`culprits`, whose runs and reasons are those of a probe that
        never saw ``pruned``."""
        if not self.on_meta:
            return False
        self.runs += 1
        try:
            out, macs = self._forward(meta_copy(pruned))
        except Exception:
            return False
        if _compare(list(_leaves(out)), self._dense) is not None:
            return False
        self._last_fit = (plan, macs)
        return True

    def culprits(self, plan: Plan) -> dict[str, str]:
        """The decided groups whose pruning breaks the architecture, with the reason for each.

        Returns:
            ``{group id: reason}``, in plan order; empty when the pruned architecture fits.
        """
        found: dict[str, str] = {}
        base: list[Decision] = []  # known to fit
        rest = list(plan.decisions)
        failure = self.check(_with(plan, rest))
        while failure is not None:
            if failure.layer is None:
                lo, hi, failure = 0, len(rest), failure  # base + rest[:lo] fits, [:hi] does not
                while hi - lo > 1 and failure.layer is None:
                    mid = (lo + hi) // 2
                    f = self.check(_with(plan, base + rest[:mid]))
                    if f is None:
                        lo = mid
                    else:
                        hi, failure = mid, f
                if failure.layer is None:
                    found[rest[hi - 1].group] = self._explain(_with(plan, base + rest[:hi]),
                                                              failure)
                    base, rest = base + rest[: hi - 1], rest[hi:]
            if failure.layer is not None:  # every group that resizes the layer
                layer = failure.layer
                hit = {d.group for d in base + rest
                       if any(m.module == layer for m in plan.group(d.group).members)}
                if not hit:
                    raise InvariantError(f"rebuilding {layer!r} failed, but no decided group "
                                         f"resizes it: {failure.what}")
                found.update(dict.fromkeys(sorted(hit), failure.what))
                rest = [d for d in base + rest if d.group not in hit]
                base = []  # what fitted may not fit without those groups
            failure = self.check(_with(plan, base + rest)) if rest else None
        if found:
            log.info("shape probe: %d run(s) pinned %s", self.runs, sorted(found))
        return found

    def _explain(self, plan: Plan, failure: Failure) -> str:
        """The reason for pinning the last decided group of ``plan``, which ``failure`` broke."""
        op, where = None, failure.where
        try:
            pruned = apply(self._base, plan)
            recorder = _Recorder()
            try:
                self._forward(pruned, recorder)
            except Exception:
                in_flight = recorder.calls[-1] if recorder.calls else None
                if in_flight is not None and in_flight.out is None:
                    op = in_flight.op
            else:
                first = _first_change(self._dense_record(), recorder.calls)
                if first is not None:
                    op, where = first.op, first.where
        except Exception as e:  # the explanation is best effort; the failure stands
            log.info("shape probe: could not record the failing run (%s)", e)
        at = "" if where is None else f" at {where}"
        return (
            f"pruning it breaks {op or 'the model'}{at}: {failure.what} (found by the shape "
            "probe: forward computes a size from these channels that the analysis cannot follow)"
        )

    def _dense_record(self) -> list[_Call]:
        if self._dense_calls is None:
            recorder = _Recorder()
            self._forward(self._base, recorder)
            self._dense_calls = recorder.calls
        return self._dense_calls


def _zeros_like(value: Any, device: torch.device) -> Any:
    """Real zero tensors of the shapes of ``value``'s (meta) tensors, on ``device``: part
    inputs recorded on meta, for a probe that must run on real tensors (it checks shapes)."""
    if isinstance(value, torch.Tensor):
        return torch.zeros(value.shape, dtype=value.dtype, device=device)
    if isinstance(value, (tuple, list)):
        return type(value)(_zeros_like(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _zeros_like(v, device) for k, v in value.items()}
    return value


def pin(groups: Sequence[ChannelGroup], reasons: Mapping[str, str]) -> tuple[ChannelGroup, ...]:
    """``groups`` with those named in ``reasons`` pinned for that reason."""
    out = tuple(dataclasses.replace(g, pinned=reasons[g.id]) if g.id in reasons else g
                for g in groups)
    if isinstance(groups, tuple) and positions_checked(groups):
        mark_positions_checked(out)  # pinning moves no position
    return out


def _with(plan: Plan, decisions: Sequence[Decision]) -> Plan:
    return plan if tuple(decisions) == plan.decisions else plan.with_decisions(decisions)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ----------------------------------------------------------------------------- outputs


def _leaves(value: Any, path: str = "output") -> Iterator[tuple[str, object]]:
    """(path, signature) of every part of a model output: tensors by shape and dtype, containers
    by type and length (dicts by keys), anything else by type."""
    if isinstance(value, torch.Tensor):
        yield path, f"shape {tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    elif isinstance(value, (tuple, list)):
        yield path, f"{type(value).__name__} of {len(value)}"
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        keys = sorted(value, key=str)
        yield path, f"{type(value).__name__} with keys {[str(k) for k in keys]}"
        for k in keys:
            yield from _leaves(value[k], f"{path}[{k!r}]")
    else:  # plain values by type: verify compares tensors only, and data may differ
        yield path, type(value).__name__


def _compare(pruned: list[tuple[str, object]], dense: list[tuple[str, object]]) -> Failure | None:
    for (path, got), (_, want) in zip(pruned, dense, strict=False):
        if got != want:
            return Failure(f"{path} is {got} instead of {want}")
    if len(pruned) != len(dense):
        return Failure(f"the output has {len(pruned)} parts instead of {len(dense)}")
    return None


# ----------------------------------------------------------------------------- where and what


@cache
def _is_internal(filename: str) -> bool:
    return os.path.realpath(filename).startswith(_SKIP)


def _where(filename: str, line: int, fn: str) -> str:
    code = linecache.getline(filename, line).strip()
    if len(code) > 90:
        code = code[:87] + "..."
    return f"{os.path.basename(filename)}:{line} in {fn}" + (f" (`{code}`)" if code else "")


def _user_frame(tb: TracebackType | None) -> str | None:
    """The innermost frame of a traceback outside torch and shrink, as ``file.py:LINE in fn``."""
    found = None
    while tb is not None:
        code = tb.tb_frame.f_code
        if not _is_internal(code.co_filename):
            found = _where(code.co_filename, tb.tb_lineno, code.co_name)
        tb = tb.tb_next
    return found


def _caller(frame: FrameType | None) -> str | None:
    while frame is not None:
        code = frame.f_code
        if not _is_internal(code.co_filename):
            return _where(code.co_filename, frame.f_lineno, code.co_name)
        frame = frame.f_back
    return None


@dataclass(slots=True)
class _Call:
    op: str
    where: str | None
    inputs: tuple[tuple[int, ...], ...]
    out: tuple[tuple[int, ...], ...] | None = None  # None while running (or when it raised)


def _shapes(value: Any) -> tuple[tuple[int, ...], ...]:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape),)
    if isinstance(value, (tuple, list)):
        return tuple(s for v in value for s in _shapes(v))
    if isinstance(value, dict):
        return tuple(s for v in value.values() for s in _shapes(v))
    return ()


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    qual = getattr(func, "__qualname__", "") or name
    if name == "__get__" and hasattr(func, "__self__"):  # a Tensor attribute such as .shape
        return f"Tensor.{getattr(func.__self__, '__name__', 'attribute')}"
    if qual.startswith(("TensorBase.", "_TensorBase.", "Tensor.")):
        return f"Tensor.{name}"
    module = getattr(func, "__module__", None) or ""
    if module in ("torch._C._nn", "torch.nn.functional"):
        return f"F.{name}"
    if qual.startswith("_VariableFunctionsClass.") or module == "torch":
        return f"torch.{name}"
    return f"{module}.{qual}".lstrip(".")


class _Recorder(TorchFunctionMode):
    """Records every torch call of a run: op, user source line, input and output shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[_Call] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        call = _Call(_op_name(func), _caller(sys._getframe(1)), _shapes((args, kwargs)))
        self.calls.append(call)
        out = func(*args, **kwargs)
        call.out = _shapes(out)
        return out


def _first_change(dense: list[_Call], pruned: list[_Call]) -> _Call | None:
    """The first call of the pruned run whose tensor inputs have the dense run's shapes but whose
    outputs do not: a size computed elsewhere reached it. Calls with tensor inputs come first
    (``torch.zeros(b, c)`` changes legitimately when ``c`` is a pruned channel count)."""
    without_inputs = None
    for d, p in zip(dense, pruned, strict=False):
        if d.op != p.op:
            break  # the runs took different paths
        if p.inputs == d.inputs and p.out != d.out:
            if p.inputs:
                return p
            without_inputs = without_inputs or p
    return without_inputs
