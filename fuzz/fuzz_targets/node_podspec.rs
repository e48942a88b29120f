//! spright-node-agent pod specifications (POST /v1/pods bodies and manifest files): parse,
//! check, and resolve the cgroup under a root that does not exist (no file-system access
//! beyond failing lookups).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spright_node_agent::PodSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = PodSpec::parse(data) else {
        return;
    };
    assert_eq!(spec.check(), Ok(()));
    let json = serde_json::to_vec(&spec).expect("a spec serializes");
    assert_eq!(PodSpec::parse(&json), Ok(spec.clone()), "serialized spec must parse back");
    let _ = spec.resolve_cgroup(Path::new("/nonexistent/spright-fuzz"));
});
