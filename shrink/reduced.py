"""A smaller input for the masked oracle, where the model allows it.

The oracle's cost is two real forward passes (the masked original and the pruned model); on a
ResNet-50 at 224x224 they cost more than the rest of pruning. A conv net whose head pools
adaptively runs at any spatial size with the same channel maps: every layer reads the same
channels, each on fewer positions. :func:`reduced_inputs` stacks two half-resolution views of
an image input on the batch axis (its even and its odd pixels: a 1x3x224x224 input becomes
2x3x112x112, half the pixels), and :func:`shrink.verify` checks on it first, accepting the
result only when all of these hold:

1. the dense model's outputs have the same structure, shapes and dtypes at both sizes
   (:class:`DenseRun`, from a meta run at the example input's size), so whatever forward
   computes from the spatial size cancels before the outputs (adaptive pooling does; a flatten
   into a Linear does not, and such a model is checked at its own size);
2. the same layers and the same torch functions are called in the same order at both sizes
   (no branch on a size changes what runs, or how channels are concatenated or split);
3. the pruned model equals the masked original there within ``rtol``.

Otherwise (a difference, an error, or an error above ``rtol``) the example inputs decide, as
before, float64 recheck included: a right plan is never failed for the smaller input.

Why it is not weaker. A wrong plan (a wrong kept index, a mis-grouped or mis-sliced member)
makes some layer read another channel than the masked original reads; the outputs then differ
unless the two channels agree at every position they have. Spatial layers keep many positions
(ResNet-50: 2x16 per channel in its last stage against 49 at 224, 2x3136 in its first). A layer
after global pooling (squeeze-excitation) sees one position per image at any size, so a wrong
index between two channels that ReLU zeroes for that image goes unseen even at full size; the
two views give it two images instead of one. Measured on 993 plans with one wrong kept index
(MobileNetV3 small and large, EfficientNet-B0, RegNetY-400MF; three per group), the check on
the example input caught 938 and the reduced one 955: 20 only on the reduced input, 3 only on
the example input. ``tests/unit/test_reduced.py`` checks, for every group of a toy net, ResNet-18
and MobileNetV3-small, that each wrong index the example input catches, the reduced input
catches too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

#: spatial sides at least this long are halved (and no side goes below half of it)
MIN_SIDE = 64
#: how many half-resolution views of the input the reduced input stacks on the batch axis
VIEWS = 2


@dataclass(frozen=True, slots=True)
class DenseRun:
    """What one run of the dense model on the example inputs shows.

    Attributes:
        macs: its multiply-accumulates (:func:`shrink.report.count_macs`).
        outputs: the :func:`signature` of its outputs.
        calls: FQNs of its submodules and names of torch functions, in the order they were
            called (:func:`recording_calls`).
        layers: the MACs of each convolution and linear layer (:class:`layer_macs`), when
            they add up to ``macs`` (every MAC is in such a layer); else None.
    """

    macs: int
    outputs: object
    calls: tuple[str, ...]
    layers: dict[str, int] | None = None


_WEIGHT_FORWARDS = {
    nn.Conv1d.forward: False, nn.Conv2d.forward: False, nn.Conv3d.forward: False,
    nn.ConvTranspose1d.forward: True, nn.ConvTranspose2d.forward: True,
    nn.ConvTranspose3d.forward: True, nn.Linear.forward: False,
}


class layer_macs:  # noqa: N801 (a context manager, used as a function)
    """Count the MACs of every call of ``model``'s convolution and linear layers (those whose
    forward is torch's own) by :func:`shrink.report.count_macs`'s formulas, per layer FQN:
    ``out.numel() * prod(weight.shape[1:])``, or the input's numel for a transposed
    convolution. Forward hooks, removed on exit; works on real and meta tensors. They call
    torch with its function handling off, so :class:`recording_calls` neither records them nor
    counts them as hooks of the layer's own.

    The pruned model's MACs follow from three such counts without running it at the example
    size (:func:`pruned_macs`).

    Example:
        >>> with layer_macs(model) as macs:
        ...     model(x)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.macs: dict[str, int] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> dict[str, int]:
        macs = self.macs

        def counter(fqn: str, transposed: bool) -> Callable[..., None]:
            def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
                x = args[0] if transposed else out
                with torch._C.DisableTorchFunction():  # silent to recording_calls
                    n = x.numel() * math.prod(_weight(m).shape[1:])
                macs[fqn] = macs.get(fqn, 0) + n
            hook.silent = True  # type: ignore[attr-defined]
            return hook

        for fqn, m in self.model.named_modules():
            transposed = _WEIGHT_FORWARDS.get(type(m).forward)
            if transposed is not None and isinstance(getattr(m, "weight", None), torch.Tensor):
                self._handles.append(m.register_forward_hook(counter(fqn, transposed)))
        return macs

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def pruned_macs(dense: DenseRun, reference: dict[str, int],
                pruned: dict[str, int]) -> int | None:
    """The pruned model's MACs on the example inputs, from the dense run's per-layer MACs and
    :class:`layer_macs` counts of the masked original (``reference``) and the pruned model
    (``pruned``) on the reduced input; None when that cannot be exact.

    A layer's MACs are a product of its weight's size (the channels) and of the positions it
    runs on (batch and spatial sides, the same for both models at one input). Pruning changes
    the first factor and the input size the second, so the layer's MACs at the example size are
    ``dense * pruned / reference``, an exact integer. A layer whose positions carry channels
    (a Linear over a channel-mixed axis) scales the same way. Every MAC must be in such a layer
    (``dense.layers``) and every layer must have run in both reduced runs.
    """
    if dense.layers is None or reference.keys() != dense.layers.keys() or (
            pruned.keys() != dense.layers.keys()):
        return None
    total = 0
    for fqn, full in dense.layers.items():
        ref, got = reference[fqn], pruned[fqn]
        if ref <= 0 or (full * got) % ref:
            return None
        total += full * got // ref
    return total


