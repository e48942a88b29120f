//! Which data path a revision's pods use, chosen per revision.
//!
//! - `userspace` (the default): the userspace proxy of the queue-proxy contract;
//! - `full`: the same proxy, with the in-pod hop to the user container short-circuited in the
//!   kernel and the accounting in the kernel;
//! - `event-driven` (EPROXY): connections to the serving port are steered in the kernel straight
//!   to the user container; this sidecar serves stats, admin and drain (see `modes.md`).
//!
//! The mode comes from the pod annotation `spright.dev/dataplane-mode`, which the sidecar reads
//! from Knative's podinfo volume: with the feature `queueproxy.mount-podinfo` enabled (or
//! `allowed` and the revision annotated `features.knative.dev/queueproxy-podinfo: enabled`),
//! Knative mounts the downward-API file `/etc/podinfo/annotations` into the queue-proxy
//! container (serving `pkg/reconciler/revision/resources/deploy.go`, `queue.PodInfoDirectory`
//! and `queue.PodInfoAnnotationsFilename`). The annotation goes on the revision template
//! (`spec.template.metadata.annotations`); Knative copies it onto the pods.
//!
//! The environment variable `SPRIGHT_DATAPLANE_MODE` overrides the annotation (edge nodes,
//! standalone runs, tests); `SPRIGHT_PODINFO_ANNOTATIONS` moves the file (tests). Without
//! either, or without the annotation, the mode is `userspace`. An unknown value, from either
//! source, is a configuration error (exit 64): a revision asking for a mode it cannot get
//! must not silently run another.

use std::collections::BTreeMap;
use std::path::Path;

pub use spright_core::dataplane_mode::{ANNOTATION, DataplaneMode};

/// The environment variable that overrides the annotation.
pub const ENV_MODE: &str = "SPRIGHT_DATAPLANE_MODE";
/// The environment variable that moves the annotations file.
pub const ENV_PODINFO: &str = "SPRIGHT_PODINFO_ANNOTATIONS";
/// Where Knative's `queueproxy.mount-podinfo` feature puts the pod's annotations.
pub const PODINFO_ANNOTATIONS: &str = "/etc/podinfo/annotations";

/// Where the mode came from (logged at start-up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModeSource {
    /// `SPRIGHT_DATAPLANE_MODE`.
    Env,
    /// The annotation in this podinfo file.
    Annotation(String),
    /// Neither: the documented default.
    Default,
}

/// Why the mode could not be chosen (configuration errors, exit 64).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModeError {
    #[error("{ENV_MODE}={0:?}: use userspace, full or event-driven")]
    Env(String),
    #[error("annotation {ANNOTATION}={value:?} in {path}: use userspace, full or event-driven")]
    Annotation { path: String, value: String },
    #[error("cannot read the pod's annotations from {path}: {reason}")]
    Read { path: String, reason: String },
}

/// Chooses the mode: the environment first, then the podinfo annotation, then the default.
/// `get` reads an environment variable; `read` reads a file (`Ok(None)` when it is absent).
pub fn select(
    get: impl Fn(&str) -> Option<String>,
    read: impl Fn(&Path) -> std::io::Result<Option<String>>,
) -> Result<(DataplaneMode, ModeSource), ModeError> {
    if let Some(value) = get(ENV_MODE).filter(|v| !v.trim().is_empty()) {
        return DataplaneMode::parse(&value)
            .map(|m| (m, ModeSource::Env))
            .map_err(|_| ModeError::Env(value));
    }
    let path = get(ENV_PODINFO)
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| PODINFO_ANNOTATIONS.to_owned());
    let text = read(Path::new(&path)).map_err(|e| ModeError::Read {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let Some(text) = text else {
        return Ok((DataplaneMode::Userspace, ModeSource::Default));
    };
    match parse_downward_api(&text).get(ANNOTATION) {
        None => Ok((DataplaneMode::Userspace, ModeSource::Default)),
        Some(value) => DataplaneMode::parse(value)
            .map(|m| (m, ModeSource::Annotation(path.clone())))
            .map_err(|_| ModeError::Annotation {
                path,
                value: value.clone(),
            }),
    }
}

/// [`select`] on the process environment and file system.
pub fn from_process() -> Result<(DataplaneMode, ModeSource), ModeError> {
    select(
        |k| std::env::var(k).ok(),
        |p| match std::fs::read_to_string(p) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        },
    )
}

/// Parses a downward-API `metadata.annotations` file: one `key="value"` line per annotation,
/// keys sorted, the value quoted as Go's `%q` does. Lines that do not have this shape are
/// skipped (the kubelet writes the file, a broken line is not ours to reject).
pub fn parse_downward_api(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (key, quoted) = line.split_once('=')?;
            Some((key.trim().to_owned(), unquote_go(quoted.trim())?))
        })
        .collect()
}

