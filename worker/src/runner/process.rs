//! Starting a trial's program in its own process group, contained (see `containment`) and with
//! the environment it is allowed, and naming how the program ended.

use super::containment::{Containment, Enclosure};
use super::environment::TrialEnv;
use chorus_proto::pb;
use nix::sys::signal::Signal;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use tracing::warn;

pub(super) struct Spec<'a> {
    pub assignment: &'a pb::Assignment,
    pub checkpoint_dir: &'a Path,
    pub restored_step: Option<i64>,
    pub gpu_ids: &'a [String],
    pub worker_id: &'a str,
    /// The torchrun environment of a multi-rank attempt.
    pub extra_env: &'a [(String, String)],
}

pub(super) struct Running {
    pub child: tokio::process::Child,
    /// Every process of the attempt; dropped without [`Enclosure::kill_all`], it kills them.
    pub processes: Enclosure,
}

pub(super) async fn spawn(
    spec: &Spec<'_>,
    containment: &Arc<Containment>,
    inherited: &TrialEnv,
) -> Result<Running, String> {
    let a = spec.assignment;
    let Some((program, args)) = a.command.split_first() else {
        return Err("the assignment has an empty command".into());
    };
    let mut processes = containment.enclose(a.trial_id, a.attempt, a.rank).await?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        // The worker's own environment holds secrets (its token, storage credentials): only
        // what the allow-list names is passed on.
        .env_clear()
        .envs(inherited.vars().iter().map(|(k, v)| (k, v)))
        // Python buffers stdout in a pipe; metric lines must arrive as they are printed.
        .env("PYTHONUNBUFFERED", "1")
        .envs(&a.env)
        .env("CHORUS_EXPERIMENT_ID", a.experiment_id.to_string())
        .env("CHORUS_TRIAL_ID", a.trial_id.to_string())
        .env("CHORUS_ATTEMPT", a.attempt.to_string())
        .env("CHORUS_CHECKPOINT_DIR", spec.checkpoint_dir)
        .env(
            "CHORUS_PARAMS",
            if a.params_json.is_empty() { "{}" } else { &a.params_json },
        )
        .env("CHORUS_WORKER_ID", spec.worker_id)
        .env("CHORUS_RANK", a.rank.to_string())
        .envs(spec.extra_env.iter().map(|(k, v)| (k, v)));
    if let Some(step) = spec.restored_step {
        cmd.env("CHORUS_RESTORED_STEP", step.to_string());
    }
    if a.resources.is_some_and(|r| r.gpus > 0) && !spec.gpu_ids.is_empty() {
        cmd.env("CUDA_VISIBLE_DEVICES", spec.gpu_ids.join(","));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group, so a polite stop (SIGTERM) reaches every process the trial starts
        // (data loaders, torchrun's ranks, shell pipelines) and none of the worker's.
        .process_group(0);
    let worker_pid = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe and touch no memory of the parent.
    unsafe {
        // If the worker is SIGKILLed its trials must not run on unsupervised: the coordinator will
        // place them again elsewhere, and two copies would write the same records. The rest of
        // the tree is the next worker start's to kill (see `containment`).
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The worker died between the fork and the prctl: the signal will never come.
            if libc::getppid() != worker_pid {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    if let Err(e) = processes.configure(&mut cmd) {
        discard(processes).await;
        return Err(e);
    }
    match processes.spawn(&mut cmd).await {
        Ok(child) => Ok(Running { child, processes }),
        Err(e) => {
            discard(processes).await;
            Err(format!("cannot start {program:?}: {e}"))
        }
    }
}

/// Removes the record (and cgroup) of an attempt whose program never started.
async fn discard(processes: Enclosure) {
    if let Err(e) = processes.kill_all().await {
        warn!(error = %e, "cannot clean up after a trial that did not start");
    }
}

/// How a program that ended on its own did.
pub(super) fn classify(status: ExitStatus) -> pb::Exited {
    use std::os::unix::process::ExitStatusExt;
    let (kind, code, message) = match (status.code(), status.signal()) {
        (Some(0), _) => (pb::ExitKind::Succeeded, Some(0), "exited with status 0".to_string()),
        (Some(c), _) => (pb::ExitKind::Failed, Some(c), format!("exited with status {c}")),
        (None, Some(sig)) => {
            let name = Signal::try_from(sig).map(|s| format!(" ({s})")).unwrap_or_default();
            (pb::ExitKind::Failed, None, format!("killed by signal {sig}{name}"))
        }
        (None, None) => (pb::ExitKind::Failed, None, format!("ended abnormally: {status}")),
    };
    pb::Exited {
        kind: kind.into(),
        code,
        message,
    }
}
