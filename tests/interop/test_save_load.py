"""shrink.save / shrink.load: one safetensors file (weights + plan JSON), no pickle, exact."""

from __future__ import annotations

import copy
import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import shrink
from shrink.testing import assert_unchanged, state_snapshot

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("safetensors")

MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2",
    "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s",
    "densenet121", "googlenet", "inception_v3", "squeezenet1_0", "shufflenet_v2_x1_0",
    "regnet_y_400mf", "regnet_x_400mf", "vgg11_bn", "mnasnet0_5", "alexnet",
]


def build(name: str) -> nn.Module:
    # no auxiliary heads: their train-only branch needs >= 299 px inputs
    kwargs = {"init_weights": False, "aux_logits": False} if name in ("googlenet", "inception_v3") \
        else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


FAST = ("resnet18", "mobilenet_v3_small")
"""Round-tripped here; the other MODELS are in tests/zoo/test_save_load_zoo.py (slow)."""


@pytest.mark.parametrize("name", FAST)
def test_save_load_round_trip_is_bit_identical(name: str, tmp_path: Path) -> None:
    assert_round_trip_is_bit_identical(name, tmp_path)


def assert_round_trip_is_bit_identical(name: str, tmp_path: Path) -> None:
    model = build(name)
    size = 75 if name == "inception_v3" else 64
    x = (torch.randn(1, 3, size, size),)
    res = shrink.prune(model, x, shrink.PruneConfig(0.3, verify=False))
    path = shrink.save(res, tmp_path / f"{name}.safetensors")
    fresh = build(name)  # a different random init: every weight must come from the file
    snap = state_snapshot(fresh)
    loaded = shrink.load(fresh, path)
    assert_unchanged(fresh, snap)
    _assert_same_state(res.model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(*x), res.model.eval()(*x))
    assert shrink.load_plan(path) == res.plan


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        self.tail = nn.Linear(4, 4)
        self.tail2 = nn.Linear(4, 4)
        self.tail2.weight = self.tail.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(torch.relu(self.bn(self.a(x))))
        z = self.head(y.mean(dim=(2, 3)))
        return self.tail2(self.tail(z))


def _pruned_tiny(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, shrink.Result]:
    model = Tiny().to(dtype).eval()
    res = shrink.prune(model, torch.randn(2, 3, 8, 8, dtype=dtype), shrink.PruneConfig(0.5))
    return model, res