/// Undoes Go's `strconv.Quote`: `"..."` with `\"`, `\\`, `\n`, `\t`, `\r`, `\a`, `\b`, `\f`,
/// `\v`, `\xNN`, `\uNNNN`, `\UNNNNNNNN` and octal `\NNN` escapes. None when malformed.
fn unquote_go(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out: Vec<u8> = Vec::with_capacity(inner.len());
    let mut chars = inner.chars();
    let hex = |chars: &mut std::str::Chars<'_>, n: usize| -> Option<u32> {
        let digits: String = chars.by_ref().take(n).collect();
        (digits.len() == n)
            .then(|| u32::from_str_radix(&digits, 16).ok())
            .flatten()
    };
    while let Some(c) = chars.next() {
        if c == '"' {
            return None;
        }
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        let byte = |b: u8, out: &mut Vec<u8>| out.push(b);
        match chars.next()? {
            '"' => byte(b'"', &mut out),
            '\\' => byte(b'\\', &mut out),
            '\'' => byte(b'\'', &mut out),
            'n' => byte(b'\n', &mut out),
            't' => byte(b'\t', &mut out),
            'r' => byte(b'\r', &mut out),
            'a' => byte(0x07, &mut out),
            'b' => byte(0x08, &mut out),
            'f' => byte(0x0c, &mut out),
            'v' => byte(0x0b, &mut out),
            'x' => byte(u8::try_from(hex(&mut chars, 2)?).ok()?, &mut out),
            d @ '0'..='7' => {
                let rest: String = chars.by_ref().take(2).collect();
                let v = u32::from_str_radix(&format!("{d}{rest}"), 8).ok()?;
                byte(u8::try_from(v).ok()?, &mut out);
            }
            u @ ('u' | 'U') => {
                let c = char::from_u32(hex(&mut chars, if u == 'u' { 4 } else { 8 })?)?;
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn file(text: Option<&str>) -> impl Fn(&Path) -> std::io::Result<Option<String>> {
        let text = text.map(str::to_owned);
        move |p| {
            assert_eq!(p, Path::new(PODINFO_ANNOTATIONS));
            Ok(text.clone())
        }
    }

    const PODINFO: &str = "autoscaling.knative.dev/target=\"10\"\n\
        features.knative.dev/queueproxy-podinfo=\"enabled\"\n\
        kubernetes.io/config.seen=\"2026-11-29T22:00:00.000000000Z\"\n\
        serving.knative.dev/creator=\"admin\"\n\
        spright.dev/dataplane-mode=\"event-driven\"\n";

    #[test]
    fn the_annotation_chooses_the_mode() {
        assert_eq!(
            select(env(&[]), file(Some(PODINFO))),
            Ok((
                DataplaneMode::EventDriven,
                ModeSource::Annotation(PODINFO_ANNOTATIONS.into())
            ))
        );
    }

    #[test]
    fn the_default_is_userspace() {
        let default = Ok((DataplaneMode::Userspace, ModeSource::Default));
        assert_eq!(select(env(&[]), file(None)), default);
        assert_eq!(
            select(env(&[]), file(Some("serving.knative.dev/creator=\"x\"\n"))),
            default
        );
        assert_eq!(select(env(&[(ENV_MODE, " ")]), file(None)), default);
    }

    #[test]
    fn the_environment_overrides_the_annotation() {
        assert_eq!(
            select(env(&[(ENV_MODE, "full")]), file(Some(PODINFO))),
            Ok((DataplaneMode::Full, ModeSource::Env))
        );
    }

    #[test]
    fn unknown_values_are_errors() {
        let err = select(env(&[(ENV_MODE, "ebpf")]), file(None)).unwrap_err();
        assert_eq!(err, ModeError::Env("ebpf".into()));
        assert!(err.to_string().contains("event-driven"));
        let err = select(
            env(&[]),
            file(Some("spright.dev/dataplane-mode=\"Event-Driven\"\n")),
        )
        .unwrap_err();
        assert!(
            matches!(&err, ModeError::Annotation { value, .. } if value == "Event-Driven"),
            "{err}"
        );
        let unreadable = select(env(&[]), |_: &Path| {
            Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
        });
        assert!(matches!(unreadable, Err(ModeError::Read { .. })));
    }

    #[test]
    fn the_podinfo_path_can_move() {
        let got = select(env(&[(ENV_PODINFO, "/tmp/x/annotations")]), |p: &Path| {
            assert_eq!(p, Path::new("/tmp/x/annotations"));
            Ok(Some("spright.dev/dataplane-mode=\"full\"".to_owned()))
        });
        assert_eq!(
            got,
            Ok((
                DataplaneMode::Full,
                ModeSource::Annotation("/tmp/x/annotations".into())
            ))
        );
    }

    #[test]
    fn go_quoted_values_are_unquoted() {
        let map = parse_downward_api(
            "a=\"x\\\"y\\\\z\"\nb=\"line\\nnext\\t\\u00e9\\x41\\101\"\nbroken\nc=unquoted\nd=\"é\"\n",
        );
        assert_eq!(map.get("a").map(String::as_str), Some("x\"y\\z"));
        assert_eq!(
            map.get("b").map(String::as_str),
            Some("line\nnext\té\u{41}A")
        );
        assert_eq!(map.get("c"), None);
        assert_eq!(map.get("d").map(String::as_str), Some("é"));
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn random_podinfo_text_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let alphabet = b"ab=\"\\xu0179 \n\t-./";
        for _ in 0..5000 {
            let len = rng.gen_range(0..40);
            let text: String = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())] as char)
                .collect();
            let _ = parse_downward_api(&text);
            let _ = select(env(&[]), |_: &Path| Ok(Some(text.clone())));
        }
    }
}
