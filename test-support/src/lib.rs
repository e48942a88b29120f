//! Helpers shared by the black-box tests of every component.
//!
//! Tests of one binary run as parallel threads of one process: whatever a helper creates
//! (directories, cgroups, ports) is named by the test and the process *and* a per-process
//! counter ([`unique_name`]), never by the process id alone.

pub mod bpftool;
pub mod cgroup;
pub mod tls;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU32, Ordering};

/// xorshift64*: deterministic pseudo-random numbers for randomized tests, with no dependency
/// (a test prints its seed, so a failure can be replayed).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// One of `xs` (not empty).
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

/// Where `scripts/setup.sh` installs a Go binary (Knative's oracles, `queue`): `$GOBIN`, else
/// `$HOME/go/bin`.
pub fn go_bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("GOBIN") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join("go")
            .join("bin"),
    };
    dir.join(name)
}

const LOW: u32 = 20_000;
/// The kernel hands out ephemeral ports from 32768 up (`ip_local_port_range`).
const SPAN: u32 = 32_768 - LOW;

/// A loopback port for a child process to listen on.
///
/// Binding port 0 and passing the number on races: between the probe and the child's bind,
/// any connection may take the same port as its ephemeral source port, and parallel tests may
/// be handed the same one. These ports come from below the ephemeral range instead, from a
/// per-process counter that starts at a pid-derived offset, so no ephemeral port and no other
/// test in this process gets the same one; a port something already listens on is skipped.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = (std::process::id() % 400) * 30;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (offset + n) % SPAN;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and 32767");
}

/// `<test>-<pid>-<n>`: a name no other test of this process, and no other process, is given
/// (`n` counts the calls in this process).
pub fn unique_name(test: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{test}-{}-{n}", std::process::id())
}

/// A fresh directory under the system's temp directory, `spright-<unique_name(test)>`,
/// removed with everything in it on drop.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(test: &str) -> Self {
        let path = std::env::temp_dir().join(format!("spright-{}", unique_name(test)));
        // A directory of an earlier process with the same pid.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs `cmd` to its end and returns what it printed on stdout. Panics with `hint` (what to
/// install) when it cannot be started, and with its stderr when it fails.
pub fn run_ok(cmd: &mut Command, hint: &str) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e} ({hint})"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A test of a `harness = false` test binary: its name and its body.
pub type Test = (&'static str, fn());

/// Runs `tests` one after the other, as libtest prints them (`test <name> ... ok` or
/// `FAILED`, then `test result: ...`), a panic failing only its test. `filter`, the binary's
/// first argument, keeps the tests whose name contains it; a flag (`-...`, as cargo passes
/// them) filters nothing.
pub fn run_tests(tests: &[Test], filter: Option<&str>) -> ExitCode {
    let filter = filter.filter(|f| !f.starts_with('-'));
    let mut failed = 0;
    let mut ran = 0;
    for (name, test) in tests {
        if filter.is_some_and(|f| !name.contains(f)) {
            continue;
        }
        ran += 1;
        eprintln!("test {name} ...");
        if std::panic::catch_unwind(test).is_ok() {
            eprintln!("test {name} ... ok");
        } else {
            eprintln!("test {name} ... FAILED");
            failed += 1;
        }
    }
    eprintln!("test result: {} passed; {failed} failed", ran - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_dirs_are_unique_per_call_and_removed_on_drop() {
        let (a, b) = (unique_name("t"), unique_name("t"));
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("t-{}-", std::process::id())), "{a}");
        let (d1, d2) = (TestDir::new("t"), TestDir::new("t"));
        assert_ne!(d1.path(), d2.path());
        std::fs::write(d1.join("f"), "x").expect("write");
        let p = d1.path().to_owned();
        drop(d1);
        assert!(!p.exists());
        assert!(d2.path().is_dir());
    }

    #[test]
    fn ports_are_distinct_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len());
        assert!(ports.iter().all(|p| (20_000..32_768).contains(p)));
    }

    #[test]
    fn run_tests_filters_by_name_and_fails_on_a_panic() {
        fn passes() {}
        fn fails() {
            panic!("expected");
        }
        let tests: [Test; 2] = [("passes", passes), ("fails", fails)];
        assert_eq!(run_tests(&tests, Some("pass")), ExitCode::SUCCESS);
        assert_eq!(run_tests(&tests, Some("--nocapture")), ExitCode::FAILURE);
        assert_eq!(run_tests(&tests, None), ExitCode::FAILURE);
    }
}
