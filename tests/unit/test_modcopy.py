"""copy_module must copy exactly as copy.deepcopy does, only faster."""

import copy
from typing import Any

import pytest
import torch
from torch import fx, nn

from shrink.modcopy import copy_module


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.again = self.block  # the same submodule twice
        self.sizes = [1, 2, (3, 4)]
        self.table = {"a": torch.zeros(2)}
        self.parent_ref = {"me": self}  # a cycle back to the root
        self.register_buffer("steps", torch.tensor(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(x).mean((2, 3)) @ self.head.weight.T


class _OwnCopy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.copied = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> "_OwnCopy":
        new = _OwnCopy()
        new.copied = self.copied + 1
        return new


def _state(m: nn.Module) -> list[Any]:
    return [(n, type(v).__name__, sorted(vars(v)) if isinstance(v, nn.Module) else None)
            for n, v in m.named_modules(remove_duplicate=False)]


def _models() -> dict[str, nn.Module]:
    tied = _Tied()
    tied.block[0].register_forward_hook(lambda *_: None)
    wrapped = nn.Sequential(_OwnCopy(), nn.Linear(2, 2))
    return {"tied": tied, "own_deepcopy": wrapped,
            "graph_module": fx.symbolic_trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))}


@pytest.mark.parametrize("name", list(_models()))
def test_copy_module_matches_deepcopy(name: str) -> None:
    model = _models()[name]
    params = {id(p): p for p in model.parameters()}
    want, got = copy.deepcopy(model, dict(params)), copy_module(model, dict(params))
    assert _state(got) == _state(want)
    originals = dict(model.named_parameters())
    for (n1, a), (n2, b) in zip(want.named_parameters(), got.named_parameters(), strict=True):
        assert n1 == n2
        assert (a is originals[n1]) == (b is originals[n2])  # the memo's entries are used
    for (n1, a), (n2, b) in zip(want.named_buffers(), got.named_buffers(), strict=True):
        assert n1 == n2
        assert torch.equal(a, b)
        assert b is not model.get_buffer(n2)
    for m_old, m_new in zip(model.modules(), got.modules(), strict=True):
        assert m_new is not m_old
        assert m_new._forward_hooks is not m_old._forward_hooks
        assert list(m_new._forward_hooks.values()) == list(m_old._forward_hooks.values())


def test_copy_module_keeps_sharing_and_cycles() -> None:
    model = _Tied()
    new = copy_module(model)
    assert new.head.weight is new.emb.weight
    assert new.head.weight is not model.head.weight
    assert new.again is new.block
    assert new.parent_ref["me"] is new
    assert new.sizes == model.sizes
    assert new.sizes is not model.sizes
    assert new.table["a"] is not model.table["a"]
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(new(x), model(x))


def test_copy_module_defers_to_a_custom_deepcopy() -> None:
    new = copy_module(nn.Sequential(_OwnCopy()))
    assert new[0].copied == 1


def test_copy_module_of_a_graph_module_runs_its_code() -> None:
    gm = _models()["graph_module"]
    new = copy_module(gm)
    x = torch.randn(4, 2)
    torch.testing.assert_close(new(x), gm(x))


def test_copy_module_of_many_layers_copies_every_one() -> None:
    # regression: memoising the temporary state dicts let a later dict reuse a dead one's id
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
                            for _ in range(40)])
    new = copy_module(model, {id(p): p for p in model.parameters()})
    for old, copied in zip(model.modules(), new.modules(), strict=True):
        assert type(copied) is type(old)
        assert list(copied._parameters) == list(old._parameters)
        assert list(copied._buffers) == list(old._buffers)


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.hooked = nn.Conv2d(2, 2, 1)
        self.hooked.register_forward_pre_hook(lambda *_: None)
        self.renorm = nn.Embedding(5, 2, max_norm=1.0)
        self.plain = nn.Embedding(5, 2)
        self.head = nn.Linear(2, 5)
        self.head.weight = self.renorm.weight  # tied to a layer that writes it
        self.sub = nn.Sequential(nn.Linear(2, 2))
        self.bn = nn.BatchNorm2d(2)


def test_shared_copy_shares_only_weights_that_forward_reads() -> None:
    from shrink.modcopy import shared_copy

    model = _Mixed()
    new = shared_copy(model, own=("sub",))
    assert new.conv.weight is model.conv.weight
    assert new.plain.weight is model.plain.weight
    assert new.bn.weight is model.bn.weight
    assert new.bn.running_mean is model.bn.running_mean  # BN writes it in training only
    assert not new.training
    assert model.training
    assert new.hooked.weight is not model.hooked.weight  # a hook may write
    assert new.renorm.weight is not model.renorm.weight  # max_norm renormalises in place
    assert new.head.weight is new.renorm.weight  # tied to it: copied, still tied
    assert new.sub[0].weight is not model.sub[0].weight  # named in own
    assert new is not model
    assert new.conv is not model.conv


def test_set_eval_sets_every_flag_as_eval_does() -> None:
    import torchvision

    from shrink.modcopy import set_eval, set_modes

    model = torchvision.models.mobilenet_v3_small().train()
    model.features[1].training = False  # mixed flags: all must end up False
    modes = [(m, m.training) for m in model.modules()]
    assert set_eval(model) is model
    assert not any(m.training for m in model.modules())
    set_modes(modes)
    assert [m.training for m in model.modules()] == [t for _, t in modes]


def test_set_eval_runs_a_train_override() -> None:
    from shrink.modcopy import set_eval

    class FrozenNorm(nn.Sequential):  # e.g. a backbone that keeps its norms in eval
        calls = 0

        def train(self, mode: bool = True) -> "FrozenNorm":
            FrozenNorm.calls += 1
            super().train(mode)
            self[1].train(False)
            return self

    model = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenNorm(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    set_eval(model.train())
    assert FrozenNorm.calls == 2 and not any(m.training for m in model.modules())
