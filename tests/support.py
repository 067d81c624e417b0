"""Small models, data and comparisons that several test files share.

Import what a file needs (``from support import Net, loaders, equal_states``);
``one_thread`` is an autouse fixture, so importing it into a test module is
what turns it on there.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_FEATURES, N_CLASSES = 8, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for the module's tests.

    Other suites run beside this one on a 2-core machine, and tiny models
    gain nothing from threads: they only add contention (a 5x5 convolution
    went from 1 ms to 60 ms).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(nn.Module):
    """Linear-BN-ReLU-Dropout-Linear: BN buffers (float and int) and dropout (RNG) exercise everything."""

    def __init__(self, hidden=16, dropout=0.2, in_features=N_FEATURES, num_classes=N_CLASSES):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.bn(self.fc1(x)))))


def dataset(n=40, seed=0):
    """``n`` samples of ``N_FEATURES`` features; the class follows the first two features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()).clamp(max=N_CLASSES - 1)
    return TensorDataset(x, y)


def loaders(batch_size=8, own_generator=True, n=40):
    """A shuffled train loader (``n`` samples; with its own generator, or the global one) and a 24-sample valid loader."""
    gen = torch.Generator().manual_seed(123) if own_generator else None
    train = DataLoader(dataset(n), batch_size=batch_size, shuffle=True, generator=gen)
    valid = DataLoader(dataset(24, seed=1), batch_size=16)
    return train, valid


def state(module):
    """A copy of ``module.state_dict()`` that later training cannot change."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def equal_states(a, b):
    """Same keys and bit-identical tensors (state dicts, or modules: their state dicts are compared)."""
    if isinstance(a, nn.Module):
        a = a.state_dict()
    if isinstance(b, nn.Module):
        b = b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def equal_nested(a, b):
    """Bit-identical nested checkpoint contents: tensors (dtype included), dicts, lists, numbers (NaN equals NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(equal_nested(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b
