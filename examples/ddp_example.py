"""Data-parallel training with an EMA: the Trainer under DDP, on 2 CPU processes with gloo.

Run it either way:

    python examples/ddp_example.py                                 # starts 2 processes itself
    torchrun --nproc_per_node 2 examples/ddp_example.py            # or let torchrun start them

Each process trains on its half of every global batch (a DistributedSampler
splits the data set); DDP averages the gradients, so the parameters, and the
EMA built from them, are the same on both ranks without any communication
for the EMA.  Rank 0 alone writes the checkpoints.  At the end the main
process loads ``ckpt_best.pth`` with ``models.get`` (the EMA weights) and
evaluates it; nothing here needs a GPU or a download.
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ema_cuda import Trainer, models


def blobs(n: int, seed: int) -> TensorDataset:
    """Four noisy Gaussian clusters in 16 dimensions: a small problem that SGD solves in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 2
    y = torch.randint(0, 4, (n,), generator=g)
    x = centres[y] + torch.randn(n, 16, generator=g) * 3.0
    return TensorDataset(x, y)


def train(ckpt_root: str, epochs: int) -> None:
    """The training script proper: what every rank runs (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    train_set, valid_set = blobs(2048, seed=1), blobs(512, seed=2)
    # Each rank reads every world-th sample; shuffled anew each epoch (the
    # Trainer calls set_epoch).  Passing num_replicas/rank lets the samplers
    # exist before the Trainer initialises the process group.
    train_loader = DataLoader(train_set, batch_size=32, sampler=DistributedSampler(train_set, world, rank, seed=0))
    valid_loader = DataLoader(valid_set, batch_size=128, sampler=DistributedSampler(valid_set, world, rank, shuffle=False))
    model = models.get("mlp", in_features=16, num_classes=4, hidden_features=(64, 64))
    trainer = Trainer("ddp_example", ckpt_root)
    trainer.train(
        model,
        {
            "max_epochs": epochs,
            "initial_lr": 0.1,
            "optimizer": "SGD",
            "optimizer_params": {"momentum": 0.9},
            "ema": True,
            "ema_params": {"decay": 0.99, "decay_type": "threshold"},
            "progress_bar": False,
            # A demo is run again and again into the same folder: replace the
            # previous run's checkpoints (a real run would resume instead).
            "overwrite": True,
        },
        train_loader,
        valid_loader,
    )
    # Every rank holds the same EMA (the Trainer checked it); rank 0 reports.
    if trainer.is_main_process:
        print(f"rank 0 of {world}: EMA validation accuracy {trainer.history[-1]['valid_accuracy']:.3f}")
    # The Trainer leaves the process group up (for trainer.test()); close it together.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _spawned(rank: int, world: int, port: int, ckpt_root: str, epochs: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(ckpt_root, epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2, help="processes to start when not run by torchrun")
    parser.add_argument("--ckpt-root", default=os.path.join(tempfile.gettempdir(), "ema_cuda_examples"),
                        help="where the checkpoints go (the same path on every rank)")
    args = parser.parse_args()
    ckpt_root = args.ckpt_root

    if "WORLD_SIZE" in os.environ:  # started by torchrun: this process is one rank
        train(ckpt_root, args.epochs)
        return
    with socket.socket() as s:  # a free port on loopback for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.nproc, port, ckpt_root, args.epochs), nprocs=args.nproc)

    # Back in one process: the best checkpoint's EMA weights, as any user would load them.
    best = models.get("mlp", in_features=16, num_classes=4, hidden_features=(64, 64),
                      checkpoint_path=os.path.join(ckpt_root, "ddp_example", "ckpt_best.pth"))
    x, y = blobs(512, seed=2).tensors
    with torch.no_grad():
        accuracy = (best(x).argmax(1) == y).float().mean().item()
    print(f"models.get loaded {best.loaded_checkpoint_key!r}: accuracy {accuracy:.3f} (checkpoints in {ckpt_root})")


if __name__ == "__main__":
    main()
