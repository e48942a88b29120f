//! The shared-memory slot pool.
//!
//! One process (the pool owner, normally the gateway) creates the region; function processes
//! map the same memory (a memfd passed over the control socket, or a file on /dev/shm or
//! hugetlbfs). The region holds a header, one metadata record per slot and the slot data:
//!
//! ```text
//! 0            4096                         data_offset
//! | header      | slot metadata (32 B each)  | slot 0 | slot 1 | ... | slot n-1 |
//! ```
//!
//! Descriptors name slots by index: every process maps the pool at its own address, so no
//! pointer ever crosses a process boundary. Every access is bounds-checked against the
//! mapping and generation-checked against the slot, so a stale or forged descriptor is an
//! error, never a wild read.
//!
//! Free slots form a lock-free Treiber stack whose head carries an ABA tag. Each slot has one
//! owner at a time, recorded in its metadata:
//! - `FREE`: on the free stack;
//! - `f` (a function id): in flight to function `f` (a descriptor is on its way);
//! - `f | HELD`: held by function `f`, which may read and write the payload.
//!
//! Ownership only moves by compare-and-swap, so a slot is never held by two parties. When a
//! function process dies, [`Pool::reclaim`] frees every slot it held or that was in flight to it.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};
use thiserror::Error;

use crate::descriptor::Descriptor;

const MAGIC: u64 = u64::from_le_bytes(*b"SPRIGHT1");
const VERSION: u32 = 1;
const HEADER_LEN: usize = 4096;
const META_LEN: usize = 32;
const PAGE: usize = 4096;
const EMPTY: u32 = u32::MAX;
/// Owner value of a free slot.
const FREE: u32 = u32::MAX;
/// Bit set in the owner field while a function holds (reads or writes) the slot.
const HELD: u32 = 0x8000_0000;
/// The largest function id the owner field can carry.
pub const MAX_FUNCTION_ID: u32 = HELD - 1;

// Header field offsets.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_SLOT_SIZE: usize = 12;
const H_SLOT_COUNT: usize = 16;
const H_FREE_COUNT: usize = 20;
const H_FREE_HEAD: usize = 24;

// Slot metadata field offsets.
const M_NEXT: usize = 0;
const M_GENERATION: usize = 4;
const M_OWNER: usize = 8;
const M_LEN: usize = 12;
const M_REQUEST: usize = 16;
const M_ROUTE: usize = 24;
const M_STATUS: usize = 28;

/// Errors of the pool.
#[derive(Debug, Error)]
pub enum PoolError {
    #[error("pool configuration: {0}")]
    Config(String),
    #[error("creating or mapping the shared-memory region: {0}")]
    Io(#[from] std::io::Error),
    #[error("the shared-memory region is not a spright pool: {0}")]
    BadRegion(String),
    #[error("the shared-memory pool is exhausted ({0} slots, all in use)")]
    Exhausted(u32),
    #[error("descriptor names slot {slot}, the pool has {count}")]
    SlotOutOfRange { slot: u32, count: u32 },
    #[error("descriptor length {len} exceeds the slot size {slot_size}")]
    LengthOutOfRange { len: u32, slot_size: u32 },
    #[error("stale descriptor for slot {slot}: generation {got}, slot is at {current}")]
    Stale { slot: u32, got: u32, current: u32 },
    #[error("slot {slot} is not {expected:#x}'s to take (owner {owner:#x})")]
    NotOwner {
        slot: u32,
        expected: u32,
        owner: u32,
    },
    #[error("function id {0} is out of range")]
    BadFunctionId(u32),
}

/// Size of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Bytes per slot (the largest payload).
    pub slot_size: u32,
    /// Number of slots.
    pub slot_count: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            slot_size: 64 * 1024,
            slot_count: 1024,
        }
    }
}

