//! The `Forwarded` shim (serving `pkg/queue/forwarded_shim.go`): when a request carries
//! `X-Forwarded-*` headers but no `Forwarded`, synthesise the RFC 7239 header from them.

use http::{HeaderMap, HeaderName, HeaderValue, header::FORWARDED};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

fn get(h: &HeaderMap, name: HeaderName) -> &str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn write_node(out: &mut String, node: &str) {
    if node.contains(':') {
        out.push_str("\"[");
        out.push_str(node);
        out.push_str("]\"");
    } else {
        out.push_str(node);
    }
}

/// The `Forwarded` value for the given `X-Forwarded-For/-Proto/-Host` values.
pub fn generate(xff: &str, xfp: &str, xfh: &str) -> String {
    // Go's scan stops at the end of the string, so a trailing comma adds no empty node.
    let mut nodes = xff
        .strip_suffix(',')
        .unwrap_or(xff)
        .split(',')
        .map(str::trim);
    let first = if xff.is_empty() {
        ""
    } else {
        nodes.next().unwrap_or("")
    };
    let mut out = String::with_capacity(xff.len() + xfp.len() + xfh.len() + 16);
    if !xff.is_empty() {
        out.push_str("for=");
        write_node(&mut out, first);
    }
    if !xfh.is_empty() {
        if !first.is_empty() {
            out.push(';');
        }
        out.push_str("host=");
        out.push_str(xfh);
    }
    if !xfp.is_empty() {
        if !first.is_empty() || !xfh.is_empty() {
            out.push(';');
        }
        out.push_str("proto=");
        out.push_str(xfp);
    }
    if !xff.is_empty() {
        for node in nodes {
            out.push_str(", for=");
            write_node(&mut out, node);
        }
    }
    out
}

/// Adds `Forwarded` to `h` when the shim applies.
pub fn apply(h: &mut HeaderMap) {
    if !get(h, FORWARDED).is_empty() {
        return;
    }
    let (xff, xfp, xfh) = (
        get(h, X_FORWARDED_FOR),
        get(h, X_FORWARDED_PROTO),
        get(h, X_FORWARDED_HOST),
    );
    if xff.is_empty() && xfp.is_empty() && xfh.is_empty() {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(&generate(xff, xfp, xfh)) {
        h.insert(FORWARDED, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases() {
        assert_eq!(generate("1.2.3.4", "", ""), "for=1.2.3.4");
        assert_eq!(
            generate("1.2.3.4, ::1", "https", "a.b"),
            "for=1.2.3.4;host=a.b;proto=https, for=\"[::1]\""
        );
        assert_eq!(generate("", "http", "h"), "host=h;proto=http");
        assert_eq!(generate("", "http", ""), "proto=http");
        assert_eq!(generate("a,b,,c", "", ""), "for=a, for=b, for=, for=c");
        assert_eq!(generate("a,", "", ""), "for=a");
    }

    #[test]
    fn random_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..2000 {
            let s: String = (0..rng.gen_range(0..20))
                .map(|_| [',', ' ', ':', 'a', '"', '1'][rng.gen_range(0..6)])
                .collect();
            let _ = generate(&s, &s, "");
        }
    }
}
