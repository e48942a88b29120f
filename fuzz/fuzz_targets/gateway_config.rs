//! spright-gateway configuration: durations (SPRIGHT_REQUEST_TIMEOUT, ...) and the whole
//! flag parser. First byte 0: a duration; else NUL/newline-separated arguments.
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use spright_fuzz::{argv, text};
use spright_gateway::config::{Config, parse_duration};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode == 0 {
        let _ = parse_duration(&text(rest));
        return;
    }
    let mut args = argv("spright-gateway", rest);
    args.push("--chain".into());
    args.push("/nonexistent/chain.yaml".into());
    let _ = Config::try_parse_from(args);
});