impl PoolConfig {
    fn layout(&self) -> Result<Layout, PoolError> {
        if self.slot_count == 0 || self.slot_count == EMPTY {
            return Err(PoolError::Config(format!(
                "slot count must be in 1..{EMPTY}, got {}",
                self.slot_count
            )));
        }
        if self.slot_size == 0 || !self.slot_size.is_multiple_of(64) {
            return Err(PoolError::Config(format!(
                "slot size must be a positive multiple of 64 bytes, got {}",
                self.slot_size
            )));
        }
        let count = self.slot_count as usize;
        let meta_end = HEADER_LEN
            .checked_add(count.checked_mul(META_LEN).ok_or_else(too_big)?)
            .ok_or_else(too_big)?;
        let data_offset = meta_end
            .div_ceil(PAGE)
            .checked_mul(PAGE)
            .ok_or_else(too_big)?;
        let total = data_offset
            .checked_add(
                count
                    .checked_mul(self.slot_size as usize)
                    .ok_or_else(too_big)?,
            )
            .ok_or_else(too_big)?;
        Ok(Layout { data_offset, total })
    }
}

fn too_big() -> PoolError {
    PoolError::Config("pool size overflows the address space".into())
}

struct Layout {
    data_offset: usize,
    total: usize,
}

/// The mapped pool. Cheap to share: wrap it in an [`Arc`].
pub struct Pool {
    map: MmapRaw,
    config: PoolConfig,
    data_offset: usize,
    fd: OwnedFd,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("slot_size", &self.config.slot_size)
            .field("slot_count", &self.config.slot_count)
            .field("free", &self.free_count())
            .finish()
    }
}

impl Pool {
    /// Creates a pool in an anonymous memfd; share it with [`Pool::fd`] over the control socket.
    pub fn create_memfd(name: &str, config: PoolConfig) -> Result<Self, PoolError> {
        let cname = std::ffi::CString::new(name)
            .map_err(|_| PoolError::Config("pool name contains NUL".into()))?;
        let fd =
            nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .map_err(std::io::Error::from)?;
        Self::create_on(File::from(fd), config)
    }

