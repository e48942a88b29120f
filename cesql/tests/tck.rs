//! Runs every case of the CloudEvents SQL TCK (cloudevents/spec `cesql/cesql-tck`), copied to
//! /work/shared/fixtures/cesql-tck (or `CESQL_TCK_DIR`), plus a random-input robustness test.

use cesql::{ErrorKind, Expression, Value};
use serde_yaml::Value as Y;
use std::collections::HashMap;
use std::path::PathBuf;

fn tck_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CESQL_TCK_DIR") {
        return PathBuf::from(d);
    }
    let vendored = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cesql-tck");
    if vendored.is_dir() {
        return vendored;
    }
    PathBuf::from("/work/shared/fixtures/cesql-tck")
}

fn yaml_to_value(y: &Y) -> Option<Value> {
    match y {
        Y::Bool(b) => Some(Value::Bool(*b)),
        Y::Number(n) => n
            .as_i64()
            .and_then(|i| i32::try_from(i).ok())
            .map(Value::Int),
        Y::String(s) => Some(Value::String(s.clone())),
        _ => None,
    }
}

fn error_kind(s: &str) -> Option<ErrorKind> {
    Some(match s {
        "parse" => ErrorKind::Parse,
        "math" => ErrorKind::Math,
        "cast" => ErrorKind::Cast,
        "missingFunction" => ErrorKind::MissingFunction,
        "functionEvaluation" => ErrorKind::FunctionEvaluation,
        "missingAttribute" => ErrorKind::MissingAttribute,
        "generic" => ErrorKind::Generic,
        _ => return None,
    })
}

fn default_event() -> HashMap<String, Value> {
    [
        ("specversion", "1.0"),
        ("id", "myId"),
        ("source", "localhost.localdomain"),
        ("type", "myType"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Value::from(v)))
    .collect()
}

fn same_result(expected: &Value, got: &Value) -> bool {
    match (expected, got) {
        // The TCK spells one boolean as `FALSE`, which YAML 1.2 reads as a string.
        (Value::String(s), Value::Bool(b)) => s.eq_ignore_ascii_case(&b.to_string()),
        _ => expected == got,
    }
}

/// Runs one case; returns a failure description.
fn run_case(case: &Y) -> Result<(), String> {
    let expr_text = match &case["expression"] {
        Y::String(s) => s.clone(),
        other => yaml_to_value(other)
            .map(|v| v.to_string())
            .ok_or("no expression")?,
    };
    let want_err = case["error"]
        .as_str()
        .map(|e| error_kind(e).ok_or(format!("unknown error kind {e}")));
    let want_err = want_err.transpose()?;
    let want_val = yaml_to_value(&case["result"]);
    let mut event = match &case["event"] {
        Y::Mapping(m) => m
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), yaml_to_value(v)?)))
            .collect(),
        _ => default_event(),
    };
    if let Y::Mapping(m) = &case["eventOverrides"] {
        for (k, v) in m {
            if let (Some(k), Some(v)) = (k.as_str(), yaml_to_value(v)) {
                event.insert(k.to_string(), v);
            }
        }
    }
    let expr = match Expression::parse(&expr_text) {
        Ok(e) => e,
        Err(e) => {
            return if want_err == Some(ErrorKind::Parse) {
                Ok(())
            } else {
                Err(format!("{expr_text:?}: unexpected parse error: {e}"))
            };
        }
    };
    if want_err == Some(ErrorKind::Parse) {
        return Err(format!(
            "{expr_text:?}: parsed but a parse error was expected"
        ));
    }
    let out = expr.evaluate(&event);
    if let Some(want) = &want_val
        && !same_result(want, &out.value)
    {
        return Err(format!(
            "{expr_text:?}: value {:?}, expected {want:?} (errors {:?})",
            out.value, out.errors
        ));
    }
    match want_err {
        None if !out.errors.is_empty() => {
            Err(format!("{expr_text:?}: unexpected errors {:?}", out.errors))
        }
        Some(k) if !out.errors.iter().any(|e| e.kind == k) => Err(format!(
            "{expr_text:?}: expected a {k:?} error, got {:?}",
            out.errors
        )),
        _ => Ok(()),
    }
}

#[test]
fn tck_all_cases_pass() {
    let dir = tck_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read TCK dir {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no TCK files in {}", dir.display());
    let mut total = 0;
    let mut failures = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("readable TCK file");
        let doc: Y = serde_yaml::from_str(&text).expect("valid TCK yaml");
        let suite = doc["name"].as_str().unwrap_or("?").to_string();
        for case in doc["tests"].as_sequence().into_iter().flatten() {
            total += 1;
            let name = case["name"].as_str().unwrap_or("?");
            if let Err(why) = run_case(case) {
                failures.push(format!("[{suite}] {name}: {why}"));
            }
        }
    }
    println!(
        "CESQL TCK: {}/{} cases passed",
        total - failures.len(),
        total
    );
    assert!(
        failures.is_empty(),
        "{} of {} TCK cases failed:\n{}",
        failures.len(),
        total,
        failures.join("\n")
    );
}

/// Random token soup and random bytes: parsing and evaluation never panic.
#[test]
fn random_input_never_panics() {
    const FRAGS: &[&str] = &[
        "(",
        ")",
        ",",
        "'",
        "\"",
        "\\",
        "a",
        "id",
        "NOT",
        "AND",
        "OR",
        "XOR",
        "LIKE",
        "IN",
        "EXISTS",
        "TRUE",
        "false",
        "1",
        "-",
        "+",
        "*",
        "/",
        "%",
        "=",
        "!=",
        "<>",
        "<",
        "<=",
        ">",
        ">=",
        "'x%_'",
        "\"q\"",
        "SUBSTRING(",
        "ABS(",
        "CONCAT_WS(",
        "INT(",
        "BOOL(",
        "LEFT(",
        "2147483647",
        "-2147483648",
        "0",
        " ",
        "_",
        "é",
        "\u{0}",
        "ñ%",
    ];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut event: HashMap<String, Value> = HashMap::new();
    event.insert("id".into(), Value::from("1"));
    event.insert("a".into(), Value::from("x"));
    let mut parsed = 0;
    for _ in 0..20_000 {
        let len = (rnd() % 24) as usize;
        let mut s = String::new();
        for _ in 0..len {
            if rnd() % 10 == 0 {
                s.push(char::from_u32((rnd() % 0x250) as u32).unwrap_or('?'));
            } else {
                s.push_str(FRAGS[(rnd() as usize) % FRAGS.len()]);
                if rnd() % 2 == 0 {
                    s.push(' ');
                }
            }
        }
        if let Ok(e) = Expression::parse(&s) {
            parsed += 1;
            let _ = e.evaluate(&event);
        }
    }
    assert!(
        parsed > 100,
        "generator should produce some valid expressions ({parsed})"
    );
}
