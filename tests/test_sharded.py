"""ShardedModelEMA on an FSDP2 model and its DCP checkpoints: 2 processes, gloo on loopback, CPU only."""
import copy
import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ema_cuda import ModelEMA, models
from ema_cuda.checkpoint import CheckpointError, load_dcp_weights
from ema_cuda.ema_decay_schedules import ThresholdDecay
from dist_helpers import run_workers
from support import seeded
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD = 2
STEPS = 6


class Uneven(nn.Module):
    """Uneven shapes on purpose: 5 and 3 rows do not split evenly over 2 ranks, 1 row leaves rank 1 empty.

    Not support.Net: BatchNorm statistics, taken from each rank's own batch, would differ from those of
    the unsharded reference run on the global batch.  The int buffer ``calls`` is one FSDP2 leaves whole.
    """

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 5)
        self.b = nn.Linear(5, 3)
        self.c = nn.Linear(3, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls += 1
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def make_net(seed=0):
    return seeded(Uneven, seed)


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for m in (model.a, model.b, model.c):
        fully_shard(m)
    fully_shard(model)
    return model


def batch(step, rank):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 12, generator=gen), torch.randn(4, 1, generator=gen)


def train_step(model, opt, x, y):
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


class NoCollectives:
    """Makes every torch.distributed collective raise while active."""

    NAMES = ("all_gather_into_tensor", "all_gather", "all_reduce", "reduce_scatter_tensor", "broadcast",
             "barrier", "all_to_all_single", "send", "recv", "gather", "scatter")

    def __enter__(self):
        self.saved = {n: getattr(dist, n) for n in self.NAMES}

        def forbidden(*args, **kwargs):
            raise AssertionError("a collective was called during the EMA update")

        for n in self.NAMES:
            setattr(dist, n, forbidden)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(dist, n, f)


def _fsdp_worker(rank, world, outdir):
    from ema_cuda.sharded import ShardedModelEMA, save_sharded_checkpoint, load_sharded_checkpoint

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    model = shard(make_net())
    ema = ShardedModelEMA(model, 0.8, ThresholdDecay())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, STEPS + 1):
        train_step(model, opt, *batch(step, rank))
        with NoCollectives():
            ema.update(model, step, STEPS)
        if step == 3:
            save_sharded_checkpoint({"model": model.state_dict(), "ema": ema.state_dict()}, f"{outdir}/ckpt")
    path = save_sharded_checkpoint({"model": model.state_dict(), "ema": ema.state_dict()}, f"{outdir}/ckpt")

    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in ema.state_dict()["ema"].items()}
    local = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    result = {
        "full": full,
        "local": local,
        "ema_bytes": ema.memory_bytes(),
        "path": str(path),
        "model_full": {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
                       for k, v in model.state_dict().items()},
    }

    # swapped(): the model evaluates with the EMA weights, then gets its own back exactly.
    x = batch(99, 0)[0]
    with torch.no_grad():
        raw_out = model(x)
        before = {k: v.to_local().clone() for k, v in model.state_dict().items() if hasattr(v, "to_local")}
        with ema.swapped(model):
            ema_out = model(x)
        after = {k: v.to_local() for k, v in model.state_dict().items() if hasattr(v, "to_local")}
    result["swap_restored"] = all(torch.equal(before[k], after[k]) for k in before)
    result["raw_out"], result["ema_out"] = raw_out, ema_out

    # Load on 2 ranks: a fresh model and EMA (another initialisation) get the saved state.
    model2 = shard(make_net(seed=7))
    ema2 = ShardedModelEMA(model2, 0.5, ThresholdDecay())
    state = {"ema": ema2.state_dict()}
    load_sharded_checkpoint(state, f"{outdir}/ckpt")
    ema2.load_state_dict(state["ema"])
    result["reloaded_equal"] = all(torch.equal(v, local[k]) for k, v in ema2.ema.state_dict().items())
    result["reloaded_counters"] = (ema2.decay, ema2.num_updates)
    torch.save(result, f"{outdir}/rank{rank}.pt")


