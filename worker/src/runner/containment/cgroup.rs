//! cgroup v2: finding the worker's own cgroup, checking it may hold attempts, killing one.

use super::KILL_WAIT;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The worker's own cgroup, if it can create a child there and move a process into it.
pub fn usable_parent() -> Result<PathBuf, String> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("cannot read mountinfo: {e}"))?;
    let own =
        std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("the worker is in no cgroup v2 hierarchy")?;
    let parent = locate(&mountinfo, own)?;
    probe(&parent)?;
    Ok(parent)
}

/// The directory of cgroup `own` (as `/proc/self/cgroup` names it) under the cgroup2 mount
/// whose root contains it.
pub fn locate(mountinfo: &str, own: &str) -> Result<PathBuf, String> {
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.get(sep + 1) != Some(&"cgroup2") || f.len() < 5 {
            continue;
        }
        let (root, point) = (unescape(f[3]), unescape(f[4]));
        let Ok(rel) = Path::new(own).strip_prefix(&root) else {
            continue;
        };
        return Ok(PathBuf::from(point).join(rel));
    }
    Err(format!("no cgroup2 mount holds the worker's cgroup {own}"))
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(v) = b
                .get(i + 1..i + 4)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates a child cgroup and moves a short-lived process into it the way a trial will be
/// moved (from between fork and exec); read-only mounts, missing delegation and threaded
/// cgroups all fail here, at start, rather than at a trial's spawn.
fn probe(parent: &Path) -> Result<(), String> {
    let dir = parent.join(format!(
        "chorus-probe-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir(&dir).map_err(|e| format!("cannot create a cgroup under {}: {e}", parent.display()))?;
    let result = probe_in(&dir);
    let _ = std::fs::remove_dir(&dir);
    result
}

fn probe_in(dir: &Path) -> Result<(), String> {
    if !dir.join("cgroup.kill").exists() && !dir.join("cgroup.freeze").exists() {
        return Err("the kernel offers neither cgroup.kill nor cgroup.freeze".into());
    }
    let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    // SAFETY: as in `Enclosure::configure`. The child never executes anything: it reports
    // success as ECANCELED and exits, so the parent learns the outcome from spawn's error.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n == 1 {
                Err(std::io::Error::from_raw_os_error(libc::ECANCELED))
            } else {
                Err(err)
            }
        });
    }
    match cmd.spawn() {
        Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => Ok(()),
        Err(e) => Err(format!("cannot move a process into {}: {e}", dir.display())),
        Ok(mut child) => {
            let _ = child.kill();
            let _ = child.wait();
            Err("the cgroup probe ran unexpectedly".into())
        }
    }
}

/// Kills everything in the cgroup `dir` (and its sub-cgroups), waits until it is empty and
/// removes it. A cgroup already gone is fine.
pub fn kill_and_remove(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    let start = Instant::now();
    let kill_file = dir.join("cgroup.kill");
    let by_kill_file = kill_file.exists();
    if by_kill_file {
        std::fs::write(&kill_file, "1").map_err(|e| format!("cannot write {}: {e}", kill_file.display()))?;
    } else {
        // Frozen, its members cannot fork while they are killed one by one.
        let _ = std::fs::write(dir.join("cgroup.freeze"), "1");
    }
    while populated(dir)? {
        if !by_kill_file {
            for pid in members(dir) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if start.elapsed() > KILL_WAIT {
            return Err(format!(
                "cgroup {} still holds processes {:?} after {KILL_WAIT:?}",
                dir.display(),
                members(dir)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    remove_tree(dir)
}

fn populated(dir: &Path) -> Result<bool, String> {
    let events = dir.join("cgroup.events");
    match std::fs::read_to_string(&events) {
        Ok(text) => Ok(text.lines().any(|l| l == "populated 1")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("cannot read {}: {e}", events.display())),
    }
}

/// Pids in the cgroup and its sub-cgroups.
fn members(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for sub in subdirs(dir) {
        pids.extend(members(&sub));
    }
    pids
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// An empty cgroup is removed with rmdir, children first (a trial may have made some).
fn remove_tree(dir: &Path) -> Result<(), String> {
    for sub in subdirs(dir) {
        remove_tree(&sub)?;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove cgroup {}: {e}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup_is_found_under_the_mount_that_holds_it() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                      30 24 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(locate(hybrid, "/").unwrap(), PathBuf::from("/sys/fs/cgroup/unified"));
        let unified = "30 24 0:27 / /sys/fs/cgroup rw shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            locate(unified, "/system.slice/chorus.service").unwrap(),
            PathBuf::from("/sys/fs/cgroup/system.slice/chorus.service")
        );
        // A mount of a sub-tree (a container's namespace root), with an escaped space.
        let sub = "30 24 0:27 /kube/pod\\0401 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            locate(sub, "/kube/pod 1/worker").unwrap(),
            PathBuf::from("/sys/fs/cgroup/worker")
        );
        assert!(locate(sub, "/elsewhere").is_err());
        assert!(locate("25 24 0:22 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n", "/").is_err());
    }
}
