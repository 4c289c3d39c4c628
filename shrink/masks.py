"""From ``torch.nn.utils.prune`` masks to a physically smaller model.

``torch.nn.utils.prune`` multiplies weights by masks: the model is no smaller and no faster.
:func:`from_masks` folds the masks in (as ``prune.remove`` does, on a deep copy), finds the
channels that are dead, removes them with a :class:`~shrink.plan.Plan`, and checks the result.

When is a channel dead? By the masked-oracle principle (see :mod:`shrink.verify`), removing
channel ``c`` of a group equals running the folded model with ``c`` zeroed at the input of every
*reader* (an IN member: the conv/linear layers that consume the group). So removing ``c`` leaves
the model's function unchanged exactly when, at every reader ``r``, one of these holds:

* **r ignores c**: ``r``'s weights that read ``c`` are all zero (a ``dim=1`` mask on ``r``);
* **c arrives at r as zero**: every *writer* of ``c`` (the conv/linear layers that produce the
  group; depthwise convs inside the group only carry it) has an all-zero filter for ``c``, and
  ``c`` is exactly 0 at ``r``'s input on every probe (the example inputs plus random draws).
  A writer's bias, a BatchNorm shift (``beta - gamma * mean / sqrt(var + eps)``) or an op with
  ``f(0) != 0`` (sigmoid, ``x + 1``) turns a masked filter into a nonzero *constant* channel,
  which the next layer reads: such a channel is not dead, and stays. (Folding the constant into
  the reader's bias is not exact for padded convolutions, so shrink does not.)

:attr:`Reconcile.ALL` (the default) removes exactly those channels: the result equals the masked
model on any input, up to float rounding, and :func:`from_masks` verifies it on the example
inputs and probes. :attr:`Reconcile.UNION` removes a channel as soon as any member's mask zeroes
it (a masked filter, masked input columns, a zero BatchNorm weight). That is what a user who
masked only output filters usually wants, but it is *not* the masked model: it equals the masked
model with those channels also zeroed at every reader. The report gives the measured deviation.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shrink.analysis import analyze
from shrink.api import Result, infer_inputs
from shrink.capture import capture, normalize_inputs
from shrink.errors import ConfigError, VerificationError
from shrink.plan import ChannelGroup, Decision, Member, Plan, Side, fingerprint
from shrink.rewrite import apply
from shrink.rules import rule_for
from shrink.verify import relative_error, verify

log = logging.getLogger(__name__)


class Reconcile(enum.Enum):
    """How the members of a channel group reconcile their masks (see the module docstring)."""

    ALL = "all"
    UNION = "union"


@dataclass(frozen=True, slots=True)
class MaskedTensor:
    """One ``torch.nn.utils.prune`` reparametrization: ``module.name = name_orig * name_mask``."""

    module: str
    name: str


def find_masks(model: nn.Module) -> tuple[MaskedTensor, ...]:
    """Every tensor of ``model`` that carries a ``torch.nn.utils.prune`` reparametrization.

    Example:
        >>> prune.ln_structured(model.conv1, "weight", amount=0.5, n=2, dim=0)
        >>> shrink.find_masks(model)
        (MaskedTensor(module='conv1', name='weight'),)
    """
    from torch.nn.utils import prune

    found = []
    for fqn, mod in model.named_modules():
        for hook in mod._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                found.append(MaskedTensor(fqn, str(hook._tensor_name)))
    return tuple(found)


def fold_masks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every prune mask folded into its tensor (``prune.remove``).

    The copy has plain parameters (``weight``, no ``weight_orig``/``weight_mask``, no pruning
    hooks); other hooks stay. ``model`` itself is not modified.

    Raises:
        ConfigError: when the model cannot be deep-copied (e.g. legacy ``weight_norm``).
    """
    from torch.nn.utils import prune

    masked = find_masks(model)
    # The masked attribute (``weight = weight_orig * weight_mask``) is a non-leaf tensor, which
    # deepcopy refuses: hand deepcopy a detached clone instead (prune.remove recomputes it).
    memo: dict[int, Any] = {}
    for mt in masked:
        value = getattr(model.get_submodule(mt.module), mt.name, None)
        if isinstance(value, torch.Tensor):
            memo[id(value)] = value.detach().clone()
    try:
        folded = copy.deepcopy(model, memo)
    except RuntimeError as e:
        raise ConfigError(
            f"cannot copy {type(model).__name__}: {e}. shrink never modifies the caller's model, "
            "so it works on a deep copy; remove whatever holds non-leaf tensors (e.g. the legacy "
            "torch.nn.utils.weight_norm: use torch.nn.utils.parametrizations.weight_norm)."
        ) from e
    for mt in masked:
        with torch.no_grad():
            prune.remove(folded.get_submodule(mt.module), mt.name)  # type: ignore[no-untyped-call]
    return folded


