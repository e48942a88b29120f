//! Compiles the eBPF programs with clang-19: bpf/dataplane.bpf.c into
//! `$OUT_DIR/dataplane.bpf.o`, bpf/accounting.bpf.c into
//! `$OUT_DIR/accounting.bpf.o`, bpf/steering.bpf.c into
//! `$OUT_DIR/steering.bpf.o` and bpf/loopback.bpf.c into
//! `$OUT_DIR/loopback.bpf.o`, which the loaders embed.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// (source, object) pairs.
const PROGRAMS: [(&str, &str); 4] = [
    ("bpf/dataplane.bpf.c", "dataplane.bpf.o"),
    ("bpf/accounting.bpf.c", "accounting.bpf.o"),
    ("bpf/steering.bpf.c", "steering.bpf.o"),
    ("bpf/loopback.bpf.c", "loopback.bpf.o"),
];
const CLANG: &str = "/usr/bin/clang-19";
const HELPERS: &str = "/usr/include/bpf/bpf_helpers.h";
const LINUX_BPF_H: &str = "/usr/include/linux/bpf.h";
const SETUP_HINT: &str = "install clang-19 and libbpf-dev: run scripts/setup.sh";

fn main() -> ExitCode {
    for (source, _) in PROGRAMS {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    match build() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: spright-ebpf: {message}");
            ExitCode::FAILURE
        }
    }
}

fn build() -> Result<(), String> {
    let clang = Path::new(CLANG);
    if !clang.exists() {
        return Err(format!("{CLANG} not found; {SETUP_HINT}"));
    }
    for header in [HELPERS, LINUX_BPF_H] {
        if !Path::new(header).exists() {
            return Err(format!("{header} not found; {SETUP_HINT}"));
        }
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let arch = env::var("CARGO_CFG_TARGET_ARCH").map_err(|e| format!("target arch: {e}"))?;
    // linux/bpf.h pulls in asm/types.h, which lives in the multiarch include dir.
    let multiarch = format!("/usr/include/{}", debian_multiarch(&arch));
    for (source, object) in PROGRAMS {
        compile(clang, &multiarch, source, &out_dir.join(object))?;
    }
    Ok(())
}

fn compile(clang: &Path, multiarch: &str, source: &str, object: &Path) -> Result<(), String> {
    let output = Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{multiarch}"))
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(object)
        .output()
        .map_err(|e| format!("running {CLANG}: {e}; {SETUP_HINT}"))?;
    if !output.status.success() {
        return Err(format!(
            "{CLANG} failed to compile {source} ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// Maps Cargo's target arch to Debian's multiarch tuple.
fn debian_multiarch(arch: &str) -> String {
    match arch {
        "x86" => "i386-linux-gnu".to_owned(),
        "arm" => "arm-linux-gnueabihf".to_owned(),
        "powerpc64" => "powerpc64-linux-gnu".to_owned(),
        other => format!("{other}-linux-gnu"),
    }
}
