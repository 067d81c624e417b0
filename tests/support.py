"""Small models, data, comparisons and stand-ins that several test files share.

Import what a file needs (``from support import Net, loaders, equal_states``);
``one_thread`` is an autouse fixture, so importing it into a test module is
what turns it on there.
"""
import contextlib
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


class ConvNet(nn.Module):
    """Conv-BN-ReLU-mean-Linear on images of 3 channels (any size): conv and linear weights, BatchNorm2d
    statistics and its int buffer, and a 4-d weight that ``channels_last`` lays out differently."""

    def __init__(self, width=6, num_classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class KD(nn.Module):
    """A distillation module as KDModelEMA takes one (SuperGradients' layout): a ``student`` that trains, a
    frozen ``teacher`` and ``arch_params``; the forward pass runs the student."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False)
        self.arch_params = {"run_teacher_on_eval": False}

    def forward(self, x):
        return self.student(x)


def seeded(build, seed=0, **kwargs):
    """``build(**kwargs)`` right after ``torch.manual_seed(seed)``: equal seeds give equal initial weights."""
    torch.manual_seed(seed)
    return build(**kwargs)


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


def assert_bit_identical(a, b):
    """Same keys, and under each the same dtype and bits (state dicts, or modules); names the first key that
    differs."""
    if isinstance(a, nn.Module):
        a = a.state_dict()
    if isinstance(b, nn.Module):
        b = b.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


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


class RecordingStreams:
    """A stand-in for the CUDA stream API of ``async_update`` (``SideStreamExecutor.default_streams``): runs
    everything at once on the host and records, in ``log``, what the EMA asks of the streams.

    Entries: ``("wait_stream", waiter, waited)``, ``("wait_event", stream, event)``, ``("record", event,
    stream)``; streams are named ``main`` (the current one), ``side``, ``side2``, ... (the side streams in
    the order they were made) and events are numbered from 1 (``events`` is the last).  ``recorded`` holds
    ``(data_ptr, stream)`` for every tensor registered with the allocator for a side stream.
    """

    class Stream:
        def __init__(self, log, name):
            self.log, self.name = log, name

        def wait_stream(self, other):
            self.log.append(("wait_stream", self.name, other.name))

        def wait_event(self, event):
            self.log.append(("wait_event", self.name, event.ident))

    class Event:
        def __init__(self, log, ident):
            self.log, self.ident = log, ident

        def record(self, stream):
            self.log.append(("record", self.ident, stream.name))

    def __init__(self):
        self.log = []
        self.active = self.Stream(self.log, "main")  # the current stream
        self.side_streams = []
        self.events = 0
        self.recorded = []

    def supports(self, device):
        return True

    def side_stream(self, device):
        n = len(self.side_streams) + 1
        self.side_streams.append(self.Stream(self.log, "side" if n == 1 else f"side{n}"))
        return self.side_streams[-1]

    def current_stream(self, device):
        return self.active

    @contextlib.contextmanager
    def stream(self, stream):
        previous, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = previous

    def new_event(self):
        self.events += 1
        return self.Event(self.log, self.events)

    def record_stream(self, tensor, stream):
        self.recorded.append((tensor.data_ptr(), stream.name))


class Tied(nn.Module):
    """One weight under two names: an embedding tied to the output projection."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.mid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 11, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.mid(self.embed(idx))))


def require_package(name: str, min_version: str = None):
    """Imports and returns the framework ``name`` for an integration test.

    ``make test`` installs every framework the integrations support and sets
    EMA_CUDA_EXPECT_INTEGRATIONS=1: there a package that is missing, too old
    or broken (a torchvision built for another torch raises RuntimeError on
    import) fails the test instead of skipping it.  Elsewhere (the suites
    against another torch release) such a test is skipped with the reason.
    EMA_CUDA_SKIP_INTEGRATIONS=1 skips every one of them: tools/test_torch_version.sh
    sets it, since the frameworks it sees were installed for .venv's torch (timm's
    torchvision, which transformers and Lightning also load, does not even import
    beside torch 2.13).  Callable at a test module's top level too.
    """
    import importlib
    import os

    from packaging.version import Version

    if os.environ.get("EMA_CUDA_SKIP_INTEGRATIONS") == "1":
        pytest.skip(f"{name}: the integration tests are off here (EMA_CUDA_SKIP_INTEGRATIONS=1: the frameworks "
                    "installed beside this torch were built for another release)", allow_module_level=True)
    try:
        module = importlib.import_module(name)
        if min_version is not None and Version(module.__version__.split("+")[0]) < Version(min_version):
            raise ImportError(f"{name} {module.__version__} is older than {min_version}")
    except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
        why = f"{name} is not usable here ({type(exc).__name__}: {exc})"
        if os.environ.get("EMA_CUDA_EXPECT_INTEGRATIONS") == "1":
            pytest.fail(why + "; `make test` installs it (INTEGRATIONS in the Makefile)", pytrace=False)
        pytest.skip(why, allow_module_level=True)
    return module


def check_dropins_benchmark(framework: str):
    """benchmarks/fw_dropins.py's rows for ``framework`` on a tiny model: every row timed, none failed."""
    from benchmarks import fw_dropins

    out = fw_dropins.rows(True, device="cpu", workloads={"tiny": [(7,), (3, 5)] * 4}, block_time=0.001, rounds=2,
                          frameworks=[framework])
    assert [r["status"] for r in out] == ["ok"] * len(out) and out
    assert all(r["native_s"] > 0 and r["ours_s"] > 0 and r["speedup"] > 0 for r in out)
    assert "tiny" in fw_dropins.table(out)
