//! activator-lite manifests: Revisions and private/public Endpoints from multi-document
//! YAML, merged into the cluster state, then what the throttler derives from it (ready
//! destinations per protocol, this activator's slice of them).
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use activator_lite::manifests::{merge, parse_manifests};
use activator_lite::throttler::{activator_position, assign_slice};
use libfuzzer_sys::fuzz_target;
use spright_fuzz::text;

fuzz_target!(|data: &[u8]| {
    let Ok(objects) = parse_manifests(&text(data), Path::new("fuzz.yaml")) else {
        return;
    };
    let mut files = BTreeMap::new();
    files.insert(PathBuf::from("fuzz.yaml"), objects);
    let state = merge(&files);
    for (key, spec) in &state.revisions {
        let _ = (key, spec);
    }
    for (key, eps) in &state.private {
        let activators = state.public.get(key).cloned().unwrap_or_default();
        let own = activators.first().cloned().unwrap_or_default();
        let (index, count) = activator_position(&activators, &own);
        for h2c in [false, true] {
            let (ready, not_ready) = eps.dests(h2c);
            assert!(not_ready.iter().all(|d| !ready.contains(d)));
            let slice = assign_slice(&ready, index, count);
            assert!(slice.len() <= ready.len().max(1));
            for n in 0..4 {
                let _ = assign_slice(&ready, n, count + n as usize);
            }
        }
    }
});
