#!/usr/bin/env python3
"""A small stand-in for a training script, used by the example sweeps.

It "trains" a model whose validation loss depends on the learning rate, momentum and depth in a
known way, reports metrics with the Chorus metric protocol, and checkpoints its progress to
CHORUS_CHECKPOINT_DIR so a restarted trial resumes where it stopped instead of starting over.
"""
import argparse
import json
import math
import os
import random
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--lr", type=float, required=True)
p.add_argument("--momentum", type=float, default=0.9)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--epochs", type=int, default=8)
p.add_argument("--epoch-seconds", type=float, default=0.15)
args = p.parse_args()

ckpt_dir = os.environ.get("CHORUS_CHECKPOINT_DIR", "")
state_path = os.path.join(ckpt_dir, "state.json") if ckpt_dir else ""
state = {"epoch": 0, "best": None}
if state_path and os.path.exists(state_path):
    with open(state_path) as f:
        state = json.load(f)
    print(f"resumed from epoch {state['epoch']}", flush=True)

# The best learning rate is 0.01, the best momentum 0.9, three layers; noise is per trial.
rng = random.Random(json.dumps(vars(args), sort_keys=True))
floor = (math.log10(args.lr) + 2) ** 2 * 0.15 + (args.momentum - 0.9) ** 2 * 2 + abs(args.layers - 3) * 0.05

for epoch in range(state["epoch"] + 1, args.epochs + 1):
    time.sleep(args.epoch_seconds)
    progress = 1 - math.exp(-epoch / 3)
    train_loss = 2.0 * (1 - progress) + floor * progress + rng.uniform(0, 0.02)
    val_loss = train_loss + 0.05 + rng.uniform(0, 0.03)
    val_acc = max(0.0, min(1.0, 1 - val_loss / 2.5))
    print(f"epoch {epoch}: train_loss={train_loss:.4f} val_loss={val_loss:.4f}", flush=True)
    state["epoch"] = epoch
    if state_path:
        with open(state_path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(state_path + ".tmp", state_path)
    metric = {"step": epoch, "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5), "val_acc": round(val_acc, 5)}
    print("chorus:metric " + json.dumps(metric), flush=True)

sys.exit(0)
