"""An EMA of an FSDP2-sharded model, kept shard by shard, saved with DCP and loaded on one process.

    python examples/fsdp_example.py                                # starts 2 CPU processes (gloo) itself
    torchrun --nproc_per_node 2 examples/fsdp_example.py

Each rank shards the model with ``fully_shard`` and keeps the moving average
of its own shards only (``ShardedModelEMA``): the EMA costs each rank its
shard size, and an update is one fused call with no communication.  The EMA
and the model are saved with ``save_sharded_checkpoint`` (DCP, each rank
writing its shards); then a single process, without any process group,
loads the consolidated EMA weights into an ordinary model with ``models.get``.
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ema_cuda import ShardedModelEMA, models
from ema_cuda.ema_decay_schedules import ThresholdDecay
from ema_cuda.sharded import save_sharded_checkpoint


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return models.get("mlp", in_features=32, num_classes=4, hidden_features=(256, 256))


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(10_000 * rank + step)
    x = torch.randn(64, 32, generator=g)
    return x, (x[:, :4].argmax(1))  # a learnable rule: the largest of the first 4 features


def train(ckpt_root: str, steps: int) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for layer in model.net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)

    ema = ShardedModelEMA(model, decay=0.99, decay_function=ThresholdDecay())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(1, steps + 1):
        x, y = batch(step, rank)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        ema.update(model, step=step, total_steps=steps)
    print(f"rank {rank}/{world}: EMA holds {ema.memory_bytes():,} bytes of a {full_bytes:,}-byte model", flush=True)

    path = save_sharded_checkpoint({"model": model.state_dict(), "ema": ema.state_dict()}, ckpt_root)
    if rank == 0:
        print(f"saved {path}", flush=True)
    dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, ckpt_root: str, steps: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(ckpt_root, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=2, help="processes to start when not run by torchrun")
    parser.add_argument("--ckpt-root", default=os.path.join(tempfile.gettempdir(), "ema_cuda_examples", "fsdp"))
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        train(args.ckpt_root, args.steps)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.nproc, port, args.ckpt_root, args.steps), nprocs=args.nproc)

    # One process, no process group: DCP consolidates the shards.
    model = models.get(lambda: models.MLP(in_features=32, num_classes=4, hidden_features=(256, 256)),
                       checkpoint_path=args.ckpt_root)
    x, y = batch(0, 99)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"models.get loaded the consolidated {model.loaded_checkpoint_key!r}: accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
