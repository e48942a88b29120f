//! An IoT motion-detection pipeline in four functions. Each works on a buffer in place (the
//! pool slot under the dataplane, a `Vec` under HTTP), so the same code runs both ways.
//!
//! 1. `decode`: accelerometer samples as text, one `x,y,z` line each, become binary: a u32
//!    count then f32 triples (smaller than the text, so it fits in place).
//! 2. `denoise`: a 3-sample moving average over each axis.
//! 3. `detect`: the magnitude of each sample; motion where it jumps by more than the
//!    threshold from one sample to the next. Writes a small binary summary.
//! 4. `alert`: the summary as JSON, the chain's answer.

pub mod http;

/// Functions in chain order.
pub const STEPS: [&str; 4] = ["decode", "denoise", "detect", "alert"];

/// A jump in magnitude above this (in g) counts as motion.
pub const MOTION_THRESHOLD: f32 = 0.5;

/// Largest number of samples one request may carry.
pub const MAX_SAMPLES: usize = 4096;

/// A refusal with the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    pub status: u16,
    pub message: String,
}

fn bad(message: String) -> StepError {
    StepError {
        status: 400,
        message,
    }
}

/// Runs step `name` over `buf[..len]`, writing its output into `buf`; returns the new length.
pub fn run_step(name: &str, buf: &mut [u8], len: usize) -> Result<usize, StepError> {
    match name {
        "decode" => decode(buf, len),
        "denoise" => denoise(buf, len),
        "detect" => detect(buf, len),
        "alert" => alert(buf, len),
        other => Err(StepError {
            status: 500,
            message: format!("no step named {other:?}"),
        }),
    }
}

fn samples(buf: &[u8], len: usize) -> Result<usize, StepError> {
    let count = buf
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| bad("missing sample count".into()))?;
    if count > MAX_SAMPLES || 4 + count * 12 != len {
        return Err(bad(format!("{len} bytes do not hold {count} samples")));
    }
    Ok(count)
}

fn read_f32(buf: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn write_f32(buf: &mut [u8], at: usize, v: f32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Text lines `x,y,z` to binary. A short line ("0,0,1") is smaller than its 12 binary bytes,
/// so the values are parsed first and then written over the text.
fn decode(buf: &mut [u8], len: usize) -> Result<usize, StepError> {
    let text =
        std::str::from_utf8(&buf[..len]).map_err(|e| bad(format!("samples are not UTF-8: {e}")))?;
    let mut values: Vec<[f32; 3]> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut v = [0f32; 3];
        let mut parts = line.split(',');
        for (i, slot) in v.iter_mut().enumerate() {
            let part = parts
                .next()
                .ok_or_else(|| bad(format!("line {}: expected x,y,z", n + 1)))?;
            *slot = part
                .trim()
                .parse::<f32>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| {
                    bad(format!(
                        "line {}: value {} is not a number: {part:?}",
                        n + 1,
                        i + 1
                    ))
                })?;
        }
        if parts.next().is_some() {
            return Err(bad(format!("line {}: more than three values", n + 1)));
        }
        if values.len() == MAX_SAMPLES {
            return Err(StepError {
                status: 413,
                message: format!("more than {MAX_SAMPLES} samples"),
            });
        }
        values.push(v);
    }
    if values.is_empty() {
        return Err(bad("no samples".into()));
    }
    let out = 4 + values.len() * 12;
    if out > buf.len() {
        return Err(StepError {
            status: 413,
            message: "decoded samples do not fit the slot".into(),
        });
    }
    buf[..4].copy_from_slice(&(values.len() as u32).to_le_bytes());
    for (i, v) in values.iter().enumerate() {
        for (j, f) in v.iter().enumerate() {
            write_f32(buf, 4 + i * 12 + j * 4, *f);
        }
    }
    Ok(out)
}

fn denoise(buf: &mut [u8], len: usize) -> Result<usize, StepError> {
    let count = samples(buf, len)?;
    for axis in 0..3 {
        let mut prev = read_f32(buf, 4 + axis * 4);
        for i in 0..count {
            let at = |k: usize| 4 + k * 12 + axis * 4;
            let cur = read_f32(buf, at(i));
            let next = if i + 1 < count {
                read_f32(buf, at(i + 1))
            } else {
                cur
            };
            write_f32(buf, at(i), (prev + cur + next) / 3.0);
            prev = cur;
        }
    }
    Ok(len)
}

