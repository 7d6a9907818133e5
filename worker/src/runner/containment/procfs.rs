//! Reading `/proc`, and signalling a process by identity.

use super::ProcessId;
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub struct Stat {
    pub ppid: i32,
    pub start: u64,
    pub zombie: bool,
    pub stopped: bool,
}

pub fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// The command name (field 2) is in parentheses and may hold spaces and parentheses itself,
/// so the fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = *f.first()?;
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
        zombie: matches!(state, "Z" | "X" | "x"),
        stopped: matches!(state, "T" | "t"),
    })
}

/// Every process now, by pid. A process gone between listing and reading is left out.
pub fn snapshot() -> HashMap<i32, Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .collect()
}

/// Whether the process's initial environment holds `entry` (`NAME=value`) as a whole entry.
/// Unreadable (another user's process, or gone) counts as no.
pub fn environ_has(pid: i32, entry: &[u8]) -> bool {
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    env.split(|b| *b == 0).any(|e| e == entry)
}

/// Signals `p` only if its pid still names that process: through a pidfd, opened and then
/// checked against the start time, so a pid reused in between is never hit. A process
/// already gone is not an error.
pub fn signal(p: ProcessId, sig: Signal) -> Result<(), Errno> {
    // SAFETY: plain syscalls; the returned descriptor is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p.pid, 0) };
    if fd < 0 {
        return match Errno::last() {
            Errno::ESRCH => Ok(()),
            // Kernels before 5.3: check, then signal by pid (a narrow window for reuse).
            Errno::ENOSYS if stat(p.pid).is_some_and(|s| s.start == p.start) => {
                match nix::sys::signal::kill(Pid::from_raw(p.pid), sig) {
                    Ok(()) | Err(Errno::ESRCH) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Errno::ENOSYS => Ok(()),
            e => Err(e),
        };
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    if stat(p.pid).is_none_or(|s| s.start != p.start) {
        return Ok(());
    }
    // SAFETY: a valid pidfd, a null siginfo (as kill(2) would send), no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r == 0 {
        return Ok(());
    }
    match Errno::last() {
        Errno::ESRCH => Ok(()),
        e => Err(e),
    }
}
