#!/usr/bin/env python3
"""Data-parallel training throughput of emotion-bench in PyTorch DDP, the anchor for Chorus's
data-parallel builtin trials.

The model and inputs are bench/emotion_bench.py's (shared/emotion-bench.md): per-rank batch 64 of
random inputs, Adam at 1e-3, cross-entropy. With --world 2, two processes on 127.0.0.1 each train a
DistributedDataParallel replica (gloo backend, DDP's defaults: 25 MiB gradient buckets, buffers
broadcast from rank 0 each forward), each with one intra-op thread. With --world 1 it is plain
eager in one process, no process group and no DDP wrapper: the 1-worker figure.

A step is forward, backward (gradients all-reduced by DDP), the optimiser update and loss.item();
warm-up steps, a barrier, then timed steps ended by a barrier. samples_per_second is global: all
ranks' samples over the slowest rank's time.

Usage: python bench/ddp_emotion.py [--world 2] [--steps 20] [--warmup 3] [--batch 64]
Run it in the bench-only venv (bench/emotion_bench.sh makes it): torch==2.11.0 from PyPI.
"""
import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emotion_bench import EmotionBench  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(rank, world, port, args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        model = DistributedDataParallel(EmotionBench())
    else:
        model = EmotionBench()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Each rank its own samples, as data-parallel shards are.
    g = torch.Generator().manual_seed(args.seed + 1 + rank)
    b = args.batch
    image = torch.randn(b, 1, 48, 48, generator=g)
    tokens = torch.randint(0, 8000, (b, 32), generator=g)
    audio = torch.randn(b, 64, 40, generator=g)
    labels = torch.randint(0, 7, (b,), generator=g)
    model.train()

    def step():
        loss = nn.functional.cross_entropy(model(image, tokens, audio), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        last = step()
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        sps = world * args.steps * b / seconds
        kind = f"DDP over gloo, {world} processes" if world > 1 else "eager, 1 process, no DDP"
        print(f"pytorch emotion-bench data-parallel ({kind}): {sps:.1f} samples/s "
              f"({1000 * seconds / args.steps:.1f} ms/step, {args.steps} steps of {b} per rank, "
              f"{torch.get_num_threads()} thread(s) per rank, torch {torch.__version__}, last loss {last:.4f})")
        print(f"samples_per_second={sps:.3f}", flush=True)
    if world > 1:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="per rank")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.world == 1:
        train(0, 1, None, args)
        return
    # Keep gloo on the loopback interface whatever the host's name resolves to.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(train, args=(args.world, free_port(), args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
