"""MODEL arguments of the command line: ``torchvision:NAME``, ``timm:NAME``,
``path/to/file.py:factory`` or ``package.module:factory``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink.progress import stage


class SpecError(ValueError):
    """A MODEL or option argument the CLI cannot interpret."""


def load_model(spec: str) -> nn.Module:
    """Build the model a MODEL argument names, in eval mode.

    Args:
        spec: ``torchvision:NAME``, ``timm:NAME``, ``path/to/file.py:factory`` or
            ``package.module:factory``.

    Returns:
        The model. torchvision and timm models get random weights with BN statistics
        calibrated on random data (no download; realistic activations for benchmarks).

    Raises:
        SpecError: the spec is malformed, names no model, or the factory fails.
    """
    with stage(f"load {spec}"):
        return _load_model(spec)


def _load_model(spec: str) -> nn.Module:
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise SpecError(
            f"MODEL {spec!r} is not a model spec. Use torchvision:NAME (e.g. torchvision:resnet18),"
            " timm:NAME, path/to/file.py:factory or package.module:factory.")
    if kind == "torchvision":
        model = _zoo_model("torchvision", name)
    elif kind == "timm":
        model = _zoo_model("timm", name)
    else:
        model = _factory_model(kind, name, spec)
    if not isinstance(model, nn.Module):
        raise SpecError(f"MODEL {spec!r}: the factory returned {type(model).__name__}, not an "
                        "nn.Module. Point it at a function that builds and returns the model.")
    return model.eval()


def _zoo_model(zoo: str, name: str) -> nn.Module:
    try:
        if zoo == "torchvision":
            import torchvision

            known = torchvision.models.list_models()
            if name not in known:
                close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                raise SpecError(f"torchvision has no model {name!r}; {hint}See "
                                "torchvision.models.list_models() for the names.")
            model = torchvision.models.get_model(name, weights=None)
        else:
            import timm

            if name not in timm.list_models():
                raise SpecError(f"timm has no model {name!r}; see timm.list_models('*{name}*')")
            model = timm.create_model(name, pretrained=False)
    except ImportError as e:
        raise SpecError(f"{zoo}:{name} needs the {zoo!r} package: pip install {zoo}") from e
    from shrink.testing import calibrate_bn_, randomize_

    randomize_(model)
    shape = first_input_shape(model)
    gen = torch.Generator().manual_seed(0)
    calibrate_bn_(model, lambda: (torch.randn(4, *shape[1:], generator=gen),), steps=2)
    return model.eval()


def first_input_shape(model: nn.Module) -> tuple[int, ...]:
    from shrink.api import infer_inputs

    shape = tuple(infer_inputs(model)[0].shape)
    if type(model).__name__ == "Inception3":
        shape = (*shape[:2], 299, 299)
    return shape


def _factory_model(module: str, attr: str, spec: str) -> Any:
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise SpecError(f"MODEL {spec!r}: file {path} does not exist")
        modspec = importlib.util.spec_from_file_location(f"_shrink_user_{path.stem}", path)
        if modspec is None or modspec.loader is None:
            raise SpecError(f"MODEL {spec!r}: cannot import {path} as Python")
        mod = importlib.util.module_from_spec(modspec)
        try:
            modspec.loader.exec_module(mod)
        except Exception as e:
            raise SpecError(f"MODEL {spec!r}: importing {path} failed: "
                            f"{type(e).__name__}: {e}") from e
    else:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise SpecError(f"MODEL {spec!r}: cannot import module {module!r} ({e}); check the "
                            "name and that it is on PYTHONPATH, or pass a .py file path") from e
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        names = sorted(n for n in dir(mod) if callable(getattr(mod, n)) and not n.startswith("_"))
        raise SpecError(f"MODEL {spec!r}: {module} has no callable {attr!r}; it has {names[:10]}")
    if isinstance(factory, nn.Module):
        return factory
    try:
        return factory()
    except Exception as e:
        raise SpecError(f"MODEL {spec!r}: calling {attr}() failed: {type(e).__name__}: {e}") from e