def test_fsdp2_ema_equals_unsharded_ema_and_checkpoints_reshard(tmp_path):
    run_workers(_fsdp_worker, WORLD, (str(tmp_path),), workdir=tmp_path / "errors", timeout=90)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))

    # The unsharded reference: the same model on the global batch (both ranks' samples).
    model = make_net()
    ref = ModelEMA(model, 0.8, ThresholdDecay())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, STEPS + 1):
        (x0, y0), (x1, y1) = batch(step, 0), batch(step, 1)
        train_step(model, opt, torch.cat([x0, x1]), torch.cat([y0, y1]))
        ref.update(model, step, STEPS)
    expected = ref.ema.state_dict()

    # Gathered from the shards, the EMA is the unsharded one (up to float sums in another order).
    assert r0["full"].keys() == expected.keys()
    for key, v in expected.items():
        torch.testing.assert_close(r0["full"][key], v, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(r1["full"][key], v, rtol=1e-5, atol=1e-6, msg=key)
    # Each rank holds its shard only: rows split as torch.chunk does, 5 -> 3 + 2, 1 -> 1 + 0.
    assert r0["local"]["a.weight"].shape == (3, 12) and r1["local"]["a.weight"].shape == (2, 12)
    assert r0["local"]["c.weight"].shape == (1, 3) and r1["local"]["c.weight"].shape == (0, 3)
    assert torch.equal(torch.cat([r0["local"]["a.weight"], r1["local"]["a.weight"]]), r0["full"]["a.weight"])
    # EMA memory per rank is its shard (plus 64-byte alignment per tensor), not the model.
    full_bytes = ref.memory_bytes()
    for r in (r0, r1):
        shard_bytes = sum(v.numel() * v.element_size() for v in r["local"].values())
        assert shard_bytes <= r["ema_bytes"] <= shard_bytes + 64 * len(r["local"])
        assert r["ema_bytes"] < full_bytes
    assert r0["ema_bytes"] + r1["ema_bytes"] <= full_bytes + 64 * 2 * len(expected)

    # swapped() evaluated the EMA weights and restored the training weights bit for bit.
    assert r0["swap_restored"] and r1["swap_restored"]
    probe = copy.deepcopy(model)
    probe.load_state_dict(r0["full"])
    x = batch(99, 0)[0]
    with torch.no_grad():
        torch.testing.assert_close(r0["ema_out"], probe(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(r0["ema_out"], r0["raw_out"])

    # Loaded on 2 ranks into a fresh EMA: the same shards, decay and counters.
    assert r0["reloaded_equal"] and r1["reloaded_equal"]
    assert r0["reloaded_counters"] == (0.8, STEPS)

    # Loaded on 1 process (no process group) into a plain ModelEMA of the unsharded model.
    from ema_cuda.sharded import latest_checkpoint, load_sharded_checkpoint

    ckpt_root = tmp_path / "ckpt"
    assert latest_checkpoint(ckpt_root).name == "step-2" == os.path.basename(r0["path"])
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["LATEST", "step-2"]  # the older one was removed
    single = ModelEMA(make_net(seed=5), 0.5, ThresholdDecay())
    state = {"ema": single.state_dict()}
    load_sharded_checkpoint(state, ckpt_root)
    single.load_state_dict(state["ema"])
    for key, v in single.ema.state_dict().items():
        assert torch.equal(v, r0["full"][key]), key
    assert single.num_updates == STEPS and single.decay == 0.8

    # models.get-style loading of the consolidated EMA, and of the raw weights.
    got = models.get(make_net, checkpoint_path=ckpt_root)
    assert got.loaded_checkpoint_key == "ema_net"
    for key, v in got.state_dict().items():
        assert torch.equal(v, r0["full"][key]), key
    raw = models.get(make_net, checkpoint_path=ckpt_root, load_ema=False)
    assert raw.loaded_checkpoint_key == "net"
    for key, v in raw.state_dict().items():
        assert torch.equal(v, r0["model_full"][key]), key
    with pytest.raises(CheckpointError, match="holds no ema weights"):
        only_model = tmp_path / "only_model"
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP's "assuming a single process"
            dcp.save({"model": model.state_dict()}, checkpoint_id=only_model, no_dist=True)
        load_dcp_weights(only_model, "ema")


def _killed_mid_save_worker(rank, world, outdir):
    from torch.distributed.checkpoint import filesystem

    from ema_cuda.sharded import ShardedModelEMA, save_sharded_checkpoint

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=10))
    model = shard(make_net())
    ema = ShardedModelEMA(model, 0.8, ThresholdDecay())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, opt, *batch(1, rank))
    ema.update(model, 1, STEPS)
    save_sharded_checkpoint({"ema": ema.state_dict()}, f"{outdir}/ckpt")
    full = {k: v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone()
            for k, v in ema.state_dict()["ema"].items()}
    torch.save(full, f"{outdir}/first{rank}.pt")

    train_step(model, opt, *batch(2, rank))
    ema.update(model, 2, STEPS)
    if rank == 1:
        write_data = filesystem.FileSystemWriter.write_data

        def write_then_die(self, plan, planner):
            future = write_data(self, plan, planner)
            future.wait()  # this rank's shard file is on disk ...
            os._exit(3)  # ... and the process dies before the checkpoint is complete

        filesystem.FileSystemWriter.write_data = write_then_die
    try:
        save_sharded_checkpoint({"ema": ema.state_dict()}, f"{outdir}/ckpt")
    except Exception as exc:  # rank 0 sees its peer vanish
        with open(f"{outdir}/rank0_error.txt", "w") as f:
            f.write(repr(exc))
    os._exit(0)


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    codes = run_workers(_killed_mid_save_worker, WORLD, (str(tmp_path),), workdir=tmp_path / "errors",
                        timeout=60, check=False)
    # Rank 1 died inside the save; rank 0's save failed (its peer vanished) within the 10 s group timeout.
    assert codes == [0, 3], codes
    assert "Error" in (tmp_path / "rank0_error.txt").read_text()
    root = tmp_path / "ckpt"
    assert (root / "LATEST").read_text().strip() == "step-1"
    partial = root / "step-2"
    assert partial.is_dir() and any(partial.iterdir()) and not (partial / ".metadata").exists()

    from ema_cuda.sharded import load_sharded_checkpoint

    first = torch.load(tmp_path / "first0.pt", weights_only=True)
    single = ModelEMA(make_net(seed=3), 0.5, ThresholdDecay())
    state = {"ema": single.state_dict()}
    assert load_sharded_checkpoint(state, root).name == "step-1"
    single.load_state_dict(state["ema"])
    for key, v in single.ema.state_dict().items():
        assert torch.equal(v, first[key]), key
    assert single.num_updates == 1
    # The consolidated loader (models.get) follows LATEST too.
    consolidated = load_dcp_weights(root, "ema")
    assert all(torch.equal(consolidated[k], first[k]) for k in first)


