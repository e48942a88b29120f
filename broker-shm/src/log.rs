//! The per-broker event log: memory-mapped segment files plus per-trigger cursors.
//!
//! Layout under `<data-dir>/<namespace>/<broker>/`:
//! - `<base offset, 20 digits>.seg`: preallocated segment files; records are
//!   `[len u32 LE][checksum u32 LE][payload][pad to 8]`, a zero length marks the end;
//! - `cursors/<trigger key>`: 8-byte little-endian dispatch position of each trigger.
//!
//! Offsets are logical byte positions across segments (segment base + position), so a
//! cursor stays valid when older segments are deleted. The length word is written last, so
//! a record torn by a crash reads as the end of the log; the checksum catches torn pages
//! after a power loss in "append" durability.

use memmap2::{Advice, MmapMut, MmapOptions, MmapRaw};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, OnceLock};

const HEADER: usize = 8;

/// When an append counts as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Once copied into the shared mapping (survives a process crash, not a power loss).
    Append,
    /// After `msync` of the written range (survives a power loss).
    Msync,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "append" => Ok(Durability::Append),
            "msync" => Ok(Durability::Msync),
            other => Err(format!("durability must be append or msync, not {other:?}")),
        }
    }
}

/// Log sizing and durability.
#[derive(Debug, Clone, Copy)]
pub struct LogConfig {
    /// Bytes per segment file (also the largest record).
    pub segment_bytes: usize,
    /// Most bytes of segments kept on disk; appends beyond it are refused until the
    /// triggers catch up (never silently dropped).
    pub retention_bytes: u64,
    /// Append durability.
    pub durability: Durability,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 16 << 20,
            retention_bytes: 1 << 30,
            durability: Durability::Append,
        }
    }
}

/// Log errors.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("event of {0} bytes exceeds the segment size")]
    TooLarge(usize),
    #[error("log retention limit reached ({0} bytes); subscribers are behind")]
    Full(u64),
    /// The filesystem under the data directory cannot hold another `bytes` (disk full or
    /// quota): nothing was written.
    #[error("no space for {bytes} bytes at {path}: the data directory's filesystem is full")]
    NoSpace { path: PathBuf, bytes: usize },
    /// A segment file whose name (its base offset) cannot belong to this log: corrupted
    /// or forged. The log refuses to open rather than hand out wrapped offsets.
    #[error("log segment {path}: {reason}")]
    BadSegment { path: PathBuf, reason: String },
    /// The 64-bit offset space is used up: a new segment would end past `u64::MAX`.
    #[error("log offsets exhausted: a new segment at offset {0} would end past u64::MAX")]
    OffsetsExhausted(u64),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

struct Segment {
    base: u64,
    used: usize,
    path: PathBuf,
    /// Shared with the prefault thread, which only asks the kernel to populate pages of it
    /// (it never reads or writes the bytes), so a deleted segment stays mapped until a
    /// request for it is done.
    map: Arc<MmapRaw>,
    /// Pages below this position are populated or requested (see [`Segment::prefault`]).
    populated: usize,
}

/// How far ahead of a segment's tail its pages are populated, and the smallest request.
///
/// The first write to a page of a mapped file is a page fault in which the filesystem
/// allocates the page's blocks (converting the preallocated, unwritten extent) and updates
/// the file's mtime in its journal: on ext4 that cost landed on about one append in 16 before.
/// A thread of its own takes that cost ahead of the appends, `MADV_POPULATE_WRITE` over the
/// next window of the segment. 1 MiB is a few seconds of appends at a hundred events per
/// second, well inside the 30 s after which writeback cleans (and write-protects) dirty
/// pages again, so populated pages are written before that.
const PREFAULT_AHEAD: usize = 1 << 20;
const PREFAULT_CHUNK: usize = PREFAULT_AHEAD / 4;

/// A range of a segment mapping to populate.
struct PrefaultRequest {
    map: Arc<MmapRaw>,
    from: usize,
    to: usize,
    /// Told when this request (and so every earlier one) is done.
    #[cfg(test)]
    done: Option<SyncSender<()>>,
}