    /// Creates a pool in a file (for example on /dev/shm or a hugetlbfs mount).
    pub fn create_file(path: &Path, config: PoolConfig) -> Result<Self, PoolError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Self::create_on(file, config)
    }

    fn create_on(file: File, config: PoolConfig) -> Result<Self, PoolError> {
        let layout = config.layout()?;
        file.set_len(layout.total as u64)?;
        let map = MmapOptions::new().len(layout.total).map_raw(&file)?;
        let pool = Self {
            map,
            config,
            data_offset: layout.data_offset,
            fd: file.into(),
        };
        pool.header_u32(H_SLOT_SIZE)
            .store(config.slot_size, Ordering::Relaxed);
        pool.header_u32(H_SLOT_COUNT)
            .store(config.slot_count, Ordering::Relaxed);
        pool.header_u32(H_VERSION).store(VERSION, Ordering::Relaxed);
        for i in 0..config.slot_count {
            let next = if i + 1 < config.slot_count {
                i + 1
            } else {
                EMPTY
            };
            pool.meta_u32(i, M_NEXT).store(next, Ordering::Relaxed);
            pool.meta_u32(i, M_GENERATION).store(0, Ordering::Relaxed);
            pool.meta_u32(i, M_OWNER).store(FREE, Ordering::Relaxed);
        }
        pool.header_u32(H_FREE_COUNT)
            .store(config.slot_count, Ordering::Relaxed);
        pool.header_u64(H_FREE_HEAD).store(0, Ordering::Relaxed);
        pool.header_u64(H_MAGIC).store(MAGIC, Ordering::Release);
        Ok(pool)
    }

    /// Maps a pool that another process created (the fd received over the control socket,
    /// or an opened pool file). The header is validated against the size of the region.
    pub fn open(fd: OwnedFd) -> Result<Self, PoolError> {
        let file = File::from(fd);
        let total = usize::try_from(file.metadata()?.len())
            .map_err(|_| PoolError::BadRegion("region larger than the address space".into()))?;
        if total < HEADER_LEN {
            return Err(PoolError::BadRegion(format!("region is {total} bytes")));
        }
        let map = MmapOptions::new().len(total).map_raw(&file)?;
        let mut pool = Self {
            map,
            config: PoolConfig {
                slot_size: 0,
                slot_count: 0,
            },
            data_offset: 0,
            fd: file.into(),
        };
        if pool.header_u64(H_MAGIC).load(Ordering::Acquire) != MAGIC {
            return Err(PoolError::BadRegion("bad magic".into()));
        }
        let version = pool.header_u32(H_VERSION).load(Ordering::Relaxed);
        if version != VERSION {
            return Err(PoolError::BadRegion(format!(
                "version {version}, expected {VERSION}"
            )));
        }
        let config = PoolConfig {
            slot_size: pool.header_u32(H_SLOT_SIZE).load(Ordering::Relaxed),
            slot_count: pool.header_u32(H_SLOT_COUNT).load(Ordering::Relaxed),
        };
        let layout = config
            .layout()
            .map_err(|e| PoolError::BadRegion(e.to_string()))?;
        if layout.total != total {
            return Err(PoolError::BadRegion(format!(
                "header describes {} bytes, region has {total}",
                layout.total
            )));
        }
        pool.config = config;
        pool.data_offset = layout.data_offset;
        Ok(pool)
    }

    /// Opens a pool file created by [`Pool::create_file`].
    pub fn open_file(path: &Path) -> Result<Self, PoolError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Self::open(file.into())
    }

    /// The region's file descriptor, to pass to function processes.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Slot size and count.
    pub fn config(&self) -> PoolConfig {
        self.config
    }

    /// Number of free slots.
    pub fn free_count(&self) -> u32 {
        self.header_u32(H_FREE_COUNT).load(Ordering::Relaxed)
    }

    /// Takes a free slot for function `holder`, or fails with [`PoolError::Exhausted`].
    pub fn alloc(self: &Arc<Self>, holder: u32) -> Result<Slot, PoolError> {
        check_id(holder)?;
        let head = self.header_u64(H_FREE_HEAD);
        let mut cur = head.load(Ordering::Acquire);
        loop {
            let index = cur as u32;
            if index == EMPTY {
                return Err(PoolError::Exhausted(self.config.slot_count));
            }
            if index >= self.config.slot_count {
                return Err(PoolError::BadRegion(format!(
                    "free list names slot {index}"
                )));
            }
            let next = self.meta_u32(index, M_NEXT).load(Ordering::Acquire);
            let tag = (cur >> 32).wrapping_add(1);
            match head.compare_exchange_weak(
                cur,
                (tag << 32) | u64::from(next),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.header_u32(H_FREE_COUNT)
                        .fetch_sub(1, Ordering::Relaxed);
                    self.meta_u32(index, M_OWNER)
                        .store(holder | HELD, Ordering::Release);
                    self.meta_u32(index, M_LEN).store(0, Ordering::Relaxed);
                    self.meta_u64(index, M_REQUEST).store(0, Ordering::Relaxed);
                    self.meta_u32(index, M_ROUTE).store(0, Ordering::Relaxed);
                    self.meta_u32(index, M_STATUS).store(0, Ordering::Relaxed);
                    let generation = self.meta_u32(index, M_GENERATION).load(Ordering::Acquire);
                    return Ok(Slot {
                        pool: Arc::clone(self),
                        index,
                        generation,
                        holder,
                        live: true,
                    });
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Takes the slot a received descriptor names, for function `holder`. The descriptor must
    /// be in range, current (generation) and in flight to `holder`.
    pub fn claim(self: &Arc<Self>, desc: &Descriptor, holder: u32) -> Result<Slot, PoolError> {
        check_id(holder)?;
        self.check(desc)?;
        let owner = self.meta_u32(desc.slot, M_OWNER);
        owner
            .compare_exchange(holder, holder | HELD, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|actual| PoolError::NotOwner {
                slot: desc.slot,
                expected: holder,
                owner: actual,
            })?;
        let current = self
            .meta_u32(desc.slot, M_GENERATION)
            .load(Ordering::Acquire);
        if current != desc.generation {
            // Lost a race with a reclaim: hand it back untouched.
            let _ =
                owner.compare_exchange(holder | HELD, holder, Ordering::AcqRel, Ordering::Relaxed);
            return Err(PoolError::Stale {
                slot: desc.slot,
                got: desc.generation,
                current,
            });
        }
        self.meta_u32(desc.slot, M_LEN)
            .store(desc.len, Ordering::Relaxed);
        Ok(Slot {
            pool: Arc::clone(self),
            index: desc.slot,
            generation: desc.generation,
            holder,
            live: true,
        })
    }

    /// Frees every slot held by `function` or in flight to it (the function's process died).
    /// Returns the request ids of the slots freed, so the pool owner can fail those requests.
    pub fn reclaim(&self, function: u32) -> Vec<u64> {
        let mut requests = Vec::new();
        for index in 0..self.config.slot_count {
            let owner = self.meta_u32(index, M_OWNER);
            for state in [function, function | HELD] {
                if owner
                    .compare_exchange(state, FREE, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    requests.push(self.meta_u64(index, M_REQUEST).load(Ordering::Relaxed));
                    self.release(index);
                    break;
                }
            }
        }
        requests
    }

    fn check(&self, desc: &Descriptor) -> Result<(), PoolError> {
        if desc.slot >= self.config.slot_count {
            return Err(PoolError::SlotOutOfRange {
                slot: desc.slot,
                count: self.config.slot_count,
            });
        }
        if desc.len > self.config.slot_size {
            return Err(PoolError::LengthOutOfRange {
                len: desc.len,
                slot_size: self.config.slot_size,
            });
        }
        Ok(())
    }

    /// Pushes a slot whose owner is already `FREE` back on the free stack.
    fn release(&self, index: u32) {
        self.meta_u32(index, M_GENERATION)
            .fetch_add(1, Ordering::AcqRel);
        let head = self.header_u64(H_FREE_HEAD);
        let mut cur = head.load(Ordering::Acquire);
        loop {
            self.meta_u32(index, M_NEXT)
                .store(cur as u32, Ordering::Release);
            let tag = (cur >> 32).wrapping_add(1);
            match head.compare_exchange_weak(
                cur,
                (tag << 32) | u64::from(index),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        self.header_u32(H_FREE_COUNT)
            .fetch_add(1, Ordering::Relaxed);
    }

    fn header_u32(&self, offset: usize) -> &AtomicU32 {
        self.atomic_u32(offset)
    }

    fn header_u64(&self, offset: usize) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= HEADER_LEN);
        // SAFETY: the offset is 8-aligned and inside the header page of the mapping, which
        // lives as long as `self`; all processes access it only through atomics.
        unsafe { &*self.map.as_mut_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn meta_u32(&self, index: u32, field: usize) -> &AtomicU32 {
        debug_assert!(index < self.config.slot_count);
        self.atomic_u32(HEADER_LEN + index as usize * META_LEN + field)
    }

    fn meta_u64(&self, index: u32, field: usize) -> &AtomicU64 {
        let offset = HEADER_LEN + index as usize * META_LEN + field;
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.data_offset.max(HEADER_LEN));
        // SAFETY: 8-aligned (META_LEN and the field offset are multiples of 8) and inside the
        // metadata area of the mapping, which lives as long as `self`; accessed only atomically.
        unsafe { &*self.map.as_mut_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.map.len());
        // SAFETY: 4-aligned and inside the mapping (checked above), which lives as long as
        // `self`; every process accesses these words only through atomics.
        unsafe { &*self.map.as_mut_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn data_ptr(&self, index: u32) -> *mut u8 {
        assert!(index < self.config.slot_count);
        let offset = self.data_offset + index as usize * self.config.slot_size as usize;
        assert!(offset + self.config.slot_size as usize <= self.map.len());
        // SAFETY: the slot's data lies inside the mapping (checked above).
        unsafe { self.map.as_mut_ptr().add(offset) }
    }
}

fn check_id(id: u32) -> Result<(), PoolError> {
    if id > MAX_FUNCTION_ID {
        Err(PoolError::BadFunctionId(id))
    } else {
        Ok(())
    }
}

/// A slot held by one function: its payload can be read and written in place. Dropping a
/// `Slot` frees it; [`Slot::send_to`] hands it to another function instead.
pub struct Slot {
    pool: Arc<Pool>,
    index: u32,
    generation: u32,
    holder: u32,
    live: bool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("index", &self.index)
            .field("generation", &self.generation)
            .field("holder", &self.holder)
            .field("len", &self.len())
            .finish()
    }
}

impl Slot {
    /// Slot index in the pool.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Payload length.
    pub fn len(&self) -> usize {
        self.pool
            .meta_u32(self.index, M_LEN)
            .load(Ordering::Relaxed) as usize
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Capacity of the slot.
    pub fn capacity(&self) -> usize {
        self.pool.config.slot_size as usize
    }

    /// The payload, in place in shared memory.
    pub fn payload(&self) -> &[u8] {
        let len = self.len().min(self.capacity());
        // SAFETY: the slot is held by this `Slot` alone (its owner word is `holder | HELD`,
        // set by compare-and-swap), so nobody writes it meanwhile; the range is inside the
        // slot, which is inside the mapping kept alive by `self.pool`.
        unsafe { std::slice::from_raw_parts(self.pool.data_ptr(self.index), len) }
    }

    /// The whole slot buffer, for writing a payload in place; then call [`Slot::set_len`].
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `payload`, and `&mut self` makes this the only reference in this
        // process; no other process touches a slot it does not hold.
        unsafe { std::slice::from_raw_parts_mut(self.pool.data_ptr(self.index), self.capacity()) }
    }

    /// Sets the payload length.
    pub fn set_len(&mut self, len: usize) -> Result<(), PoolError> {
        let slot_size = self.pool.config.slot_size;
        let len32 = u32::try_from(len).ok().filter(|l| *l <= slot_size).ok_or(
            PoolError::LengthOutOfRange {
                len: u32::try_from(len).unwrap_or(u32::MAX),
                slot_size,
            },
        )?;
        self.pool
            .meta_u32(self.index, M_LEN)
            .store(len32, Ordering::Relaxed);
        Ok(())
    }

    /// Copies `bytes` in as the payload.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), PoolError> {
        self.set_len(bytes.len())?;
        self.buffer_mut()[..bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    /// The request this slot belongs to (set by the gateway, carried along the chain).
    pub fn request_id(&self) -> u64 {
        self.pool
            .meta_u64(self.index, M_REQUEST)
            .load(Ordering::Relaxed)
    }

    /// Sets the request id.
    pub fn set_request_id(&mut self, id: u64) {
        self.pool
            .meta_u64(self.index, M_REQUEST)
            .store(id, Ordering::Relaxed);
    }

    /// Route: chain index (high 16 bits) and hop (low 16 bits).
    pub fn route(&self) -> (u16, u16) {
        let r = self
            .pool
            .meta_u32(self.index, M_ROUTE)
            .load(Ordering::Relaxed);
        ((r >> 16) as u16, r as u16)
    }

    /// Sets the route.
    pub fn set_route(&mut self, chain: u16, hop: u16) {
        let r = (u32::from(chain) << 16) | u32::from(hop);
        self.pool
            .meta_u32(self.index, M_ROUTE)
            .store(r, Ordering::Relaxed);
    }

    /// Status word: 0 for a result, otherwise an HTTP status the gateway should answer.
    pub fn status(&self) -> u32 {
        self.pool
            .meta_u32(self.index, M_STATUS)
            .load(Ordering::Relaxed)
    }

    /// The HTTP status the slot's status word stands for: 200 for a result, the function's
    /// status for a refusal, 500 for a word that is no HTTP status.
    pub fn http_status(&self) -> u16 {
        match self.status() {
            0 => 200,
            s => u16::try_from(s)
                .ok()
                .filter(|s| (100..600).contains(s))
                .unwrap_or(500),
        }
    }

    /// Sets the status word.
    pub fn set_status(&mut self, status: u32) {
        self.pool
            .meta_u32(self.index, M_STATUS)
            .store(status, Ordering::Relaxed);
    }

    /// Hands the slot to function `dst` and returns the descriptor to send it. Until `dst`
    /// claims it, the slot is in flight to `dst` (and reclaimed if `dst` dies).
    pub fn send_to(mut self, dst: u32) -> Result<Descriptor, PoolError> {
        check_id(dst)?;
        let len = self.len() as u32;
        self.pool
            .meta_u32(self.index, M_OWNER)
            .compare_exchange(self.holder | HELD, dst, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|owner| PoolError::NotOwner {
                slot: self.index,
                expected: self.holder | HELD,
                owner,
            })?;
        self.live = false;
        Ok(Descriptor {
            dst,
            slot: self.index,
            len,
            generation: self.generation,
        })
    }

    /// Frees the slot now (dropping does the same).
    pub fn free(self) {}
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.live
            && self
                .pool
                .meta_u32(self.index, M_OWNER)
                .compare_exchange(
                    self.holder | HELD,
                    FREE,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            self.pool.release(self.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Arc<Pool> {
        let cfg = PoolConfig {
            slot_size: 128,
            slot_count: 8,
        };
        Arc::new(Pool::create_memfd("test", cfg).expect("pool"))
    }

    #[test]
    fn alloc_write_send_claim_free() {
        let pool = small();
        let mut s = pool.alloc(0).expect("alloc");
        s.write(b"hello").expect("write");
        s.set_request_id(42);
        s.set_route(3, 1);
        assert_eq!(pool.free_count(), 7);
        let d = s.send_to(5).expect("send");
        assert_eq!(d.len, 5);
        // Only function 5 can claim it.
        assert!(matches!(pool.claim(&d, 6), Err(PoolError::NotOwner { .. })));
        let s = pool.claim(&d, 5).expect("claim");
        assert_eq!(s.payload(), b"hello");
        assert_eq!(s.request_id(), 42);
        assert_eq!(s.route(), (3, 1));
        // A second claim of the same descriptor fails: one holder at a time.
        assert!(pool.claim(&d, 5).is_err());
        drop(s);
        assert_eq!(pool.free_count(), 8);
        // The old descriptor is stale now, even once the slot is reused.
        let again = pool.alloc(0).expect("alloc");
        let d2 = again.send_to(5).expect("send");
        assert_eq!(d2.slot, d.slot);
        assert!(matches!(pool.claim(&d, 5), Err(PoolError::Stale { .. })));
        assert!(pool.claim(&d2, 5).is_ok());
    }

    #[test]
    fn exhaustion_is_an_error_and_recovers() {
        let pool = small();
        let held: Vec<_> = (0..8).map(|_| pool.alloc(1).expect("alloc")).collect();
        assert!(matches!(pool.alloc(1), Err(PoolError::Exhausted(8))));
        drop(held);
        assert_eq!(pool.free_count(), 8);
        assert!(pool.alloc(1).is_ok());
    }

    #[test]
    fn bounds_are_checked() {
        let pool = small();
        let bad_slot = Descriptor {
            dst: 1,
            slot: 8,
            len: 0,
            generation: 0,
        };
        assert!(matches!(
            pool.claim(&bad_slot, 1),
            Err(PoolError::SlotOutOfRange { .. })
        ));
        let bad_len = Descriptor {
            dst: 1,
            slot: 0,
            len: 129,
            generation: 0,
        };
        assert!(matches!(
            pool.claim(&bad_len, 1),
            Err(PoolError::LengthOutOfRange { .. })
        ));
        let mut s = pool.alloc(1).expect("alloc");
        assert!(s.set_len(129).is_err());
        assert!(s.write(&[0; 200]).is_err());
        assert!(pool.alloc(HELD).is_err());
    }

    #[test]
    fn reclaim_frees_held_and_in_flight_slots() {
        let pool = small();
        let mut a = pool.alloc(3).expect("alloc");
        a.set_request_id(10);
        let mut b = pool.alloc(0).expect("alloc");
        b.set_request_id(11);
        let _d = b.send_to(3).expect("send");
        let keep = pool.alloc(4).expect("alloc");
        std::mem::forget(a); // the process "died" while holding it
        let mut ids = pool.reclaim(3);
        ids.sort_unstable();
        assert_eq!(ids, vec![10, 11]);
        assert_eq!(pool.free_count(), 7);
        drop(keep);
        assert_eq!(pool.free_count(), 8);
    }

    #[test]
    fn a_second_mapping_sees_the_same_memory() {
        let pool = small();
        let fd = pool.fd().try_clone_to_owned().expect("dup");
        let other = Arc::new(Pool::open(fd).expect("open"));
        let mut s = pool.alloc(0).expect("alloc");
        s.write(b"shared").expect("write");
        let d = s.send_to(2).expect("send");
        let got = other.claim(&d, 2).expect("claim");
        assert_eq!(got.payload(), b"shared");
        drop(got);
        assert_eq!(pool.free_count(), 8);
    }

    #[test]
    fn open_rejects_foreign_regions() {
        let fd = nix::sys::memfd::memfd_create(c"x", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .expect("memfd");
        let f = File::from(fd);
        f.set_len(8192).expect("len");
        assert!(matches!(Pool::open(f.into()), Err(PoolError::BadRegion(_))));
    }

    #[test]
    fn random_descriptors_never_reach_memory_they_do_not_own() {
        // A small deterministic fuzz: forged descriptors (random bytes through the wire
        // decoder) must fail cleanly unless they name a slot in flight to the claimer at its
        // current generation, and the pool's accounting must survive them.
        let pool = small();
        let mut held = pool.alloc(0).expect("alloc");
        held.write(b"real").expect("write");
        let real = held.send_to(3).expect("send");
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..50_000 {
            let mut wire = [0u8; 16];
            for b in &mut wire {
                *b = next() as u8;
            }
            // Bias some fields into range so the deeper checks run too.
            if next() % 2 == 0 {
                wire[4..8].copy_from_slice(&((next() % 10) as u32).to_le_bytes());
                wire[8..12].copy_from_slice(&((next() % 200) as u32).to_le_bytes());
                wire[12..16].copy_from_slice(&((next() % 3) as u32).to_le_bytes());
            }
            let d = Descriptor::decode(&wire).expect("16 bytes decode");
            let claimer = (next() % 6) as u32;
            if let Ok(slot) = pool.claim(&d, claimer) {
                assert_eq!(
                    (d.slot, d.generation, claimer),
                    (real.slot, real.generation, 3)
                );
                drop(slot);
                break;
            }
        }
        assert!(pool.free_count() >= 7);
    }

    #[test]
    fn concurrent_alloc_free_keeps_count() {
        let pool = Arc::new(
            Pool::create_memfd(
                "c",
                PoolConfig {
                    slot_size: 64,
                    slot_count: 64,
                },
            )
            .expect("pool"),
        );
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let p = Arc::clone(&pool);
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        if let Ok(mut s) = p.alloc(t) {
                            s.set_request_id(u64::from(i));
                            let d = s.send_to(t + 10).expect("send");
                            drop(p.claim(&d, t + 10).expect("claim"));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(pool.free_count(), 64);
    }
}