def test_plain_model_ema_refuses_a_sharded_model_and_sharded_needs_one(tmp_path):
    from ema_cuda.sharded import ShardedModelEMA

    with pytest.raises(TypeError, match="not sharded"):
        ShardedModelEMA(make_net(), 0.9, ThresholdDecay())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = shard(make_net())
        with pytest.raises(TypeError, match="use ema_cuda.ShardedModelEMA"):
            ModelEMA(model, 0.9, ThresholdDecay())
        from ema_cuda import Trainer

        loader = [(torch.randn(2, 12), torch.zeros(2, dtype=torch.long))]
        with pytest.raises(ValueError, match="the Trainer drives DDP only"):
            Trainer("fsdp", tmp_path).train(model, {"max_epochs": 1, "initial_lr": 0.1}, loader, loader)
        ema = ShardedModelEMA(model, 0.9, ThresholdDecay())
        with pytest.raises(TypeError, match="cannot be pickled"):
            copy.deepcopy(ema)
        # One rank: the shard is the whole tensor, and the update is the plain one.
        ref = ModelEMA(make_net(), 0.9, ThresholdDecay())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(model, opt, *batch(1, 0))
        ema.update(model, 1, 10)
        plain = make_net()
        plain.load_state_dict({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()})
        ref.update(plain, 1, 10)
        for key, v in ref.ema.state_dict().items():
            assert torch.equal(ema.ema.state_dict()[key], v), key
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- issue 14: names and interrupted writes


def _single_process_state(seed=0):
    ema = ModelEMA(make_net(seed), 0.8, ThresholdDecay())
    return ema, {"ema": ema.state_dict()}


def test_checkpoint_directories_are_named_after_the_optimizer_step(tmp_path):
    from ema_cuda.sharded import latest_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint

    root = tmp_path / "ckpt"
    ema, state = _single_process_state()
    assert save_sharded_checkpoint(state, root, step=300, keep=5).name == "step-300"
    assert save_sharded_checkpoint(dict(state, step=600), root, keep=5).name == "step-600"  # from the state
    # The same step again (a run resumed from step-600 saving at once): a new
    # directory, never the complete checkpoint LATEST names.
    assert save_sharded_checkpoint(state, root, step=600, keep=5).name == "step-600-2"
    assert latest_checkpoint(root).name == "step-600-2"
    assert save_sharded_checkpoint(state, root, step=900, keep=2).name == "step-900"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step-600-2", "step-900"]
    fresh, target = _single_process_state(seed=3)
    assert load_sharded_checkpoint(target, root).name == "step-900"
    fresh.load_state_dict(target["ema"])
    assert all(torch.equal(v, ema.ema.state_dict()[k]) for k, v in fresh.ema.state_dict().items())
    with pytest.raises(ValueError, match=r"step must be the optimizer step.*2.5"):
        save_sharded_checkpoint(state, root, step=2.5)


def test_without_a_step_directories_number_the_saves(tmp_path):
    from ema_cuda.sharded import save_sharded_checkpoint

    _, state = _single_process_state()
    assert [save_sharded_checkpoint(state, tmp_path).name for _ in range(2)] == ["step-1", "step-2"]


def test_interrupted_pointer_write_keeps_latest_and_leaves_no_temp(tmp_path, monkeypatch):
    from ema_cuda.sharded import latest_checkpoint, save_sharded_checkpoint

    _, state = _single_process_state()
    save_sharded_checkpoint(state, tmp_path, step=1)

    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("LATEST"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_sharded_checkpoint(state, tmp_path, step=2)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step-1"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
