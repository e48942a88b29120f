//! Helpers shared by the black-box tests of every component.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

const LOW: u32 = 20_000;
/// The kernel hands out ephemeral ports from 32768 up (`ip_local_port_range`).
const SPAN: u32 = 32_768 - LOW;

/// A loopback port for a child process to listen on.
///
/// Binding port 0 and passing the number on races: between the probe and the child's bind,
/// any connection may take the same port as its ephemeral source port, and parallel tests may
/// be handed the same one. These ports come from below the ephemeral range instead, from a
/// per-process counter that starts at a pid-derived offset, so no ephemeral port and no other
/// test in this process gets the same one; a port something already listens on is skipped.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = (std::process::id() % 400) * 30;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (offset + n) % SPAN;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and 32767");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len());
        assert!(ports.iter().all(|p| (20_000..32_768).contains(p)));
    }
}