def reduced_inputs(inputs: tuple[Any, ...]) -> tuple[torch.Tensor] | None:
    """Two half-resolution views of a single image-like input, stacked on the batch axis: the
    even and the odd pixels of a floating tensor ``(N, C, *spatial)`` whose spatial sides are
    all at least :data:`MIN_SIDE` (``(2N, C, *spatial // 2)``); None for any other inputs."""
    if len(inputs) != 1:
        return None
    (x,) = inputs
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 3
            and all(side >= MIN_SIDE for side in x.shape[2:])):
        return None
    views = [x[(slice(None), slice(None), *(slice(start, side - side % 2, 2)
                                           for side in x.shape[2:]))]
             for start in range(VIEWS)]
    return (torch.cat(views, 0),)


def describe(inputs: tuple[torch.Tensor]) -> str:
    """How a report names the reduced input, e.g. ``"2x3x112x112"``."""
    return "x".join(str(s) for s in inputs[0].shape)


def signature(value: Any, batch: int = 1) -> object:
    """The structure of a model's outputs with each tensor's shape and dtype (and each other
    value's type): what must not change with the input's size. ``batch``: the factor by which
    the input's batch grew, divided out of every tensor's first axis (which must be the batch
    axis: anything else leaves a signature that cannot match)."""
    leaves, spec = pytree.tree_flatten(value)
    return spec, tuple(_leaf(v, batch) for v in leaves)