/// The process's prefault thread: it blocks on its queue (no polling) and populates each
/// requested range. It yields the CPU before each request so that the threads an append
/// just woke (a function, the reply thread) run first on a busy core. A full queue drops a
/// request: the appends then fault those pages themselves, as without the thread.
fn prefault_queue() -> Option<&'static SyncSender<PrefaultRequest>> {
    static QUEUE: OnceLock<Option<SyncSender<PrefaultRequest>>> = OnceLock::new();
    QUEUE
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel(64);
            std::thread::Builder::new()
                .name("log-prefault".into())
                .spawn(move || prefault_loop(&rx))
                .map_err(|e| tracing::warn!(error = %e, "no log prefault thread; appends fault pages in"))
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

fn prefault_loop(rx: &Receiver<PrefaultRequest>) {
    while let Ok(req) = rx.recv() {
        std::thread::yield_now();
        if let Err(e) = req
            .map
            .advise_range(Advice::PopulateWrite, req.from, req.to - req.from)
        {
            // Kernels before 5.14 have no MADV_POPULATE_WRITE; a full disk shows at the
            // append, as without prefaulting.
            tracing::debug!(error = %e, "log prefault stopped");
            if e.raw_os_error() == Some(nix::libc::EINVAL) {
                return;
            }
        }
        #[cfg(test)]
        if let Some(done) = req.done {
            let _ = done.send(());
        }
    }
}

fn checksum(data: &[u8]) -> u32 {
    // FNV-1a, 32 bit.
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn padded(n: usize) -> usize {
    (HEADER + n + 7) & !7
}

fn open_preallocated(path: &Path, len: usize, create: bool) -> Result<File, LogError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(io(path))?;
    let cur = file.metadata().map_err(io(path))?.len();
    if cur < len as u64
        && let Err(e) = preallocate(&file, path, len)
    {
        // A file that was empty (just created) is removed; an existing shorter file keeps
        // whatever it held.
        if cur == 0 {
            let _ = std::fs::remove_file(path);
        }
        return Err(e);
    }
    Ok(file)
}

/// Reserves the disk blocks of `[0, len)` before the file is mapped. A write through a
/// mapping into a hole the filesystem cannot fill (disk full, quota) raises SIGBUS and kills
/// the process; reserved up front, a full disk is instead an error here, answered with a
/// 503 before any 202. Filesystems that cannot preallocate get a sparse file, as before.
fn preallocate(file: &File, path: &Path, len: usize) -> Result<(), LogError> {
    use nix::errno::Errno;
    use nix::fcntl::{FallocateFlags, fallocate};
    use std::os::fd::AsRawFd;
    let bytes = i64::try_from(len).map_err(|_| LogError::TooLarge(len))?;
    match fallocate(file.as_raw_fd(), FallocateFlags::empty(), 0, bytes) {
        Ok(()) => Ok(()),
        Err(Errno::ENOSPC | Errno::EDQUOT) => Err(LogError::NoSpace {
            path: path.to_path_buf(),
            bytes: len,
        }),
        Err(Errno::EOPNOTSUPP) => file.set_len(len as u64).map_err(io(path)),
        Err(e) => Err(io(path)(e.into())),
    }
}

fn map(file: &File, path: &Path) -> Result<MmapMut, LogError> {
    // SAFETY: the file is private to this process (one broker-shm per data dir); nobody
    // truncates it while mapped, and all access goes through the owning `Cursor`.
    unsafe { MmapOptions::new().map_mut(file) }.map_err(io(path))
}

impl Segment {
    fn open(dir: &Path, base: u64, size: usize) -> Result<Segment, LogError> {
        let path = dir.join(format!("{base:020}.seg"));
        let file = open_preallocated(&path, size, true)?;
        let map = MmapOptions::new().map_raw(&file).map_err(io(&path))?;
        let mut seg = Segment {
            base,
            used: 0,
            path,
            map: Arc::new(map),
            populated: 0,
        };
        seg.used = seg.scan();
        seg.populated = seg.used;
        Ok(seg)
    }

    /// The segment's bytes.
    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping lives as long as `self.map` (an `Arc` this segment holds) and
        // spans `len()` bytes. The bytes are read and written only through this segment
        // (the file is private to this process, one broker-shm per data dir, and never
        // truncated while mapped), and `bytes_mut` needs `&mut self`, so no write aliases
        // this borrow; the prefault thread never touches the bytes.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }

