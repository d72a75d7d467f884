//! The running side: the newest generation's journal, and the hooks the write-family
//! syscalls call before they change a file.
//!
//! Every task of the job writes through the same journal, so it belongs to the job's
//! kernel (`Kernel::files_journal`), behind a mutex, rather than to any task.

use super::{append, encode, tail_crc, Entry, FilesInfo, Mode, Policy, Record, BLOCK, JOURNAL};
use crate::kernel::files::OpenFile;
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// (st_dev, st_ino) of a file on this host.
type Key = (u64, u64);

#[derive(Debug, Clone)]
struct Tracked {
    id: u32,
    /// Size at the generation: bytes from here on are the job's appends.
    size: u64,
    /// Blocks whose contents at the generation are saved in the journal.
    saved: BTreeSet<u64>,
    /// Marked changed beyond undoing: nothing more to record.
    changed: bool,
    stdio: bool,
}

struct Active {
    policy: Policy,
    generation: u64,
    path: PathBuf,
    file: File,
    files: HashMap<Key, Tracked>,
    next_id: u32,
    saved_bytes: u64,
}

/// The job's file journal: the policy for the generations it takes, and the newest
/// generation's journal being kept.
pub struct FileJournal {
    policy: Mutex<Policy>,
    active: Mutex<Option<Active>>,
    file_order: [Mutex<()>; 64],
}

