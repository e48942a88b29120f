//! broker-shm log recovery: segment files and a cursor file with arbitrary (corrupted,
//! torn, forged) contents are opened as after a crash; every record is read from the
//! cursor and from the head, decoded as an event, and a new append must read back.
//! Format: `[cursor: 8 bytes][second segment base: 8 bytes][segment 0]SEG1[segment 1]`
//! (the second segment only when `SEG1` is present).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use broker_shm::event::{CloudEvent, EventRecord as _};
use broker_shm::log::{BrokerLog, Cursor, Durability, LogConfig};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("SPRIGHT_FUZZ_TMP")
            .map_or_else(std::env::temp_dir, PathBuf::from);
        base.join(format!("spright-fuzz-log-{}", std::process::id()))
    })
}

fn word(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
    u64::from_le_bytes(w)
}

/// Reads records from `from`, at most `limit`; offsets must move forward.
fn walk(log: &BrokerLog, from: u64, limit: usize) -> usize {
    let mut offset = from;
    let mut n = 0;
    while n < limit {
        let Some((payload, next)) = log.read(offset) else {
            break;
        };
        assert!(next > offset, "read({offset}) did not move forward: next {next}");
        assert!(!payload.is_empty(), "read({offset}) returned an empty record");
        let _ = CloudEvent::from_record(&payload);
        offset = next;
        n += 1;
    }
    n
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let cursor_value = &data[..8];
    // Any base, up to u64::MAX: BrokerLog::open refuses one whose offsets would overflow.
    let second_base = word(&data[8..16]);
    let segments = &data[16..];
    let (seg0, seg1) = match segments.windows(4).position(|w| w == b"SEG1") {
        Some(i) => (&segments[..i], Some(&segments[i + 4..])),
        None => (segments, None),
    };

    let dir = dir();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("cursors")).expect("fuzz temp dir");
    std::fs::write(dir.join(format!("{:020}.seg", 0)), seg0).expect("write segment");
    if let Some(seg1) = seg1 {
        std::fs::write(dir.join(format!("{second_base:020}.seg")), seg1).expect("write segment");
    }
    std::fs::write(dir.join("cursors").join("ns.trigger"), cursor_value).expect("write cursor");

    let cfg = LogConfig {
        segment_bytes: 4096,
        retention_bytes: 64 << 10,
        durability: Durability::Append,
    };
    let Ok(mut log) = BrokerLog::open(dir, cfg) else {
        return;
    };
    let head = log.head();
    let tail = log.tail();
    assert!(head <= tail || seg1.is_some(), "head {head} after tail {tail}");
    if let Ok(cursor) = Cursor::open(dir, "ns.trigger", tail, Durability::Append) {
        walk(&log, cursor.get(), 64);
    }
    walk(&log, head, 256);

    // The recovered log must take new events, and give them back.
    let ev = CloudEvent::new("after-recovery", "/fuzz", "dev.fuzz.event").to_record();
    let before = log.tail();
    if let Ok(after) = log.append(&ev) {
        assert!(after > before, "append did not advance the tail");
        if seg1.is_none() {
            let (payload, next) = log.read(before).expect("appended record must read back");
            assert_eq!(payload, ev);
            assert_eq!(next, after);
        }
    }
    let _ = log.disk_bytes();
    log.truncate_below(log.tail());
});