/// Summary layout: count u32, motion u32 (0/1), first index u32 (u32::MAX: none), max jump f32.
fn detect(buf: &mut [u8], len: usize) -> Result<usize, StepError> {
    let count = samples(buf, len)?;
    let mag = |buf: &[u8], i: usize| {
        let b = 4 + i * 12;
        let (x, y, z) = (read_f32(buf, b), read_f32(buf, b + 4), read_f32(buf, b + 8));
        (x * x + y * y + z * z).sqrt()
    };
    let mut first = u32::MAX;
    let mut max_jump = 0f32;
    let mut last = mag(buf, 0);
    for i in 1..count {
        let m = mag(buf, i);
        let jump = (m - last).abs();
        if jump > max_jump {
            max_jump = jump;
        }
        if jump > MOTION_THRESHOLD && first == u32::MAX {
            first = i as u32;
        }
        last = m;
    }
    buf[0..4].copy_from_slice(&(count as u32).to_le_bytes());
    buf[4..8].copy_from_slice(&u32::from(first != u32::MAX).to_le_bytes());
    buf[8..12].copy_from_slice(&first.to_le_bytes());
    write_f32(buf, 12, max_jump);
    Ok(16)
}

fn alert(buf: &mut [u8], len: usize) -> Result<usize, StepError> {
    if len != 16 {
        return Err(bad(format!("a detection summary is 16 bytes, got {len}")));
    }
    let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let (count, motion, first, jump) = (word(0), word(4) == 1, word(8), read_f32(buf, 12));
    let first = if first == u32::MAX {
        "null".to_owned()
    } else {
        first.to_string()
    };
    let json = format!(
        "{{\"motion\":{motion},\"samples\":{count},\"first_motion_index\":{first},\"max_jump_g\":{jump:.3}}}\n"
    );
    if json.len() > buf.len() {
        return Err(StepError {
            status: 500,
            message: "alert does not fit the slot".into(),
        });
    }
    buf[..json.len()].copy_from_slice(json.as_bytes());
    Ok(json.len())
}

/// A sample request body: `n` samples at rest with one jolt at sample `n / 2`.
pub fn sample_body(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let z = if i == n / 2 { 3.0 } else { 1.0 };
        s.push_str(&format!("0.01,-0.02,{z}\n"));
    }
    s
}

/// Runs the whole chain on a text body, as one process would: the reference result.
pub fn run_chain_locally(body: &[u8]) -> Result<Vec<u8>, StepError> {
    let mut buf = vec![0u8; 64 * 1024];
    let n = body.len().min(buf.len());
    buf[..n].copy_from_slice(&body[..n]);
    let mut len = n;
    for step in STEPS {
        len = run_step(step, &mut buf, len)?;
    }
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_jolt() {
        let out = run_chain_locally(sample_body(32).as_bytes()).expect("chain");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("\"motion\":true"), "{text}");
        assert!(text.contains("\"samples\":32"), "{text}");
    }

    #[test]
    fn still_input_has_no_motion() {
        let body = "0,0,1\n0,0,1\n0,0,1\n";
        let text =
            String::from_utf8(run_chain_locally(body.as_bytes()).expect("chain")).expect("utf8");
        assert!(text.contains("\"motion\":false"), "{text}");
        assert!(text.contains("\"first_motion_index\":null"), "{text}");
    }

    #[test]
    fn bad_input_is_a_400_with_the_line() {
        let err = run_chain_locally(b"0,0,1\n0,x,1\n").expect_err("bad");
        assert_eq!(err.status, 400);
        assert!(err.message.contains("line 2"), "{}", err.message);
        assert_eq!(run_chain_locally(b"").expect_err("empty").status, 400);
        assert_eq!(run_chain_locally(b"1,2\n").expect_err("short").status, 400);
        assert_eq!(
            run_chain_locally(b"1,2,3,4\n").expect_err("long").status,
            400
        );
        assert_eq!(
            run_chain_locally(&[0xff, 0xfe]).expect_err("utf8").status,
            400
        );
        assert_eq!(
            run_chain_locally(b"nan,1,1\n").expect_err("nan").status,
            400
        );
    }

    #[test]
    fn no_step_panics_on_arbitrary_bytes() {
        // A small deterministic fuzz: random buffers and lengths into every step.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = vec![0u8; 4096];
        for _ in 0..20_000 {
            let len = (next() % 512) as usize;
            for b in buf.iter_mut().take(len) {
                *b = next() as u8;
            }
            for step in STEPS {
                let _ = run_step(step, &mut buf, len);
            }
        }
    }
}
