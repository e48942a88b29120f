//! Keeps start-up code out of the resident set.
//!
//! The kernel maps file pages 64 KiB at a time around every page fault, so reading the
//! environment, decoding the probe spec, setting up logging and binding the listeners leave a
//! few MiB of code and read-only data mapped that serving never touches again: with a heap of
//! a few hundred KiB, that is most of an idle sidecar's RSS. Once start-up is done, the
//! read-only file mappings are dropped from the page tables (`MADV_DONTNEED`); the pages stay
//! in the page cache, and what the serving path runs is mapped back on first use.
//!
//! Only mappings that are not writable and hold no private (copy-on-write) pages are
//! touched, so no relocated or modified data is ever discarded.

/// One mapping of `/proc/self/smaps`.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    /// Read-only and backed by a file.
    read_only_file: bool,
    anonymous_kb: u64,
}

/// Parses `/proc/self/smaps`; unparsable entries are skipped.
fn parse(smaps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if let Some((s, e)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16))
        {
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            out.push(Mapping {
                start,
                end,
                read_only_file: perms.len() == 4
                    && perms.starts_with('r')
                    && perms.as_bytes()[1] == b'-'
                    && perms.ends_with('p')
                    && path.starts_with('/'),
                // Unknown until the field is seen: assume private pages.
                anonymous_kb: u64::MAX,
            });
        } else if first == "Anonymous:"
            && let Some(m) = out.last_mut()
        {
            m.anonymous_kb = fields
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX);
        }
    }
    out
}

/// The mappings whose pages can be dropped without losing anything.
fn droppable(maps: &[Mapping]) -> impl Iterator<Item = &Mapping> {
    maps.iter()
        .filter(|m| m.read_only_file && m.anonymous_kb == 0 && m.end > m.start)
}

/// Drops the read-only file pages mapped so far (see the module notes). Best effort.
pub fn trim_startup_pages() {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    let maps = parse(&smaps);
    for m in droppable(&maps) {
        // SAFETY: the range is a whole private, non-writable file mapping of this process
        // without copy-on-write pages (checked above), so dropping its pages loses nothing:
        // the next access maps the same file contents again. No Rust object lives in it.
        unsafe {
            libc::madvise(
                m.start as *mut libc::c_void,
                m.end - m.start,
                libc::MADV_DONTNEED,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d000000000-55d000100000 r--p 00000000 08:01 42 /usr/bin/queue-proxy-ebpf
Size:               1024 kB
Anonymous:             0 kB
55d000100000-55d000700000 r-xp 00100000 08:01 42 /usr/bin/queue-proxy-ebpf
Size:               6144 kB
Anonymous:             0 kB
55d000700000-55d000740000 r--p 00700000 08:01 42 /usr/bin/queue-proxy-ebpf
Anonymous:           256 kB
55d000740000-55d000750000 rw-p 00740000 08:01 42 /usr/bin/queue-proxy-ebpf
Anonymous:            64 kB
55d001000000-55d001200000 rw-p 00000000 00:00 0 [heap]
Anonymous:          2048 kB
7f0000000000-7f0000001000 r--p 00000000 00:00 0
Anonymous:             0 kB
7f0000002000-7f0000003000 r-xp 00000000 08:01 7 /usr/lib/libc.so.6
";

    #[test]
    fn only_clean_read_only_file_mappings_are_dropped() {
        let maps = parse(SMAPS);
        assert_eq!(maps.len(), 7);
        let starts: Vec<usize> = droppable(&maps).map(|m| m.start).collect();
        // Not the relocated (copy-on-write) one, not writable data, not the heap, not an
        // anonymous read-only mapping, not one whose `Anonymous` line is missing.
        assert_eq!(starts, vec![0x55d0_0000_0000, 0x55d0_0010_0000]);
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let alphabet = b"0123456789abcdef-rwxp /:Anonymous kB\n";
        for _ in 0..2000 {
            let s: String = (0..rng.gen_range(0..120))
                .map(|_| char::from(alphabet[rng.gen_range(0..alphabet.len())]))
                .collect();
            let _ = droppable(&parse(&s)).count();
        }
    }

    #[test]
    fn trimming_the_test_process_keeps_it_running() {
        trim_startup_pages();
        let v: Vec<u64> = (0..1000).collect();
        assert_eq!(v.iter().sum::<u64>(), 499_500);
    }
}