def from_masks(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    policy: Reconcile | str = Reconcile.ALL,
    rtol: float = 1e-5,
    probes: int = 2,
    seed: int = 0,
    ignore: Sequence[str | type[nn.Module]] = (),
    leaf_types: Sequence[type[nn.Module]] = (),
) -> Result:
    """Turn ``torch.nn.utils.prune`` masks (or already-removed zeroed channels) into real speed.

    Args:
        model: a model carrying prune reparametrizations (``weight_orig``, ``weight_mask`` and
            their hooks), or with masks already folded in by ``prune.remove``. Not modified.
        example_inputs: a tensor or tuple of inputs; inferred for image models when omitted.
        policy: :attr:`Reconcile.ALL` (``"all"``, default: only channels that provably
            contribute nothing go, so the result equals the masked model) or
            :attr:`Reconcile.UNION` (``"union"``: a channel goes when any member's mask zeroes
            it; the result then differs from the masked model, by the reported error).
        rtol: tolerance of the equality check against the masked model.
        probes: random inputs (besides ``example_inputs``) on which dead channels must arrive
            at every reader as exactly zero.
        seed: seed of those random inputs.
        ignore: module names, globs or types whose channels stay.
        leaf_types: module types to keep opaque during capture.

    Returns:
        :class:`~shrink.Result`: the smaller model (same mode, dtype and device as ``model``,
        plain parameters, no pruning hooks), its plan (made for the *folded* model, i.e. the
        original architecture: it applies to a freshly built one, see :func:`shrink.save`),
        the analysis, and a report whose ``diagnostics`` say what stayed and why (``"nothing
        structural to remove"`` when the masks zero no whole channel).

    Raises:
        ConfigError: bad policy or options. CaptureError: untraceable model or bad inputs.
        VerificationError: the result does not equal the masked model (a shrink bug).

    Example:
        >>> prune.ln_structured(model.conv1, "weight", amount=0.5, n=2, dim=0)
        >>> small = shrink.from_masks(model, (x,)).model
    """
    policy = _policy(policy)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 0:
        raise ConfigError(f"probes must be an int >= 0, got {probes!r}")
    folded = fold_masks(model)
    inputs = normalize_inputs(infer_inputs(folded) if example_inputs is None else example_inputs)
    analysis = analyze(capture(folded, inputs, leaf_types=leaf_types), ignore=ignore)
    probe_inputs = [inputs, *_random_like(inputs, probes, seed)]
    weights = _Weights(folded)
    zero_at = _arrives_zero(folded, weights, analysis.groups, probe_inputs)
    decisions: list[Decision] = []
    notes: list[str] = []
    for g in analysis.groups:
        dead, why = _dead_channels(g, weights, zero_at, policy)
        if why:
            notes.append(f"{g.id}: {why}")
        if not dead:
            continue
        if g.pinned is not None or g.size < 2:
            notes.append(f"{g.id}: {len(dead)} dead channel(s) stay: the group is pinned "
                         f"({g.pinned or 'a single channel'})")
            continue
        keep, note = _keep(g, dead)
        if note:
            notes.append(f"{g.id}: {note}")
        if len(keep) < g.size:
            decisions.append(Decision(g.id, keep))
    plan = Plan(model=fingerprint(folded), groups=analysis.groups, decisions=tuple(decisions))
    if not decisions:
        notes.insert(0, "nothing structural to remove: the masks zero no whole channel of a "
                        "prunable group (unstructured masks such as global_unstructured keep "
                        "every channel); returning the folded model unchanged")
    pruned = apply(folded, plan)
    report = verify(folded, pruned, plan, inputs, rtol=rtol, strict=True)
    deviation = 0.0 if not decisions else max(
        _deviation(folded, pruned, x) for x in (inputs, probe_inputs[-1]))
    if policy is Reconcile.ALL and not deviation <= rtol:
        raise VerificationError(
            f"from_masks: the pruned model differs from the masked model by max relative error "
            f"{deviation:.3e} > rtol {rtol:.1e} although every removed channel was proven dead. "
            "This is a shrink bug: please report it with the model."
        )
    if policy is Reconcile.UNION:
        notes.append(f"policy 'union': the result differs from the masked model by max relative "
                     f"error {deviation:.3e} (channels some layer still read were removed)")
    for note in notes:
        log.info("from_masks: %s", note)
    report = dataclasses.replace(report, diagnostics=(*report.diagnostics, *notes))
    return Result(pruned, plan, analysis, report)


