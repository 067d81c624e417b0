"""Train a small CNN on scikit-learn's 8x8 digits with noisy SGD, with and without looking at the EMA.

The data set ships with scikit-learn (1,797 images, no download).  Training
uses deliberately noisy SGD (small batches, a high constant learning rate and
some flipped training labels), the setting where an exponential moving
average of the weights is expected to help: the raw weights keep jumping
around a good region, the average sits nearer its middle.

Every epoch prints the validation accuracy of the raw weights and of the
EMA weights.  At the end, ``ckpt_best.pth`` (chosen on the EMA's validation
accuracy) is loaded with ``models.get`` and evaluated on a held-out test
split, next to the raw weights of the last epoch.

    python examples/train_digits.py                # about a minute on 2 CPU cores
    python examples/train_digits.py --epochs 40 --decay 0.995 --label-noise 0
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from ema_cuda import Trainer, models
from ema_cuda.checkpoint import load_checkpoint_to_model


def make_splits(seed: int, label_noise: float):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = list(range(len(y)))
    train_idx, rest = train_test_split(idx, test_size=0.4, stratify=y.numpy(), random_state=seed)
    valid_idx, test_idx = train_test_split(rest, test_size=0.5, stratify=y[rest].numpy(), random_state=seed)
    x_train, y_train = x[train_idx], y[train_idx].clone()
    mean, std = x_train.mean(), x_train.std()
    x = (x - mean) / std
    x_train = x[train_idx]
    if label_noise > 0:
        # Flip a fraction of the training labels to random classes: the
        # validation and test labels stay clean.
        g = torch.Generator().manual_seed(seed)
        flip = torch.rand(len(y_train), generator=g) < label_noise
        y_train[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    return (
        TensorDataset(x_train, y_train),
        TensorDataset(x[valid_idx], y[valid_idx]),
        TensorDataset(x[test_idx], y[test_idx]),
    )


class PrintingTrainer(Trainer):
    """Prints one table row per epoch: raw vs EMA validation accuracy."""

    def on_epoch_end(self, epoch, metrics):
        raw, ema = metrics["valid_raw_accuracy"], metrics["valid_accuracy"]
        print(f"{epoch:5d}  {metrics['train_loss']:10.4f}  {100 * raw:8.2f}%  {100 * ema:8.2f}%  {100 * (ema - raw):+7.2f}",
              flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--label-noise", type=float, default=0.2, help="fraction of training labels flipped")
    ap.add_argument("--decay", type=float, default=None,
                    help="EMA decay (default: 0.998, lowered for short runs so that its horizon "
                    "1 / (1 - decay) stays at most a quarter of the run's steps)")
    ap.add_argument("--decay-type", default="threshold", help="EMA decay schedule: constant, threshold, exp, ...")
    ap.add_argument("--width", type=int, default=16, help="channels of the first conv layer of digits_cnn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; one is fastest for a model this small")
    ap.add_argument("--ckpt-root", default=None, help="checkpoint directory (default: a temporary one)")
    ap.add_argument("--progress-bar", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_ds, valid_ds, test_ds = make_splits(args.seed, args.label_noise)
    train_dl = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(args.seed))
    valid_dl = DataLoader(valid_ds, batch_size=256)
    test_dl = DataLoader(test_ds, batch_size=256)
    net = models.get("digits_cnn", num_classes=10, width=args.width)

    total_steps = args.epochs * len(train_dl)
    if args.decay is None:
        # An EMA averages over about 1 / (1 - decay) steps.  A horizon longer
        # than the run leaves the EMA near the random initial weights (decay
        # 0.9999 over a few hundred steps: chance accuracy), so a short run
        # (--epochs 1) gets a shorter one.
        args.decay = min(0.998, 1 - 4 / total_steps)
    ema_params = {"decay": args.decay, "decay_type": args.decay_type}
    if args.decay_type == "exp":
        ema_params["beta"] = 15  # SuperGradients' default ramp; the other schedules take no beta
    ckpt_root = args.ckpt_root or tempfile.mkdtemp(prefix="ema_digits_")
    trainer = PrintingTrainer(experiment_name="digits", ckpt_root_dir=ckpt_root)
    params = {
        "max_epochs": args.epochs,
        "initial_lr": args.lr,
        "optimizer": "SGD",
        "optimizer_params": {"momentum": args.momentum},
        "loss": "cross_entropy",
        "ema": True,
        "ema_params": ema_params,
        "seed": args.seed,
        "device": "cpu",
        "progress_bar": args.progress_bar,
        "silent_mode": True,
    }
    print(f"digits: {len(train_ds)} train / {len(valid_ds)} valid / {len(test_ds)} test images, "
          f"{len(train_dl)} SGD steps per epoch (batch {args.batch_size}, lr {args.lr}, "
          f"{100 * args.label_noise:.0f}% training labels flipped); EMA decay {args.decay:.4g} ({args.decay_type}, "
          f"horizon {1 / (1 - args.decay):.0f} of {total_steps} steps)")
    print("epoch  train loss  raw acc    EMA acc    EMA-raw")
    t0 = time.time()
    history = trainer.train(model=net, training_params=params, train_loader=train_dl, valid_loader=valid_dl)
    elapsed = time.time() - t0

    raw = [h["valid_raw_accuracy"] for h in history]
    ema = [h["valid_accuracy"] for h in history]
    tail = max(1, len(history) // 3)
    print(f"\ntrained {len(history)} epochs in {elapsed:.1f} s; checkpoints in {trainer.checkpoints_dir}")
    print(f"validation accuracy, last {tail} epochs: raw mean {100 * sum(raw[-tail:]) / tail:.2f}% "
          f"(min {100 * min(raw[-tail:]):.2f}%, max {100 * max(raw[-tail:]):.2f}%), "
          f"EMA mean {100 * sum(ema[-tail:]) / tail:.2f}% "
          f"(min {100 * min(ema[-tail:]):.2f}%, max {100 * max(ema[-tail:]):.2f}%)")

    # Test accuracy: the raw weights of the last epoch (from ckpt_latest.pth's
    # 'net'), the EMA of the last epoch (what the model holds now), and the
    # best checkpoint as models.get loads it (its 'ema_net').
    latest = trainer.checkpoints_dir / "ckpt_latest.pth"
    raw_net = models.get("digits_cnn", num_classes=10, width=args.width)
    load_checkpoint_to_model(raw_net, latest, load_ema_as_net=False)
    best_net = models.get("digits_cnn", num_classes=10, width=args.width,
                          checkpoint_path=trainer.checkpoints_dir / "ckpt_best.pth")
    raw_test = trainer.test(test_dl, model=raw_net)["accuracy"]
    ema_test = trainer.test(test_dl)["accuracy"]
    best_test = trainer.test(test_dl, model=best_net)["accuracy"]
    print(f"test accuracy: raw last epoch {100 * raw_test:.2f}% | EMA last epoch {100 * ema_test:.2f}% | "
          f"ckpt_best ({best_net.loaded_checkpoint_key}) {100 * best_test:.2f}%")


if __name__ == "__main__":
    main()
