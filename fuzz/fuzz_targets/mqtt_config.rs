//! mqtt-adaptor configuration: the broker address, K_CE_OVERRIDES, topic filters and the
//! whole flag/env parser. First byte picks the parser; the rest is its input (for the flag
//! parser, NUL/newline-separated arguments; flags naming files are skipped).
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use mqtt_adaptor::config::{
    Args, BrokerAddr, Config, normalize_go_flags, parse_overrides, valid_topic_filter,
};
use spright_fuzz::{argv, text};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            if let Ok(addr) = BrokerAddr::parse(&text(rest)) {
                let again = BrokerAddr::parse(&addr.url());
                assert_eq!(again.ok(), Some(addr), "url() must parse back to the same address");
            }
        }
        1 => {
            let _ = parse_overrides(&text(rest));
        }
        2 => {
            let _ = valid_topic_filter(&text(rest));
        }
        _ => {
            let args = argv("mqtt-adaptor", rest);
            if args.iter().any(|a| a.to_ascii_lowercase().contains("file")) {
                return;
            }
            if let Ok(parsed) = Args::try_parse_from(normalize_go_flags(args))
                && let Ok(cfg) = Config::from_args(parsed)
            {
                let _ = cfg.effective_broker().url();
            }
        }
    }
});