impl Default for FileJournal {
    fn default() -> Self {
        FileJournal {
            policy: Mutex::new(Policy::default()),
            active: Mutex::new(None),
            file_order: [const { Mutex::new(()) }; 64],
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FileJournal {
    /// Sets the policy for the generations the job takes.
    pub fn set_policy(&self, policy: Policy) {
        *lock(&self.policy) = policy;
    }

    pub fn policy(&self) -> Policy {
        *lock(&self.policy)
    }

    /// Whether writes are being journaled (some generation exists and the policy keeps
    /// anything); the hooks do nothing otherwise.
    pub fn is_active(&self) -> bool {
        lock(&self.active).is_some()
    }
}

fn fstat(fd: RawFd) -> Option<libc::stat> {
    // SAFETY: fstat into a local struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st)
}

fn is_regular(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

/// A regular file with a name: one deleted while open (a POSIX semaphore or shared
/// memory object, a scratch file) has no path a restore could bring back, and the
/// kernel layer's checkpoint carries what the job can still reach of it.
fn is_journaled(st: &libc::stat) -> bool {
    is_regular(st) && st.st_nlink > 0
}

/// (st_dev, st_ino) of vmctl's own standard output and error where they are regular
/// files. A file is one of the job's standard streams whichever description the job
/// writes it through (its processes inherit vmctl's; `>> /dev/stdout` opens another).
fn own_streams() -> &'static [Key] {
    static STREAMS: std::sync::OnceLock<Vec<Key>> = std::sync::OnceLock::new();
    STREAMS.get_or_init(|| {
        [1, 2]
            .into_iter()
            .filter_map(fstat)
            .filter(is_regular)
            .map(|st| (st.st_dev, st.st_ino))
            .collect()
    })
}

fn fd_path(fd: RawFd) -> PathBuf {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

/// A `File` view of a descriptor vmctl owns elsewhere, never closed by this view.
fn borrowed(fd: RawFd) -> std::mem::ManuallyDrop<File> {
    // SAFETY: the descriptor stays open for the life of the view (the caller holds it),
    // and ManuallyDrop keeps the view from closing it.
    std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}

/// Reads of the file open as `fd`: through it, or, when it was opened write-only,
/// through a read-only descriptor of the same file.
enum Reader {
    Same(std::mem::ManuallyDrop<File>),
    Own(File),
}

impl std::ops::Deref for Reader {
    type Target = File;
    fn deref(&self) -> &File {
        match self {
            Reader::Same(f) => f,
            Reader::Own(f) => f,
        }
    }
}

fn reader(fd: RawFd) -> std::io::Result<Reader> {
    // SAFETY: a query on a descriptor the caller holds.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags >= 0 && flags & libc::O_ACCMODE != libc::O_WRONLY {
        return Ok(Reader::Same(borrowed(fd)));
    }
    File::open(format!("/proc/self/fd/{fd}")).map(Reader::Own)
}

/// Which part of a file a change touches.
enum Change {
    /// Bytes [offset, offset+len).
    Write { offset: u64, len: u64 },
    /// Everything from `offset` on (truncation, collapsing or inserting a range).
    From { offset: u64 },
    /// Space allocated, data unchanged: only the file's size may grow.
    Grow,
    /// Mapped shared and writable: from now on the guest's stores reach the file
    /// without vmctl seeing them.
    MappedWritable,
}

impl Active {
    fn durable(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        append(&mut self.file, bytes)?;
        self.file.sync_data()
    }

    /// The journal can no longer say how to undo the job's changes: it is renamed
    /// aside, so restoring this generation (or an older one) is refused rather than
    /// silently wrong, and nothing more is recorded until the next generation.
    fn fail(self, e: std::io::Error) {
        let aside = self.path.with_extension("journal.incomplete");
        let _ = std::fs::rename(&self.path, &aside);
        eprintln!(
            "vmctl: warning: cannot record the job's file changes in {}: {e}; generation {} and older ones can no longer be restored; the next checkpoint starts afresh",
            self.path.display(),
            self.generation
        );
    }

    fn add_file(&mut self, fd: RawFd, st: &libc::stat, stdio: bool) -> std::io::Result<Key> {
        let key = (st.st_dev, st.st_ino);
        let size = st.st_size as u64;
        let id = self.next_id;
        self.next_id += 1;
        let record = Record::File {
            id,
            path: fd_path(fd),
            dev: st.st_dev,
            ino: st.st_ino,
            size,
            // A standard stream is never cut back to a size, so needs no check of it.
            tail_crc32: if stdio {
                0
            } else {
                tail_crc(&*reader(fd)?, size)?
            },
            stdio,
        };
        self.durable(&encode(&record, &[]))?;
        self.files.insert(
            key,
            Tracked {
                id,
                size,
                saved: BTreeSet::new(),
                changed: false,
                stdio,
            },
        );
        Ok(key)
    }

    fn mark_changed(&mut self, key: Key, what: String) -> std::io::Result<()> {
        let t = self.files.get_mut(&key).expect("tracked");
        t.changed = true;
        let id = t.id;
        self.durable(&encode(&Record::Changed { id, what }, &[]))
    }

    /// Records what undoing `change` to the regular file open as `fd` (`st` its
    /// status) will need, before it is made. For a write to a standard stream, returns
    /// the file's id in the `Wrote` record made.
    fn before(
        &mut self,
        fd: RawFd,
        st: &libc::stat,
        stdio: bool,
        change: Change,
    ) -> std::io::Result<Option<u32>> {
        let key = (st.st_dev, st.st_ino);
        if !self.files.contains_key(&key) {
            self.add_file(fd, st, stdio)?;
        }
        let t = self.files[&key].clone();
        if t.changed {
            return Ok(None);
        }
        if let (Change::MappedWritable, false) = (&change, t.stdio) {
            if self.policy.mode != Mode::Journal || t.size > MAPPED_COPY_MAX {
                self.mark_changed(
                    key,
                    format!("mapped shared and writable (keeping a copy needs --files=journal and at most {MAPPED_COPY_MAX} bytes)"),
                )?;
                return Ok(None);
            }
            self.save(fd, key, 0, t.size)?;
            return Ok(None);
        }
        let (lo, hi) = match change {
            Change::Write { offset, len } => (offset, offset.saturating_add(len)),
            Change::From { offset } => (offset, u64::MAX),
            // Recorded with its size above; a restore cuts the growth back.
            Change::Grow | Change::MappedWritable => return Ok(None),
        };
        if t.stdio {
            // Another writer may share the file: what is undone is exactly the job's
            // own bytes, so each write's place is recorded. Not synced: this survives
            // vmctl being killed; a crash of the whole node loses the file's own
            // unsynced tail alike.
            if let Change::Write { offset, len } = change {
                self.record_stream(&Record::Wrote {
                    id: t.id,
                    offset,
                    len,
                })?;
                return Ok(Some(t.id));
            }
            return Ok(None);
        }
        let below = hi.min(t.size);
        if self.policy.mode == Mode::Refuse {
            self.mark_changed(key, format!("written at byte {lo}"))?;
            return Ok(None);
        }
        if lo >= below {
            return Ok(None);
        }
        if self.policy.mode == Mode::Truncate {
            self.mark_changed(
                key,
                format!(
                    "overwritten at byte {lo}, below its size {} at the checkpoint",
                    t.size
                ),
            )?;
            return Ok(None);
        }
        self.save(fd, key, lo, below)?;
        Ok(None)
    }

    fn record_stream(&mut self, record: &Record) -> std::io::Result<()> {
        append(&mut self.file, &encode(record, &[]))
    }

    /// Saves the blocks of [lo, hi) not saved yet, as they are now (that is, as at the
    /// generation: the job has not changed them since).
    fn save(&mut self, fd: RawFd, key: Key, lo: u64, hi: u64) -> std::io::Result<()> {
        let t = &self.files[&key];
        let (id, size) = (t.id, t.size);
        let missing: Vec<u64> = (lo / BLOCK..hi.div_ceil(BLOCK))
            .filter(|b| !t.saved.contains(b))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let bytes: u64 = missing.len() as u64 * BLOCK;
        if self.saved_bytes + bytes > self.policy.budget {
            return self.mark_changed(
                key,
                format!(
                    "overwritten at byte {lo} after more than {} bytes of overwritten data were saved (raise journal:SIZE)",
                    self.policy.budget
                ),
            );
        }
        let file = reader(fd)?;
        let mut out = Vec::new();
        // Contiguous runs of missing blocks, each saved in records of bounded size.
        let mut i = 0;
        while i < missing.len() {
            let mut j = i + 1;
            while j < missing.len()
                && missing[j] == missing[j - 1] + 1
                && (j - i) as u64 * BLOCK < super::MAX_SAVED_PER_RECORD
            {
                j += 1;
            }
            let start = missing[i] * BLOCK;
            let end = ((missing[j - 1] + 1) * BLOCK).min(size);
            let mut data = vec![0u8; (end - start) as usize];
            let got = read_upto(&file, &mut data, start)?;
            data.truncate(got);
            out.extend(encode(
                &Record::Saved {
                    id,
                    offset: start,
                    len: got as u64,
                },
                &data,
            ));
            i = j;
        }
        self.durable(&out)?;
        self.saved_bytes += bytes;
        let t = self.files.get_mut(&key).expect("tracked");
        t.saved.extend(missing);
        Ok(())
    }
}

/// Reads up to `buf.len()` bytes at `offset`, fewer at end of file.
fn read_upto(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Changes to one file are made one at a time while the journal is kept, each with
/// its record: the job's processes and threads run on host threads of their own and
/// may write to the same file (an inherited standard output, a log) at once. Two
/// writes through one shared offset could otherwise both be recorded at the same
/// place, or one save the blocks the other is about to overwrite too late. Files
/// share these locks by their inode; Linux itself takes a lock per inode for each
/// write, so little concurrency is lost.
impl FileJournal {
    fn file_order(&self, key: Key) -> std::sync::MutexGuard<'_, ()> {
        let slot =
            (key.0.wrapping_mul(31).wrapping_add(key.1) % self.file_order.len() as u64) as usize;
        lock(&self.file_order[slot])
    }
}

/// A change to a file the journal has recorded and the caller is about to make.
/// Until it is dropped, other changes to the same file wait: drop it (or pass it
/// to `written`) once the change is made.
#[must_use = "hold it while the change is made"]
pub struct Pending<'a> {
    _order: std::sync::MutexGuard<'a, ()>,
    stream: Option<StreamWrite>,
}

/// A write to a standard stream as recorded: checked against where it landed.
struct StreamWrite {
    fd: RawFd,
    id: u32,
    offset: u64,
    len: u64,
    positional: bool,
    append: bool,
}

impl FileJournal {
    /// Records what undoing the change `change` works out (from the file open as `fd`)
    /// will need, and returns with the file's other changes held back until the caller
    /// has made it. None if the journal is not kept or `fd` is not a regular file.
    fn begin(
        &self,
        fd: RawFd,
        stdio: bool,
        change: impl FnOnce(RawFd) -> Option<(Change, Option<StreamWrite>)>,
    ) -> Option<Pending<'_>> {
        if !self.is_active() {
            return None;
        }
        let st = fstat(fd).filter(is_journaled)?;
        let key = (st.st_dev, st.st_ino);
        let order = self.file_order(key);
        let mut guard = lock(&self.active);
        let active = guard.as_mut()?;
        // Worked out only now: no other write of the job moves the file's end or the
        // shared offset until this one is made.
        let (change, stream) = change(fd)?;
        let stdio = stdio || own_streams().contains(&key);
        match active.before(fd, &st, stdio, change) {
            Ok(recorded) => Some(Pending {
                _order: order,
                stream: recorded.and_then(|id| stream.map(|s| StreamWrite { id, ..s })),
            }),
            Err(e) => {
                if let Some(a) = guard.take() {
                    a.fail(e);
                }
                None
            }
        }
    }

    /// Before the job writes `len` bytes to `file` at `offset` (None: at its current
    /// position, or at the end for O_APPEND). Make the write, then call `written`.
    pub fn before_write(
        &self,
        file: &OpenFile,
        offset: Option<u64>,
        len: u64,
    ) -> Option<Pending<'_>> {
        self.begin(file.raw(), file.stdio.is_some(), |fd| {
            // SAFETY: queries on a descriptor the caller holds.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
            let append = flags >= 0 && flags & libc::O_APPEND != 0;
            // Linux writes at the end of an O_APPEND file even with an offset.
            let at = if append {
                fstat(fd)?.st_size as u64
            } else {
                match offset {
                    Some(o) => o,
                    // SAFETY: as above.
                    None => u64::try_from(unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) }).ok()?,
                }
            };
            let stream = StreamWrite {
                fd,
                // Set once recorded.
                id: 0,
                offset: at,
                len,
                positional: offset.is_some(),
                append,
            };
            Some((Change::Write { offset: at, len }, Some(stream)))
        })
    }

    /// After the write `before_write` recorded was made, with the bytes it wrote (None
    /// if it failed). The place of a write to a standard stream was foretold: if the
    /// write landed elsewhere (something outside the job appended to the file meanwhile)
    /// or wrote less, the record is corrected.
    pub fn written(&self, pending: Option<Pending<'_>>, result: &crate::kernel::SysResult) {
        let Some(Pending {
            _order,
            stream: Some(s),
        }) = pending
        else {
            return;
        };
        let wrote = result.map_or(0, |n| n.max(0) as u64).min(s.len);
        let landed = if wrote == 0 {
            None
        } else if s.append && s.positional {
            // pwrite on O_APPEND moves no offset: the file's end is the write's end.
            fstat(s.fd).map(|st| (st.st_size as u64).saturating_sub(wrote))
        } else if s.positional {
            Some(s.offset)
        } else {
            // SAFETY: a query on a descriptor the caller holds.
            u64::try_from(unsafe { libc::lseek(s.fd, 0, libc::SEEK_CUR) })
                .ok()
                .map(|end| end.saturating_sub(wrote))
        };
        if landed == Some(s.offset) && wrote == s.len {
            return;
        }
        let mut guard = lock(&self.active);
        let Some(active) = guard.as_mut() else { return };
        let mut result = active.record_stream(&Record::NotWritten {
            id: s.id,
            offset: s.offset,
            len: s.len,
        });
        if let (Ok(()), Some(offset)) = (&result, landed) {
            result = active.record_stream(&Record::Wrote {
                id: s.id,
                offset,
                len: wrote,
            });
        }
        if let Err(e) = result {
            if let Some(a) = guard.take() {
                a.fail(e);
            }
        }
    }

    /// Before the job truncates `file` to `len` bytes; make it while this is held.
    pub fn before_truncate(&self, file: &OpenFile, len: u64) -> Option<Pending<'_>> {
        self.before_truncate_fd(file.raw(), file.stdio.is_some(), len)
    }

    /// Before a truncation of the file open (by vmctl) as `fd`.
    pub fn before_truncate_fd(&self, fd: RawFd, stdio: bool, len: u64) -> Option<Pending<'_>> {
        self.begin(fd, stdio, |_| Some((Change::From { offset: len }, None)))
    }

    /// Before `fallocate(file, mode, offset, len)`; make it while this is held.
    pub fn before_fallocate(
        &self,
        file: &OpenFile,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> Option<Pending<'_>> {
        self.begin(file.raw(), file.stdio.is_some(), |_| {
            let change =
                if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
                    Change::From { offset }
                } else if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                    Change::Write { offset, len }
                } else {
                    Change::Grow
                };
            Some((change, None))
        })
    }

    /// Before the job maps the file open as `fd` shared and writable.
    pub fn before_shared_writable_map(&self, fd: RawFd) {
        drop(self.begin(fd, false, |_| Some((Change::MappedWritable, None))));
    }
}

