"""ema_cuda.integrations.lightning.EMACallback with a real lightning.Trainer (issue 17).

Every run is a few dozen steps of a tiny model on the CPU.  The DDP test
starts its two ranks with dist_helpers.run_workers (as torchrun would: the
ranks find RANK/LOCAL_RANK/MASTER_PORT in their environment and Lightning
joins them instead of launching processes), so conftest runs it one group at
a time like the suite's other multi-process tests; Lightning's own launchers
(``ddp`` re-running the test script, ``ddp_spawn`` pickling the trainer)
cannot be bounded by a deadline or serialized that way.
"""
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dist_helpers import run_workers  # noqa: F401 - also marks the module for conftest's process-group lock
from support import assert_bit_identical, one_thread, require_package, state  # noqa: F401 - one_thread: autouse

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

L = require_package("lightning", "2.6")

from ema_cuda import ModelEMA  # noqa: E402
from ema_cuda.ema_decay_schedules import ExpDecay  # noqa: E402
from ema_cuda.integrations.lightning import EMACallback  # noqa: E402


class Module(L.LightningModule):
    """Linear-BN-ReLU-Linear (float and int buffers, no dropout: runs are deterministic) that records
    what it sees: the state after each optimizer step, and whether evaluation saw the EMA weights."""

    def __init__(self, bn=True):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16) if bn else nn.Identity()
        self.fc2 = nn.Linear(16, 3)
        self.steps = []  # (global_step, state) after every optimizer step
        self.seen = {"validation": [], "test": []}  # did evaluation see the EMA's weights?
        self.restored = []  # did training resume with the weights it had?

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))

    def training_step(self, batch, batch_idx):
        if self.steps:
            self.restored.append(torch.equal(self.fc1.weight, self.steps[-1][1]["fc1.weight"]))
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step > (self.steps[-1][0] if self.steps else 0):
            self.steps.append((self.trainer.global_step, state(self)))

    def _evaluate(self, kind, batch):
        ema = _callback(self.trainer).ema
        if ema is not None:
            self.seen[kind].append(torch.equal(_local(self.fc1.weight), _local(ema.ema.fc1.weight)))
        x, y = batch
        self.log(f"{kind}_loss", F.cross_entropy(self(x), y))

    def validation_step(self, batch, batch_idx):
        self._evaluate("validation", batch)

    def test_step(self, batch, batch_idx):
        self._evaluate("test", batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _callback(trainer):
    return next((c for c in trainer.callbacks if isinstance(c, EMACallback)), None)


def data(n=64, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()).clamp(max=2)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)  # no shuffle: a resumed epoch sees the same batches