def _safetensors_layout(data: bytes) -> tuple[dict, int]:
    """Parse the file the way the format defines it; every byte must be accounted for."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    end = 0
    for start, stop in spans:
        assert start == end, "tensor bytes must be contiguous, with nothing hidden between them"
        end = stop
    assert 8 + n + end == len(data), "bytes after the last tensor"
    return header, n


def test_saved_file_is_json_plus_raw_tensors_and_contains_no_pickle(tmp_path: Path) -> None:
    _, res = _pruned_tiny()
    path = shrink.save(res, tmp_path / "tiny.safetensors")
    data = path.read_bytes()
    assert not zipfile.is_zipfile(path)  # torch.save's format is a zip of pickles
    assert data[:1] != b"\x80"  # pickle protocol >= 2 starts with PROTO
    header, _ = _safetensors_layout(data)
    meta = header["__metadata__"]
    assert meta["format"] == "shrink.pruned"
    assert meta["format_version"] == "1"
    assert shrink.Plan.from_json(meta["plan"]) == res.plan
    assert json.loads(meta["aliases"]) == {"tail2.weight": "tail.weight"}
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} <= {"F32", "I64"}
    assert list(tmp_path.iterdir()) == [path]  # one file, no temporaries left behind


def test_tied_weights_stay_tied_after_load(tmp_path: Path) -> None:
    _, res = _pruned_tiny()
    loaded = shrink.load(Tiny().eval(), shrink.save(res, tmp_path / "t.safetensors"))
    assert loaded.tail.weight is loaded.tail2.weight
    _assert_same_state(res.model, loaded)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip(dtype: torch.dtype, tmp_path: Path) -> None:
    _, res = _pruned_tiny(dtype)
    loaded = shrink.load(Tiny().to(dtype), shrink.save(res, tmp_path / "h.safetensors"))
    _assert_same_state(res.model, loaded)
    assert loaded.a.weight.dtype == dtype


def test_load_keeps_the_fresh_models_mode(tmp_path: Path) -> None:
    _, res = _pruned_tiny()
    loaded = shrink.load(Tiny().train(), shrink.save(res, tmp_path / "m.safetensors"))
    assert all(m.training for m in loaded.modules())


def test_save_needs_the_plan_of_a_model_shrink_did_not_produce(tmp_path: Path) -> None:
    _, res = _pruned_tiny()
    hand_made = copy.deepcopy(res.model)
    del hand_made.__dict__["_shrink_provenance"]  # as if the layers had been built by hand
    with pytest.raises(shrink.ConfigError, match="cannot tell which plan"):
        shrink.save(hand_made, tmp_path / "x.safetensors")
    shrink.save(hand_made, tmp_path / "x.safetensors", plan=res.plan)
    shrink.save(res.model, tmp_path / "y.safetensors")  # a model shrink made remembers it


def test_save_refuses_a_plan_that_did_not_produce_the_model(tmp_path: Path) -> None:
    model, res = _pruned_tiny()
    with pytest.raises(shrink.PlanError, match="did not produce this model"):
        shrink.save(model, tmp_path / "x.safetensors", plan=res.plan)


@pytest.mark.parametrize(
    ("fresh", "fragment"),
    [
        (lambda: torchvision.models.resnet34(), "'layer1.2.conv1.weight'"),
        (lambda: torchvision.models.resnet18(num_classes=10), "'fc' (Linear) to have 1000"),
        (lambda: torchvision.models.resnet18().half(), "'conv1.weight' is torch.float16"),
    ],
    ids=["deeper", "other_head", "other_dtype"],
)
def test_loading_into_the_wrong_model_names_the_parameter(fresh, fragment, tmp_path: Path) -> None:
    model = torchvision.models.resnet18().eval()
    res = shrink.prune(model, torch.randn(1, 3, 32, 32), shrink.PruneConfig(0.25, verify=False))
    path = shrink.save(res, tmp_path / "r18.safetensors")
    with pytest.raises(shrink.PlanError, match="saved from a different model") as err:
        shrink.load(fresh(), path)
    assert fragment in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_saves_on_cpu_and_loads_onto_the_fresh_models_device(tmp_path: Path) -> None:
    model = Tiny().cuda().eval()
    res = shrink.prune(model, torch.randn(2, 3, 8, 8, device="cuda"), shrink.PruneConfig(0.5))
    loaded = shrink.load(Tiny().cuda(), shrink.save(res, tmp_path / "c.safetensors"))
    assert next(loaded.parameters()).is_cuda
    _assert_same_state(res.model, loaded)


def test_transformer_with_pruned_heads_stream_tokens_and_size_attribute_round_trips(
        tmp_path: Path) -> None:
    # replaced attention layers, sliced class token/position embedding, rewritten hidden_dim
    tv = pytest.importorskip("torchvision")

    def build() -> torch.nn.Module:
        return tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                           num_heads=4, hidden_dim=32, mlp_dim=64,
                                           num_classes=5).eval()

    x = torch.randn(2, 3, 32, 32)
    res = shrink.prune(build(), (x,), shrink.PruneConfig(0.5, round_to=1))
    shrink.save(res, tmp_path / "vit")
    again = shrink.load(build(), tmp_path / "vit")
    assert again.hidden_dim == 16
    assert again.encoder.pos_embedding.shape == (1, 17, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(x), res.model(x), rtol=0, atol=0)


def _small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_save_of_compress_round_trips_bit_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _small_net()
    small = shrink.compress(model, 0.5)
    path = shrink.save(small, tmp_path / "small.safetensors")
    again = shrink.load(_small_net(), path)
    _assert_same_state(small, again)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(small(x), again(x))
    assert again[0].out_channels == small[0].out_channels < 32


def test_a_fine_tuned_copy_of_a_compressed_model_saves_too(tmp_path: Path) -> None:
    small = shrink.compress(_small_net(), 0.5)
    tuned = copy.deepcopy(small)
    with torch.no_grad():
        tuned[0].weight.add_(1.0)  # weights change, the architecture does not
    again = shrink.load(_small_net(), shrink.save(tuned, tmp_path / "t.safetensors"))
    _assert_same_state(tuned, again)


def test_a_model_compressed_twice_saves_its_plan_chain(tmp_path: Path) -> None:
    once = shrink.compress(_small_net(), 0.5)
    twice = shrink.compress(once, 0.5, round_to=1)
    assert twice[0].out_channels < once[0].out_channels
    path = shrink.save(twice, tmp_path / "twice.safetensors")
    again = shrink.load(_small_net(), path)
    _assert_same_state(twice, again)
    assert shrink.load_plan(path).model == shrink.plan.fingerprint(_small_net())


def test_save_refuses_a_model_changed_after_pruning_and_names_the_fix(tmp_path: Path) -> None:
    small = shrink.compress(_small_net(), 0.5)
    small[7] = nn.Linear(small[7].in_features, 3)  # a new head: the plan no longer describes it
    with pytest.raises(shrink.ConfigError, match=r"plan=result\.plan"):
        shrink.save(small, tmp_path / "x.safetensors")
    with pytest.raises(shrink.ConfigError, match="cannot tell which plan"):
        shrink.save(_small_net(), tmp_path / "y.safetensors")