    /// The segment's bytes, to append to.
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only borrow of the bytes.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr(), self.map.len()) }
    }

    /// Asks the prefault thread to populate the pages up to [`PREFAULT_AHEAD`] past the
    /// tail once less than half of that window is left.
    fn prefault(&mut self) {
        let want = (self.used + PREFAULT_AHEAD).min(self.map.len());
        if want < self.populated + PREFAULT_CHUNK && want < self.map.len() {
            return;
        }
        if want <= self.populated {
            return;
        }
        let Some(queue) = prefault_queue() else {
            return;
        };
        let req = PrefaultRequest {
            map: self.map.clone(),
            from: self.populated,
            to: want,
            #[cfg(test)]
            done: None,
        };
        // A full queue drops the request (see `prefault_queue`); a later append asks again.
        if queue.try_send(req).is_ok() {
            self.populated = want;
        }
    }

    /// Finds the end of the valid records.
    fn scan(&self) -> usize {
        let mut pos = 0;
        while let Some((_, next)) = self.record_at(pos) {
            pos = next;
        }
        pos
    }

    fn record_at(&self, pos: usize) -> Option<(&[u8], usize)> {
        let bytes = self.bytes();
        let hdr = bytes.get(pos..pos + HEADER)?;
        let len = u32::from_le_bytes(hdr[0..4].try_into().ok()?) as usize;
        let sum = u32::from_le_bytes(hdr[4..8].try_into().ok()?);
        if len == 0 {
            return None;
        }
        let payload = bytes.get(pos + HEADER..pos + HEADER + len)?;
        if checksum(payload) != sum {
            return None;
        }
        Some((payload, pos + padded(len)))
    }

    fn capacity(&self) -> usize {
        self.map.len()
    }

    /// Offset one past the last record (`base + used`; `open` keeps it within u64).
    fn end(&self) -> u64 {
        self.base + self.used as u64
    }

    fn append(&mut self, payload: &[u8], durability: Durability) -> Result<(), LogError> {
        let pos = self.used;
        let end = pos + padded(payload.len());
        let len = u32::try_from(payload.len()).map_err(|_| LogError::TooLarge(payload.len()))?;
        let bytes = self.bytes_mut();
        bytes[pos + HEADER..pos + HEADER + payload.len()].copy_from_slice(payload);
        // Zero the next header so a stale record after a reused region never reads as valid.
        if let Some(next) = bytes.get_mut(end..end + 4) {
            next.fill(0);
        }
        bytes[pos + 4..pos + 8].copy_from_slice(&checksum(payload).to_le_bytes());
        bytes[pos..pos + 4].copy_from_slice(&len.to_le_bytes());
        if durability == Durability::Msync {
            let flush_end = (end + 4).min(self.map.len());
            self.map
                .flush_range(pos, flush_end - pos)
                .map_err(io(&self.path))?;
        }
        self.used = end;
        self.prefault();
        Ok(())
    }
}

/// One broker's log.
pub struct BrokerLog {
    dir: PathBuf,
    cfg: LogConfig,
    segments: VecDeque<Segment>,
}

impl std::fmt::Debug for BrokerLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerLog")
            .field("dir", &self.dir)
            .field("segments", &self.segments.len())
            .field("tail", &self.tail())
            .finish()
    }
}

