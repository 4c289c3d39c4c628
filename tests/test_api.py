import subprocess
import sys

import pytest
import torch
from torch import nn

import shrink
from shrink.plan import Side
from shrink.testing import assert_unchanged, state_snapshot
from tests.helpers import n_params


def _net() -> nn.Module:
    # 32 channels: round_to="auto" rounds kept counts to 16, so half of 32 is really pruned
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def test_compress_returns_new_smaller_model_and_leaves_input_alone() -> None:
    model = _net()
    model.register_forward_hook(lambda m, i, o: None)
    snap = state_snapshot(model)
    small = shrink.compress(model, 0.5)
    assert small is not model
    assert n_params(small) < n_params(model)
    assert_unchanged(model, snap)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_compress_infers_image_inputs_from_first_conv() -> None:
    x = shrink.infer_inputs(_net())[0]
    assert x.shape == (1, 3, 224, 224)


def test_compress_without_inferable_inputs_says_pass_example_inputs() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(shrink.ConfigError, match="example_inputs"):
        shrink.compress(model, 0.5)


def test_unknown_option_and_bad_importance_are_config_errors() -> None:
    with pytest.raises(shrink.ConfigError, match="unknown option"):
        shrink.compress(_net(), 0.5, nrom=2)
    with pytest.raises(shrink.ConfigError, match="importance"):
        shrink.compress(_net(), 0.5, importance="magic")
    with pytest.raises(shrink.ConfigError, match="norm must be 1, 2 or inf"):
        shrink.compress(_net(), 0.5, norm=3)
    with pytest.raises(shrink.ConfigError, match="scope"):
        shrink.compress(_net(), 0.5, scope="everywhere")


def test_failed_compress_leaves_model_untouched() -> None:
    model = _net()
    snap = state_snapshot(model)
    with pytest.raises(shrink.ShrinkError):
        shrink.compress(model, 0.5, example_inputs=torch.randn(1, 5, 8, 8))
    assert_unchanged(model, snap)


def test_random_importance_is_reproducible_with_seed() -> None:
    model = _net()
    x = (torch.randn(1, 3, 16, 16),)
    plans = [shrink.prune(model, x, shrink.PruneConfig(0.5, importance="random", seed=s)).plan
             for s in (1, 1, 2)]
    assert plans[0] == plans[1]
    assert plans[0] != plans[2]


def test_user_scores_choose_the_channels() -> None:
    model = _net()
    scores = {"0": torch.arange(32.0)}  # channel i scores i: the low half goes
    res = shrink.prune(model, (torch.randn(1, 3, 8, 8),),
                       shrink.PruneConfig(0.5, importance=scores))
    (d,) = [d for d in res.plan.decisions if d.group == "0:out"]
    assert d.keep == tuple(range(16, 32))
    assert not [d for d in res.plan.decisions if d.group != "0:out"]  # unscored groups stay


def test_report_prints_params_macs_and_groups() -> None:
    res = shrink.prune(_net(), (torch.randn(1, 3, 8, 8),), shrink.PruneConfig(0.5))
    text = str(res.report)
    assert "params" in text
    assert "MACs" in text
    assert "0:out" in text
    assert "pinned" in text
    assert res.report.macs_after < res.report.macs_before


def test_import_shrink_is_lean() -> None:
    code = ("import sys, shrink; bad = [m for m in ('onnx', 'onnxruntime', 'torchvision', "
            "'safetensors', 'matplotlib', 'torch_pruning', 'transformers') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_are_documented() -> None:
    for name in shrink.__all__:
        obj = getattr(shrink, name)
        if callable(obj) and not isinstance(obj, type(Side.IN)):
            assert obj.__doc__, f"shrink.{name} has no docstring"


def test_inferred_inputs_skip_tensors_owned_by_containers() -> None:
    class WithToken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Parameter(torch.zeros(1, 1, 4))  # like a ViT class token
            self.proj = nn.Conv2d(5, 4, 2)

    assert shrink.infer_inputs(WithToken())[0].shape == (1, 5, 224, 224)
    assert shrink.infer_inputs(nn.Sequential(nn.Linear(7, 2)))[0].shape == (1, 7)


def test_public_api_is_small_and_plumbing_stays_importable() -> None:
    assert len(shrink.__all__) <= 40
    assert len(set(shrink.__all__)) == len(shrink.__all__)
    assert all(hasattr(shrink, n) for n in shrink.__all__)
    from shrink.criteria import LnNorm, Taylor  # noqa: F401
    from shrink.plan import ChannelGroup, Member  # noqa: F401
    from shrink.select import Global, Target, Uniform  # noqa: F401
    for gone in ("make_config", "export_onnx_with_report", "Uniform", "AxisScores", "Keep"):
        assert not hasattr(shrink, gone), gone


def test_an_int_ratio_is_refused_and_amount_removes_channels() -> None:
    with pytest.raises(shrink.ConfigError, match=r"ratio=1 is an int.*amount=1"):
        shrink.compress(_net(), 1)
    with pytest.raises(shrink.ConfigError, match="ratio= or amount=, not both"):
        shrink.PruneConfig(0.5, amount=2)
    with pytest.raises(shrink.ConfigError, match="say how much to remove"):
        shrink.PruneConfig()
    small = shrink.compress(_net(), amount=3, round_to=1)
    assert small[0].out_channels == 32 - 3
    assert small[3].out_channels == 32 - 3
    assert shrink.compress(_net(), 0).state_dict().keys() == _net().state_dict().keys()


def test_compress_and_prune_config_have_the_same_options_and_defaults() -> None:
    import dataclasses

    from shrink.config import option_names
    from shrink.provenance import plans_of

    model, x = _net(), (torch.randn(1, 3, 32, 32),)
    by_config = shrink.prune(model, x, shrink.PruneConfig(0.5)).plan
    (by_compress,) = plans_of(shrink.compress(model, 0.5, example_inputs=x))
    assert by_compress == by_config
    cfg = shrink.PruneConfig(0.5)
    assert cfg.policy.round_to == "auto"  # the documented default, whichever way it is built
    assert set(option_names()) == {f.name for f in dataclasses.fields(shrink.PruneConfig)}
    assert "ratio" in option_names()
    assert "amount" in option_names()