/// A generation's journal, made while the guest is frozen for a checkpoint, written
/// into the generation by the checkpoint writer, and kept from then on by `activate`.
pub struct Prepared {
    pub info: FilesInfo,
    pub bytes: Vec<u8>,
    generation: u64,
    policy: Policy,
    files: HashMap<Key, Tracked>,
}

/// How the job holds a file at a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Through a descriptor (recorded if open for writing).
    Descriptor,
    /// Through one of its standard streams.
    Stdio,
    /// Mapped shared and writable: the guest's stores reach the file without vmctl
    /// seeing them, so the whole file is copied into the generation.
    SharedWritable,
}

/// Mapped files larger than this are not copied: restoring such a generation is
/// refused instead.
pub const MAPPED_COPY_MAX: u64 = 64 << 20;

impl FileJournal {
    /// Records the regular files among `held` (host descriptor, how the job holds it) that
    /// the job can write. None under the `none` policy.
    pub fn prepare(
        &self,
        generation: u64,
        held: impl IntoIterator<Item = (RawFd, Held)>,
    ) -> Option<Prepared> {
        let policy = self.policy();
        if policy.mode == Mode::None {
            return None;
        }
        let follows = lock(&self.active).as_ref().map(|a| a.generation);
        let mut bytes = encode(
            &Record::Header {
                generation,
                follows,
                policy: policy.to_string(),
            },
            &[],
        );
        let mut files: HashMap<Key, Tracked> = HashMap::new();
        // Mapped files first: their record carries the copy.
        let mut held: Vec<(RawFd, Held)> = held.into_iter().collect();
        held.sort_by_key(|&(_, h)| h != Held::SharedWritable);
        for (fd, how) in held {
            // SAFETY: queries on a descriptor the job's table holds.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
            if flags < 0
                || (flags & libc::O_ACCMODE == libc::O_RDONLY && how != Held::SharedWritable)
            {
                continue;
            }
            let Some(st) = fstat(fd) else { continue };
            let key = (st.st_dev, st.st_ino);
            if !is_journaled(&st) || files.contains_key(&key) {
                continue;
            }
            let stdio = how == Held::Stdio || own_streams().contains(&key);
            let size = st.st_size as u64;
            let tail = if stdio {
                Ok(0)
            } else {
                reader(fd).and_then(|r| tail_crc(&r, size))
            };
            let id = files.len() as u32;
            bytes.extend(encode(
                &Record::File {
                    id,
                    path: fd_path(fd),
                    dev: st.st_dev,
                    ino: st.st_ino,
                    size,
                    tail_crc32: *tail.as_ref().unwrap_or(&0),
                    stdio,
                },
                &[],
            ));
            // Unreadable to vmctl (a write-only mode): nothing could be saved, so a restore
            // refuses this generation rather than guess.
            let mut saved = BTreeSet::new();
            let changed = if let Err(e) = &tail {
                let what =
                    format!("cannot be read by vmctl ({e}), so its changes cannot be undone");
                bytes.extend(encode(&Record::Changed { id, what }, &[]));
                true
            } else if how == Held::SharedWritable {
                match copy_whole(fd, id, size) {
                    Ok(Some(copy)) => {
                        bytes.extend(copy);
                        saved.extend(0..size.div_ceil(BLOCK));
                        false
                    }
                    Ok(None) => {
                        let what = format!("mapped shared and writable, and larger than the {MAPPED_COPY_MAX} bytes a generation copies of such a file");
                        bytes.extend(encode(&Record::Changed { id, what }, &[]));
                        true
                    }
                    Err(e) => {
                        let what =
                            format!("mapped shared and writable, and cannot be copied ({e})");
                        bytes.extend(encode(&Record::Changed { id, what }, &[]));
                        true
                    }
                }
            } else {
                false
            };
            files.insert(
                key,
                Tracked {
                    id,
                    size,
                    saved,
                    changed,
                    stdio,
                },
            );
        }
        Some(Prepared {
            info: FilesInfo {
                policy: policy.to_string(),
                journal: JOURNAL.into(),
            },
            bytes,
            generation,
            policy,
            files,
        })
    }
}

