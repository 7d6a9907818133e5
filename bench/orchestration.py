#!/usr/bin/env python3
"""Orchestration overhead of Chorus (release build), on this machine.

(a) throughput: 1,000 trials of a trivial command that reports one metric, on 2 workers x 2 slots;
    figure: trials per second from submission to the experiment's completion.
(b) efficiency: 200 trials that each sleep 0.5 s on the same 4 slots; figure: wall time divided by
    the ideal (200 x 0.5 s / 4 slots = 25 s). The anchor is the ideal itself: Ray Tune's release
    test for the same shape accepts about 1.14.
(c) the coordinator's CPU seconds and peak RSS during each run, read from /proc.

Each scenario runs --runs times (default 5) on a fresh coordinator and workers; the median, min and
max are printed as a Markdown table for docs/BENCHMARKS.md.

Usage: python3 bench/orchestration.py [--runs 5] [--only a|b] [--build]
       CHORUS_BENCH_BIN=DIR python3 bench/orchestration.py ...   (binaries from DIR)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CHORUS_BENCH_BIN runs another build (e.g. an earlier commit's) for a side-by-side comparison.
BIN = os.environ.get("CHORUS_BENCH_BIN", os.path.join(ROOT, "target", "release"))
CLK_TCK = os.sysconf("SC_CLK_TCK")

SPEC = """
name: bench-%(name)s
metric: {name: loss, goal: minimize}
parameters:
  x: {min: 0.0, max: 1.0}
searcher: {name: random, seed: 1}
max_trials: %(n)d
parallel_trials: 4
trial:
  command: [sh, -c, '%(prefix)secho "chorus:metric {\\"loss\\": ${params.x}}"']
"""
TRIVIAL = {"name": "trivial", "prefix": ""}
SLEEPY = {"name": "sleep", "prefix": "sleep 0.5; "}


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_once(spec_text):
    with tempfile.TemporaryDirectory(prefix="chorus-bench-") as d:
        env = dict(os.environ, RUST_LOG="warn")
        env.pop("CHORUS_TOKEN", None)
        coord = subprocess.Popen(
            [os.path.join(BIN, "chorus-coordinator"), "--listen", "127.0.0.1:0", "--data-dir", os.path.join(d, "c")],
            stdout=subprocess.PIPE, stderr=open(os.path.join(d, "c.log"), "w"), env=env, text=True)
        addr = coord.stdout.readline().strip().rsplit(" ", 1)[-1]
        env["CHORUS_COORDINATOR"] = "http://" + addr
        workers = [
            subprocess.Popen(
                [os.path.join(BIN, "chorus-worker"), "--worker-id", f"bench-{i}", "--slots", "2", "--gpus", "0",
                 "--data-dir", os.path.join(d, f"w{i}")],
                stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, f"w{i}.log"), "w"), env=env)
            for i in range(2)
        ]
        chorus = os.path.join(BIN, "chorus")
        try:
            for _ in range(100):
                out = subprocess.run([chorus, "worker", "list", "--output", "json"], env=env, capture_output=True, text=True)
                if out.returncode == 0 and sum(1 for w in json.loads(out.stdout) if w.get("alive")) == 2:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError("workers did not register")
            spec = os.path.join(d, "spec.yaml")
            with open(spec, "w") as f:
                f.write(spec_text)
            cpu0 = proc_cpu_seconds(coord.pid)
            wcpu0 = sum(proc_cpu_seconds(w.pid) for w in workers)
            t0 = time.perf_counter()
            out = subprocess.run([chorus, "experiment", "submit", spec, "--wait"], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if out.returncode != 0:
                raise RuntimeError(f"sweep failed: {out.stderr}")
            cpu = proc_cpu_seconds(coord.pid) - cpu0
            wcpu = sum(proc_cpu_seconds(w.pid) for w in workers) - wcpu0
            print(f"run: wall {wall:.2f} s, coordinator CPU {cpu:.2f} s, workers CPU {wcpu:.2f} s", file=sys.stderr)
            rss = proc_peak_rss_mib(coord.pid)
            listing = subprocess.run([chorus, "experiment", "list", "--output", "json"], env=env, capture_output=True, text=True)
            exp = json.loads(listing.stdout)[-1]
            completed = exp["counts"]["completed"]
            return wall, cpu, rss, completed
        finally:
            for p in workers + [coord]:
                p.terminate()
            for p in workers + [coord]:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()


def summary(xs):
    return statistics.median(xs), min(xs), max(xs)


def fmt(t, digits=2):
    med, lo, hi = t
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", choices=["a", "b"])
    ap.add_argument("--build", action="store_true", help="cargo build --release first")
    args = ap.parse_args()
    if args.build:
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    rows = []
    if args.only in (None, "a"):
        n = 1000
        res = [run_once(SPEC % dict(TRIVIAL, n=n)) for _ in range(args.runs)]
        assert all(r[3] == n for r in res), f"not every trial completed: {[r[3] for r in res]}"
        rate = summary([n / r[0] for r in res])
        rows.append(("(a) 1,000 trivial trials, 2 workers x 2 slots", f"{fmt(rate, 1)} trials/s",
                     "≥ 100 trials/s", fmt(summary([r[1] for r in res])), fmt(summary([r[2] for r in res]), 1)))
        print(f"(a) trials/s per run: {[round(n / r[0], 1) for r in res]}", file=sys.stderr)
    if args.only in (None, "b"):
        n, ideal = 200, 200 * 0.5 / 4
        res = [run_once(SPEC % dict(SLEEPY, n=n)) for _ in range(args.runs)]
        assert all(r[3] == n for r in res), f"not every trial completed: {[r[3] for r in res]}"
        ratio = summary([r[0] / ideal for r in res])
        rows.append(("(b) 200 trials of sleep 0.5 s, 4 slots", f"{fmt(ratio, 3)} × ideal ({ideal:.0f} s)",
                     "≤ 1.05 (Ray Tune accepts ≈ 1.14)", fmt(summary([r[1] for r in res])), fmt(summary([r[2] for r in res]), 1)))
        print(f"(b) wall/ideal per run: {[round(r[0] / ideal, 3) for r in res]}", file=sys.stderr)
    print(f"| scenario | result, median (min–max) of {args.runs} | target | coordinator CPU s | coordinator peak RSS MiB |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
