//! bpftool (Debian package bpftool) as the kernel's independent witness in tests.

use std::process::Command;

/// `bpftool -j <args>` as JSON; nothing printed (an empty list) is an empty array. Panics with
/// bpftool's message when it fails.
pub fn json(args: &[&str]) -> serde_json::Value {
    let stdout = crate::run_ok(
        Command::new("bpftool").arg("-j").args(args),
        "apt-get install bpftool",
    );
    if stdout.iter().all(u8::is_ascii_whitespace) {
        return serde_json::Value::Array(Vec::new());
    }
    serde_json::from_slice(&stdout).expect("bpftool JSON")
}

/// Whether the kernel still has the program (`kind` "prog") or map ("map") with this id.
pub fn exists(kind: &str, id: u64) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()
        .expect("run bpftool (apt-get install bpftool)")
        .status
        .success()
}