def _leaf(v: Any, batch: int) -> object:
    if not isinstance(v, torch.Tensor):
        return type(v)
    shape = tuple(v.shape)
    if batch > 1:
        if not shape or shape[0] % batch:
            return ("not batched", shape)
        shape = (shape[0] // batch, *shape[1:])
    return shape, v.dtype


class recording_calls:  # noqa: N801 (a context manager, used as a function)
    """Record, in order, the FQN of every submodule of ``model`` each time it is called and the
    name of every torch function that ``forward`` code calls while ``model`` runs, leaving out
    what the modules' hooks call (the oracle's masks are hooks; the dense run has none). The
    hooks are removed on exit; ``calls`` (also what ``with`` gives) holds the record.

    Example:
        >>> with recording_calls(model) as calls:
        ...     model(x)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[str] = []
        self._mode = _Functions(self.calls)
        self._handles: list[Any] = []

    def __enter__(self) -> list[str]:
        calls, mode = self.calls, self._mode

        def called(fqn: str) -> Callable[..., None]:
            def pre(_m: nn.Module, _a: Any) -> None:
                calls.append(fqn)
                mode.in_hooks = True
            return pre

        def entered(fqn: str) -> Callable[..., None]:
            def pre(_m: nn.Module, _a: Any) -> None:
                calls.append(fqn)
                mode.in_hooks = False
            return pre

        def in_hooks(*_: Any) -> None:
            mode.in_hooks = True

        def in_forward(*_: Any) -> None:
            mode.in_hooks = False

        plain: dict[int, str] = {}  # modules without hooks of their own: the global hooks
        for fqn, m in self.model.named_modules():  # ours run first and last around the others
            if not (_own(m._forward_pre_hooks) or _own(m._forward_hooks)):
                plain[id(m)] = fqn
                continue
            after = in_hooks if fqn == "" else in_forward
            if m._forward_pre_hooks:
                self._handles += [m.register_forward_pre_hook(called(fqn), prepend=True),
                                  m.register_forward_pre_hook(in_forward)]
            else:  # no pre-hooks of its own: one of ours does what both would
                self._handles.append(m.register_forward_pre_hook(entered(fqn)))
            if m._forward_hooks:
                self._handles += [m.register_forward_hook(in_hooks, prepend=True),
                                  m.register_forward_hook(after)]
            else:
                self._handles.append(m.register_forward_hook(after))

        # Every other module is recorded by one pair of global hooks (they run before a
        # module's own, which it has none of): two handles instead of two per module. They
        # see every module called in the process and keep to this model's.
        def global_pre(m: nn.Module, _a: Any) -> None:
            fqn = plain.get(id(m))
            if fqn is not None:
                calls.append(fqn)
                mode.in_hooks = False

        def global_post(m: nn.Module, _a: Any, _o: Any) -> None:
            fqn = plain.get(id(m))
            if fqn is not None:
                mode.in_hooks = fqn == ""  # past the root: as if in hooks

        if plain:
            from torch.nn.modules.module import (
                register_module_forward_hook,
                register_module_forward_pre_hook,
            )

            self._handles += [register_module_forward_pre_hook(global_pre),
                              register_module_forward_hook(global_post)]
        mode.__enter__()
        return calls

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles = []


def _own(hooks: dict[int, Any]) -> bool:
    """Whether a module's hook table holds a hook of its own: one not marked ``silent`` (a hook
    that calls torch with its function handling off, like :class:`layer_macs`'s)."""
    return any(not getattr(h, "silent", False) for h in hooks.values())


class _Functions(TorchFunctionMode):
    """Appends the name of every torch function called outside module hooks, from the model's
    first pre-hook on until its forward hooks (outside: as if in hooks)."""

    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls
        self.in_hooks = True

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if not self.in_hooks:
            name = _NAMES.get(func)
            if name is None:
                if len(_NAMES) > 4096:  # (bounded, should some func be made per call)
                    _NAMES.clear()
                name = _NAMES[func] = f"torch:{getattr(func, '__qualname__', None) or func!r}"
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


#: the record's name of each torch function seen (torch's functions live as long as the process)
_NAMES: dict[Any, str] = {}


def dense_run(model: nn.Module, inputs: tuple[Any, ...]) -> DenseRun:
    """Run a weightless (meta) copy of ``model`` on ``inputs``, counting MACs as
    :func:`shrink.report.count_macs` does (a real copy when the model cannot run on meta)."""
    from shrink.capture import meta_copy, to_meta
    from shrink.modcopy import copy_module, set_eval
    from shrink.report import counted

    def run(m: nn.Module, x: tuple[Any, ...], lean: bool) -> DenseRun:
        with layer_macs(m) as layers, recording_calls(m) as calls:  # ours before its hooks
            out, macs = counted(lambda: m(*x), lean=lean)
        return DenseRun(macs, signature(out), tuple(calls), complete(layers, macs))

    try:
        return run(set_eval(meta_copy(model)), to_meta(inputs), True)
    except Exception:  # an op without a meta kernel: run a real copy, as count_macs does
        return run(set_eval(copy_module(model)), inputs, False)


def complete(layers: dict[str, int], macs: int) -> dict[str, int] | None:
    """``layers`` (a :class:`layer_macs` count) when it accounts for all ``macs``, else None."""
    return layers if layers and sum(layers.values()) == macs else None


def _weight(m: nn.Module) -> torch.Tensor:
    w = m.weight
    assert isinstance(w, torch.Tensor)
    return w