/// Saved records holding the whole file, or None if it is too large to copy.
fn copy_whole(fd: RawFd, id: u32, size: u64) -> std::io::Result<Option<Vec<u8>>> {
    if size > MAPPED_COPY_MAX {
        return Ok(None);
    }
    let file = reader(fd)?;
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(super::MAX_SAVED_PER_RECORD);
        let mut data = vec![0u8; len as usize];
        file.read_exact_at(&mut data, offset)?;
        out.extend(encode(&Record::Saved { id, offset, len }, &data));
        offset += len;
    }
    Ok(Some(out))
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().append(true).open(path)
}

impl FileJournal {
    /// The generation written from `prepared` is complete in `gen_dir`: the job's changes
    /// from now on are recorded in its journal.
    pub fn activate(&self, prepared: Prepared, gen_dir: &Path) {
        let path = gen_dir.join(JOURNAL);
        let mut guard = lock(&self.active);
        match open_append(&path) {
            Ok(file) => {
                *guard = Some(Active {
                    policy: prepared.policy,
                    generation: prepared.generation,
                    path,
                    next_id: prepared.files.len() as u32,
                    files: prepared.files,
                    file,
                    saved_bytes: 0,
                });
            }
            Err(e) => {
                *guard = None;
                eprintln!(
                "vmctl: warning: {}: {e}; the job's file changes after generation {} are not recorded, so it cannot be restored",
                path.display(),
                prepared.generation
            );
            }
        }
    }
}

