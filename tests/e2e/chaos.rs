//! Chaos: a seeded schedule of faults during a sweep of checkpointing command trials, then the
//! invariants that must hold whatever happened.
//!
//! Faults (drawn from the seed, one after another, each for a drawn while): SIGKILL and SIGSTOP
//! of the coordinator and of a worker (a killed one restarts under the same id), a worker cut
//! off from the coordinator or its link stalled (a TCP proxy between them), a full disk under
//! the coordinator and under a worker (a small tmpfs filled up; skipped, with the reason, where
//! mounting is not permitted), and for runs on S3 (a real `s3s-fs` behind a proxy) an object
//! store that fails every request or stalls.
//!
//! Invariants:
//! 1. the experiment ends, and every trial ends exactly once: completed, or failed with a reason
//!    once its restarts ran out (never seen ending twice or leaving its end);
//! 2. no acknowledged metric is lost: every metric line the coordinator showed for a trial
//!    while the faults ran, and its final best and last values, are in the trial's history in
//!    storage;
//! 3. every line of that history belongs to the trial's lineage: attempts in order, each line
//!    stored under the attempt that printed it, each attempt's lines its own consecutive steps,
//!    the last attempt the trial's final one, no line of another trial; no checkpoint of an
//!    attempt the trial never had, and the checkpoint the coordinator acknowledged restores
//!    with this trial's state;
//! 4. no process of any attempt is left running: a SIGKILLed worker's trial processes die with
//!    it, what they started is gone once it restarts under the same id, and nothing of any
//!    attempt runs after the experiment ended (every trial process carries a marker, searched
//!    for in `/proc`; each trial starts helpers, one of them in a session of its own);
//! 5. nothing is written outside the cluster's directories and the experiment's storage (every
//!    process runs in a dedicated root, whose files are checked), and no process exits by
//!    itself (the coordinator on a full disk, say).
//!
//! The seed is printed first; `CHORUS_CHAOS_SEED=S[,S...]` replays the given seeds (one per
//! test of this module, in order) instead of the fixed ones and the clock's.

use super::*;
use chorus_core::checkpoint::{self, CheckpointRef};
use chorus_core::history::read_history;
use chorus_core::storage::{Storage, StorageOptions, StorageUri, open};
use chorus_core::{ExperimentId, TrialId};
use chorus_tests::fault::files_under;
use chorus_tests::{ClusterConfig, FaultProxy, MarkedProcess, ProxyMode, S3Server, fill_disk, marked_processes};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

/// The seeds every run of the suite tries, besides one from the clock. Between them they
/// draw both storages and every kind of fault.
const FIXED_SEEDS: [u64; 3] = [1, 2, 7];
const WORKERS: usize = 2;
const TRIALS: u64 = 8;
const STEPS: u64 = 40;
const FAULTS: usize = 5;
const MAX_RESTARTS: u64 = 12;
const LEASE_TTL: Duration = Duration::from_secs(3);
/// How often the run looks at the trials while faults go on.
const POLL: Duration = Duration::from_millis(700);
/// Sizes of the file systems that are filled up.
const COORDINATOR_DISK: u64 = 64 * 1024 * 1024;
const WORKER_DISK: u64 = 16 * 1024 * 1024;
const FILL_NAME: &str = ".chaos-fill";
/// How soon a trial's own processes must die with a SIGKILLed worker (parent-death signal).
const WITH_WORKER: Duration = Duration::from_secs(3);
/// How soon after a worker restarts under the same id what its killed predecessor's trials
/// started must be gone.
const AFTER_RESTART: Duration = Duration::from_secs(10);
/// How soon after the experiment ends every process of its attempts must be gone.
const AFTER_END: Duration = Duration::from_secs(15);
const BUCKET: &str = "chorus";
const PREFIX: &str = "chaos";

#[test]
fn chaos_fixed_seed_a() {
    run_slot(0);
}

#[test]
fn chaos_fixed_seed_b() {
    run_slot(1);
}

#[test]
fn chaos_fixed_seed_c() {
    run_slot(2);
}

#[test]
fn chaos_clock_seed() {
    run_slot(3);
}

/// The seed of the `slot`-th run: from `CHORUS_CHAOS_SEED` when set, else the fixed ones and
/// then the clock's.
fn seed_for(slot: usize) -> Option<u64> {
    if let Ok(list) = std::env::var("CHORUS_CHAOS_SEED") {
        let seeds: Vec<u64> = list
            .split(',')
            .map(|s| s.trim().parse().expect("CHORUS_CHAOS_SEED: comma-separated integers"))
            .collect();
        return seeds.get(slot).copied();
    }
    FIXED_SEEDS.get(slot).copied().or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Some((nanos % 1_000_000) as u64)
    })
}

fn run_slot(slot: usize) {
    let Some(seed) = seed_for(slot) else {
        eprintln!("chaos: no seed for run {slot} in CHORUS_CHAOS_SEED; nothing to do");
        return;
    };
    let plan = Plan::draw(seed);
    eprintln!(
        "chaos: seed {seed} (replay: CHORUS_CHAOS_SEED={seed} cargo nextest run -p chorus-tests -E 'test(chaos::)')"
    );
    eprintln!("{}", plan.describe());
    let report = Run::new(plan).execute();
    eprintln!("{}", report.summary);
    assert!(
        report.violations.is_empty(),
        "chaos seed {seed}: {} invariant(s) broken (replay with CHORUS_CHAOS_SEED={seed}):\n- {}\n{}",
        report.violations.len(),
        report.violations.join("\n- "),
        report.logs
    );
}

