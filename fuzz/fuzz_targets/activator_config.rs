//! activator-lite configuration: flags, environment (Go durations, integers, TLS version)
//! and resolv.conf. Format: `<flags, NUL/newline separated>\0\0<KEY=VALUE lines>\0\0<resolv.conf>`.
#![no_main]

use std::collections::HashMap;

use activator_lite::config::{Config, Flags, cluster_domain_from_resolv, parse_go_duration};
use clap::Parser;
use libfuzzer_sys::fuzz_target;
use spright_fuzz::{argv, key_values, text};

fn parts(data: &[u8]) -> [&[u8]; 3] {
    let mut out: [&[u8]; 3] = [&[]; 3];
    let mut rest = data;
    for slot in out.iter_mut() {
        match rest.windows(2).position(|w| w == b"\0\0") {
            Some(i) => {
                *slot = &rest[..i];
                rest = &rest[i + 2..];
            }
            None => {
                *slot = rest;
                rest = &[];
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [flags, env, resolv] = parts(data);
    let resolv = text(resolv);
    let _ = cluster_domain_from_resolv(&resolv);
    let env: HashMap<String, String> = key_values(env).into_iter().collect();
    for v in env.values() {
        let _ = parse_go_duration(v);
    }
    let mut args = argv("activator-lite", flags);
    args.push("--manifests".into());
    args.push("/nonexistent".into());
    if let Ok(flags) = Flags::try_parse_from(args) {
        let _ = Config::from_parts(flags, &env, Some(&resolv));
    }
});
