//! Shared by the sample binaries' tests. A directory without `main.rs`, so Cargo does not
//! take it for a binary of its own.

/// `count` pseudo-random inputs of up to `max_len` bytes drawn from `alphabet` (xorshift),
/// for the binaries' random-input tests.
#[cfg(test)]
pub fn random_inputs(alphabet: &[u8], count: usize, max_len: usize) -> Vec<Vec<u8>> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..count)
        .map(|i| {
            (0..i % (max_len + 1))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    alphabet[(x % alphabet.len() as u64) as usize]
                })
                .collect()
        })
        .collect()
}