def trainer(callbacks, **kwargs):
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def module(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Module(**kwargs)


def test_one_update_per_optimizer_step_with_global_step_and_estimated_total():
    """accumulate_grad_batches=2 over 8 batches x 2 epochs: 8 updates, at steps 1..8 of 8, bit-identical to a
    ModelEMA driven by hand with the states the model had after each optimizer step."""
    cb = EMACallback(decay=0.9, decay_type="exp", beta=3, copy_to_model_at_end=False)
    m = module()
    initial = state(m)
    trainer(cb, max_epochs=2, accumulate_grad_batches=2).fit(m, data())
    assert [s for s, _ in m.steps] == list(range(1, 9))
    assert cb.ema.num_updates == 8
    ref_model = module()
    ref_model.load_state_dict(initial)
    ref = ModelEMA(ref_model, 0.9, ExpDecay(beta=3))
    for step, st in m.steps:
        ref_model.load_state_dict(st)
        ref.update(ref_model, step=step, total_steps=8)
    assert_bit_identical(ref.state_dict()["ema"], cb.ema.state_dict()["ema"])
    assert_bit_identical(m, m.steps[-1][1])  # copy_to_model_at_end=False: the model keeps its weights


def test_validation_and_test_run_on_the_ema_weights_and_training_gets_its_own_back():
    cb = EMACallback(decay=0.9)
    m = module()
    fit = trainer(cb, max_epochs=2, num_sanity_val_steps=1)
    fit.fit(m, data(), data(16, seed=1))
    # sanity check, then one validation epoch per training epoch (2 batches each)
    assert m.seen["validation"] == [True] * 5
    assert m.restored and all(m.restored)
    assert_bit_identical(m, cb.ema.ema)  # copy_to_model_at_end
    assert cb.ema.num_updates == 16

    m.load_state_dict(m.steps[-1][1])  # training weights again: the test must swap the EMA in and out
    fit.test(m, data(16, seed=1))
    assert m.seen["test"] == [True, True]
    assert_bit_identical(m, m.steps[-1][1])

    off = EMACallback(decay=0.9, evaluate_with_ema=False)
    m = module()
    trainer(off, max_epochs=1).fit(m, data(), data(16, seed=1))
    assert m.seen["validation"] == [False, False]


def test_checkpoint_layout_and_resume_continue_bit_identically(tmp_path):
    """fit 2 epochs in one go == fit 1 epoch, checkpoint, resume for the second; the checkpoint has the EMA
    weights as its state_dict (what load_from_checkpoint gives) and the training weights beside them."""
    ckpts = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    cb = EMACallback(decay=0.9, decay_type="exp", beta=3, copy_to_model_at_end=False)
    straight = module()
    trainer([cb, ckpts], max_epochs=2, enable_checkpointing=True).fit(straight, data(), data(16, seed=1))

    path = tmp_path / "epoch=0.ckpt"
    saved = torch.load(path, weights_only=True)
    (step, training), = [(s, st) for s, st in straight.steps if s == saved["global_step"]]
    assert_bit_identical(saved["current_model_state"], training)
    entry = saved["callbacks"]["EMACallback"]
    assert "ema" not in entry["ema"] and entry["last_step"] == step == 8  # the weights are not stored twice
    ema_at_8 = saved["state_dict"]
    assert ema_at_8.keys() == training.keys() and not torch.equal(ema_at_8["fc1.weight"], training["fc1.weight"])
    assert_bit_identical(Module.load_from_checkpoint(path).state_dict(), ema_at_8)

    resumed_cb = EMACallback(decay=0.9, decay_type="exp", beta=3, copy_to_model_at_end=False)
    resumed = module(seed=1)  # other initial weights: everything must come from the checkpoint
    trainer([resumed_cb], max_epochs=2).fit(resumed, data(), data(16, seed=1), ckpt_path=path)
    assert [s for s, _ in resumed.steps] == list(range(9, 17))
    assert_bit_identical(resumed, straight)
    assert_bit_identical(resumed_cb.ema.state_dict()["ema"], cb.ema.state_dict()["ema"])
    assert resumed_cb.ema.num_updates == cb.ema.num_updates == 16


def test_same_weights_as_lightnings_ema_weight_averaging():
    """EMAWeightAveraging(decay=d) copies the model at its first update and uses d after it: that is the
    "power" schedule with min_decay=d.  Over 56 steps both EMAs agree to within fp32 rounding: they compute
    d * ema + (1 - d) * model in different orders, a relative error of a few ulp per step that the decay
    keeps bounded (measured: at most 3 ulp, 4.8e-7 on a running variance of 2.3; asserted: rtol=1e-5,
    atol=1e-6)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    d = 0.9
    runs = {}
    for name, cb in [("ours", EMACallback(decay=d, decay_type="power", min_decay=d)),
                     ("lightning", EMAWeightAveraging(decay=d))]:
        m = module()
        trainer([cb], max_epochs=7).fit(m, data())
        runs[name] = (m, cb)
    (ours, ours_cb), (theirs, _) = runs["ours"], runs["lightning"]
    assert ours_cb.ema.num_updates == 56
    assert_bit_identical(ours.steps[-1][1], theirs.steps[-1][1])  # the training itself is the same
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()  # both copied the EMA in at the end
    for key, value in ours_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, theirs_state[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(ours_state["fc1.weight"], ours.steps[-1][1]["fc1.weight"])


def test_resumes_from_a_checkpoint_of_lightnings_ema_weight_averaging(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    theirs = module()
    fit = trainer([EMAWeightAveraging(decay=0.9)], max_epochs=1)
    fit.fit(theirs, data())
    fit.save_checkpoint(tmp_path / "theirs.ckpt")  # after training: state_dict holds their EMA
    saved = torch.load(tmp_path / "theirs.ckpt", weights_only=True)
    assert "current_model_state" in saved

    cb = EMACallback(decay=0.9, decay_type="power", min_decay=0.9)
    m = module(seed=1)
    trainer([cb], max_epochs=1).fit(m, data(), ckpt_path=tmp_path / "theirs.ckpt")  # already done: no steps
    assert_bit_identical(cb.ema.state_dict()["ema"], saved["state_dict"])
    assert cb.ema.num_updates == 0 and m.steps == []


def test_a_checkpoint_without_an_ema_warns_and_starts_from_the_model(tmp_path):
    plain = module()
    fit = trainer([], max_epochs=1)
    fit.fit(plain, data())
    fit.save_checkpoint(tmp_path / "plain.ckpt")
    cb = EMACallback(decay=0.9)
    with pytest.warns(UserWarning, match="holds no EMA"):
        trainer([cb], max_epochs=2).fit(module(seed=1), data(), ckpt_path=tmp_path / "plain.ckpt")
    assert cb.ema.num_updates == 8


def test_options_are_checked_at_construction_and_fsdp1_is_refused():
    with pytest.raises(ValueError, match="ema_dtyp"):
        EMACallback(decay=0.9, ema_dtyp=torch.float32)
    with pytest.raises(ValueError, match="decay"):
        EMACallback(decay=1.5)
    with pytest.raises(TypeError, match="beta"):
        EMACallback(decay=0.9, decay_type=ExpDecay(beta=3), beta=4)
    cb = EMACallback(decay=0.9, decay_type=ExpDecay(beta=3), update_every=2)
    stub = type("T", (), {"strategy": type("FSDPStrategy", (), {})(), "global_step": 0})()
    with pytest.raises(RuntimeError, match="ModelParallelStrategy"):
        cb.on_fit_start(stub, module())


def test_an_unknown_run_length_needs_total_steps_for_a_schedule_that_reads_it():
    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            for x, y in data(16).dataset:
                yield x, y

    loader = DataLoader(Endless(), batch_size=8)
    with pytest.raises(ValueError, match="total_steps"):
        trainer([EMACallback(decay=0.9, decay_type="exp", beta=3)], max_epochs=1).fit(module(), loader)
    cb = EMACallback(decay=0.9)  # constant: the length does not matter
    trainer([cb], max_epochs=1).fit(module(), loader)
    assert cb.ema.num_updates == 2


# ---------------------------------------------------------------------- DDP and FSDP2, 2 ranks


class ShardedModule(Module):
    """Module sharded with FSDP2 by ModelParallelStrategy: every parameter becomes a DTensor."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.fc1, self.fc2, self):
            fully_shard(layer, mesh=mesh)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)  # made after sharding, on the DTensors


