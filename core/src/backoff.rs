//! Exponential backoff shared by the components' retry loops.

use std::time::Duration;

/// `base × 2^doublings` (at most 2^30), capped at `max`; never overflows.
pub fn exponential(base: Duration, max: Duration, doublings: u32) -> Duration {
    let factor = 1u32.checked_shl(doublings.min(30)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let got: Vec<u128> = (0..8)
            .map(|n| exponential(base, max, n).as_millis())
            .collect();
        assert_eq!(got, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(
            exponential(Duration::MAX, Duration::MAX, u32::MAX),
            Duration::MAX
        );
    }
}