// ---------------------------------------------------------------------------------------------
// The schedule

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillCoordinator,
    StopCoordinator,
    KillWorker(usize),
    StopWorker(usize),
    CutWorker(usize),
    StallWorker(usize),
    FillCoordinatorDisk,
    FillWorkerDisk(usize),
    FailStore,
    StallStore,
}

impl Fault {
    /// How long it lasts, in milliseconds: some worker faults outlast the lease, so their
    /// trials move while the old attempts may still run.
    fn duration_ms(self) -> std::ops::Range<u64> {
        match self {
            Fault::KillCoordinator => 200..2_000,
            Fault::StopCoordinator => 1_000..5_000,
            Fault::KillWorker(_) => 500..4_000,
            Fault::StopWorker(_) | Fault::CutWorker(_) | Fault::StallWorker(_) => 2_000..6_500,
            Fault::FillCoordinatorDisk | Fault::FillWorkerDisk(_) => 2_000..5_000,
            Fault::FailStore | Fault::StallStore => 2_000..5_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Planned {
    /// Quiet time before the fault starts.
    after: Duration,
    fault: Fault,
    lasts: Duration,
}

#[derive(Debug, Clone)]
struct Plan {
    seed: u64,
    s3: bool,
    faults: Vec<Planned>,
}

impl Plan {
    /// Draws the storage and `FAULTS` faults of distinct kinds, each with its target, start
    /// and length; the same seed always gives the same plan.
    fn draw(seed: u64) -> Plan {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let s3 = rng.random_bool(0.5);
        let mut kinds: Vec<fn(usize) -> Fault> = vec![
            |_| Fault::KillCoordinator,
            |_| Fault::StopCoordinator,
            Fault::KillWorker,
            Fault::StopWorker,
            Fault::CutWorker,
            Fault::StallWorker,
            |_| Fault::FillCoordinatorDisk,
            Fault::FillWorkerDisk,
        ];
        if s3 {
            kinds.push(|_| Fault::FailStore);
            kinds.push(|_| Fault::StallStore);
        }
        kinds.shuffle(&mut rng);
        let faults = kinds
            .into_iter()
            .take(FAULTS)
            .map(|kind| {
                let fault = kind(rng.random_range(0..WORKERS));
                Planned {
                    after: Duration::from_millis(rng.random_range(300..1_500)),
                    fault,
                    lasts: Duration::from_millis(rng.random_range(fault.duration_ms())),
                }
            })
            .collect();
        Plan { seed, s3, faults }
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "chaos plan for seed {}: storage {}, {} trials of {} steps, lease {:?}",
            self.seed,
            if self.s3 { "s3 (s3s-fs behind a proxy)" } else { "file" },
            TRIALS,
            STEPS,
            LEASE_TTL
        );
        for p in &self.faults {
            s.push_str(&format!("\n  after {:?}: {:?} for {:?}", p.after, p.fault, p.lasts));
        }
        s
    }

    fn has(&self, f: impl Fn(Fault) -> bool) -> bool {
        self.faults.iter().any(|p| f(p.fault))
    }
}

// ---------------------------------------------------------------------------------------------
// The trial

/// A trial of `STEPS` steps that keeps its state in a checkpoint file and resumes from it.
/// Each metric line names the attempt that printed it (`a`), so a line found in storage can
/// be traced to its attempt; `loss` is a function of the trial's `k` and the step, so a line
/// of another trial stands out. It starts two helpers that live as long as it might (one in a
/// session of its own, as daemons do), which must die with its attempt. A checkpoint that does
/// not fit on a full disk is retried for a while, as a trainer waiting for space would.
const TRIAL_SCRIPT: &str = r#"d="$CHORUS_CHECKPOINT_DIR"; k=${params.k}; n=@STEPS@; s=0
if [ -f "$d/state" ]; then read s t a < "$d/state"; s=${s:-0}; if [ "${t:-0}" != "$CHORUS_TRIAL_ID" ]; then echo "chorus:metric {\"foreign_checkpoint\": ${t:-0}, \"a\": $CHORUS_ATTEMPT}"; fi; fi
sleep 600 > /dev/null 2>&1 &
setsid sleep 600 > /dev/null 2>&1 &
while [ "$s" -lt "$n" ]; do
  s=$((s+1)); sleep 0.2; i=0
  until printf "%s %s %s\n" "$s" "$CHORUS_TRIAL_ID" "$CHORUS_ATTEMPT" > "$d/state.tmp" && mv "$d/state.tmp" "$d/state"; do
    i=$((i+1)); if [ "$i" -ge 40 ]; then echo "cannot write a checkpoint" >&2; exit 3; fi; sleep 0.25
  done
  echo "chorus:metric {\"step\": $s, \"loss\": $((k * 1000 - s)), \"a\": $CHORUS_ATTEMPT}"
done
echo "chorus:metric {\"final_step\": $s, \"a\": $CHORUS_ATTEMPT}""#;

fn loss(k: i64, step: i64) -> f64 {
    (k * 1000 - step) as f64
}

fn spec(plan: &Plan, marker: &str) -> String {
    let script = TRIAL_SCRIPT.replace("@STEPS@", &STEPS.to_string());
    let values: Vec<String> = (1..=TRIALS).map(|k| k.to_string()).collect();
    let storage = if plan.s3 {
        format!("storage: s3://{BUCKET}/{PREFIX}\n")
    } else {
        String::new()
    };
    // A literal block keeps the script's lines as they are.
    let script: String = script.lines().map(|l| format!("      {l}\n")).collect();
    format!(
        "name: chaos-{seed}
metric: {{name: loss, goal: minimize}}
parameters:
  k: {{values: [{values}]}}
searcher: {{name: grid}}
parallel_trials: 3
max_restarts: {MAX_RESTARTS}
checkpoint: {{keep_last: 1}}
{storage}trial:
  env: {{CHAOS_MARKER: {marker}}}
  command:
    - sh
    - -c
    - |
{script}    - {marker}
",
        seed = plan.seed,
        values = values.join(", "),
    )
}

// ---------------------------------------------------------------------------------------------
// The run

struct Report {
    violations: Vec<String>,
    summary: String,
    logs: String,
}

/// What the run saw of one trial while the faults went on.
#[derive(Default)]
struct Seen {
    /// The first end seen: state and attempt.
    ended: Option<(String, u64)>,
    /// Every distinct `last_metrics` the coordinator showed.
    metrics: BTreeSet<String>,
}

/// Processes that must be gone by a deadline.
struct ProcessCheck {
    what: String,
    procs: Vec<MarkedProcess>,
    deadline: Instant,
}

struct Store {
    server: S3Server,
    proxy: FaultProxy,
}

struct Run {
    plan: Plan,
    /// Every process of the run works under here; dropped last.
    root: tempfile::TempDir,
    cluster: Option<TestCluster>,
    store: Option<Store>,
    marker: String,
    exp: Option<u64>,
    seen: BTreeMap<u64, Seen>,
    /// Broken invariants, each with how often it was seen.
    violations: Vec<(String, usize)>,
    notes: Vec<String>,
    process_checks: Vec<ProcessCheck>,
    /// Why disk faults are skipped, when they are.
    no_tmpfs: Option<String>,
    coordinator_frozen: bool,
    /// The coordinator is down on purpose (killed, not yet restarted).
    coordinator_down: bool,
    workers_down: BTreeSet<usize>,
    /// What is going on now, for messages.
    now: String,
}

impl Run {
    fn new(plan: Plan) -> Run {
        let root = tempfile::Builder::new()
            .prefix(&format!("chorus-chaos-{}-", plan.seed))
            .tempdir()
            .expect("chaos root");
        let marker = format!("chorus-chaos-marker-{}-{}", plan.seed, std::process::id());
        Run {
            plan,
            root,
            cluster: None,
            store: None,
            marker,
            exp: None,
            seen: BTreeMap::new(),
            violations: Vec::new(),
            notes: Vec::new(),
            process_checks: Vec::new(),
            no_tmpfs: None,
            coordinator_frozen: false,
            coordinator_down: false,
            workers_down: BTreeSet::new(),
            now: "start".into(),
        }
    }

    fn c(&self) -> &TestCluster {
        self.cluster.as_ref().expect("cluster")
    }

    fn cm(&mut self) -> &mut TestCluster {
        self.cluster.as_mut().expect("cluster")
    }

    /// Records a broken invariant; the same one seen again is counted, not repeated.
    fn violation(&mut self, v: String) {
        match self.violations.iter().position(|(seen, _)| *seen == v) {
            Some(i) => self.violations[i].1 += 1,
            None => {
                eprintln!("chaos: VIOLATION: {v}");
                self.violations.push((v, 1));
            }
        }
    }

    /// Settles the process checks whose time has come (all of them with `all`).
    fn settle_process_checks(&mut self, all: bool) {
        let now = Instant::now();
        let mut due = Vec::new();
        self.process_checks.retain_mut(|c| {
            c.procs.retain(MarkedProcess::alive);
            if c.procs.is_empty() {
                return false;
            }
            if all || now >= c.deadline {
                due.push(format!("{} {}: {}", c.procs.len(), c.what, describe_procs(&c.procs)));
                return false;
            }
            true
        });
        for v in due {
            self.violation(v);
        }
    }

    fn execute(mut self) -> Report {
        let started = Instant::now();
        self.setup();
        let yaml = spec(&self.plan, &self.marker);
        let file = self.c().write("chaos.yaml", &yaml);
        let exp = submit(self.c(), &file);
        self.exp = Some(exp);

        let plan = self.plan.clone();
        for (i, p) in plan.faults.iter().enumerate() {
            self.now = format!("the quiet before fault {}", i + 1);
            self.watch(p.after);
            self.now = format!("fault {} ({:?})", i + 1, p.fault);
            eprintln!(
                "chaos: {:>6.1}s {:?} for {:?}",
                started.elapsed().as_secs_f64(),
                p.fault,
                p.lasts
            );
            self.inject(p.fault, p.lasts);
        }
        self.now = "the end of the sweep".into();
        let ended = self.wait_ended(Duration::from_secs(180));
        let sweep_s = started.elapsed().as_secs_f64();

        let mut outcome = String::new();
        if ended {
            outcome = self.check_end();
            self.check_records();
        }
        self.check_files();
        self.check_processes();
        let summary = format!(
            "chaos seed {}: {} in {sweep_s:.1}s (checks done at {:.1}s){}\n{outcome}{}",
            self.plan.seed,
            if self.violations.is_empty() {
                "all invariants hold"
            } else {
                "INVARIANTS BROKEN"
            },
            started.elapsed().as_secs_f64(),
            self.no_tmpfs
                .as_ref()
                .map(|r| format!("; disk faults skipped: {r}"))
                .unwrap_or_default(),
            self.notes.iter().map(|n| format!("note: {n}\n")).collect::<String>(),
        );
        let logs = self.cluster.as_ref().map(|c| c.logs_tail()).unwrap_or_default();
        // Processes first, then mounts and directories.
        drop(self.cluster.take());
        if std::env::var_os("CHORUS_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping {}", self.root.keep().display());
        }
        Report {
            violations: self
                .violations
                .into_iter()
                .map(|(v, n)| if n > 1 { format!("{v} (seen {n} times)") } else { v })
                .collect(),
            summary,
            logs,
        }
    }

    fn setup(&mut self) {
        let root = self.root.path().to_path_buf();
        let mut env = Vec::new();
        let mut storage = None;
        if self.plan.s3 {
            let server = S3Server::start_in(BUCKET, &root).expect("s3s-fs (scripts/setup.sh installs it)");
            let upstream = server.endpoint.trim_start_matches("http://").parse().expect("endpoint");
            let proxy = FaultProxy::start(upstream).expect("store proxy");
            for (k, v) in server.env() {
                let v = if k == "CHORUS_S3_ENDPOINT" {
                    format!("http://{}", proxy.addr())
                } else {
                    v
                };
                env.push((k, v));
            }
            storage = Some(format!("s3://{BUCKET}/{PREFIX}"));
            self.store = Some(Store { server, proxy });
        }
        let mut c = TestCluster::create(ClusterConfig {
            workers: WORKERS,
            slots: 2,
            lease_ttl: LEASE_TTL,
            storage,
            env,
            root: Some(root),
            worker_proxies: true,
            ..Default::default()
        })
        .expect("cluster directory");
        let mut mounts = Vec::new();
        if self.plan.has(|f| f == Fault::FillCoordinatorDisk) {
            mounts.push((c.coordinator_dir(), COORDINATOR_DISK));
        }
        for p in &self.plan.faults {
            if let Fault::FillWorkerDisk(w) = p.fault {
                mounts.push((c.worker_dir(w), WORKER_DISK));
            }
        }
        for (dir, bytes) in mounts {
            if self.no_tmpfs.is_some() {
                break;
            }
            if let Err(e) = c.mount_tmpfs(&dir, bytes) {
                eprintln!("chaos: disk faults skipped: {e:#}");
                self.no_tmpfs = Some(format!("{e:#}"));
            }
        }
        c.launch().expect("cluster starts");
        self.cluster = Some(c);
    }

    /// Lets `d` pass while looking at the trials and at processes that died by themselves.
    fn watch(&mut self, d: Duration) {
        let until = Instant::now() + d;
        loop {
            let tick = Instant::now();
            self.look();
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(POLL.saturating_sub(tick.elapsed()).min(left));
        }
    }

    /// One look: a process that exited by itself is a violation (and is started again, as a
    /// supervisor would); then the trials, when the coordinator can answer.
    fn look(&mut self) {
        self.settle_process_checks(false);
        if let Some(st) = self.cm().coordinator_exited() {
            let now = self.now.clone();
            self.violation(format!("the coordinator exited by itself ({st}) during {now}"));
        }
        if !self.coordinator_down
            && !self.cm().coordinator_running()
            && let Err(e) = self.cm().start_coordinator()
        {
            eprintln!("chaos: the coordinator does not start again yet: {e:#}");
        }
        for w in 0..WORKERS {
            if let Some(st) = self.cm().worker_exited(w) {
                let now = self.now.clone();
                self.violation(format!("worker-{w} exited by itself ({st}) during {now}"));
            }
            if !self.workers_down.contains(&w)
                && !self.cm().worker_running(w)
                && let Err(e) = self.cm().restart_worker(w)
            {
                eprintln!("chaos: worker-{w} does not start again yet: {e:#}");
            }
        }
        if self.coordinator_frozen || !self.c().coordinator_running() {
            return;
        }
        let Some(exp) = self.exp else { return };
        let Ok(v) = self
            .c()
            .chorus_json(&["trial", "list", &exp.to_string(), "--output", "json"])
        else {
            return;
        };
        for t in v["trials"].as_array().cloned().unwrap_or_default() {
            self.observe(&t);
        }
    }

    fn observe(&mut self, t: &Value) {
        let Some(id) = t["id"].as_u64() else { return };
        let state = t["state"].as_str().unwrap_or_default().to_string();
        let attempt = t["attempt"].as_u64().unwrap_or(0);
        let seen = self.seen.entry(id).or_default();
        let last = &t["last_metrics"];
        if last.as_object().is_some_and(|o| !o.is_empty()) {
            seen.metrics.insert(last.to_string());
        }
        let terminal = matches!(state.as_str(), "completed" | "failed" | "killed");
        let problem = match (&seen.ended, terminal) {
            (None, true) => {
                seen.ended = Some((state, attempt));
                None
            }
            (Some(first), true) if *first != (state.clone(), attempt) => Some(format!(
                "trial {id} ended twice: first {} (attempt {}), later {state} (attempt {attempt})",
                first.0, first.1
            )),
            (Some(first), false) => Some(format!(
                "trial {id} ended {} (attempt {}) and was later {state} (attempt {attempt})",
                first.0, first.1
            )),
            _ => None,
        };
        if let Some(p) = problem {
            let now = self.now.clone();
            self.violation(format!("{p}, seen during {now}"));
        }
    }

    fn inject(&mut self, fault: Fault, lasts: Duration) {
        match fault {
            Fault::KillCoordinator => {
                self.coordinator_down = true;
                self.cm().kill_coordinator();
                std::thread::sleep(lasts);
                self.coordinator_down = false;
                if let Err(e) = self.cm().start_coordinator() {
                    eprintln!("chaos: the coordinator did not start again: {e:#}");
                }
            }
            Fault::StopCoordinator => {
                self.coordinator_frozen = true;
                self.c().pause_coordinator();
                self.watch(lasts);
                self.c().resume_coordinator();
                self.coordinator_frozen = false;
            }
            Fault::KillWorker(w) => {
                let name = format!("worker-{w}");
                let its: Vec<MarkedProcess> = marked_processes(&self.marker)
                    .into_iter()
                    .filter(|p| p.env("CHORUS_WORKER_ID").as_deref() == Some(name.as_str()))
                    .collect();
                self.workers_down.insert(w);
                self.cm().kill_worker(w);
                // The trials' own processes die with it; what they started, at the latest
                // when it starts again on the same data directory (before it runs anything).
                self.process_checks.push(ProcessCheck {
                    what: format!("trial process(es) outlived {name}'s SIGKILL by {WITH_WORKER:?}"),
                    procs: its.iter().filter(|p| p.in_cmdline).cloned().collect(),
                    deadline: Instant::now() + WITH_WORKER,
                });
                self.watch(lasts);
                self.workers_down.remove(&w);
                if let Err(e) = self.cm().restart_worker(w) {
                    eprintln!("chaos: {name} did not start again: {e:#}");
                }
                self.process_checks.push(ProcessCheck {
                    what: format!(
                        "process(es) of {name}'s attempts still ran {AFTER_RESTART:?} after it restarted under the same id"
                    ),
                    procs: its,
                    deadline: Instant::now() + AFTER_RESTART,
                });
            }
            Fault::StopWorker(w) => {
                self.c().pause_worker(w);
                self.watch(lasts);
                self.c().resume_worker(w);
            }
            Fault::CutWorker(w) | Fault::StallWorker(w) => {
                let mode = if matches!(fault, Fault::CutWorker(_)) {
                    ProxyMode::Refuse
                } else {
                    ProxyMode::Stall
                };
                self.c().worker_proxy(w).expect("worker proxy").set_mode(mode);
                self.watch(lasts);
                self.c()
                    .worker_proxy(w)
                    .expect("worker proxy")
                    .set_mode(ProxyMode::Pass);
            }
            Fault::FillCoordinatorDisk | Fault::FillWorkerDisk(_) => {
                if let Some(why) = &self.no_tmpfs {
                    eprintln!("chaos: {fault:?} skipped: {why}");
                    self.watch(lasts);
                    return;
                }
                let dir = match fault {
                    Fault::FillWorkerDisk(w) => self.c().worker_dir(w),
                    _ => self.c().coordinator_dir(),
                };
                let fill = fill_disk(&dir, FILL_NAME).expect("fill the disk");
                self.watch(lasts);
                std::fs::remove_file(&fill).expect("free the disk");
            }
            Fault::FailStore | Fault::StallStore => {
                let mode = if fault == Fault::FailStore {
                    ProxyMode::Refuse
                } else {
                    ProxyMode::Stall
                };
                let store = self.store.as_ref().expect("an S3 run");
                store.proxy.set_mode(mode);
                self.watch(lasts);
                self.store.as_ref().expect("an S3 run").proxy.set_mode(ProxyMode::Pass);
            }
        }
    }

    /// Waits for the experiment to end, still looking; a violation when it does not.
    fn wait_ended(&mut self, timeout: Duration) -> bool {
        let exp = self.exp.expect("submitted");
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            self.watch(POLL);
            if let Ok(e) = experiment(self.c(), exp)
                && matches!(e["state"].as_str(), Some("completed" | "failed" | "killed"))
            {
                return true;
            }
        }
        let counts = experiment(self.c(), exp)
            .map(|e| e["counts"].to_string())
            .unwrap_or_default();
        self.violation(format!(
            "experiment {exp} did not end within {timeout:?} of the last fault: {counts}"
        ));
        false
    }