impl FileJournal {
    /// After a restore of `generation` (whose journal's records are `entries`) brought the
    /// files back: the job goes on from it, so its journal is kept again.
    pub fn resume(&self, gen_dir: &Path, generation: u64, entries: &[Entry]) -> Result<(), String> {
        let policy = self.policy();
        if policy.mode == Mode::None {
            return Ok(());
        }
        let path = gen_dir.join(JOURNAL);
        let mut file = open_append(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut by_id: HashMap<u32, Key> = HashMap::new();
        let mut files: HashMap<Key, Tracked> = HashMap::new();
        let mut next_id = 0;
        for e in entries {
            match &e.record {
                Record::File {
                    id,
                    path,
                    ino,
                    size,
                    stdio,
                    ..
                } => {
                    next_id = next_id.max(id + 1);
                    // The restore checked the inode; the device number is this host's.
                    let key = if *stdio {
                        own_streams().iter().copied().find(|k| k.1 == *ino)
                    } else {
                        std::fs::metadata(path).ok().map(|m| {
                            use std::os::unix::fs::MetadataExt;
                            (m.dev(), m.ino())
                        })
                    };
                    let Some(key) = key.filter(|k| k.1 == *ino) else {
                        continue;
                    };
                    by_id.insert(*id, key);
                    files.entry(key).or_insert(Tracked {
                        id: *id,
                        size: *size,
                        saved: BTreeSet::new(),
                        changed: false,
                        stdio: *stdio,
                    });
                }
                Record::Saved { id, offset, len } => {
                    if let Some(t) = by_id.get(id).and_then(|k| files.get_mut(k)) {
                        t.saved.extend(
                            offset / BLOCK..(offset + len).div_ceil(BLOCK).max(offset / BLOCK + 1),
                        );
                    }
                }
                Record::Changed { id, .. } => {
                    if let Some(t) = by_id.get(id).and_then(|k| files.get_mut(k)) {
                        t.changed = true;
                    }
                }
                _ => {}
            }
        }
        let bytes = encode(&Record::Resumed, &[]);
        append(&mut file, &bytes)
            .and_then(|_| file.sync_data())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        *lock(&self.active) = Some(Active {
            policy,
            generation,
            path,
            file,
            files,
            next_id,
            saved_bytes: 0,
        });
        Ok(())
    }
}

impl FileJournal {
    /// The descriptor behind a guest's `truncate(path)`, opened only to learn and save
    /// what the truncation will cut. None if nothing is being journaled.
    pub fn open_for_truncate(&self, path: &std::ffi::CStr) -> Option<File> {
        if !self.is_active() {
            return None;
        }
        // Only a regular file is truncated: opening a FIFO would wait for a writer, and
        // opening a device can act on it. O_NONBLOCK covers a swap after the check.
        let st = std::fs::metadata(std::ffi::OsStr::from_bytes(path.to_bytes())).ok()?;
        if !st.file_type().is_file() {
            return None;
        }
        // SAFETY: open with a valid C string; the result is owned below.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        // SAFETY: `fd` was just opened and nothing else owns it.
        (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
    }
}