def _policy(policy: Reconcile | str) -> Reconcile:
    if isinstance(policy, Reconcile):
        return policy
    try:
        return Reconcile(policy)
    except ValueError:
        raise ConfigError(
            f"policy={policy!r} is unknown: use 'all' (only channels that provably contribute "
            "nothing; equals the masked model) or 'union' (any member's mask removes a channel)"
        ) from None


def _random_like(inputs: tuple[Any, ...], n: int, seed: int) -> list[tuple[Any, ...]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        scale = 3.0 ** k
        out.append(tuple(
            (torch.randn(x.shape, generator=gen, dtype=torch.float64) * scale).to(x)
            if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in inputs
        ))
    return out


def _deviation(folded: nn.Module, pruned: nn.Module, inputs: tuple[Any, ...]) -> float:
    """max relative output difference; in float64 for half-precision models, whose rounding
    (summation order changes with the channel count) would otherwise hide the comparison."""
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in folded.parameters()):
        folded = copy.deepcopy(folded).to(torch.float64)
        pruned = copy.deepcopy(pruned).to(torch.float64)
        inputs = tuple(x.to(torch.float64) if isinstance(x, torch.Tensor)
                       and x.is_floating_point() else x for x in inputs)
    modes = [(m, m.training) for m in (*folded.modules(), *pruned.modules())]
    try:
        folded.eval()
        pruned.eval()
        with torch.no_grad():
            return relative_error(pruned(*inputs), folded(*inputs))
    finally:
        for m, mode in modes:
            m.training = mode


def _readers(g: ChannelGroup, weights: _Weights) -> list[Member]:
    """IN members that read the group into another channel space.

    A layer with both sides in the group and no weights on its IN axis (a depthwise conv)
    only *carries* the group: what it outputs on channel c is read by the group's readers.
    """
    out_mods = {m.module for m in g.members if m.side is Side.OUT}
    readers = []
    for m in g.members:
        if m.side is not Side.IN:
            continue
        if m.module in out_mods and weights.zero(m) is None:
            continue
        readers.append(m)
    return readers