    // -----------------------------------------------------------------------------------------
    // Invariants

    /// Invariant 1: the experiment and each trial ended once, and how.
    fn check_end(&mut self) -> String {
        let exp = self.exp.expect("submitted");
        let e = experiment(self.c(), exp).expect("describe");
        let state = e["state"].as_str().unwrap_or_default().to_string();
        if state == "killed" {
            self.violation(format!("experiment {exp} was killed: {}", e["message"]));
        }
        let ts = trials(self.c(), exp);
        let mut ks: Vec<i64> = ts.iter().filter_map(|t| t["params"]["k"].as_i64()).collect();
        ks.sort_unstable();
        if ks != (1..=TRIALS as i64).collect::<Vec<_>>() {
            self.violation(format!(
                "the sweep's trials are not the grid 1..={TRIALS}, once each: k = {ks:?}"
            ));
        }
        let mut lines = format!("experiment {exp}: {state}\n");
        for t in &ts {
            self.observe(t);
            let id = t["id"].as_u64().unwrap_or(0);
            let st = t["state"].as_str().unwrap_or_default();
            let msg = t["message"].as_str().unwrap_or_default();
            lines.push_str(&format!(
                "  trial {id} (k={}): {st}, attempt {}, restarts {}{}\n",
                t["params"]["k"],
                t["attempt"],
                t["restarts"],
                if msg.is_empty() {
                    String::new()
                } else {
                    format!(": {msg}")
                }
            ));
            match st {
                "completed" => {}
                // Only a trial whose restarts ran out may fail, and it says why.
                "failed" if !msg.is_empty() && t["restarts"].as_u64() == Some(MAX_RESTARTS) => {
                    self.notes.push(format!("trial {id} failed: {msg}"));
                }
                other => self.violation(format!(
                    "trial {id} ended {other} after {} of its {MAX_RESTARTS} restarts ({msg:?}); only a trial whose restarts ran out may fail, with a reason",
                    t["restarts"]
                )),
            }
        }
        if !ts.iter().any(|t| t["state"] == "completed") {
            self.violation("no trial completed, so the run proved nothing".into());
        }
        lines
    }

