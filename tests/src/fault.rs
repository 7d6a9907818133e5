//! Host-level checks for end-to-end tests: a scan of `/proc` for processes that carry a marker,
//! and a listing of every file a run left under a directory.

use std::path::{Path, PathBuf};

/// A live process whose command line or environment holds a marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkedProcess {
    pub pid: i32,
    pub ppid: i32,
    /// When it started, in clock ticks after boot: with the pid, it names the process even
    /// once the pid is reused.
    pub start_time: u64,
    pub cmdline: String,
    /// Whether the marker is in its command line (not only in its environment).
    pub in_cmdline: bool,
}

impl MarkedProcess {
    /// Whether this very process still runs (not a zombie, not a later one with its pid).
    pub fn alive(&self) -> bool {
        read_stat(self.pid).is_some_and(|(state, _, start)| start == self.start_time && state != "Z" && state != "X")
    }

    /// Its parent now (the one recorded may have died since), while it runs.
    pub fn parent_now(&self) -> Option<i32> {
        read_stat(self.pid)
            .filter(|(_, _, start)| *start == self.start_time)
            .map(|(_, ppid, _)| ppid)
    }

    /// A variable of its environment, while it runs.
    pub fn env(&self, key: &str) -> Option<String> {
        let environ = std::fs::read(format!("/proc/{}/environ", self.pid)).ok()?;
        let prefix = format!("{key}=");
        environ
            .split(|&b| b == 0)
            .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// State, parent and start time from `/proc/PID/stat`: "pid (comm) S ppid ..."; comm may hold
/// spaces and parentheses, so fields are read after the last ')'.
fn read_stat(pid: i32) -> Option<(String, i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After comm: state is field 3 of the line, ppid 4, starttime 22.
    Some((
        fields.first()?.to_string(),
        fields.get(1)?.parse().ok()?,
        fields.get(19)?.parse().ok()?,
    ))
}

/// Every live process (zombies excepted) with `marker` in its command line or environment.
pub fn marked_processes(marker: &str) -> Vec<MarkedProcess> {
    let needle = marker.as_bytes();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let dir = e.path();
        let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(dir.join("environ")).unwrap_or_default();
        let holds = |b: &[u8]| b.windows(needle.len()).any(|w| w == needle);
        let in_cmdline = holds(&cmdline);
        if !in_cmdline && !holds(&environ) {
            continue;
        }
        let Some((state, ppid, start_time)) = read_stat(pid) else {
            continue;
        };
        if state == "Z" || state == "X" {
            continue;
        }
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ").trim().to_string();
        out.push(MarkedProcess {
            pid,
            ppid,
            start_time,
            cmdline,
            in_cmdline,
        });
    }
    out.sort_by_key(|p| p.pid);
    out
}

/// Every file (not directory) under `root`, as paths relative to it, sorted. Mount points are
/// crossed; unreadable entries are skipped.
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(root, &p, out),
                Ok(_) => out.push(p.strip_prefix(root).unwrap_or(&p).to_path_buf()),
                Err(_) => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn finds_a_marked_child_and_not_after_it_exits() {
        let marker = format!("chorus-marker-test-{}", std::process::id());
        let mut child = Command::new("sleep").arg("30").env("MARK", &marker).spawn().unwrap();
        // Polled: right after the spawn the child may not have executed `sleep` yet.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut found = marked_processes(&marker);
        while found.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            found = marked_processes(&marker);
        }
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].pid, child.id() as i32);
        assert_eq!(found[0].ppid, std::process::id() as i32);
        assert!(!found[0].in_cmdline);
        assert_eq!(found[0].env("MARK").as_deref(), Some(marker.as_str()));
        assert!(found[0].alive());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!found[0].alive());
        assert!(marked_processes(&marker).is_empty());
    }
}
