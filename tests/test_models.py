"""models.get / models.register: building by name and choosing ema_net vs net from a checkpoint."""
import sys
import types
import warnings

import pytest
import torch
from torch import nn

from ema_cuda import models
from ema_cuda.checkpoint import CheckpointError, save_checkpoint
from support import equal_states


def _perturbed(model, scale):
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(scale)
    return model


def test_builtins_forward_shapes():
    cnn = models.get("digits_cnn", num_classes=10)
    assert cnn(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert cnn(torch.randn(5, 64)).shape == (5, 10)  # flat sklearn rows
    mlp = models.get("mlp", num_classes=3, in_features=64, hidden_features=(16, 8))
    assert mlp(torch.randn(2, 64)).shape == (2, 3)
    assert {"digits_cnn", "mlp"} <= set(models.list_models())


@pytest.mark.parametrize(
    "entries, load_ema, expected",
    [
        (("net", "ema_net"), True, "ema_net"),
        (("net",), True, "net"),
        (("net", "ema_net"), False, "net"),
    ],
)
def test_get_prefers_ema_net_then_net(tmp_path, entries, load_ema, expected):
    torch.manual_seed(0)
    weights = {"net": _perturbed(models.get("digits_cnn", num_classes=4), 0.0),
               "ema_net": _perturbed(models.get("digits_cnn", num_classes=4), 0.5)}
    path = save_checkpoint({k: weights[k].state_dict() for k in entries}, tmp_path / "c.pth")
    loaded = models.get("digits_cnn", num_classes=4, checkpoint_path=path, load_ema=load_ema)
    assert equal_states(loaded, weights[expected]) and loaded.loaded_checkpoint_key == expected


def _four_classes(path):
    save_checkpoint({"net": models.get("digits_cnn", num_classes=4).state_dict()}, path)


def _no_weights(path):
    save_checkpoint({"epoch": 1}, path)


def _zeros(path):
    path.write_bytes(b"\x00" * 100)


@pytest.mark.parametrize(
    "write, exc, match",
    [
        (_four_classes, CheckpointError, r"c\.pth.*'net'.*'classifier\.weight'.*\(4, 64\).*\(10, 64\)"),
        (_no_weights, CheckpointError, r"c\.pth.*'ema_net'.*'net'"),
        (_zeros, CheckpointError, r"c\.pth"),
        (None, FileNotFoundError, r"c\.pth"),
    ],
    ids=["shape", "no-weights", "corrupt", "missing"],
)
def test_get_errors_name_file_and_key(tmp_path, write, exc, match):
    path = tmp_path / "c.pth"
    if write is not None:
        write(path)
    with pytest.raises(exc, match=match):
        models.get("digits_cnn", num_classes=10, checkpoint_path=path)


def test_unknown_name_lists_registered():
    with pytest.raises(ValueError, match=r"'no_such_net'.*digits_cnn.*mlp"):
        models.get("no_such_net")
    with pytest.raises(ValueError, match="unknown model source"):
        models.get("keras:foo")


def test_a_broken_external_package_warns_and_leaves_the_registry_usable(monkeypatch):
    # E.g. a torchvision built for another torch raises RuntimeError on import.
    real_import = models.importlib.import_module

    def import_module(name, *args):
        if name in ("torchvision", "timm"):
            raise RuntimeError(f"{name} was built for another torch")
        return real_import(name, *args)

    monkeypatch.setattr(models.importlib, "import_module", import_module)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"unknown model name 'no_such_net'.*digits_cnn"):
            models.get("no_such_net")
        with pytest.raises(ValueError, match=r"timm is installed but failed to import \(RuntimeError: timm was"):
            models.get("timm:resnet18")
        assert models.list_models(include_external=True) == models.list_models()
    messages = {str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)}
    for name in ("torchvision", "timm"):
        assert f"ema_cuda.models: {name} is installed but failed to import (RuntimeError: {name} was built for " \
               "another torch); its models are not available" in messages
    assert isinstance(models.get("mlp"), nn.Module)