impl BrokerLog {
    /// Opens (or creates) the log in `dir`, recovering the tail by scanning.
    pub fn open(dir: &Path, cfg: LogConfig) -> Result<BrokerLog, LogError> {
        std::fs::create_dir_all(dir.join("cursors")).map_err(io(dir))?;
        let mut bases: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse::<u64>().ok()
            })
            .collect();
        bases.sort_unstable();
        bases.dedup();
        let mut segments: VecDeque<Segment> = VecDeque::new();
        for base in bases {
            // Existing segments keep their own size.
            let path = dir.join(format!("{base:020}.seg"));
            let size = std::fs::metadata(&path).map_err(io(&path))?.len();
            let size = usize::try_from(size).unwrap_or(usize::MAX).max(HEADER);
            // Offsets are `base + position`: a segment must end within u64 (so tail() and
            // read() never overflow) and start at or after the previous segment's end (so
            // offsets only move forward). Anything else is a corrupted or forged name.
            let bad = |reason: String| LogError::BadSegment {
                path: path.clone(),
                reason,
            };
            if base.checked_add(size as u64).is_none() {
                return Err(bad(format!(
                    "base offset {base} plus its size {size} bytes overflows a 64-bit offset"
                )));
            }
            if let Some(prev) = segments.back()
                && base < prev.end()
            {
                return Err(bad(format!(
                    "base offset {base} is below the end {} of the previous segment {}",
                    prev.end(),
                    prev.path.display()
                )));
            }
            segments.push_back(Segment::open(dir, base, size)?);
        }
        if segments.is_empty() {
            segments.push_back(Segment::open(dir, 0, cfg.segment_bytes)?);
        }
        // Only the last segment is appended to.
        if let Some(last) = segments.back_mut() {
            last.prefault();
        }
        Ok(BrokerLog {
            dir: dir.to_path_buf(),
            cfg,
            segments,
        })
    }

    /// The directory of this log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Offset one past the last record.
    pub fn tail(&self) -> u64 {
        self.segments.back().map_or(0, |s| s.base + s.used as u64)
    }

    /// Offset of the oldest retained record.
    pub fn head(&self) -> u64 {
        self.segments.front().map_or(0, |s| s.base)
    }

    /// End offset of the oldest segment when a newer one exists (it is sealed).
    pub fn first_sealed_end(&self) -> Option<u64> {
        if self.segments.len() < 2 {
            return None;
        }
        self.segments.front().map(|s| s.base + s.used as u64)
    }

    /// Bytes of segment files currently on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.capacity() as u64).sum()
    }

    /// Appends a record; returns the offset after it (the new tail).
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, LogError> {
        let need = padded(payload.len()) + 4;
        if need > self.cfg.segment_bytes {
            return Err(LogError::TooLarge(payload.len()));
        }
        let fits = self
            .segments
            .back()
            .is_some_and(|s| s.used + need <= s.capacity());
        if !fits {
            if self.disk_bytes() + self.cfg.segment_bytes as u64 > self.cfg.retention_bytes {
                return Err(LogError::Full(self.cfg.retention_bytes));
            }
            let base = self.tail();
            if base.checked_add(self.cfg.segment_bytes as u64).is_none() {
                return Err(LogError::OffsetsExhausted(base));
            }
            self.segments
                .push_back(Segment::open(&self.dir, base, self.cfg.segment_bytes)?);
            if let Some(new) = self.segments.back_mut() {
                new.prefault();
            }
        }
        let durability = self.cfg.durability;
        let seg = self
            .segments
            .back_mut()
            .ok_or(LogError::TooLarge(payload.len()))?;
        seg.append(payload, durability)?;
        Ok(self.tail())
    }

    /// Reads the record at `offset`: `(payload, next offset)`, or `None` at the tail.
    /// An offset below the head (deleted by retention) resumes at the head.
    pub fn read(&self, offset: u64) -> Option<(Vec<u8>, u64)> {
        let offset = offset.max(self.head());
        for (i, s) in self.segments.iter().enumerate() {
            let end = s.base + s.used as u64;
            if offset < s.base || offset > end {
                continue;
            }
            if offset == end {
                // End of a sealed segment: continue in the next one.
                if i + 1 < self.segments.len() {
                    continue;
                }
                return None;
            }
            let pos = usize::try_from(offset - s.base).ok()?;
            let (payload, next) = s.record_at(pos)?;
            return Some((payload.to_vec(), s.base + next as u64));
        }
        None
    }

    /// Deletes every sealed segment entirely below `offset` (all triggers are past it).
    pub fn truncate_below(&mut self, offset: u64) {
        while self.segments.len() > 1 {
            let Some(front) = self.segments.front() else {
                break;
            };
            if front.base + front.used as u64 > offset {
                break;
            }
            if let Some(seg) = self.segments.pop_front() {
                let _ = std::fs::remove_file(&seg.path);
            }
        }
    }
}

/// A trigger's persisted dispatch position (an 8-byte memory-mapped file).
pub struct Cursor {
    map: MmapMut,
    path: PathBuf,
    durability: Durability,
}

impl std::fmt::Debug for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cursor({}, {})", self.path.display(), self.get())
    }
}

impl Cursor {
    /// Opens the cursor `key` of a log; a new cursor starts at `initial`.
    pub fn open(
        log_dir: &Path,
        key: &str,
        initial: u64,
        durability: Durability,
    ) -> Result<Cursor, LogError> {
        let safe: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = log_dir.join("cursors").join(safe);
        let existed = path.exists();
        let file = open_preallocated(&path, 8, true)?;
        let map = map(&file, &path)?;
        let mut c = Cursor {
            map,
            path,
            durability,
        };
        if !existed {
            c.set(initial)?;
        }
        Ok(c)
    }

