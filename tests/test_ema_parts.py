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


# ---------------------------------------------------------------- _overlap


def test_overlapping_pairs_finds_every_shared_byte_and_nothing_else():
    base = torch.zeros(100)
    disjoint = [base[0:10], base[10:20], torch.zeros(5)]
    assert list(overlapping_pairs(disjoint)) == []  # touching ends share no byte
    inner, outer, tail = base[20:25], base[15:40], base[39:41]
    pairs = {frozenset(p) for p in overlapping_pairs([inner, outer, tail, base[50:60]])}
    assert pairs == {frozenset((0, 1)), frozenset((1, 2))}
    # A span inside a long one is found even when a shorter one lies between them.
    long, short, later = base[0:90], base[1:2], base[80:85]
    assert {frozenset(p) for p in overlapping_pairs([long, short, later])} == {frozenset((0, 1)), frozenset((0, 2))}


def test_overlapping_pairs_ignores_tensors_without_memory():
    base = torch.zeros(10)
    assert list(overlapping_pairs([base, base[3:3], torch.zeros(10, device="meta")])) == []


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


def test_check_ema_params_raises_what_from_params_would_without_building():
    check_ema_params({"decay": 0.9, "decay_type": "ramp", "tau": 10, "buffers": "copy"})
    with pytest.raises(ValueError, match=r"'tua' \(did you mean 'tau'\?\)"):
        check_ema_params({"decay_type": "ramp", "tua": 10})
    with pytest.raises(ValueError, match=r"ema_params: unknown decay_type 'cosine'"):
        check_ema_params({"decay_type": "cosine"})


# ---------------------------------------------------------------- the averaged module and the pickled path


class KD(nn.Module):
    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        self.teacher = nn.Linear(3, 3)


def test_averaged_module_is_the_tree_the_ema_holds():
    ema = ModelEMA(nn.Linear(3, 3), 0.9, ConstantDecay())
    assert ema.averaged_module is ema.ema
    kd = KDModelEMA(KD(), 0.9, ConstantDecay())
    assert kd.averaged_module is kd.ema.student
    assert set(kd.state_dict()["ema"]) == set(kd.averaged_module.state_dict())


@pytest.mark.parametrize("cls,model", [(ModelEMA, lambda: nn.Linear(3, 3)), (KDModelEMA, KD)])
def test_pickles_name_the_public_path(cls, model):
    # NOTE [pickled path]: a pickle names the class by its public path, as the single-module EMA's did, and
    # no internal module of the package (they may move).
    ema = cls(model(), 0.9, ConstantDecay())
    strings = [arg for _, arg, _ in pickletools.genops(pickle.dumps(ema)) if isinstance(arg, str)]
    assert "ema_cuda.ema" in strings and cls.__name__ in strings
    assert not any(s.startswith("ema_cuda.ema.") for s in strings)
    twin = copy.deepcopy(ema)
    assert type(twin) is cls and twin.averaged_module is not ema.averaged_module
