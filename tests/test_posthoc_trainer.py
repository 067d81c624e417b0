"""The Trainer with ``ema_params={"decay_type": "posthoc", ...}``: profiles, snapshots beside the checkpoints, resume."""
import pytest
import torch

from ema_cuda import PostHocEMA
from ema_cuda.checkpoint import load_checkpoint
from ema_cuda.posthoc import list_snapshots, read_snapshot
from ema_cuda.training import Trainer
from support import Net, assert_bit_identical, equal_nested, equal_states, loaders, one_thread, state  # noqa: F401

POSTHOC = {"decay_type": "posthoc", "sigma_rels": [0.05, 0.10], "snapshot_every": 5}


def _params(**kw):
    p = {
        "max_epochs": 4,
        "initial_lr": 0.2,
        "optimizer_params": {"momentum": 0.9},
        "ema": True,
        "ema_params": dict(POSTHOC),
        "progress_bar": False,
        "silent_mode": True,
        "device": "cpu",
    }
    p.update(kw)
    return p


class Interrupt(Exception):
    pass


class StopAfter(Trainer):
    def __init__(self, *a, stop_after, **k):
        super().__init__(*a, **k)
        self.stop_after = stop_after

    def on_epoch_end(self, epoch, metrics):
        if epoch == self.stop_after:
            raise Interrupt(epoch)


def test_trainer_keeps_profiles_and_snapshots(tmp_path):
    torch.manual_seed(0)
    model = Net()
    train, valid = loaders()  # 5 steps per epoch
    trainer = Trainer("run", tmp_path)
    history = trainer.train(model, _params(), train, valid)
    ema = trainer.ema
    assert isinstance(ema, PostHocEMA) and ema.sigma_rels == (0.05, 0.10)
    assert ema.step == ema.num_updates == 20
    infos = list_snapshots(tmp_path / "run" / "posthoc")
    assert [(i.step, i.sigma_rel) for i in infos] == [(s, r) for s in (5, 10, 15, 20) for r in (0.05, 0.10)]
    assert_bit_identical(read_snapshot(infos[-2].path)[1], ema.emas[0].state_dict())
    # The first profile is validated, checkpointed as 'ema_net' and left in the model.
    assert "valid_raw_accuracy" in history[-1] and "valid_accuracy" in history[-1]
    assert equal_states(state(model), state(ema.ema))
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt_latest.pth")
    assert equal_states(ckpt["ema_net"], state(ema.ema))
    assert ckpt["ema_state"]["format"] == "ema_cuda.PostHocEMA/1" and ckpt["ema_state"]["step"] == 20
    reconstructed = ema.reconstruct(0.07)
    assert reconstructed.keys() == ema.ema.state_dict().keys()


def test_trainer_resume_is_bit_identical(tmp_path):
    params = _params()
    torch.manual_seed(7)
    model_a = Net()
    init = state(model_a)
    train, valid = loaders()
    trainer_a = Trainer("a", tmp_path)
    trainer_a.train(model_a, params, train, valid)

    model_b = Net()
    model_b.load_state_dict(init)
    train, valid = loaders()
    with pytest.raises(Interrupt):
        StopAfter("b", tmp_path, stop_after=2).train(model_b, params, train, valid)
    torch.manual_seed(999)
    model_c = Net()
    train, valid = loaders()
    trainer_c = Trainer("b", tmp_path)
    trainer_c.train(model_c, dict(params, resume=True), train, valid)

    assert equal_states(state(model_c), state(model_a))
    for a, c in zip(trainer_a.ema.emas, trainer_c.ema.emas):
        assert_bit_identical(a, c)
    assert equal_nested(load_checkpoint(tmp_path / "b" / "ckpt_latest.pth")["ema_state"],
                        dict(load_checkpoint(tmp_path / "a" / "ckpt_latest.pth")["ema_state"],
                             snapshot_dir=str(tmp_path / "b" / "posthoc")))
    trainer_a.ema.wait()
    trainer_c.ema.wait()
    snaps_a = list_snapshots(tmp_path / "a" / "posthoc")
    snaps_c = list_snapshots(tmp_path / "b" / "posthoc")
    assert [(i.step, i.sigma_rel) for i in snaps_a] == [(i.step, i.sigma_rel) for i in snaps_c]
    for a, c in zip(snaps_a, snaps_c):
        assert_bit_identical(read_snapshot(a.path)[1], read_snapshot(c.path)[1])


def test_snapshot_dir_and_no_snapshots(tmp_path):
    train, valid = loaders()
    own = tmp_path / "elsewhere"
    trainer = Trainer("own", tmp_path)
    trainer.train(Net(), _params(max_epochs=1, ema_params=dict(POSTHOC, snapshot_dir=str(own))), train, valid)
    assert [i.step for i in list_snapshots(own)] == [5, 5]
    assert not (tmp_path / "own" / "posthoc").exists()
    trainer = Trainer("none", tmp_path)
    trainer.train(Net(), _params(max_epochs=1, ema_params={"decay_type": "posthoc"}), train, valid)
    assert trainer.ema.sigma_rels == (0.05, 0.10) and trainer.ema.snapshot_dir is None


