"""The parts of the ema_cuda.ema package on their own: the overlap test, the options, the pickled path."""
import copy
import pickle
import pickletools

import pytest
import torch
from torch import nn

from ema_cuda import KDModelEMA, ModelEMA
from ema_cuda._overlap import overlapping_pairs
from ema_cuda.ema import check_ema_params
from ema_cuda.ema.options import EMAOptions
from ema_cuda.ema_decay_schedules import ConstantDecay, ExpDecay, IDecayFunction, ThresholdDecay
from support import KD, Net
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)


# ---------------------------------------------------------------- _overlap


# Spans of one 100-element buffer (``base``) and others; the index pairs that share memory.
_SPANS = {
    # Touching ends share no byte.
    "disjoint": (lambda base: [base[0:10], base[10:20], torch.zeros(5)], set()),
    "nested and chained": (lambda base: [base[20:25], base[15:40], base[39:41], base[50:60]], {(0, 1), (1, 2)}),
    # A span inside a long one is found even when a shorter one lies between them.
    "inside a long one": (lambda base: [base[0:90], base[1:2], base[80:85]], {(0, 1), (0, 2)}),
    "without memory": (lambda base: [base, base[3:3], torch.zeros(10, device="meta")], set()),
}


@pytest.mark.parametrize("case", list(_SPANS))
def test_overlapping_pairs_finds_every_shared_byte_and_nothing_else(case):
    spans, expected = _SPANS[case]
    found = {frozenset(p) for p in overlapping_pairs(spans(torch.zeros(100)))}
    assert found == {frozenset(p) for p in expected}


def test_a_model_with_two_parameters_sharing_memory_is_refused_naming_both():
    model = nn.Linear(4, 4)
    with torch.no_grad():
        model.extra = nn.Parameter(model.weight.data[0])  # a view of the weight, registered apart
    with pytest.raises(ValueError, match=r"'weight' and 'extra' are different tensors that overlap in memory"):
        ModelEMA(model, 0.9, ConstantDecay())


# ---------------------------------------------------------------- options


class HostOnly(IDecayFunction):
    def __call__(self, decay, step, total_steps):
        return decay


def test_options_are_validated_and_normalised_once():
    opts = EMAOptions(0.99, ConstantDecay(), ema_dtype="bfloat16", update_every=torch.tensor(3).item())
    assert opts.ema_dtype is torch.bfloat16 and opts.update_every == 3 and type(opts.decay) is float
    with pytest.raises(AttributeError):
        opts.decay = 0.5  # frozen
    with pytest.raises(ValueError, match=r"^Somewhere: update_every must be an integer >= 1, got 0"):
        opts.replace("Somewhere", update_every=0)
    with pytest.raises(ValueError, match="capturable=True needs update_every=1"):
        EMAOptions(0.9, ExpDecay(beta=5), update_every=2).replace("X", capturable=True)


def test_setting_an_option_on_the_ema_validates_it_and_keeps_the_old_value_on_error():
    ema = ModelEMA(nn.Linear(3, 3), 0.9, ConstantDecay())
    with pytest.raises(ValueError, match="decay must be a number in"):
        ema.decay = 1.5
    assert ema.decay == 0.9
    ema.update_every = 2
    assert ema.update_every == 2 and ema.state_dict()["update_every"] == 2
    with pytest.raises(AttributeError, match="ema_dtype is fixed at construction"):
        ema.ema_dtype = torch.float64
    cap = ModelEMA(nn.Linear(3, 3), 0.9, ThresholdDecay(), capturable=True)
    with pytest.raises(ValueError, match="tensor form"):
        cap.decay_function = HostOnly()
    assert isinstance(cap.decay_function, ThresholdDecay)


def test_check_ema_params_accepts_what_from_params_takes():
    check_ema_params({"decay": 0.9, "decay_type": "ramp", "tau": 10, "buffers": "copy"})


@pytest.mark.parametrize("params,match", [
    ({"decay_type": "ramp", "tua": 10}, r"'tua' \(did you mean 'tau'\?\)"),
    ({"decay_type": "cosine"}, r"ema_params: unknown decay_type 'cosine'"),
], ids=["misspelt option", "unknown schedule"])
def test_check_ema_params_raises_what_from_params_would_without_building(params, match):
    with pytest.raises(ValueError, match=match):
        check_ema_params(params)


# ---------------------------------------------------------------- the averaged module and the pickled path


def make_kd():
    return KD(Net(), Net())


def test_averaged_module_is_the_tree_the_ema_holds():
    ema = ModelEMA(nn.Linear(3, 3), 0.9, ConstantDecay())
    assert ema.averaged_module is ema.ema
    kd = KDModelEMA(make_kd(), 0.9, ConstantDecay())
    assert kd.averaged_module is kd.ema.student
    assert set(kd.state_dict()["ema"]) == set(kd.averaged_module.state_dict())


@pytest.mark.parametrize("cls,model", [(ModelEMA, lambda: nn.Linear(3, 3)), (KDModelEMA, make_kd)])
def test_pickles_name_the_public_path(cls, model):
    # NOTE [pickled path]: a pickle names the class by its public path, as the single-module EMA's did, and
    # no internal module of the package (they may move).
    ema = cls(model(), 0.9, ConstantDecay())
    strings = [arg for _, arg, _ in pickletools.genops(pickle.dumps(ema)) if isinstance(arg, str)]
    assert "ema_cuda.ema" in strings and cls.__name__ in strings
    assert not any(s.startswith("ema_cuda.ema.") for s in strings)
    twin = copy.deepcopy(ema)
    assert type(twin) is cls and twin.averaged_module is not ema.averaged_module