    /// Opens the experiment's storage as any tool would (S3 directly, not through the proxy).
    fn storage(&self, uri: &str) -> Storage {
        let mut opts = StorageOptions::default();
        if let Some(store) = &self.store {
            for (k, v) in store.server.env() {
                // SAFETY: the variables are the same for every run in this process, and
                // nothing reads them concurrently with a different expectation.
                unsafe { std::env::set_var(k, v) };
            }
            opts.s3_endpoint = Some(store.server.endpoint.clone());
        }
        open(&StorageUri::parse(uri).expect("storage URI"), &opts).expect("open storage")
    }

    /// Invariants 2 and 3: the trials' histories and checkpoints in storage.
    fn check_records(&mut self) {
        let exp = self.exp.expect("submitted");
        let e = experiment(self.c(), exp).expect("describe");
        let uri = e["storage"].as_str().unwrap_or_default().to_string();
        let storage = self.storage(&uri);
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        for t in trials(self.c(), exp) {
            let id = t["id"].as_u64().unwrap_or(0);
            let history = rt
                .block_on(read_history(&storage, ExperimentId(exp), TrialId(id), 100_000))
                .map_err(|e| format!("{e}"));
            match history {
                Ok(lines) => {
                    let shown = self.seen.get(&id).map(|s| s.metrics.clone()).unwrap_or_default();
                    let problems = history_problems(&t, &lines, &shown, &mut self.notes);
                    for p in problems {
                        self.violation(format!("trial {id}: {p}\n    history: {}", short(&lines)));
                    }
                }
                Err(e) => self.violation(format!("trial {id}: its history in {uri} cannot be read: {e}")),
            }
            let problems = rt.block_on(check_checkpoint(&storage, ExperimentId(exp), &t));
            for p in problems {
                self.violation(format!("trial {id}: {p}"));
            }
        }
    }