def _arrives_zero(
    folded: nn.Module, weights: _Weights, groups: Sequence[ChannelGroup],
    probes: Sequence[tuple[Any, ...]],
) -> dict[str, torch.Tensor]:
    """Per reader module: whether each input-axis position is exactly 0 on every probe."""
    fqns = sorted({m.module for g in groups if g.prunable for m in _readers(g, weights)})
    zero: dict[str, torch.Tensor] = {}
    handles = []
    for fqn in fqns:
        mod = folded.get_submodule(fqn)
        rule = rule_for(mod)
        if rule is None:
            continue

        def hook(m: nn.Module, args: tuple[Any, ...], fqn: str = fqn, rule: Any = rule) -> None:
            x = args[0]
            if not isinstance(x, torch.Tensor):
                return
            axis = rule.in_axis(m, x.ndim)
            z = (x.detach().movedim(axis, 0).reshape(x.shape[axis], -1) == 0).all(dim=1).cpu()
            zero[fqn] = z if fqn not in zero else zero[fqn] & z

        handles.append(folded.get_submodule(fqn).register_forward_pre_hook(hook))
    modes = [(m, m.training) for m in folded.modules()]
    try:
        folded.eval()
        with torch.no_grad():
            for x in probes:
                folded(*x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return zero


def _per_channel(g: ChannelGroup, member: Member, pos_zero: torch.Tensor) -> torch.Tensor:
    """Channel c is True when every position of ``member`` carrying c is True.

    Channels the member does not carry are True: neutral for the ANDs this feeds.
    """
    out = torch.ones(g.size, dtype=torch.bool)
    if not member.index_map.index:
        return out
    idx = torch.as_tensor(member.index_map.index, dtype=torch.long)
    ch = torch.as_tensor(member.index_map.channel, dtype=torch.long)
    vals = pos_zero[idx].to(torch.int8)
    res = torch.ones(g.size, dtype=torch.int8).scatter_reduce(0, ch, vals, reduce="amin")
    return res.bool()


class _Weights:
    """Which axis positions of the folded model's layers have all-zero weights (memoised)."""

    def __init__(self, folded: nn.Module) -> None:
        self.modules = dict(folded.named_modules())
        self._memo: dict[tuple[str, Side, bool], torch.Tensor | None] = {}

    def zero(self, member: Member, *, scales: bool = False) -> torch.Tensor | None:
        key = (member.module, member.side, scales)
        if key not in self._memo:
            self._memo[key] = _zero_slices(self.modules[member.module], member, scales)
        return self._memo[key]


def _carried(g: ChannelGroup, member: Member) -> torch.Tensor:
    """Channels of ``g`` that ``member`` has at least one axis position for."""
    out = torch.zeros(g.size, dtype=torch.bool)
    out[torch.as_tensor(member.index_map.channel, dtype=torch.long)] = True
    return out


def _zero_slices(mod: nn.Module, member: Member, scales: bool) -> torch.Tensor | None:
    """Per axis position: the layer's weights on it are all zero; None when it has none.

    Weights are the rule's ``score_params`` (conv/linear filters and input columns) and, with
    ``scales``, its per-channel scales on the OUT axis (a BatchNorm weight).
    """
    rule = rule_for(mod)
    params: Sequence[tuple[torch.Tensor, int]] = (
        rule.score_params(mod, member.side) if rule is not None else ())
    if scales and member.side is Side.OUT and rule is not None:
        params = (*params, *((p, 0) for p in rule.scale_params(mod)))
    if not params:
        return None
    zero = torch.ones(member.extent, dtype=torch.bool)
    for tensor, dim in params:
        t = tensor.detach().movedim(dim, 0)
        zero &= (t.reshape(t.shape[0], -1) == 0).all(dim=1).cpu()
    return zero


def _dead_channels(
    g: ChannelGroup, weights: _Weights, zero_at: dict[str, torch.Tensor], policy: Reconcile
) -> tuple[list[int], str]:
    """Dead channels of ``g`` under ``policy`` and, when some were masked but stay, why."""
    in_mods = {m.module for m in g.members if m.side is Side.IN}
    votes = torch.zeros(g.size, dtype=torch.bool)
    writers_silent = torch.ones(g.size, dtype=torch.bool)
    n_writers = 0
    ignores: dict[str, torch.Tensor] = {}
    for m in g.members:
        scaled = weights.zero(m, scales=True)
        if scaled is not None:  # channels the member does not carry get no vote
            votes |= _per_channel(g, m, scaled) & _carried(g, m)
        zero = weights.zero(m)
        if zero is None:  # a BatchNorm (or a depthwise conv's IN side) only carries the group
            continue
        per = _per_channel(g, m, zero)
        if m.side is Side.IN:
            ignores[m.module] = per
        elif m.module not in in_mods or weights.zero(_as_in(m, g)) is not None:
            # a layer with an IN member but no IN weights (depthwise) only carries the group
            writers_silent &= per
            n_writers += 1
    if policy is Reconcile.UNION:
        return [c for c in range(g.size) if votes[c]], ""
    if n_writers == 0:
        writers_silent[:] = False
    dead = torch.ones(g.size, dtype=torch.bool)
    constant: dict[str, int] = {}  # reader -> masked-filter channels arriving nonzero there
    unmasked: dict[str, int] = {}  # reader -> channels other readers ignore but it reads
    readers = _readers(g, weights)
    for r in readers:
        ignored = ignores.get(r.module, torch.zeros(g.size, dtype=torch.bool))
        arrived = zero_at.get(r.module)
        zero = writers_silent & _per_channel(g, r, arrived) if arrived is not None else \
            torch.zeros(g.size, dtype=torch.bool)
        ok = ignored | zero
        if bool((writers_silent & ~ok).any()):
            constant[r.module] = int((writers_silent & ~ok).sum())
        if bool((votes & ~writers_silent & ~ok).any()):
            unmasked[r.module] = int((votes & ~writers_silent & ~ok).sum())
        dead &= ok
    if not readers:
        dead = writers_silent.clone()
    stay = int((votes & ~dead).sum())
    reasons = []
    if constant:
        fqn, n = next(iter(constant.items()))
        reasons.append(
            f"{n} channel(s) with masked filters reach {fqn!r} as a nonzero constant (a bias, a "
            "BatchNorm shift or an op with f(0) != 0), which it reads: mask the bias and the "
            "following BatchNorm's weight and bias too")
    if unmasked:
        fqn, n = next(iter(unmasked.items()))
        reasons.append(f"{n} channel(s) masked elsewhere in the group are still read by {fqn!r}: "
                       "mask them there too")
    why = ""
    if stay:
        why = (f"{stay} masked channel(s) stay because removing them would change the output: "
               + "; ".join(reasons or ["a layer of the group still reads them"])
               + " (or use policy='union')")
    return [c for c in range(g.size) if dead[c]], why


def _as_in(m: Member, g: ChannelGroup) -> Member:
    for other in g.members:
        if other.module == m.module and other.side is Side.IN:
            return other
    return m


def _keep(g: ChannelGroup, dead: list[int]) -> tuple[tuple[int, ...], str]:
    """Channels to keep: all but ``dead``, but every layer axis keeps at least one channel.

    A group can span several producers (``cat([a(x), b(x)])`` followed by a residual add): a
    layer whose every channel is dead still needs one, as PyTorch layers cannot be empty.
    """
    keep, note = _keep_blocks(g, dead)
    kept = set(keep)
    rescued = set()
    for m in g.members:
        if m.index_map.channel and not kept.intersection(m.index_map.channel):
            rescued.add(min(m.index_map.channel))
    if not rescued:
        return keep, note
    if g.blocks:  # keeping one more channel in a block would unbalance the blocks: keep all
        return tuple(range(g.size)), "dead channels stay: removing them would empty a layer"
    why = (f"{len(rescued)} dead channel(s) stay because removing them would leave a layer "
           "with no channels")
    return tuple(sorted(kept | rescued)), "; ".join(filter(None, [note, why]))


def _keep_blocks(g: ChannelGroup, dead: list[int]) -> tuple[tuple[int, ...], str]:
    """All channels but ``dead``, respecting grouped-conv blocks and never empty."""
    gone = set(dead)
    if g.blocks:
        labels = sorted(set(g.blocks))
        per_block = {b: [c for c in range(g.size) if g.blocks[c] == b] for b in labels}
        n = min(sum(c in gone for c in chans) for chans in per_block.values())
        n = min(n, min(len(chans) for chans in per_block.values()) - 1)
        drop = {c for chans in per_block.values() for c in [c for c in chans if c in gone][:n]}
        keep = tuple(c for c in range(g.size) if c not in drop)
        note = "" if len(drop) == len(gone) else (
            f"{len(gone) - len(drop)} dead channel(s) stay so that every conv group "
            "(block) keeps the same number of channels")
        return keep, note
    keep = tuple(c for c in range(g.size) if c not in gone)
    if not keep:
        return (0,), "every channel is dead; channel 0 stays because a layer needs one"
    return keep, ""
