"""Post-hoc EMA on the digits example: train once, then choose the EMA length by reconstructing it.

The run of ``train_digits.py`` (8x8 digits, noisy SGD) with a
:class:`ema_cuda.PostHocEMA` in the Trainer: two power-function profiles
(``--sigma-rels``, EDM2's 0.05 and 0.10) are averaged in one fused update and
snapshotted every ``--snapshot-every`` steps.  After training, the EMA of each
``sigma_rel`` of a grid is reconstructed from the snapshots and evaluated on
the validation and test splits; the plot (``--out``) shows accuracy against
``sigma_rel``, with the directly tracked profiles and the raw weights.

It also measures what the snapshots cost: the time of a training step
(forward, backward, SGD, the EMA update) with snapshots on and off, in
interleaved blocks so that a busy machine slows both alike (the median of
each, and the ratio of neighbouring blocks), with two identical runs taking
turns to have snapshots on, so that what differs between two runs is not
counted as the snapshots' cost.

    python examples/posthoc_digits_sweep.py --out docs/posthoc_sweep.png   # a few minutes on 2 CPU cores
    python examples/posthoc_digits_sweep.py --epochs 2 --grid 5 --timing-rounds 2 --out /tmp/sweep.png
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ema_cuda import PostHocEMA, Trainer, models
from ema_cuda.posthoc import combine_snapshots, solve_weights
from train_digits import make_splits


def accuracy(trainer, net, loader) -> float:
    return trainer.test(loader, model=net, use_ema=False)["accuracy"]


def net_with(state, width):
    net = models.get("digits_cnn", num_classes=10, width=width)
    net.load_state_dict(state)
    return net


def step_times(args, train_ds, snapshot_dir) -> dict:
    """Median seconds per training step with snapshots on and off (same model, data and optimizer as the run), and
    the ratio on/off within a round: neighbouring blocks see the same load on a shared machine.

    Two identical runs take turns: in even rounds the first has snapshots on, in odd rounds the second, and which
    block goes first alternates too.  Two runs built alike still differ (where their memory lies), by a few percent
    on a small model; a fixed "on" run would add that difference to the snapshots' cost.  With the turns, the
    geometric mean of the two runs' median ratios is the snapshots' cost alone, and the square root of their
    quotient is the two runs' own difference (reported as a check of the method).
    """
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(args.seed)
        net = models.get("digits_cnn", num_classes=10, width=args.width)
        opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
        ema = PostHocEMA(net, args.sigma_rels, snapshot_every=args.snapshot_every,
                         snapshot_dir=Path(snapshot_dir) / name)
        loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(args.seed))
        runs.append({"net": net, "opt": opt, "ema": ema, "loader": loader, "it": iter(loader)})
    loss_fn = torch.nn.CrossEntropyLoss()

    def block(run, steps, snapshots):
        # snapshot_every=None stops the snapshots of a PostHocEMA; its writer thread stays, idle.
        run["ema"].snapshot_every = args.snapshot_every if snapshots else None
        start = time.perf_counter()
        for _ in range(steps):
            try:
                x, y = next(run["it"])
            except StopIteration:
                run["it"] = iter(run["loader"])
                x, y = next(run["it"])
            loss = loss_fn(run["net"](x), y)
            loss.backward()
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            run["ema"].update(run["net"])
        elapsed = time.perf_counter() - start
        run["ema"].wait()  # a write left over must not slow the next block down
        return elapsed / steps

    # Warm-up (allocator, plan, the writer thread, first snapshots), ending half-way between two snapshot steps:
    # each block's snapshots then fall in its middle, and their writes, which slow the steps after them, too.
    for run in runs:
        block(run, 50 + args.snapshot_every // 2, True)
    steps = 4 * args.snapshot_every  # every block with snapshots takes 4
    on_times, off_times, ratios = [], [], ([], [])  # ratios[k]: on/off with run k on
    for r in range(args.timing_rounds):
        k = r % 2
        pair = [(runs[k], True), (runs[1 - k], False)]
        times = {on: block(run, steps, on) for run, on in (pair if (r // 2) % 2 == 0 else pair[::-1])}
        on_times.append(times[True])
        off_times.append(times[False])
        ratios[k].append(times[True] / times[False])
    a, b = (statistics.median(x) if x else 1.0 for x in ratios)
    return {"off": statistics.median(off_times), "on": statistics.median(on_times), "ratio": (a * b) ** 0.5,
            "runs": (a / b) ** 0.5}


def report_step_times(args, train_ds) -> None:
    with tempfile.TemporaryDirectory() as d:
        times = step_times(args, train_ds, d)
    print(f"step time, median of {args.timing_rounds} rounds of interleaved blocks of {4 * args.snapshot_every} "
          f"steps: snapshots off {1e3 * times['off']:.3f} ms, on (every {args.snapshot_every}) "
          f"{1e3 * times['on']:.3f} ms; ratio on/off {times['ratio']:.3f} ({100 * (times['ratio'] - 1):+.1f}%; "
          f"the two runs' own difference {100 * (times['runs'] - 1):+.1f}%)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--label-noise", type=float, default=0.2, help="fraction of training labels flipped")
    ap.add_argument("--sigma-rels", type=float, nargs="+", default=[0.05, 0.10], help="the profiles tracked")
    ap.add_argument("--snapshot-every", type=int, default=25, help="steps between snapshots")
    ap.add_argument("--grid", type=int, default=25, help="sigma_rel values reconstructed, from 0.01 to 0.25")
    ap.add_argument("--width", type=int, default=16, help="channels of the first conv layer of digits_cnn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads; one is fastest for this model")
    ap.add_argument("--timing-rounds", type=int, default=10, help="interleaved blocks per setting (0: no timing)")
    ap.add_argument("--timing-only", action="store_true", help="only measure the step time")
    ap.add_argument("--ckpt-root", default=None, help="checkpoint directory (default: a temporary one)")
    ap.add_argument("--out", default="posthoc_sweep.png", help="the plot (PNG)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_ds, valid_ds, test_ds = make_splits(args.seed, args.label_noise)
    train_dl = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(args.seed))
    valid_dl = DataLoader(valid_ds, batch_size=256)
    test_dl = DataLoader(test_ds, batch_size=256)
    total_steps = args.epochs * len(train_dl)
    if args.timing_only:
        report_step_times(args, train_ds)
        return
    ckpt_root = args.ckpt_root or tempfile.mkdtemp(prefix="ema_posthoc_digits_")
    trainer = Trainer(experiment_name="digits_posthoc", ckpt_root_dir=ckpt_root)
    params = {
        "max_epochs": args.epochs, "initial_lr": args.lr, "optimizer": "SGD",
        "optimizer_params": {"momentum": args.momentum}, "loss": "cross_entropy", "seed": args.seed,
        "device": "cpu", "progress_bar": False, "silent_mode": True, "ema": True,
        "ema_params": {"decay_type": "posthoc", "sigma_rels": args.sigma_rels, "snapshot_every": args.snapshot_every},
    }
    print(f"digits: {total_steps} SGD steps ({args.epochs} epochs of {len(train_dl)}), profiles sigma_rel "
          f"{args.sigma_rels}, snapshots every {args.snapshot_every} steps")
    t0 = time.time()
    trainer.train(model=models.get("digits_cnn", num_classes=10, width=args.width), training_params=params,
                  train_loader=train_dl, valid_loader=valid_dl)
    ema = trainer.ema
    if ema.last_snapshot_step != ema.step:
        ema.snapshot()  # the end of the run, so that the reconstructions are of the final step
    snapshots = ema.snapshots()
    print(f"trained in {time.time() - t0:.1f} s; {len(snapshots)} snapshots in {ema.snapshot_dir}")

    # The raw weights of the last step are in ckpt_latest.pth ('net'); the model now holds the first profile.
    raw = torch.load(trainer.checkpoints_dir / "ckpt_latest.pth", weights_only=True)["net"]
    raw_valid, raw_test = (accuracy(trainer, net_with(raw, args.width), dl) for dl in (valid_dl, test_dl))
    tracked = [(s, accuracy(trainer, ema.ema_for(s), valid_dl), accuracy(trainer, ema.ema_for(s), test_dl))
               for s in ema.sigma_rels]
    grid = [0.01 + i * (0.25 - 0.01) / max(1, args.grid - 1) for i in range(args.grid)]
    sweep, errors = [], []
    for s in grid:
        rec = solve_weights(snapshots, s)  # the weights of the snapshots, and how far their profile is from s's
        net = net_with(combine_snapshots(rec), args.width)
        sweep.append((s, accuracy(trainer, net, valid_dl), accuracy(trainer, net, test_dl)))
        errors.append(rec.relative_error)
    print(f"{'sigma_rel':>9}  {'valid':>7}  {'test':>7}  profile error (relative L2)")
    for (s, v, t), e in zip(sweep, errors):
        print(f"{s:9.3f}  {100 * v:6.2f}%  {100 * t:6.2f}%  {e:.3g}")
    best = max(sweep, key=lambda r: r[1])
    print(f"raw weights: valid {100 * raw_valid:.2f}%, test {100 * raw_test:.2f}%; tracked: " + ", ".join(
        f"{s} valid {100 * v:.2f}% test {100 * t:.2f}%" for s, v, t in tracked))
    print(f"chosen on validation: sigma_rel={best[0]:.3f}, test {100 * best[2]:.2f}%")

    if args.timing_rounds > 0:
        report_step_times(args, train_ds)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    xs = [s for s, _, _ in sweep]
    ax.plot(xs, [100 * v for _, v, _ in sweep], "-o", ms=3, label="reconstructed EMA, validation")
    ax.plot(xs, [100 * t for _, _, t in sweep], "-s", ms=3, label="reconstructed EMA, test")
    poor = [(s, v) for (s, v, _), e in zip(sweep, errors) if e > 0.1]
    if poor:
        ax.plot([s for s, _ in poor], [100 * v for _, v in poor], "o", mfc="none", mec="red", ms=9,
                label="profile error > 0.1 (snapshots too sparse)")
    ax.plot([s for s, _, _ in tracked], [100 * v for _, v, _ in tracked], "k*", ms=11,
            label="tracked profiles, validation")
    ax.axhline(100 * raw_valid, color="grey", ls="--", lw=1, label="raw weights, validation")
    ax.axhline(100 * raw_test, color="grey", ls=":", lw=1, label="raw weights, test")
    ax.set_xlabel("sigma_rel (EMA width as a fraction of the run)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Post-hoc EMA on digits: {total_steps} noisy SGD steps, profiles {args.sigma_rels} "
                 f"snapshotted every {args.snapshot_every}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