    /// Invariant 5: everything under the run's root belongs to a cluster directory or to the
    /// experiment's storage.
    fn check_files(&mut self) {
        let root = self.root.path().to_path_buf();
        let cluster = self
            .c()
            .dir
            .path()
            .strip_prefix(&root)
            .expect("cluster under root")
            .to_path_buf();
        let s3 = self.store.as_ref().map(|s| {
            s.server
                .dir
                .path()
                .strip_prefix(&root)
                .expect("s3 under root")
                .to_path_buf()
        });
        let mut outside = Vec::new();
        for f in files_under(&root) {
            if let Ok(rest) = f.strip_prefix(&cluster) {
                let first = rest
                    .components()
                    .next()
                    .map(|c| c.as_os_str().to_string_lossy().to_string());
                let allowed = match first.as_deref() {
                    Some("coordinator") => {
                        // With S3 storage, no record may land on the coordinator's disk.
                        !(self.plan.s3 && rest.starts_with("coordinator/storage"))
                    }
                    Some("logs") => true,
                    Some(w) if w.starts_with("worker-") => true,
                    Some("chaos.yaml") => true,
                    _ => false,
                };
                if !allowed {
                    outside.push(f);
                }
            } else if let Some(s3) = s3.as_ref().filter(|s3| f.starts_with(s3)) {
                let rest = f.strip_prefix(s3).unwrap_or(&f);
                if !rest.starts_with(Path::new(BUCKET).join(PREFIX)) && !is_s3_server_own(rest) {
                    outside.push(f);
                }
            } else {
                outside.push(f);
            }
        }
        if !outside.is_empty() {
            let list: Vec<String> = outside.iter().take(20).map(|p| p.display().to_string()).collect();
            self.violation(format!(
                "{} file(s) written outside the cluster's directories and the experiment's storage (under {}): {}",
                outside.len(),
                root.display(),
                list.join(", ")
            ));
        }
    }

