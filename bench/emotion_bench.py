#!/usr/bin/env python3
"""emotion-bench training throughput in PyTorch eager, the anchor for the built-in trainer.

The model is shared/emotion-bench.md layer for layer, as worker/src/models/emotion_bench.rs builds
it (1,436,615 parameters, PyTorch default initialisation): batch 64 of random inputs, Adam at 1e-3,
cross-entropy, 3 warm-up steps, then timed steps of forward, backward, update and loss.item().

With --channels-last the image branch and its input use torch.channels_last, as the built-in
trainer does; the default is PyTorch's default layout (NCHW), the plain eager anchor.

Usage: python bench/emotion_bench.py [--steps 20] [--threads 1] [--channels-last]
Run it in the bench-only venv (bench/emotion_bench.sh makes it): torch==2.11.0 from PyPI.
"""
import argparse
import time

import torch
from torch import nn


class EmotionBench(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embedding = nn.Embedding(8000, 128)
        self.text_lstm = nn.LSTM(128, 128, num_layers=1, batch_first=True)
        self.audio_lstm = nn.LSTM(40, 128, num_layers=1, batch_first=True)
        self.head = nn.Sequential(nn.Linear(384, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 7))

    def forward(self, image, tokens, audio):
        i = self.image(image)                                # [B, 128]
        _, (t, _) = self.text_lstm(self.embedding(tokens))   # h: [1, B, 128]
        _, (a, _) = self.audio_lstm(audio)                   # h: [1, B, 128]
        return self.head(torch.cat([i, t[0], a[0]], dim=1))  # [B, 7]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    model = EmotionBench().to(dev)
    params = sum(p.numel() for p in model.parameters())
    assert params == 1_436_615, params
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = args.batch
    image = torch.randn(b, 1, 48, 48, device=dev)
    tokens = torch.randint(0, 8000, (b, 32), device=dev)
    audio = torch.randn(b, 64, 40, device=dev)
    labels = torch.randint(0, 7, (b,), device=dev)
    if args.channels_last:
        model.image = model.image.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    model.train()

    def step():
        loss = nn.functional.cross_entropy(model(image, tokens, audio), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        last = step()
    seconds = time.perf_counter() - start
    sps = args.steps * b / seconds
    layout = "channels-last" if args.channels_last else "nchw"
    print(f"pytorch emotion-bench ({layout}): {sps:.1f} samples/s ({1000 * seconds / args.steps:.1f} ms/step, "
          f"{args.steps} steps of {b}, {torch.get_num_threads()} thread(s), {dev}, torch {torch.__version__}, "
          f"{params} parameters, last loss {last:.4f})")
    print(f"samples_per_second={sps:.3f}")


if __name__ == "__main__":
    main()
