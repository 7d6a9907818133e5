"""A local Chorus cluster for the search benchmarks (bench/search_regret.py,
bench/search_curves.py): a coordinator on a loopback port and CPU workers, and the loop that runs
one experiment until its trials have logged a budget of epochs."""
import json
import os
import subprocess
import time


class Cluster:
    """A coordinator and `workers` workers with `slots` slots each, in a work folder; `env` has
    CHORUS_COORDINATOR set for the CLI at `chorus`."""

    def __init__(self, bin_dir, workdir, workers=2, slots=2):
        self.procs = []
        coord = subprocess.Popen([os.path.join(bin_dir, "chorus-coordinator"), "--listen", "127.0.0.1:0",
                                  "--data-dir", os.path.join(workdir, "coordinator")], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        self.procs.append(coord)
        addr = coord.stdout.readline().strip().rsplit(" ", 1)[-1]
        self.env = dict(os.environ, CHORUS_COORDINATOR=f"http://{addr}")
        self.chorus = os.path.join(bin_dir, "chorus")
        for i in range(workers):
            self.procs.append(subprocess.Popen(
                [os.path.join(bin_dir, "chorus-worker"), "--coordinator", f"http://{addr}", "--worker-id", f"w{i}",
                 "--slots", str(slots), "--gpus", "0", "--data-dir", os.path.join(workdir, f"w{i}")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env))
        time.sleep(1.5)

    def stop(self):
        for p in reversed(self.procs):
            p.terminate()

    def run(self, spec, path, log, budget, poll=0.5):
        """Submits `spec` (written to `path`), waits until `log` has `budget` lines or the
        experiment ends, kills it, and returns the log's rows (split lines) in time order; each
        trial appends `time_ns trial epoch value` per epoch."""
        open(log, "w").close()
        with open(path, "w") as f:
            json.dump(spec, f)  # JSON is YAML
        out = subprocess.run([self.chorus, "experiment", "submit", path, "-o", "json"], env=self.env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"submit failed: {out.stderr}")
        exp = json.loads(out.stdout)["id"]
        while True:
            with open(log) as f:
                if sum(1 for _ in f) >= budget:
                    break
            described = subprocess.run([self.chorus, "experiment", "describe", str(exp), "-o", "json"], env=self.env,
                                       capture_output=True, text=True, check=True).stdout
            if json.loads(described)["experiment"]["state"] != "active":
                break
            time.sleep(poll)
        subprocess.run([self.chorus, "experiment", "kill", str(exp)], env=self.env, capture_output=True)
        with open(log) as f:
            return sorted(tuple(line.split()) for line in f if line.strip())