@pytest.mark.parametrize("ema_params, match", [
    (dict(POSTHOC, sigma_rel=[0.05]), r"unknown key 'sigma_rel'.*did you mean 'sigma_rels'"),
    (dict(POSTHOC, decay=0.999), "unknown key 'decay'"),
    (dict(POSTHOC, sigma_rels=[0.05, 0.05]), "twice"),
    (dict(POSTHOC, sigma_rels=[]), "empty"),
    (dict(POSTHOC, snapshot_every=0), "snapshot_every must be an integer >= 1"),
])
def test_bad_posthoc_params_fail_before_training(tmp_path, ema_params, match):
    train, valid = loaders()
    with pytest.raises(ValueError, match=r"training param 'ema_params'.*" + match):
        Trainer("bad", tmp_path).train(Net(), _params(ema_params=ema_params), train, valid)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def _ddp_worker(rank, world, outdir):
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    from ema_cuda import distributed as dist_utils
    from support import dataset, seeded

    ds = dataset(32)
    train = DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, world, rank, shuffle=False))
    trainer = Trainer("ddp", outdir)
    # Each rank starts from its own weights (DDP's broadcast makes them equal); BatchNorm statistics
    # come from each rank's batches until the Trainer broadcasts the EMAs' buffers after each epoch.
    trainer.train(seeded(Net, seed=rank, dropout=0.0), _params(max_epochs=2, seed=0), train, train)
    assert dist.is_initialized()
    trainer.ema.wait()
    dist_utils.check_ema_synchronized(trainer.ema)  # every profile, on every rank
    torch.save({"emas": [e.state_dict() for e in trainer.ema.emas], "dir": trainer.ema.snapshot_dir,
                "step": trainer.ema.step}, f"{outdir}/rank{rank}.pt")


def test_ddp_trainer_profiles_agree_and_rank_0_writes_the_snapshots(tmp_path):
    import torch.distributed as dist

    from dist_helpers import run_workers

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    run_workers(_ddp_worker, 2, (str(tmp_path),), workdir=tmp_path / "errors", timeout=90)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for a, b in zip(r0["emas"], r1["emas"]):
        assert_bit_identical(a, b)
    assert r0["step"] == 8 and r0["dir"] == tmp_path / "ddp" / "posthoc" and r1["dir"] is None
    assert [i.step for i in list_snapshots(tmp_path / "ddp" / "posthoc")] == [5, 5]


# ------------------------------------------------------------------ knowledge distillation

def test_kd_trainer_keeps_the_students_profiles(tmp_path):
    """KDTrainer with decay_type='posthoc': profiles and snapshots of the student only, the teacher shared and
    never written, validation and checkpoints on the student's first profile."""
    from ema_cuda.posthoc import KDPostHocEMA
    from ema_cuda.training import KDTrainer

    train, valid = loaders()
    torch.manual_seed(3)
    teacher, student = Net(hidden=24), Net()
    teacher_before = state(teacher)
    trainer = KDTrainer("kd", tmp_path)
    history = trainer.train(student, teacher, _params(max_epochs=2, loss="kd_loss"), train, valid)
    ema = trainer.ema
    assert isinstance(ema, KDPostHocEMA) and ema.step == 10
    assert equal_states(state(teacher), teacher_before)
    assert ema.ema.teacher is teacher and ema.ema.student is ema.emas[0]
    infos = list_snapshots(tmp_path / "kd" / "posthoc")
    assert [(i.step, i.sigma_rel) for i in infos] == [(s, r) for s in (5, 10) for r in (0.05, 0.10)]
    assert set(read_snapshot(infos[-1].path)[1]) == set(student.state_dict())  # the student's keys
    assert equal_states(state(student), state(ema.emas[0]))  # the end-of-training copy
    ckpt = load_checkpoint(tmp_path / "kd" / "ckpt_latest.pth")
    assert set(ckpt["net"]) == set(student.state_dict())
    assert equal_states(ckpt["ema_net"], state(ema.emas[0]))
    assert "valid_accuracy" in history[-1] and "valid_raw_accuracy" in history[-1]


def test_kd_profiles_are_those_of_the_student_alone():
    """Updating a KDPostHocEMA with the distillation module gives the bits a PostHocEMA of the student gets."""
    from ema_cuda.posthoc import KDPostHocEMA
    from ema_cuda.training.kd import KDModule

    torch.manual_seed(0)
    student, teacher = Net(), Net(hidden=24)
    kd = KDModule(student, teacher)
    a, b = KDPostHocEMA(kd, (0.05, 0.10)), PostHocEMA(student, (0.05, 0.10))
    for step in range(1, 6):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        a.update(kd)
        b.update(student)
    for x, y in zip(a.emas, b.emas):
        assert_bit_identical(state(x), state(y))
    assert a.ema.teacher is teacher
    with a.swapped(kd, 0.10):
        assert equal_states(state(student), state(a.emas[1]))
    with pytest.raises(TypeError, match="distillation module"):
        a.update(student)