    /// Current position.
    pub fn get(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.map[..8]);
        u64::from_le_bytes(b)
    }

    /// Stores a new position.
    pub fn set(&mut self, v: u64) -> Result<(), LogError> {
        self.map[..8].copy_from_slice(&v.to_le_bytes());
        if self.durability == Durability::Msync {
            self.map.flush().map_err(io(&self.path))?;
        }
        Ok(())
    }

    /// Deletes the cursor file (trigger removed).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(seg: usize, ret: u64) -> LogConfig {
        LogConfig {
            segment_bytes: seg,
            retention_bytes: ret,
            durability: Durability::Msync,
        }
    }

    /// A full filesystem under the data directory is an error (`NoSpace`, answered 503)
    /// when a segment is created, never a SIGBUS on a write into an unbacked page; the
    /// records already stored stay readable and the half-made segment is removed. Runs in a
    /// thread with a private mount namespace holding a 64 KiB tmpfs (needs CAP_SYS_ADMIN, as
    /// CI's root has).
    #[test]
    fn a_full_filesystem_is_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        std::thread::spawn(move || {
            use nix::mount::{MsFlags, mount};
            use nix::sched::{CloneFlags, unshare};
            const NEEDS: &str = "this test mounts a 64 KiB tmpfs in a private mount namespace: it needs CAP_SYS_ADMIN (run it as root, as CI does)";
            unshare(CloneFlags::CLONE_NEWNS).expect(NEEDS);
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .expect(NEEDS);
            mount(
                Some("none"),
                &path,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("size=64k"),
            )
            .expect(NEEDS);
            let mut log = BrokerLog::open(&path, cfg(16 << 10, 1 << 20)).unwrap();
            let record = [7u8; 1000];
            let mut stored = 0;
            let err = loop {
                match log.append(&record) {
                    Ok(_) => stored += 1,
                    Err(e) => break e,
                }
                assert!(stored < 1000, "a 64 KiB filesystem took {stored} KB");
            };
            assert!(matches!(err, LogError::NoSpace { .. }), "{err}");
            assert!(err.to_string().contains("filesystem is full"), "{err}");
            assert!(stored >= 15, "only {stored} records fit");
            let (mut off, mut read) = (log.head(), 0);
            while let Some((rec, next)) = log.read(off) {
                assert_eq!(rec, record);
                (off, read) = (next, read + 1);
            }
            assert_eq!(read, stored);
            let segments = std::fs::read_dir(&path)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension() == Some("seg".as_ref()))
                .count();
            assert_eq!(segments as u64, log.disk_bytes() / (16 << 10));
        })
        .join()
        .unwrap();
    }

    /// Fuzz finding (broker_log_recovery, `segment-base-near-u64-max`): a segment file named
    /// with a base near u64::MAX made tail() and read() overflow `base + used`.
    #[test]
    fn forged_segment_bases_are_refused_not_overflowed() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = BrokerLog::open(dir.path(), cfg(256, 4096)).unwrap();
        log.append(b"first").unwrap();
        drop(log);
        let forged = dir.path().join(format!("{}.seg", u64::MAX));
        std::fs::write(&forged, [0u8; 64]).unwrap();
        let err = BrokerLog::open(dir.path(), cfg(256, 4096)).unwrap_err();
        assert!(matches!(err, LogError::BadSegment { .. }), "{err}");
        assert!(err.to_string().contains("overflows"), "{err}");
        std::fs::remove_file(&forged).unwrap();

        // A base inside the previous segment's records: offsets would go backwards.
        let inside = dir.path().join(format!("{:020}.seg", 4));
        std::fs::write(&inside, [0u8; 64]).unwrap();
        let err = BrokerLog::open(dir.path(), cfg(256, 4096)).unwrap_err();
        assert!(err.to_string().contains("below the end"), "{err}");
        std::fs::remove_file(&inside).unwrap();
        assert_eq!(
            BrokerLog::open(dir.path(), cfg(256, 4096)).unwrap().head(),
            0
        );

        // The last segment that fits below u64::MAX: appends stop with an error, not a wrap.
        let dir = tempfile::tempdir().unwrap();
        let base = u64::MAX - 300;
        std::fs::write(dir.path().join(format!("{base:020}.seg")), [0u8; 256]).unwrap();
        let mut log = BrokerLog::open(dir.path(), cfg(256, 4096)).unwrap();
        let mut tail = log.tail();
        let err = loop {
            match log.append(&[7u8; 40]) {
                Ok(t) => {
                    assert!(t > tail);
                    tail = t;
                }
                Err(e) => break e,
            }
        };
        assert!(matches!(err, LogError::OffsetsExhausted(_)), "{err}");
        assert_eq!(log.read(base).unwrap().0, vec![7u8; 40]);
    }

    #[test]
    fn append_read_reopen_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = BrokerLog::open(dir.path(), cfg(256, 4096)).unwrap();
        let mut offsets = vec![0];
        for i in 0..20 {
            let rec = format!("record-{i}-{}", "x".repeat(i * 3));
            offsets.push(log.append(rec.as_bytes()).unwrap());
        }
        assert!(log.segments.len() > 2);
        let tail = log.tail();
        drop(log);
        let mut log = BrokerLog::open(dir.path(), cfg(256, 4096)).unwrap();
        assert_eq!(log.tail(), tail);
        let mut off = 0;
        for i in 0..20 {
            let (rec, next) = log.read(off).unwrap();
            assert!(rec.starts_with(format!("record-{i}-").as_bytes()));
            assert_eq!(next, offsets[i + 1]);
            off = next;
        }
        assert!(log.read(off).is_none());
        let before = log.disk_bytes();
        log.truncate_below(offsets[15]);
        assert!(log.disk_bytes() < before);
        assert!(log.read(offsets[15]).is_some());
        // Reading below the head resumes at the head.
        assert!(log.read(0).is_some());
    }

    #[test]
    fn retention_refuses_and_torn_record_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = BrokerLog::open(dir.path(), cfg(128, 256)).unwrap();
        let mut full = false;
        for _ in 0..20 {
            match log.append(&[7u8; 40]) {
                Ok(_) => {}
                Err(LogError::Full(_)) => {
                    full = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(full);
        assert!(matches!(
            log.append(&[0u8; 200]),
            Err(LogError::TooLarge(_))
        ));
        // Corrupt the last record's payload: reopening must stop before it.
        let tail = log.tail();
        let seg = log.segments.back_mut().unwrap();
        let last = seg.used - padded(40);
        seg.bytes_mut()[last + HEADER] ^= 0xff;
        drop(log);
        let log = BrokerLog::open(dir.path(), cfg(128, 256)).unwrap();
        assert!(log.tail() < tail);
    }

    /// Waits until the prefault thread has handled every request queued before this one.
    fn prefault_barrier(map: Arc<MmapRaw>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let req = PrefaultRequest {
            map,
            from: 0,
            to: 0,
            done: Some(tx),
        };
        prefault_queue().unwrap().send(req).unwrap();
        rx.recv().unwrap();
    }

    /// Page faults taken by the calling thread so far.
    fn faults_of_this_thread() -> i64 {
        use nix::sys::resource::{UsageWho, getrusage};
        let u = getrusage(UsageWho::RUSAGE_THREAD).unwrap();
        u.minor_page_faults() + u.major_page_faults()
    }

    #[test]
    fn appends_find_their_pages_populated_ahead() {
        let dir = tempfile::tempdir().unwrap();
        // "append" durability: an msync cleans (and write-protects) each page it writes back,
        // so in "msync" durability every append faults its page again by design.
        let config = LogConfig {
            durability: Durability::Append,
            ..cfg(4 << 20, 8 << 20)
        };
        let mut log = BrokerLog::open(dir.path(), config).unwrap();
        log.append(b"first").unwrap();
        prefault_barrier(log.segments.back().unwrap().map.clone());
        let record = [7u8; 504];
        let before = faults_of_this_thread();
        // 512 KiB of appends (records of 512 bytes): 128 pages, each a page fault without
        // the prefault thread.
        for _ in 0..1024 {
            log.append(&record).unwrap();
        }
        let faults = faults_of_this_thread() - before;
        assert!(
            faults < 16,
            "{faults} page faults appending 512 KiB into a populated window"
        );
        // Every record is intact.
        let mut at = log.head();
        let mut n = 0;
        while let Some((payload, next)) = log.read(at) {
            assert!(n == 0 || payload == record);
            at = next;
            n += 1;
        }
        assert_eq!(n, 1025);
    }

    #[test]
    fn cursor_persists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cursors")).unwrap();
        let mut c = Cursor::open(dir.path(), "ns/t", 42, Durability::Append).unwrap();
        assert_eq!(c.get(), 42);
        c.set(99).unwrap();
        drop(c);
        let c = Cursor::open(dir.path(), "ns/t", 0, Durability::Append).unwrap();
        assert_eq!(c.get(), 99);
    }
}