def test_register_and_factory(tmp_path):
    class Tiny(nn.Module):
        def __init__(self, n=2):
            super().__init__()
            self.fc = nn.Linear(3, n)

    models.register("tiny_for_test", Tiny, overwrite=True)
    assert isinstance(models.get("tiny_for_test", n=5), Tiny)
    with pytest.raises(ValueError, match="already registered"):
        models.register("tiny_for_test", lambda: Tiny())

    @models.register(overwrite=True)
    def tiny_decorated():
        return Tiny(1)

    assert models.get("tiny_decorated").fc.out_features == 1
    # A factory (here the class) instead of a name.
    assert models.get(Tiny, n=7).fc.out_features == 7
    with pytest.raises(TypeError, match="not an nn.Module"):
        models.get(lambda: 3)


def test_external_registries_are_used_when_installed(monkeypatch):
    # A stand-in torchvision/timm: checks the name routing without the packages.
    built = {}
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(
        list_models=lambda: ["resnet_x"],
        get_model=lambda name, **kw: built.setdefault("tv", (name, kw)) and nn.Linear(1, 1),
    )
    timm = types.ModuleType("timm")
    timm.list_models = lambda: ["vit_x", "resnet_x"]
    timm.create_model = lambda name, **kw: built.setdefault("timm", (name, kw)) and nn.Linear(1, 1)
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "timm", timm)

    # A bare name both packages have is ambiguous (see test_ambiguous_bare_name_is_an_error); qualified, it works.
    models.get("torchvision:resnet_x", num_classes=3)
    assert built["tv"] == ("resnet_x", {"weights": None, "num_classes": 3})
    models.get("timm:resnet_x")
    assert built["timm"] == ("resnet_x", {"pretrained": False})
    assert "torchvision:resnet_x" in models.list_models(include_external=True)
    with pytest.raises(ValueError, match="torchvision has no model 'nope'"):
        models.get("torchvision:nope")


def _stub_external(monkeypatch, tv_names, timm_names):
    built = []
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(list_models=lambda: list(tv_names),
                                      get_model=lambda name, **kw: built.append(("torchvision", name)) or nn.Linear(1, 1))
    timm = types.ModuleType("timm")
    timm.list_models = lambda: list(timm_names)
    timm.create_model = lambda name, **kw: built.append(("timm", name)) or nn.Linear(1, 1)
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "timm", timm)
    return built


def test_ambiguous_bare_name_is_an_error_listing_the_qualified_choices(monkeypatch):
    built = _stub_external(monkeypatch, ["resnet18", "vgg11"], ["resnet18", "vit_tiny"])
    with pytest.raises(ValueError, match=r"'resnet18' is ambiguous: both torchvision and timm have it; "
                                         r"use 'torchvision:resnet18' or 'timm:resnet18'"):
        models.get("resnet18")
    assert built == []
    models.get("vgg11")
    models.get("vit_tiny")
    models.get("timm:resnet18")
    assert built == [("torchvision", "vgg11"), ("timm", "vit_tiny"), ("timm", "resnet18")]


def test_get_returns_the_model_in_eval_mode(tmp_path, monkeypatch):
    assert models.get("digits_cnn").training is False
    assert models.get("mlp", dropout=0.5).training is False
    net = models.get("digits_cnn")
    path = save_checkpoint({"net": net.state_dict()}, tmp_path / "c.pth")
    loaded = models.get("digits_cnn", checkpoint_path=path)
    assert loaded.training is False and all(not m.training for m in loaded.modules())
    _stub_external(monkeypatch, ["resnet18"], [])
    assert models.get("resnet18").training is False
    # Deterministic: two calls of a dropout model give the same output.
    x = torch.randn(4, 64)
    m = models.get("mlp", dropout=0.5)
    assert torch.equal(m(x), m(x))


def test_get_loads_a_checkpoint_saved_from_a_compiled_model(tmp_path):
    net = models.get("digits_cnn")
    compiled = torch.compile(net, backend="eager")
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    path = save_checkpoint({"net": compiled.state_dict()}, tmp_path / "compiled.pth")  # written by other code
    loaded = models.get("digits_cnn", checkpoint_path=path)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
