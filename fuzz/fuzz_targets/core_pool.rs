//! spright-core descriptors and the shared pool: descriptors decoded from arbitrary bytes
//! (forged, stale, out of range, misaddressed) mixed with legitimate hand-offs between
//! functions. A forged descriptor must never hand out a slot nobody sent to its claimer,
//! and the free count must stay exact. With a first byte of `\x01`, the rest overwrites the
//! pool's slot metadata and data (a corrupted region written by a broken function) before
//! the pool is reopened and used: errors are fine, panics and hangs are not.
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use spright_core::descriptor::{DESCRIPTOR_LEN, Descriptor};
use spright_core::pool::{Pool, PoolConfig, Slot};

const SLOTS: u32 = 4;
const CONFIG: PoolConfig = PoolConfig {
    slot_size: 64,
    slot_count: SLOTS,
};

fn pool() -> Arc<Pool> {
    Arc::new(Pool::create_memfd("spright-fuzz", CONFIG).expect("memfd pool"))
}

/// Runs `ops` against `pool`; `strict` checks the bookkeeping invariants (fresh pool).
fn run(pool: &Arc<Pool>, ops: &[u8], strict: bool) {
    let mut held: Vec<(Slot, u32)> = Vec::new();
    let mut in_flight: Vec<Descriptor> = Vec::new();
    let mut i = 0;
    while i < ops.len() {
        let op = ops[i];
        let arg = ops.get(i + 1).copied().unwrap_or(0);
        i += 2;
        let function = u32::from(arg % 4);
        match op % 7 {
            0 => {
                if let Ok(mut s) = pool.alloc(function) {
                    let _ = s.write(&ops[i.min(ops.len())..ops.len().min(i + usize::from(arg))]);
                    let _ = s.payload();
                    held.push((s, function));
                }
            }
            1 if !held.is_empty() => {
                let (s, _) = held.swap_remove(usize::from(arg) % held.len());
                if let Ok(d) = s.send_to(u32::from(op / 7) % 4) {
                    in_flight.push(d);
                }
            }
            2 => {
                // A forged descriptor straight off the wire.
                let Some(raw) = ops.get(i..i + DESCRIPTOR_LEN) else {
                    break;
                };
                i += DESCRIPTOR_LEN;
                let d = Descriptor::decode(raw).expect("16 bytes decode");
                assert_eq!(Descriptor::decode(&d.encode()), Ok(d));
                if let Ok(s) = pool.claim(&d, function) {
                    let _ = s.payload();
                    if strict {
                        let pos = in_flight
                            .iter()
                            .position(|f| {
                                f.slot == d.slot && f.generation == d.generation && f.dst == function
                            })
                            .unwrap_or_else(|| {
                                panic!("forged {d:?} claimed by {function}; in flight {in_flight:?}")
                            });
                        in_flight.swap_remove(pos);
                    }
                    held.push((s, function));
                }
            }
            3 if !in_flight.is_empty() => {
                let d = in_flight[usize::from(arg) % in_flight.len()];
                if let Ok(s) = pool.claim(&d.to(function), function) {
                    if strict {
                        assert_eq!(d.dst, function, "{d:?} claimed by {function}");
                        in_flight.retain(|f| *f != d);
                    }
                    held.push((s, function));
                }
            }
            4 => {
                // The function died: its slots, held or in flight, come back.
                // Its process is gone. Reclaim first: dropping its Slot handles afterwards
                // must then be a no-op (their owner word is no longer theirs).
                in_flight.retain(|d| d.dst != function);
                let _ = pool.reclaim(function);
                held.retain(|(_, h)| *h != function);
            }
            5 if !held.is_empty() => {
                let idx = usize::from(arg) % held.len();
                let s = &mut held[idx].0;
                let _ = s.set_len(usize::from(op) * 3);
                let _ = (s.payload().len(), s.request_id(), s.route(), s.http_status());
                s.set_route(u16::from(op), u16::from(arg));
                s.set_status(u32::from(arg) * 7);
                if arg % 2 == 0 {
                    held.swap_remove(idx);
                }
            }
            _ => {
                let _ = pool.alloc(function.wrapping_add(u32::MAX - 3));
            }
        }
        if strict {
            let live = (held.len() + in_flight.len()) as u32;
            assert_eq!(pool.free_count(), SLOTS - live, "free count drifted");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let pool = pool();
    if let Some(rest) = data.strip_prefix(b"\x01") {
        let file = std::fs::File::from(pool.fd().try_clone_to_owned().expect("dup pool fd"));
        // Leave the header page alone so the region opens; corrupt the slot metadata and data.
        let (meta, ops) = rest.split_at(rest.len() / 2);
        let meta = &meta[..meta.len().min(4096 + 4 * 64)];
        if file.write_at(meta, 4096).is_err() {
            return;
        }
        let Ok(reopened) = Pool::open(pool.fd().try_clone_to_owned().expect("dup pool fd")) else {
            return;
        };
        run(&Arc::new(reopened), ops, false);
        return;
    }
    run(&pool, data, true);
});