def _full(state_):
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state_.items()}


def _fsdp_fit(epochs, ckpt_path=None, save=None, distributed_checkpoint=True):
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.manual_seed(0)
    m = ShardedModule(bn=False)
    cb = EMACallback(decay=0.9, copy_to_model_at_end=False)
    fit = trainer([cb], max_epochs=epochs, devices=2, num_sanity_val_steps=1,
                  strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                         save_distributed_checkpoint=distributed_checkpoint))
    fit.fit(m, data(64), data(16, seed=1), ckpt_path=ckpt_path)
    if save is not None:
        fit.save_checkpoint(save)
    return m, cb


def _distributed_worker(rank, world_size, out):
    from ema_cuda import ShardedModelEMA

    torch.manual_seed(0)
    m = Module(bn=False)
    cb = EMACallback(decay=0.9, copy_to_model_at_end=False)
    fit = trainer([cb], max_epochs=1, devices=world_size, strategy="ddp", num_sanity_val_steps=1)
    fit.fit(m, data(64), data(16, seed=1))
    results = {"ddp": {"ema": cb.ema.state_dict()["ema"], "model": state(m), "steps": [s for s, _ in m.steps],
                       "seen": m.seen["validation"], "restored": m.restored}}

    # FSDP2 on the group DDP set up: 2 epochs straight == 1 epoch, checkpoint, resume (DCP and one file).
    m, cb = _fsdp_fit(2)
    assert isinstance(cb.ema, ShardedModelEMA)
    local = cb.ema.ema.fc1.weight
    # this rank's shard only
    assert local.shape == m.fc1.weight.to_local().shape == (8, 8), (local.shape, m.fc1.weight.to_local().shape)
    results["fsdp"] = {"ema": _full(cb.ema.state_dict()["ema"]), "model": _full(m.state_dict()),
                       "seen": m.seen["validation"], "restored": m.restored}
    for name, distributed in (("dcp", True), ("file.ckpt", False)):
        path = str(Path(out) / name)
        _fsdp_fit(1, save=path, distributed_checkpoint=distributed)
        m, cb = _fsdp_fit(2, ckpt_path=path, distributed_checkpoint=distributed)
        results[name] = {"ema": _full(cb.ema.state_dict()["ema"]), "model": _full(m.state_dict()),
                         "steps": [s for s, _ in m.steps]}
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_ddp_and_fsdp2_on_two_processes(tmp_path):
    """strategy="ddp" on 2 CPU ranks (gloo): each rank sees half the batches (4 optimizer steps), validation
    swaps the EMA in under the DDP wrapper, and both ranks end with bit-identical EMAs.  Then FSDP2
    (ModelParallelStrategy, fully_shard): each rank keeps the EMA of its own shards, evaluation swaps it in
    and out, and a resume from a distributed (DCP) or a single-file checkpoint continues bit-identically."""
    run_workers(_distributed_worker, 2, (str(tmp_path),), workdir=tmp_path / "errors", timeout=240)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for r in (r0["ddp"], r1["ddp"]):
        assert r["steps"] == [1, 2, 3, 4]
        assert r["seen"] == [True, True] and all(r["restored"])
        assert not torch.equal(r["ema"]["fc1.weight"], r["model"]["fc1.weight"])
    assert_bit_identical(r0["ddp"]["model"], r1["ddp"]["model"])
    assert_bit_identical(r0["ddp"]["ema"], r1["ddp"]["ema"])

    fsdp = r0["fsdp"]
    assert fsdp["seen"] == [True] * 3 and all(fsdp["restored"])
    assert_bit_identical(fsdp["ema"], r1["fsdp"]["ema"])
    for name in ("dcp", "file.ckpt"):
        assert r0[name]["steps"] == [5, 6, 7, 8], name
        assert_bit_identical(r0[name]["model"], fsdp["model"])
        assert_bit_identical(r0[name]["ema"], fsdp["ema"])


# ---------------------------------------------------------------------- the benchmark


def test_benchmark_rows_smoke():
    from benchmarks import fw_lightning

    rows = fw_lightning.rows(quick=True, workloads={"tiny": [(4, 3), (5,)]}, steps=3)
    assert [r["workload"] for r in rows] == ["tiny"]
    r = rows[0]
    assert r["ours_ms"] > 0 and r["lightning_ms"] > 0 and r["speedup"] > 0
    assert "tiny" in fw_lightning.table(rows)