    /// Invariant 4: no trial process outlives the run, nor its worker.
    fn check_processes(&mut self) {
        let left = wait_gone(&self.marker, AFTER_END);
        self.settle_process_checks(true);
        if !left.is_empty() {
            self.violation(format!(
                "{} trial process(es) still running {AFTER_END:?} after the experiment ended: {}",
                left.len(),
                describe_procs(&left)
            ));
        }
        // Not ours to leave behind, whatever the verdict.
        for p in &left {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Invariants 2 and 3 for one trial: what is wrong with its history `lines`, given the trial
/// as `trial list` shows it and the metric lines the coordinator showed for it during the run.
/// What is worth knowing but no invariant goes to `notes`.
fn history_problems(t: &Value, lines: &[String], shown: &BTreeSet<String>, notes: &mut Vec<String>) -> Vec<String> {
    let id = t["id"].as_u64().unwrap_or(0);
    let k = t["params"]["k"].as_i64().unwrap_or(0);
    let final_attempt = t["attempt"].as_u64().unwrap_or(0);
    let completed = t["state"] == "completed";
    let mut problems = Vec::new();
    let mut parsed: Vec<serde_json::Map<String, Value>> = Vec::new();
    for l in lines {
        match serde_json::from_str::<Value>(l) {
            Ok(Value::Object(o)) => parsed.push(o),
            _ => problems.push(format!("a line of its history is not a JSON object: {l}")),
        }
    }
    // Lineage: attempts in order, each line its attempt's own.
    let mut prev_attempt = 0;
    let mut last_step_of: BTreeMap<u64, i64> = BTreeMap::new();
    let mut prev_step: Option<i64> = None;
    let mut ended_attempt: BTreeSet<u64> = BTreeSet::new();
    for o in &parsed {
        let Some(attempt) = o.get("attempt").and_then(Value::as_u64) else {
            problems.push(format!("a line carries no attempt: {}", Value::Object(o.clone())));
            continue;
        };
        let line = Value::Object(o.clone());
        if attempt < prev_attempt {
            problems.push(format!(
                "a line of attempt {attempt} follows one of attempt {prev_attempt}: {line}"
            ));
        }
        if attempt == 0 || attempt > final_attempt {
            problems.push(format!(
                "a line of attempt {attempt}, which is not of the trial's lineage (final attempt {final_attempt}): {line}"
            ));
        }
        if int(o, "a") != Some(attempt as i64) {
            problems.push(format!(
                "a line printed by attempt {} is stored as attempt {attempt}: {line}",
                o["a"]
            ));
        }
        if o.contains_key("foreign_checkpoint") {
            problems.push(format!(
                "attempt {attempt} was handed another trial's checkpoint: {line}"
            ));
        }
        if ended_attempt.contains(&attempt) {
            problems.push(format!("attempt {attempt} has a line after its last: {line}"));
        }
        if let Some(step) = int(o, "step") {
            if o.get("loss").and_then(Value::as_f64) != Some(loss(k, step)) {
                problems.push(format!("a line that is not this trial's (k={k}): {line}"));
            }
            match last_step_of.get(&attempt) {
                Some(&p) if step != p + 1 => {
                    problems.push(format!("attempt {attempt} jumps from step {p} to {step}"));
                }
                None if attempt != prev_attempt => {
                    // The first line of a new attempt. The worker reads the checkpoint
                    // directory after the line that names its step, while the trial may
                    // have moved on, so a checkpoint can hold a later step than its name
                    // and a resumed attempt skip steps whose lines were never
                    // acknowledged: worth a note, not an invariant.
                    if let Some(p) = prev_step.filter(|&p| step > p + 1) {
                        notes.push(format!(
                            "trial {id}: attempt {attempt} resumed at step {step}, after step {p} of the history"
                        ));
                    }
                }
                _ => {}
            }
            last_step_of.insert(attempt, step);
            prev_step = Some(step);
        }
        if o.contains_key("final_step") {
            ended_attempt.insert(attempt);
        }
        prev_attempt = attempt;
    }
    let last = parsed.last();
    let last_attempt = last.and_then(|o| o.get("attempt")).and_then(Value::as_u64);
    if completed {
        let done = last.and_then(|o| int(o, "final_step"));
        if last_attempt != Some(final_attempt) || done != Some(STEPS as i64) {
            problems.push(format!(
                "it completed with attempt {final_attempt}, but its history does not end with that attempt's final line (last: {})",
                last.map(|o| Value::Object(o.clone()).to_string()).unwrap_or_else(|| "none".into())
            ));
        }
        if !parsed.iter().any(|o| int(o, "step") == Some(STEPS as i64)) {
            problems.push(format!("it completed, but step {STEPS} is not in its history"));
        }
    }
    // No acknowledged metric lost: what the coordinator showed is in the history.
    let holds = |want: &serde_json::Map<String, Value>| {
        parsed.iter().any(|o| {
            want.iter()
                .all(|(k, v)| o.get(k).and_then(Value::as_f64).is_some_and(|x| Some(x) == v.as_f64()))
        })
    };
    let mut shown = shown.clone();
    if t["last_metrics"].as_object().is_some_and(|o| !o.is_empty()) {
        shown.insert(t["last_metrics"].to_string());
    }
    for m in &shown {
        if let Ok(Value::Object(want)) = serde_json::from_str::<Value>(m)
            && !holds(&want)
        {
            problems.push(format!("the coordinator showed {m}, which is not in its history"));
        }
    }
    if let (Some(v), Some(step)) = (t["best_value"].as_f64(), t["best_step"].as_i64()) {
        let mut want = serde_json::Map::new();
        want.insert("step".into(), step.into());
        want.insert("loss".into(), v.into());
        if !holds(&want) {
            problems.push(format!("its best (loss {v} at step {step}) is not in its history"));
        }
    }
    problems
}

/// An integer field of a metric line, however the number was written (`3` or `3.0`).
fn int(o: &serde_json::Map<String, Value>, key: &str) -> Option<i64> {
    let v = o.get(key)?;
    v.as_i64()
        .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
}

/// What `s3s-fs` keeps for itself beside the buckets (uploads in progress).
fn is_s3_server_own(rel: &Path) -> bool {
    rel.components()
        .next()
        .is_some_and(|c| c.as_os_str().to_string_lossy().starts_with('.'))
}

/// The checkpoint the coordinator acknowledged restores exactly, with this trial's state at
/// that step, and no checkpoint of the trial comes from an attempt it never had.
async fn check_checkpoint(storage: &Storage, exp: ExperimentId, t: &Value) -> Vec<String> {
    let id = t["id"].as_u64().unwrap_or(0);
    let final_attempt = t["attempt"].as_u64().unwrap_or(0);
    let prefix = storage.checkpoints_prefix(exp, TrialId(id));
    let mut problems = Vec::new();
    let all = match checkpoint::list(storage, &prefix).await {
        Ok(all) => all,
        Err(e) => return vec![format!("its checkpoints cannot be listed: {e}")],
    };
    for r in &all {
        if u64::from(r.attempt) > final_attempt {
            problems.push(format!(
                "a checkpoint of attempt {} (final attempt {final_attempt}): {r}",
                r.attempt
            ));
        }
    }
    let Some(step) = t["checkpoint_step"].as_i64() else {
        if t["state"] == "completed" {
            problems.push("it completed with no acknowledged checkpoint".into());
        }
        return problems;
    };
    let candidates: Vec<CheckpointRef> = all.iter().filter(|r| r.step == step).copied().collect();
    let mut why = Vec::new();
    for r in &candidates {
        let dest = tempfile::tempdir().expect("tempdir");
        match checkpoint::restore(storage, &prefix, Some(*r), dest.path()).await {
            Ok(got) if got.restored == Some(*r) => {
                // This trial's state, written by that attempt, at that step or (read while
                // the trial went on) a later one.
                let state = std::fs::read_to_string(dest.path().join("state")).unwrap_or_default();
                let f: Vec<u64> = state.split_whitespace().filter_map(|x| x.parse().ok()).collect();
                if let [s, t, a] = f[..]
                    && s >= step as u64
                    && t == id
                    && a == u64::from(r.attempt)
                {
                    return problems;
                }
                why.push(format!(
                    "{r} holds {state:?}, not the state of trial {id} at step {step} or later by attempt {}",
                    r.attempt
                ));
            }
            Ok(got) => why.push(format!("{r} restores as {:?} ({:?})", got.restored, got.skipped)),
            Err(e) => why.push(format!("{r}: {e}")),
        }
    }
    problems.push(format!(
        "the acknowledged checkpoint (step {step}) does not restore: {} (in storage: {})",
        if why.is_empty() {
            "no checkpoint of that step".to_string()
        } else {
            why.join("; ")
        },
        all.iter().map(|r| r.dir_name()).collect::<Vec<_>>().join(" ")
    ));
    problems
}

/// Waits up to `timeout` for every process carrying `marker` to be gone; returns those left.
fn wait_gone(marker: &str, timeout: Duration) -> Vec<MarkedProcess> {
    let until = Instant::now() + timeout;
    loop {
        let left = marked_processes(marker);
        if left.is_empty() || Instant::now() >= until {
            return left;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn describe_procs(ps: &[MarkedProcess]) -> String {
    ps.iter()
        .take(12)
        .map(|p| {
            let parent = p.parent_now().unwrap_or(p.ppid);
            format!("pid {} (parent {parent}): {}", p.pid, truncate(&p.cmdline, 60))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// A history for a message: its lines' attempt and step, compactly.
fn short(lines: &[String]) -> String {
    lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_default();
            let o = v.as_object().cloned().unwrap_or_default();
            match (v["attempt"].as_u64(), int(&o, "step"), int(&o, "final_step")) {
                (Some(a), Some(s), _) => format!("a{a}:{s}"),
                (Some(a), None, Some(f)) => format!("a{a}:end{f}"),
                _ => truncate(l, 40),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn plans_replay_and_cover_every_fault() {
    assert_eq!(Plan::draw(7).describe(), Plan::draw(7).describe());
    let mut kinds = BTreeSet::new();
    let mut storages = BTreeSet::new();
    for seed in FIXED_SEEDS {
        let p = Plan::draw(seed);
        storages.insert(p.s3);
        for f in &p.faults {
            kinds.insert(format!("{:?}", f.fault).split('(').next().unwrap().to_string());
        }
    }
    assert_eq!(storages.len(), 2, "the fixed seeds run on file and on S3 storage");
    assert_eq!(kinds.len(), 10, "the fixed seeds draw every kind of fault: {kinds:?}");
}

/// The history checks fail on the histories the faults could leave behind.
#[test]
fn history_checks_catch_lost_mixed_and_foreign_lines() {
    let line = |a: u64, step: i64| format!(r#"{{"step":{step},"loss":{},"a":{a},"attempt":{a}}}"#, loss(3, step));
    let end = |a: u64| format!(r#"{{"final_step":{STEPS},"a":{a},"attempt":{a}}}"#);
    // Attempt 1 ran to step 10, attempt 2 resumed from the checkpoint at step 8.
    let mut good: Vec<String> = (1..=10).map(|s| line(1, s)).collect();
    good.extend((9..=STEPS as i64).map(|s| line(2, s)));
    good.push(end(2));
    let trial = serde_json::json!({
        "id": 4, "params": {"k": 3}, "attempt": 2, "state": "completed",
        "best_value": loss(3, STEPS as i64), "best_step": STEPS,
        "last_metrics": {"final_step": STEPS, "a": 2},
    });
    let shown: BTreeSet<String> = [r#"{"step":10,"loss":2990,"a":1}"#.to_string()].into();
    let problems = |lines: &[String], shown: &BTreeSet<String>| {
        let mut notes = Vec::new();
        history_problems(&trial, lines, shown, &mut notes)
    };
    assert_eq!(problems(&good, &shown), Vec::<String>::new());

    // A stale attempt 1 went on writing after attempt 2 had started, into the same history.
    let mut mixed = good.clone();
    mixed.insert(20, line(1, 11));
    assert!(
        problems(&mixed, &shown)
            .iter()
            .any(|p| p.contains("follows one of attempt 2"))
    );
    // An acknowledged line of attempt 1 is gone (the stale attempt rewrote the history).
    let lost: Vec<String> = good.iter().filter(|l| !l.contains(r#""step":10,"#)).cloned().collect();
    assert!(
        problems(&lost, &shown)
            .iter()
            .any(|p| p.contains("which is not in its history"))
    );
    // Only the stale attempt's lines are left.
    let stale: Vec<String> = good[..10].to_vec();
    assert!(problems(&stale, &shown).iter().any(|p| p.contains("does not end with")));
    // A line of another trial, and one stored under the wrong attempt.
    let mut foreign = good.clone();
    foreign[3] = r#"{"step":4,"loss":996,"a":1,"attempt":1}"#.into();
    assert!(
        problems(&foreign, &shown)
            .iter()
            .any(|p| p.contains("not this trial's"))
    );
    let mut retagged = good.clone();
    retagged[2] = r#"{"step":3,"loss":2997,"a":2,"attempt":1}"#.into();
    assert!(
        problems(&retagged, &shown)
            .iter()
            .any(|p| p.contains("stored as attempt 1"))
    );
    // A line of an attempt the trial never had.
    let mut future = good.clone();
    future.push(line(3, 1));
    assert!(
        problems(&future, &shown)
            .iter()
            .any(|p| p.contains("not of the trial's lineage"))
    );
}
