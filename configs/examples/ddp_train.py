#!/usr/bin/env python3
"""A plain PyTorch DistributedDataParallel script, exactly as it would run under torchrun.

Chorus starts one copy per rank with the variables torchrun sets (MASTER_ADDR, MASTER_PORT,
WORLD_SIZE, RANK, LOCAL_RANK, ...), so `init_process_group("gloo")` with the default env://
rendezvous just works. The only Chorus-specific lines are the optional `chorus:metric` prints
and the checkpoint directory, both of which a script may ignore.

Run with configs/examples/ddp-sweep.yaml (needs torch in the workers' Python).
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    ckpt = os.path.join(os.environ.get("CHORUS_CHECKPOINT_DIR", "."), "model.pt")
    start = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt)
        model.module.load_state_dict(state["model"])
        start = state["step"]
    g = torch.Generator().manual_seed(1000 + rank)
    w_true = torch.ones(16, 1)
    for step in range(start + 1, args.steps + 1):
        x = torch.randn(32, 16, generator=g)
        loss = nn.functional.mse_loss(model(x), x @ w_true)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step % 10 == 0:
            torch.save({"model": model.module.state_dict(), "step": step}, ckpt)
            print("chorus:metric " + json.dumps({"step": step, "loss": loss.item(), "world": world}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
