//! Test cgroups (cgroup v2): create one per test, run code with this process inside it, list
//! the BPF programs attached to it. Needs root and cgroup v2 at [`CGROUP_ROOT`]; without them
//! the helpers panic with the reason, they never skip.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// Where the tests' cgroup v2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";

/// Held while this process sits in a test cgroup (see [`TestCgroup::inside`]).
static MOVE: Mutex<()> = Mutex::new(());

/// A cgroup of one test, `spright-<unique_name(test)>` under [`CGROUP_ROOT`]; removed on drop
/// (waiting briefly for exiting processes to leave it).
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new(test: &str) -> Self {
        let path = Path::new(CGROUP_ROOT).join(format!("spright-{}", crate::unique_name(test)));
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            // Left by an earlier process with the same pid.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => panic!(
                "mkdir {}: {e} (needs root and cgroup v2 at {CGROUP_ROOT})",
                path.display()
            ),
        }
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with this process in the cgroup: sockets `f` creates and processes it starts
    /// belong to the cgroup. One test at a time (a process is in one cgroup); `f` must not
    /// call `inside` again.
    pub fn inside<R>(&self, f: impl FnOnce() -> R) -> R {
        let _guard = MOVE.lock().unwrap_or_else(|e| e.into_inner());
        let home = own_cgroup();
        join(&self.path);
        let result = f();
        join(&home);
        result
    }

    /// Removes the cgroup, retrying for up to 2 s while processes are still leaving it;
    /// a cgroup already gone is fine.
    pub fn remove(&self) {
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => return,
            }
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The cgroup v2 directory this process is in.
pub fn own_cgroup() -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line in /proc/self/cgroup");
    Path::new(CGROUP_ROOT).join(relative.trim_start_matches('/'))
}

/// Moves this process (every thread) into `cgroup`.
pub fn join(cgroup: &Path) {
    std::fs::write(cgroup.join("cgroup.procs"), "0")
        .unwrap_or_else(|e| panic!("joining {}: {e}", cgroup.display()));
}

/// Ids of the BPF programs attached to `cgroup`, per `bpftool cgroup show`.
pub fn program_ids(cgroup: &Path) -> Vec<u64> {
    let path = cgroup.to_str().expect("utf-8 cgroup path");
    crate::bpftool::json(&["cgroup", "show", path])
        .as_array()
        .map(|progs| {
            progs
                .iter()
                .filter_map(|p| p.get("id").and_then(serde_json::Value::as_u64))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_test_cgroup_is_its_own_and_inside_comes_back() {
        let (a, b) = (TestCgroup::new("cg"), TestCgroup::new("cg"));
        assert_ne!(a.path(), b.path());
        let home = own_cgroup();
        assert_eq!(a.inside(own_cgroup), a.path());
        assert_eq!(own_cgroup(), home);
        assert_eq!(program_ids(a.path()), Vec::<u64>::new());
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
        b.remove();
        b.remove();
        assert!(!b.path().exists());
    }
}
