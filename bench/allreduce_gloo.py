#!/usr/bin/env python3
"""All-reduce bandwidth of torch.distributed's gloo backend, the anchor for the Chorus CPU ring.

Two ranks, each its own process (torch.multiprocessing), on 127.0.0.1; float32 tensors of each
size, summed. As worker/examples/allreduce_bench.rs: the first sum is checked, then the tensor is
zeroed, warm-up iterations, then timed iterations each preceded by a barrier; the median time gives
algbw = bytes / time and busbw = algbw * 2(n-1)/n (nccl-tests), in GB/s (10^9 bytes).

Usage: python bench/allreduce_gloo.py [--sizes 1,8,64,256] [--iters N] [--warmup 3]
Prints `size_mib=64 busbw_gbps=... algbw_gbps=... ms=...` per size, from rank 0.
Run it in the bench-only venv (bench/emotion_bench.sh makes it): torch==2.11.0 from PyPI.
"""
import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MIB = 1024 * 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, args):
    # One intra-op thread per rank: two ranks share the machine, as the Chorus ranks do.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    for mib in args.sizes:
        n = mib * MIB // 4
        t = torch.full((n,), float(rank + 1), dtype=torch.float32)
        dist.all_reduce(t)
        want = world * (world + 1) / 2
        if not bool((t == want).all()):
            raise SystemExit(f"{mib} MiB: the sum is wrong")
        t.zero_()
        iters = args.iters or max(5, min(50, 1024 // max(mib, 1)))
        for _ in range(args.warmup):
            dist.all_reduce(t)
        times = []
        for _ in range(iters):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - start)
        times.sort()
        median = times[len(times) // 2]
        algbw = n * 4 / median / 1e9
        busbw = algbw * 2 * (world - 1) / world
        if rank == 0:
            print(
                f"size_mib={mib} busbw_gbps={busbw:.3f} algbw_gbps={algbw:.3f} ms={median * 1e3:.3f} "
                f"min_ms={times[0] * 1e3:.3f} max_ms={times[-1] * 1e3:.3f} iters={iters}",
                flush=True,
            )
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64, 256])
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args()
    # Keep gloo on the loopback interface whatever the host's name resolves to.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(args.world, free_port(), args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
