//! Starting a trial's program in its own process group, signalling the group, and naming how the
//! program ended.

use chorus_proto::pb;
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
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
    pub group: Group,
}

/// The trial's process group. Dropping it armed kills the whole group, so an attempt whose task
/// is cancelled (the worker panics or its runtime ends) leaves no processes behind; `kill_on_drop`
/// alone would only reach the group leader.
pub(super) struct Group {
    pgid: Option<Pid>,
    armed: bool,
}

impl Group {
    pub fn signal(&self, sig: Signal) {
        let Some(pgid) = self.pgid else { return };
        match killpg(pgid, sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => warn!(pgid = pgid.as_raw(), signal = %sig, error = %e, "cannot signal the trial's process group"),
        }
    }

    /// Called once the group is known empty: its id may be reused by an unrelated group later.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if self.armed {
            self.signal(Signal::SIGKILL);
        }
    }
}

pub(super) fn spawn(spec: &Spec<'_>) -> Result<Running, String> {
    let a = spec.assignment;
    let Some((program, args)) = a.command.split_first() else {
        return Err("the assignment has an empty command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        // Python buffers stdout in a pipe; metric lines must arrive as they are printed.
        .env("PYTHONUNBUFFERED", "1")
        // The worker's own credentials are not the trial's business.
        .env_remove("CHORUS_WORKER_TOKEN")
        .env_remove("CHORUS_RESTORED_STEP")
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
        // Its own group, so one signal reaches every process the trial starts (data loaders,
        // torchrun's ranks, shell pipelines) and none of the worker's.
        .process_group(0);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        // If the worker is SIGKILLed its trials must not run on unsupervised: the coordinator will
        // place them again elsewhere, and two copies would write the same records.
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
    }
    let child = cmd.spawn().map_err(|e| format!("cannot start {program:?}: {e}"))?;
    let pgid = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
    Ok(Running {
        child,
        group: Group { pgid, armed: true },
    })
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
