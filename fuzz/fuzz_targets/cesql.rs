//! CESQL: parse any expression, evaluate it against an event built from the rest of the
//! input. Format: `<expression>\0<attr>=<value>\n...`.
#![no_main]

use std::collections::HashMap;

use cesql::{Expression, Value};
use libfuzzer_sys::fuzz_target;
use spright_fuzz::{key_values, split_once, text};

fuzz_target!(|data: &[u8]| {
    let (expr, attrs) = split_once(data, 0);
    let Ok(parsed) = Expression::parse(&text(expr)) else {
        return;
    };
    let _ = parsed.source();
    let mut event: HashMap<String, Value> = HashMap::new();
    for (k, v) in key_values(attrs) {
        let value = match v.as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            s => s.parse::<i32>().map_or_else(|_| Value::from(s), Value::Int),
        };
        event.insert(k, value);
    }
    let out = parsed.evaluate(&event);
    // Filter semantics must agree with the evaluation.
    assert_eq!(parsed.matches(&event), out.is_match());
    for e in &out.errors {
        let _ = e.to_string();
    }
    let _ = out.value.to_string();
});
