"""ModelEMA and the Trainer under DDP: 2 processes, gloo on loopback, CPU only."""
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ema_cuda import ModelEMA, Trainer, models
from ema_cuda import distributed as dist_utils
from ema_cuda.ema_decay_schedules import ConstantDecay
from dist_helpers import run_workers
from support import N_FEATURES, Net, seeded
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD = 2
PER_RANK_BATCH = 4
PARAMS = {
    "max_epochs": 2,
    "initial_lr": 0.2,
    "optimizer": "SGD",
    "optimizer_params": {"momentum": 0.9},
    "ema": True,
    "ema_params": {"decay": 0.9, "decay_type": "threshold"},
    "progress_bar": False,
    "silent_mode": True,
    "seed": 0,
}


def dataset():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 16, generator=gen)
    y = torch.randint(0, 4, (64,), generator=gen)
    return TensorDataset(x, y)


def mlp(seed):
    return seeded(models.MLP, seed, in_features=16, num_classes=4, hidden_features=(32,))


def _ddp_worker(rank, world, outdir):
    import ema_cuda.checkpoint as ckpt_io

    saves = []
    save = ckpt_io.save_checkpoint

    def counting_save(state, path):
        saves.append(str(path))
        return save(state, path)

    ckpt_io.save_checkpoint = counting_save

    # 1. The Trainer under DDP, which initialises the process group itself
    # (the samplers are told their rank).  Each rank starts from its own initialisation:
    # DDP's broadcast at wrapping time must make them, and the EMAs, equal.
    ds = dataset()
    train = DataLoader(ds, batch_size=PER_RANK_BATCH, sampler=DistributedSampler(ds, WORLD, rank, shuffle=False))
    valid = DataLoader(ds, batch_size=PER_RANK_BATCH, sampler=DistributedSampler(ds, WORLD, rank, shuffle=False))
    model = mlp(seed=100 + rank)
    trainer = Trainer("ddp", outdir)
    trainer.train(model, dict(PARAMS), train, valid)
    assert dist.is_initialized() and dist.get_world_size() == world  # initialised from the environment
    assert isinstance(trainer.net, nn.parallel.DistributedDataParallel)
    result = {
        "ema": {k: v.clone() for k, v in trainer.ema.ema.state_dict().items()},
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "history": trainer.history,
        "saves": saves,
        "main": trainer.is_main_process,
    }

    # 2. Stopped after the first epoch and resumed (every rank reads rank 0's
    # checkpoint, and its own random state): the same EMA as uninterrupted.
    first = Trainer("ddp_resume", outdir)
    first.train(mlp(seed=100 + rank), dict(PARAMS, max_epochs=1), train, valid)
    resumed = Trainer("ddp_resume", outdir)
    resumed.train(mlp(seed=200 + rank), dict(PARAMS, resume=True), train, valid)
    result["resumed_ema"] = {k: v.clone() for k, v in resumed.ema.ema.state_dict().items()}
    result["resumed_history"] = resumed.history

    # 3. BatchNorm statistics come from each rank's batch: the EMAs' buffers
    # differ until they are broadcast; the parameters agree throughout.
    net = nn.parallel.DistributedDataParallel(seeded(Net, dropout=0.0))
    ema = ModelEMA(net, 0.9, ConstantDecay())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    for step in range(1, 6):
        net(torch.randn(5, N_FEATURES, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(net, step, 5)
    try:
        dist_utils.check_ema_synchronized(ema)
        result["differ_before_broadcast"] = False
    except RuntimeError as exc:
        result["differ_before_broadcast"] = "ranks [1] disagree with rank 0" in str(exc)
    result["bn_before"] = ema.ema.bn.running_mean.clone()
    result["weight"] = ema.ema.fc1.weight.clone()
    dist_utils.broadcast_ema_buffers(ema)
    dist_utils.check_ema_synchronized(ema)  # raises if they still differ
    result["bn_after"] = ema.ema.bn.running_mean.clone()
    torch.save(result, f"{outdir}/rank{rank}.pt")


def test_ddp_trainer_ema_equals_single_process_run_of_the_global_batch(tmp_path):
    run_workers(_ddp_worker, WORLD, (str(tmp_path),), workdir=tmp_path / "errors", timeout=90)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))

    # All ranks agree on the EMA and the model, bit for bit.
    for key in r0["ema"]:
        assert torch.equal(r0["ema"][key], r1["ema"][key]), key
        assert torch.equal(r0["model"][key], r1["model"][key]), key
    # Checkpoints were written by rank 0 only, and hold what the ranks hold.
    assert r0["main"] and not r1["main"]
    assert len(r0["saves"]) >= 2 and r1["saves"] == []
    ckpt = torch.load(tmp_path / "ddp" / "ckpt_latest.pth", weights_only=True)
    for key, v in ckpt["ema_net"].items():
        assert torch.equal(v, r0["ema"][key]), key
    assert len(ckpt["rng_states"]) == WORLD

    # A single process on the global batch (both ranks' samples) follows the
    # same trajectory: the same EMA up to the order of floating-point sums.
    ds = dataset()
    single = Trainer("single", tmp_path)
    model = mlp(seed=100)  # rank 0's initialisation, which DDP broadcast
    single.train(model, dict(PARAMS), DataLoader(ds, batch_size=WORLD * PER_RANK_BATCH),
                 DataLoader(ds, batch_size=WORLD * PER_RANK_BATCH))
    for key, v in single.ema.ema.state_dict().items():
        torch.testing.assert_close(r0["ema"][key], v, rtol=1e-5, atol=1e-6, msg=key)
    assert single.ema.num_updates == ckpt["ema_state"]["num_updates"] == 2 * 64 // (WORLD * PER_RANK_BATCH)
    for a, b in zip(r0["history"], single.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-5)
        assert a["valid_accuracy"] == b["valid_accuracy"]

    # The resumed run ends where the uninterrupted one does, on every rank.
    for r in (r0, r1):
        for key, v in r0["ema"].items():
            assert torch.equal(r["resumed_ema"][key], v), key
    assert [h["epoch"] for h in r0["resumed_history"]] == [1, 2]
    assert r0["resumed_history"][1]["valid_loss"] == r0["history"][1]["valid_loss"]

    # BatchNorm buffers: different per rank until broadcast, equal afterwards.
    assert r0["differ_before_broadcast"] and r1["differ_before_broadcast"]
    assert not torch.equal(r0["bn_before"], r1["bn_before"])
    assert torch.equal(r0["bn_after"], r1["bn_after"]) and torch.equal(r1["bn_after"], r0["bn_before"])
    assert torch.equal(r0["weight"], r1["weight"])


def _loader_length_worker(rank, world, outdir):
    ds = dataset()
    # Rank 1 sees a different number of batches: the trainer refuses to start.
    train = DataLoader(ds, batch_size=PER_RANK_BATCH * (1 + rank))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Trainer("bad", outdir).train(mlp(0), dict(PARAMS), train, train)
    except ValueError as exc:
        assert "different lengths [16, 8]" in str(exc), exc
    else:
        raise AssertionError("unequal loader lengths were accepted")
    # Equal lengths without a DistributedSampler: a warning, not an error.
    with pytest.warns(RuntimeWarning, match="no DistributedSampler"):
        Trainer("warn", outdir).train(mlp(0), dict(PARAMS, max_epochs=1, save_model=False),
                                      DataLoader(ds, batch_size=32), DataLoader(ds, batch_size=32))


def test_ddp_trainer_checks_the_loaders(tmp_path):
    run_workers(_loader_length_worker, WORLD, (str(tmp_path),), workdir=tmp_path / "errors", timeout=60)


def test_init_from_env_is_a_no_op_for_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist_utils.init_from_env() is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="RANK"):
            dist_utils.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        dist_utils.env_world_size()
