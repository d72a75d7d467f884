//! The kernel layer's part of a checkpoint: every process and thread of the job and
//! everything about them that lives in vmctl rather than in guest memory, and how
//! to rebuild it in a new vmctl.
//!
//! Objects that processes share (an address space after vfork, a descriptor table,
//! an open file description after dup or fork, a pipe) are stored once and named by
//! their index, so that the sharing comes back on restore: two descriptors that
//! shared an offset still share it.

use super::files::{FdEntry, FdTable, OpenFile};
use super::freeze::TaskSnapshot;
use super::fs_context::FsContext;
use super::mm::{
    AddressSpace, Backing, Commit, FrameAllocator, MappedFile, SharedRegion, SharedRegions,
};
use super::pids::PidTable;
use super::signals::ThreadSignals;
use super::task::{Task, TaskHandle};
use super::thread_group::{Life, Resources, TgState, ThreadGroup};
use super::vdso::{host_clock, GuestClocks, ModelClock, SavedClocks, VdsoFrames};
use super::{dup_stdio, Kernel};
use crate::machine::{GuestMemory, MachineError, Vm};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("{0}")]
    File(String),
    #[error(transparent)]
    Machine(#[from] MachineError),
}

/// An open file description.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FileState {
    /// One of vmctl's standard streams: rebound to the restoring vmctl's own.
    Stdio { stream: i32 },
    /// A file or directory reopened by path at the same offset and mode.
    Path {
        path: PathBuf,
        flags: i32,
        offset: i64,
        size: u64,
        directory: bool,
    },
    /// One end of a pipe the job made; its contents are in `KernelState::pipes`.
    Pipe {
        pipe: usize,
        write: bool,
        flags: i32,
    },
    /// Something that cannot be reopened (socket, deleted file, event descriptor):
    /// restored as /dev/null with a warning.
    Lost { what: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FdState {
    pub fd: i32,
    pub file: usize,
    pub cloexec: bool,
}

/// Bytes in flight in a pipe at the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipeState {
    /// Hex, to keep the manifest text.
    pub data: String,
    pub capacity: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FsState {
    pub cwd: PathBuf,
    pub umask: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionState {
    pub gpa: u64,
    pub slot: u32,
    pub len: u64,
    pub file_offset: u64,
    pub writable: bool,
    pub path: PathBuf,
    /// The file's bytes, hex, when it was deleted while mapped (a POSIX semaphore
    /// or shared memory object unlinked after mmap, as Python's multiprocessing
    /// does): it is recreated as an anonymous file.
    #[serde(default)]
    pub deleted_contents: Option<String>,
}

/// Largest deleted-but-mapped file a checkpoint carries.
const MAX_DELETED_MAPPED: u64 = 16 << 20;

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// The contents of a mapped file that no longer has a name.
fn deleted_file_contents(f: &std::fs::File) -> Option<String> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let md = f.metadata().ok()?;
    if md.nlink() != 0 || md.size() > MAX_DELETED_MAPPED {
        return None;
    }
    let mut data = vec![0u8; md.size() as usize];
    f.read_exact_at(&mut data, 0).ok()?;
    Some(hex(&data))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessState {
    pub tgid: i32,
    #[serde(flatten)]
    pub state: TgState,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskState {
    #[serde(flatten)]
    pub snapshot: TaskSnapshot,
    pub mm: usize,
    pub files: usize,
    pub fs: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KernelState {
    pub frames: FrameAllocator,
    pub commit_limit: u64,
    pub regions: Vec<RegionState>,
    pub address_spaces: Vec<AddressSpace>,
    pub files: Vec<FileState>,
    pub pipes: Vec<PipeState>,
    pub fd_tables: Vec<Vec<FdState>>,
    pub fs_contexts: Vec<FsState>,
    pub processes: Vec<ProcessState>,
    pub tasks: Vec<TaskState>,
    pub next_pid: i32,
    pub root_pid: i32,
    /// The guest's CLOCK_MONOTONIC when the checkpoint was taken.
    pub monotonic_ns: i64,
    /// All the guest's monotonic clocks (absent from checkpoints made before the
    /// vDSO: those carry CLOCK_MONOTONIC's offset over to the others).
    #[serde(default)]
    pub clocks: Option<SavedClocks>,
    /// The vDSO's frames, which every address space maps; absent from checkpoints
    /// made before vmctl had one.
    #[serde(default)]
    pub vdso: Option<VdsoFrames>,
    /// The TSC the guest would have read when the checkpoint was taken.
    pub tsc: u64,
}

/// The files a frozen job holds (`Kernel::held_files`): host descriptors and how the
/// job holds each, kept open for as long as this lives.
pub struct HeldFiles {
    pub list: Vec<(RawFd, crate::filejournal::track::Held)>,
    _open: Vec<Arc<OpenFile>>,
    _mapped: Vec<Arc<MappedFile>>,
}

/// Numbers objects by identity, in the order they are first seen.
struct Ids<T> {
    ids: HashMap<usize, usize>,
    items: Vec<Arc<T>>,
}

impl<T> Ids<T> {
    fn new() -> Self {
        Ids {
            ids: HashMap::new(),
            items: Vec::new(),
        }
    }

    fn id(&mut self, a: &Arc<T>) -> usize {
        let key = Arc::as_ptr(a) as usize;
        *self.ids.entry(key).or_insert_with(|| {
            self.items.push(a.clone());
            self.items.len() - 1
        })
    }
}

fn host_fd_path(fd: RawFd) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()
}

fn fstat(fd: RawFd) -> Option<libc::stat> {
    // SAFETY: fstat into a local struct on a descriptor we hold.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st)
}

fn access_flags(fd: RawFd) -> i32 {
    // SAFETY: F_GETFL only queries a descriptor we hold.
    unsafe { libc::fcntl(fd, libc::F_GETFL) }
}

/// Copies what a pipe holds without taking it out (tee), through its read end.
fn peek_pipe(read_end: RawFd) -> PipeState {
    // SAFETY: plain fcntl and pipe calls on descriptors we hold or create here; the
    // temporary pipe is closed by OwnedFd.
    unsafe {
        let capacity = libc::fcntl(read_end, libc::F_GETPIPE_SZ).max(4096);
        let mut fds = [0; 2];
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) != 0 {
            return PipeState {
                data: String::new(),
                capacity,
            };
        }
        let (r, w) = (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]));
        libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, capacity);
        let n = libc::tee(
            read_end,
            w.as_raw_fd(),
            capacity as usize,
            libc::SPLICE_F_NONBLOCK,
        );
        let mut data = vec![0u8; n.max(0) as usize];
        let mut got = 0;
        while got < data.len() {
            let m = libc::read(
                r.as_raw_fd(),
                data[got..].as_mut_ptr() as *mut _,
                data.len() - got,
            );
            if m <= 0 {
                break;
            }
            got += m as usize;
        }
        data.truncate(got);
        PipeState {
            data: hex(&data),
            capacity,
        }
    }
}

/// The descriptions of open files, with pipes recognised by their inode.
struct FileCollector {
    ids: Ids<OpenFile>,
    states: Vec<FileState>,
    pipes: Vec<PipeState>,
    pipe_ids: HashMap<(u64, u64), usize>,
}

impl FileCollector {
    fn file(&mut self, f: &Arc<OpenFile>) -> usize {
        let before = self.ids.items.len();
        let id = self.ids.id(f);
        if id == before {
            let state = self.describe(f);
            self.states.push(state);
        }
        id
    }

    fn describe(&mut self, f: &OpenFile) -> FileState {
        if let Some(stream) = f.stdio {
            return FileState::Stdio { stream };
        }
        let h = f.raw();
        let Some(st) = fstat(h) else {
            return FileState::Lost {
                what: "unknown descriptor".into(),
            };
        };
        let fmt = st.st_mode & libc::S_IFMT;
        let flags = access_flags(h);
        if fmt == libc::S_IFIFO {
            let key = (st.st_dev, st.st_ino);
            let write = flags & libc::O_ACCMODE == libc::O_WRONLY;
            let pipe = match self.pipe_ids.get(&key) {
                Some(&p) => p,
                None => {
                    self.pipes.push(PipeState {
                        data: String::new(),
                        capacity: 0,
                    });
                    self.pipe_ids.insert(key, self.pipes.len() - 1);
                    self.pipes.len() - 1
                }
            };
            if !write && self.pipes[pipe].capacity == 0 {
                self.pipes[pipe] = peek_pipe(h);
            }
            return FileState::Pipe { pipe, write, flags };
        }
        let path = host_fd_path(h).or_else(|| f.path.clone());
        let deleted = path
            .as_ref()
            .is_some_and(|p| p.as_os_str().as_bytes().ends_with(b" (deleted)"));
        match (fmt, path) {
            (libc::S_IFREG | libc::S_IFDIR | libc::S_IFCHR | libc::S_IFBLK, Some(path))
                if !deleted && path.is_absolute() =>
            {
                // SAFETY: lseek on a descriptor we hold.
                let offset = unsafe { libc::lseek(h, 0, libc::SEEK_CUR) };
                FileState::Path {
                    path,
                    flags,
                    offset: offset.max(0),
                    size: if fmt == libc::S_IFREG {
                        st.st_size as u64
                    } else {
                        0
                    },
                    directory: fmt == libc::S_IFDIR,
                }
            }
            (_, p) => FileState::Lost {
                what: match fmt {
                    libc::S_IFSOCK => "socket".into(),
                    _ if deleted => format!(
                        "deleted file {}",
                        p.map(|p| p.display().to_string()).unwrap_or_default()
                    ),
                    _ => p
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "special descriptor".into()),
                },
            },
        }
    }
}

fn regions_of(mms: &[AddressSpace], out: &mut Vec<RegionState>) {
    for mm in mms {
        for v in mm.vmas.values() {
            let Backing::File {
                file,
                region: Some(r),
                ..
            } = &v.backing
            else {
                continue;
            };
            if !out.iter().any(|x| x.gpa == r.gpa) {
                out.push(RegionState {
                    gpa: r.gpa,
                    slot: r.slot,
                    len: r.len,
                    file_offset: r.file_offset,
                    writable: r.writable,
                    path: file.path.clone(),
                    deleted_contents: file.file.as_ref().and_then(deleted_file_contents),
                });
            }
        }
    }
}

impl Kernel {
    /// Every file the job holds, each once however many descriptors, processes and
    /// mappings share it, and how, for the file journal (crate::filejournal) to record
    /// at a checkpoint. Call with the job frozen.
    pub fn held_files(&self) -> HeldFiles {
        use crate::filejournal::track::Held;
        let handles: Vec<_> = self
            .pids
            .lock()
            .expect("pids poisoned")
            .tasks
            .values()
            .cloned()
            .collect();
        let mut tables: Ids<Mutex<FdTable>> = Ids::new();
        let mut mms: Ids<Mutex<AddressSpace>> = Ids::new();
        for res in handles.iter().filter_map(|h| h.try_resources()) {
            tables.id(&res.files);
            mms.id(&res.mm);
        }
        let mut open: Ids<OpenFile> = Ids::new();
        for t in &tables.items {
            for (_, e) in t.lock().expect("fd table poisoned").iter() {
                open.id(&e.file);
            }
        }
        let mut held = HeldFiles {
            list: open
                .items
                .iter()
                .map(|f| {
                    let how = if f.stdio.is_some() {
                        Held::Stdio
                    } else {
                        Held::Descriptor
                    };
                    (f.raw(), how)
                })
                .collect(),
            _open: open.items,
            _mapped: Vec::new(),
        };
        let mut mapped: Ids<MappedFile> = Ids::new();
        for mm in &mms.items {
            for v in mm.lock().expect("address space poisoned").vmas.values() {
                if let Backing::File {
                    file,
                    region: Some(r),
                    ..
                } = &v.backing
                {
                    if v.shared && r.writable {
                        mapped.id(file);
                    }
                }
            }
        }
        for m in mapped.items {
            if let Some(f) = &m.file {
                held.list.push((f.as_raw_fd(), Held::SharedWritable));
                held._mapped.push(m.clone());
            }
        }
        held
    }

    /// Captures the kernel layer of a frozen job (every task parked, `tasks` their
    /// states).
    pub fn snapshot(&self, tasks: Vec<TaskSnapshot>) -> KernelState {
        self.shared.lock().expect("shared poisoned").msync_all();
        // The model's values now: no read the frozen guest made can exceed them.
        let clocks = self.clocks.save();
        let pids = self.pids.lock().expect("pids poisoned");
        let mut mms: Ids<Mutex<AddressSpace>> = Ids::new();
        let mut tables: Ids<Mutex<FdTable>> = Ids::new();
        let mut fss: Ids<Mutex<FsContext>> = Ids::new();
        let mut task_states = Vec::new();
        for snap in tasks {
            let Some(res) = pids.task(snap.tid).and_then(|h| h.try_resources()) else {
                continue;
            };
            task_states.push(TaskState {
                mm: mms.id(&res.mm),
                files: tables.id(&res.files),
                fs: fss.id(&res.fs),
                snapshot: snap,
            });
        }
        let mut files = FileCollector {
            ids: Ids::new(),
            states: Vec::new(),
            pipes: Vec::new(),
            pipe_ids: HashMap::new(),
        };
        let fd_tables = tables
            .items
            .iter()
            .map(|t| {
                let t = t.lock().expect("fd table poisoned");
                t.iter()
                    .map(|(&fd, e)| FdState {
                        fd,
                        file: files.file(&e.file),
                        cloexec: e.cloexec,
                    })
                    .collect()
            })
            .collect();
        let address_spaces: Vec<AddressSpace> = mms
            .items
            .iter()
            .map(|m| m.lock().expect("address space poisoned").clone())
            .collect();
        let mut regions = Vec::new();
        regions_of(&address_spaces, &mut regions);
        let fs_contexts = fss
            .items
            .iter()
            .map(|f| {
                let f = f.lock().expect("fs context poisoned");
                FsState {
                    cwd: f.cwd_path(),
                    umask: f.umask,
                }
            })
            .collect();
        let processes = pids
            .groups
            .values()
            .map(|g| ProcessState {
                tgid: g.tgid,
                state: g.lock().clone(),
            })
            .collect();
        KernelState {
            frames: self.frames.lock().expect("frames poisoned").clone(),
            commit_limit: self.commit.limit(),
            regions,
            address_spaces,
            files: files.states,
            pipes: files.pipes,
            fd_tables,
            fs_contexts,
            processes,
            tasks: task_states,
            next_pid: pids.next,
            root_pid: pids.root,
            monotonic_ns: clocks.monotonic_ns,
            clocks: Some(clocks),
            vdso: self.host.vdso,
            tsc: crate::clock::host_tsc().wrapping_add(self.tsc_offset),
        }
    }

    /// Rebuilds the job from `state` on `vm`, whose RAM already holds the memory
    /// image. Returns the kernel and its tasks, ready to run.
    pub fn restore(vm: Vm, state: KernelState) -> Result<(Arc<Kernel>, Vec<Task>), RestoreError> {
        let mem: Arc<GuestMemory> = vm.memory().clone();
        let bad =
            |what: &str| RestoreError::File(format!("the kernel state is inconsistent: {what}"));
        // The manifest passed its checksum, but it must also fit the VM it describes.
        check_state(&state, mem.size()).map_err(|e| bad(&e))?;
        if !state.frames.fits(mem.size())
            || state.address_spaces.iter().any(|m| m.root >= mem.size())
        {
            return Err(bad(
                "it names guest memory beyond the checkpoint's RAM size",
            ));
        }
        let n_mm = state.address_spaces.len();
        if state.tasks.iter().any(|t| {
            t.mm >= n_mm || t.files >= state.fd_tables.len() || t.fs >= state.fs_contexts.len()
        }) || state
            .fd_tables
            .iter()
            .flatten()
            .any(|f| f.file >= state.files.len())
            || state
                .files
                .iter()
                .any(|f| matches!(f, FileState::Pipe { pipe, .. } if *pipe >= state.pipes.len()))
        {
            return Err(bad("an object index is out of range"));
        }
        if state.tasks.is_empty() || state.tasks.len() > super::MAX_TASKS {
            return Err(bad("no task, or more than vmctl can run"));
        }
        check_kernel_mappings(&state)?;
        check_clocks(&state)?;
        // The image is in guest RAM already; KVM needs memslots up to where it reaches.
        mem.ensure_backed(state.frames.high_water())
            .map_err(|e| RestoreError::File(format!("cannot expose guest RAM to KVM: {e}")))?;

        let mut shared = SharedRegions::default();
        let mut regions: HashMap<u64, Arc<SharedRegion>> = HashMap::new();
        // Files that were deleted while mapped come back as anonymous files, one per
        // path, shared by every mapping of them.
        let mut recreated: HashMap<PathBuf, Arc<OwnedFd>> = HashMap::new();
        for r in &state.regions {
            if let Some(data) = &r.deleted_contents {
                if !recreated.contains_key(&r.path) {
                    recreated.insert(r.path.clone(), Arc::new(anonymous_file(&unhex(data))?));
                }
            }
        }
        for r in &state.regions {
            let file = match recreated.get(&r.path) {
                Some(f) => f.try_clone().map_err(|e| {
                    RestoreError::File(format!("cannot recreate a mapped file: {e}"))
                })?,
                None => open_for(
                    &r.path,
                    if r.writable {
                        libc::O_RDWR
                    } else {
                        libc::O_RDONLY
                    },
                )?,
            };
            let region = shared
                .create_at(
                    &vm,
                    file.as_raw_fd(),
                    r.file_offset,
                    r.len,
                    r.writable,
                    Some((r.gpa, r.slot)),
                )
                .map_err(|e| {
                    RestoreError::File(format!(
                        "{}: cannot map it again: {}",
                        r.path.display(),
                        std::io::Error::from_raw_os_error(e)
                    ))
                })?;
            regions.insert(r.gpa, region);
        }
        let mut mms = Vec::new();
        for mut mm in state.address_spaces {
            reopen_mapped_files(&mut mm, &recreated)?;
            attach_regions(&mut mm, &state.regions, &regions);
            mms.push(Arc::new(Mutex::new(mm)));
        }
        let pipes = make_pipes(&state.pipes)?;
        // A process started again (`--reexec`) loses its connections by design:
        // no warning for what only such processes had open.
        let reexecuted: std::collections::HashSet<i32> = state
            .processes
            .iter()
            .filter(|p| p.state.reexec.is_some() && p.state.life == Life::Running)
            .map(|p| p.tgid)
            .collect();
        // For each description, one process (pid and name) that warnings name.
        let mut holders: Vec<Option<String>> = vec![None; state.files.len()];
        for t in state
            .tasks
            .iter()
            .filter(|t| !reexecuted.contains(&t.snapshot.tgid))
        {
            for fd in &state.fd_tables[t.files] {
                holders[fd.file].get_or_insert_with(|| {
                    let comm = &t.snapshot.comm;
                    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
                    format!(
                        "process {} ({}, descriptor {})",
                        t.snapshot.tgid,
                        String::from_utf8_lossy(&comm[..len]),
                        fd.fd
                    )
                });
            }
        }
        let mut files = Vec::new();
        for (f, holder) in state.files.iter().zip(holders) {
            files.push(reopen_file(f, &pipes, holder.as_deref())?);
        }
        let tables: Vec<Arc<Mutex<FdTable>>> = state
            .fd_tables
            .iter()
            .map(|t| {
                let mut table = FdTable::default();
                for f in t {
                    table.install_at(
                        f.fd,
                        FdEntry {
                            file: files[f.file].clone(),
                            cloexec: f.cloexec,
                        },
                    );
                }
                Arc::new(Mutex::new(table))
            })
            .collect();
        let mut fss = Vec::new();
        for f in &state.fs_contexts {
            let ctx = FsContext::open(&f.cwd, f.umask).map_err(|e| {
                RestoreError::File(format!(
                    "{}: cannot return to the job's working directory: {e}",
                    f.cwd.display()
                ))
            })?;
            fss.push(Arc::new(Mutex::new(ctx)));
        }

        // The guest's TSC must not go backwards: on a host whose TSC is behind (another
        // node, or after a reboot), trap rdtsc and add the difference.
        // VMCTL_TEST_TSC_AHEAD pretends the checkpoint's TSC was that much further on,
        // so tests can exercise this path on a single host.
        let ahead: u64 = std::env::var("VMCTL_TEST_TSC_AHEAD")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let saved_tsc = state.tsc.saturating_add(ahead);
        let now_tsc = crate::clock::host_tsc();
        let (tsc_offset, tsc_trap) = if saved_tsc > now_tsc {
            (saved_tsc - now_tsc, true)
        } else {
            (0, false)
        };
        let mut pids = PidTable {
            next: state.next_pid,
            root: state.root_pid,
            ..Default::default()
        };
        for p in state.processes {
            pids.groups
                .insert(p.tgid, ThreadGroup::new(p.tgid, p.state));
        }
        let mut first_vcpu = Vec::new();
        let first_root = mms[state.tasks[0].mm]
            .lock()
            .expect("address space poisoned")
            .root;
        first_vcpu.push(vm.create_vcpu(0, first_root)?);
        let clean_fpu = first_vcpu[0]
            .capture()?
            .ok_or_else(|| MachineError::VcpuFailed("a new vCPU is not at a clean point".into()))?;
        // The guest's monotonic clocks continue from where they stopped.
        let saved = state.clocks.unwrap_or(SavedClocks {
            monotonic_ns: state.monotonic_ns,
            boottime_ns: state.monotonic_ns
                + (host_clock(libc::CLOCK_BOOTTIME) - crate::clock::monotonic_ns()),
            monotonic_raw_ns: state.monotonic_ns
                + (host_clock(libc::CLOCK_MONOTONIC_RAW) - crate::clock::monotonic_ns()),
        });
        let clocks = GuestClocks::new(
            mem.clone(),
            state.vdso.map(|v| v.vvar),
            Some(&saved),
            !tsc_trap,
        );
        let k = Arc::new(Kernel::new(
            vm,
            state.frames,
            Commit::new(state.commit_limit),
            pids,
            super::host_info(state.vdso),
            clean_fpu,
            1,
            clocks.offset_ns(ModelClock::Monotonic),
            tsc_offset,
            tsc_trap,
            shared,
            clocks,
        ));
        for mm in &mms {
            k.commit
                .charge(mm.lock().expect("address space poisoned").committed);
        }
        // A process marked for re-execution (`--reexec`) keeps one task, its main
        // thread if it still has one: the exec it does first would end the others,
        // which must not run a single instruction with their lost connections.
        let mut reexec_task: HashMap<i32, i32> = HashMap::new();
        for g in k.pids.lock().expect("pids poisoned").groups.values() {
            let mut st = g.lock();
            if st.reexec.is_some() && st.life == Life::Running {
                let threads: Vec<i32> = state
                    .tasks
                    .iter()
                    .filter(|t| t.snapshot.tgid == g.tgid)
                    .map(|t| t.snapshot.tid)
                    .collect();
                let keep = if threads.contains(&g.tgid) {
                    Some(g.tgid)
                } else {
                    threads.first().copied()
                };
                if let Some(tid) = keep {
                    reexec_task.insert(g.tgid, tid);
                    st.reexec_pending = true;
                }
            }
        }
        let mut tasks = Vec::new();
        for ts in state.tasks {
            let snap = ts.snapshot;
            if reexec_task
                .get(&snap.tgid)
                .is_some_and(|&keep| keep != snap.tid)
            {
                continue;
            }
            let tg = k
                .pids
                .lock()
                .expect("pids poisoned")
                .group(snap.tgid)
                .cloned()
                .ok_or_else(|| bad("a thread of a process that is not there"))?;
            let res = Resources {
                mm: mms[ts.mm].clone(),
                files: tables[ts.files].clone(),
                fs: fss[ts.fs].clone(),
            };
            let root = res.mm.lock().expect("address space poisoned").root;
            let mut vcpu = match first_vcpu.pop() {
                Some(mut v) => {
                    v.set_cr3(root);
                    v
                }
                None => k
                    .take_vcpu(root)
                    .map_err(|_| RestoreError::File("cannot create a vCPU".into()))?,
            };
            vcpu.restore(&snap.vcpu)?;
            let h = TaskHandle::new(
                snap.tid,
                tg.clone(),
                res.clone(),
                ThreadSignals {
                    blocked: snap.signals.blocked,
                    pending: snap.signals.pending,
                },
                snap.comm,
            );
            tg.lock().threads.push(h.clone());
            k.pids
                .lock()
                .expect("pids poisoned")
                .tasks
                .insert(snap.tid, h.clone());
            tasks.push(Task {
                k: k.clone(),
                h,
                vcpu,
                res,
                thread: snap.thread,
                exit: None,
                recheck: true,
            });
        }
        // Interval timers keep their guest deadlines.
        let groups: Vec<Arc<ThreadGroup>> = k
            .pids
            .lock()
            .expect("pids poisoned")
            .groups
            .values()
            .cloned()
            .collect();
        for g in groups {
            let timers = g.lock().itimers;
            for (which, t) in timers.iter().enumerate() {
                if t.deadline_ns != 0 {
                    k.timers.set(g.tgid, which, t.deadline_ns);
                }
            }
        }
        Ok((k, tasks))
    }
}

/// A checkpoint is untrusted: its vDSO frames must lie in its RAM, and a VMA of any
/// address space that maps kernel frames may map only those, read-only.
fn check_kernel_mappings(state: &KernelState) -> Result<(), RestoreError> {
    let bad = || {
        RestoreError::File("the kernel state maps guest memory that is not the job's vDSO".into())
    };
    let ram = state.frames.high_water();
    if state.vdso.is_some_and(|v| !v.fits(ram)) {
        return Err(bad());
    }
    for v in state.address_spaces.iter().flat_map(|m| m.vmas.values()) {
        if let Backing::Kernel { gpa } = v.backing {
            let ok = state.vdso.is_some_and(|f| f.covers(gpa, v.len()))
                && v.prot & libc::PROT_WRITE == 0
                && !v.shared;
            if !ok {
                return Err(bad());
            }
        }
    }
    Ok(())
}

/// Guest clock values a restore accepts: from boot up to about 146 years, so the
/// offsets to this host's clocks are computed without overflow.
const MAX_CLOCK_NS: i64 = 1 << 62;

/// The saved clocks are untrusted numbers too: out of range, they are refused rather
/// than left to overflow the offsets.
fn check_clocks(state: &KernelState) -> Result<(), RestoreError> {
    let saved = state
        .clocks
        .iter()
        .flat_map(|c| [c.monotonic_ns, c.boottime_ns, c.monotonic_raw_ns]);
    if std::iter::once(state.monotonic_ns)
        .chain(saved)
        .all(|ns| (0..=MAX_CLOCK_NS).contains(&ns))
    {
        Ok(())
    } else {
        Err(RestoreError::File(
            "the kernel state's saved clocks are out of range".into(),
        ))
    }
}

fn attach_regions(
    mm: &mut AddressSpace,
    states: &[RegionState],
    regions: &HashMap<u64, Arc<SharedRegion>>,
) {
    // VMAs of a shared mapping point into their region's guest-physical range.
    for v in mm.vmas.values_mut() {
        let Backing::File {
            file,
            offset,
            region: slot,
        } = &mut v.backing
        else {
            continue;
        };
        if !v.shared {
            continue;
        }
        *slot = states
            .iter()
            .find(|r| {
                r.path == file.path
                    && *offset >= r.file_offset
                    && *offset + (v.end - v.start) <= r.file_offset + r.len
            })
            .and_then(|r| regions.get(&r.gpa).cloned());
    }
}

fn open_for(path: &Path, flags: i32) -> Result<OwnedFd, RestoreError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| RestoreError::File("bad path".into()))?;
    // SAFETY: open with a valid C string; the result is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(RestoreError::File(format!(
            "{}: the job had it open but it cannot be opened now: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn reopen_mapped_files(
    mm: &mut AddressSpace,
    recreated: &HashMap<PathBuf, Arc<OwnedFd>>,
) -> Result<(), RestoreError> {
    use std::os::unix::fs::MetadataExt;
    for v in mm.vmas.values_mut() {
        let Backing::File { file, .. } = &mut v.backing else {
            continue;
        };
        if let Some(fd) = recreated.get(&file.path) {
            let f = fd
                .try_clone()
                .map_err(|e| RestoreError::File(format!("cannot recreate a mapped file: {e}")))?;
            let mut fresh = super::mm::MappedFile::new(file.path.clone(), std::fs::File::from(f))
                .map_err(|e| RestoreError::File(e.to_string()))?;
            fresh.size = file.size;
            fresh.mtime_ns = file.mtime_ns;
            *file = Arc::new(fresh);
            continue;
        }
        let f = std::fs::File::open(&file.path).map_err(|e| {
            RestoreError::File(format!(
                "{}: mapped by the job but cannot be opened now: {e}",
                file.path.display()
            ))
        })?;
        let md = f
            .metadata()
            .map_err(|e| RestoreError::File(e.to_string()))?;
        let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
        // A private mapping's untouched pages would come from the file as it is now,
        // so it must not have changed. A shared mapping *is* the file: changes (the
        // job's own writes included) are what it is meant to see.
        let changed = md.size() != file.size || mtime != file.mtime_ns;
        if !v.shared && file.size != 0 && changed {
            return Err(RestoreError::File(format!(
                "{}: mapped by the job and changed since the checkpoint (size {} -> {}); restore it or start afresh",
                file.path.display(),
                file.size,
                md.size()
            )));
        }
        let mut fresh = super::mm::MappedFile::new(file.path.clone(), f)
            .map_err(|e| RestoreError::File(e.to_string()))?;
        fresh.size = file.size;
        fresh.mtime_ns = file.mtime_ns;
        *file = Arc::new(fresh);
    }
    Ok(())
}

/// An unnamed file holding `data` (memfd).
fn anonymous_file(data: &[u8]) -> Result<OwnedFd, RestoreError> {
    let fail = |what: &str| {
        RestoreError::File(format!(
            "cannot recreate a deleted mapped file ({what}): {}",
            std::io::Error::last_os_error()
        ))
    };
    // SAFETY: memfd_create with a static name; the descriptor is owned below.
    let fd = unsafe { libc::memfd_create(c"vmwrap-restored".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(fail("memfd_create"));
    }
    // SAFETY: just created, owned by nothing else.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    use std::io::Write;
    (&f).write_all(data).map_err(|_| fail("write"))?;
    Ok(f.into())
}

/// New host pipes holding what the job's pipes held: (read end, write end).
fn make_pipes(states: &[PipeState]) -> Result<Vec<(OwnedFd, OwnedFd)>, RestoreError> {
    let mut out = Vec::new();
    for p in states {
        let data = unhex(&p.data);
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the local array; the descriptors are owned below.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(RestoreError::File(format!(
                "cannot make a pipe: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: both were just created.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let want = p.capacity.max(data.len() as i32);
        // SAFETY: fcntl and write on the pipe just created; the data fits its capacity.
        unsafe {
            if want > 65536 {
                libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, want);
            }
            let mut done = 0;
            while done < data.len() {
                let n = libc::write(
                    w.as_raw_fd(),
                    data[done..].as_ptr() as *const _,
                    data.len() - done,
                );
                if n <= 0 {
                    return Err(RestoreError::File(
                        "cannot put a pipe's contents back".into(),
                    ));
                }
                done += n as usize;
            }
        }
        out.push((r, w));
    }
    Ok(out)
}

/// `holder`: the process a warning names when the description comes back as
/// /dev/null; None: no warning.
fn reopen_file(
    f: &FileState,
    pipes: &[(OwnedFd, OwnedFd)],
    holder: Option<&str>,
) -> Result<Arc<OpenFile>, RestoreError> {
    match f {
        FileState::Stdio { stream } => dup_stdio(*stream).ok_or_else(|| {
            RestoreError::File(format!(
                "standard stream {stream} is closed in this vmctl; the job needs it"
            ))
        }),
        FileState::Path {
            path,
            flags,
            offset,
            size,
            directory,
        } => {
            let keep = flags
                & !(libc::O_CREAT
                    | libc::O_TRUNC
                    | libc::O_EXCL
                    | libc::O_TMPFILE
                    | libc::O_NOCTTY);
            let host = open_for(path, keep)?;
            if !directory && *size > 0 {
                if let Some(st) = fstat(host.as_raw_fd()) {
                    if (st.st_mode & libc::S_IFMT) == libc::S_IFREG && st.st_size < *offset {
                        return Err(RestoreError::File(format!(
                            "{}: now {} bytes, shorter than the saved offset {offset}; the job's view of it is gone",
                            path.display(),
                            st.st_size
                        )));
                    }
                }
            }
            // SAFETY: seeking our own descriptor.
            unsafe { libc::lseek(host.as_raw_fd(), *offset, libc::SEEK_SET) };
            Ok(Arc::new(OpenFile {
                host,
                path: Some(path.clone()),
                stdio: None,
            }))
        }
        FileState::Pipe { pipe, write, flags } => {
            let (r, w) = &pipes[*pipe];
            let end = if *write { w } else { r };
            let host = end
                .try_clone()
                .map_err(|e| RestoreError::File(format!("cannot reopen a pipe: {e}")))?;
            // SAFETY: fcntl on our own descriptor: the description's status flags.
            unsafe { libc::fcntl(host.as_raw_fd(), libc::F_SETFL, *flags & libc::O_NONBLOCK) };
            Ok(Arc::new(OpenFile {
                host,
                path: None,
                stdio: None,
            }))
        }
        FileState::Lost { what } => {
            if let Some(holder) = holder {
                eprintln!(
                    "vmctl: warning: {holder} had a {what} open, which a checkpoint cannot carry; it is /dev/null now"
                );
            }
            let host = open_for(Path::new("/dev/null"), libc::O_RDWR)?;
            Ok(Arc::new(OpenFile {
                host,
                path: None,
                stdio: None,
            }))
        }
    }
}

/// Checks a checkpoint's kernel state for what its owner could have edited into it
/// (the checksum only proves the manifest is what was written) before any of it is
/// used: every address inside the VM's `ram` bytes, memory areas ordered and inside
/// user space, one disposition per signal, memslots in their window. It needs no VM,
/// so `inspect --verify` and the reader's mutation test run it too.
pub fn check_state(state: &KernelState, ram: u64) -> Result<(), String> {
    use super::mm::address_space::TASK_SIZE;
    if !state.frames.fits(ram)
        || state
            .address_spaces
            .iter()
            .any(|m| m.root >= ram || !m.root.is_multiple_of(4096))
    {
        return Err("it names guest memory beyond the checkpoint's RAM size".into());
    }
    for p in &state.processes {
        if p.state.actions.len() != super::signals::NSIG + 1 {
            return Err(format!(
                "process {} has {} signal dispositions, not {}",
                p.tgid,
                p.state.actions.len(),
                super::signals::NSIG + 1
            ));
        }
    }
    for mm in &state.address_spaces {
        let mut prev_end = 0;
        for v in mm.vmas.values() {
            if v.start >= v.end
                || !v.start.is_multiple_of(4096)
                || !v.end.is_multiple_of(4096)
                || v.end > TASK_SIZE
                || v.start < prev_end
            {
                return Err(format!(
                    "memory area {:#x}-{:#x} is not a possible one",
                    v.start, v.end
                ));
            }
            prev_end = v.end;
        }
        if mm.brk < mm.brk_start || mm.brk > TASK_SIZE {
            return Err("a program break lies outside user space".into());
        }
    }
    for p in &state.processes {
        if let Some(r) = &p.state.reexec {
            // execve's own limit on argv and environment (ARG_MAX).
            if r.size() > 2 << 20 || r.argv.is_empty() {
                return Err(format!(
                    "process {}'s recorded command line for re-execution is not a possible one",
                    p.tgid
                ));
            }
        }
    }
    if let Some(f) = state.fd_tables.iter().flatten().find(|f| f.fd < 0) {
        return Err(format!("descriptor {} is not a possible number", f.fd));
    }
    check_regions(&state.regions)
}

/// Shared-file memslots must lie in their guest-physical window, one slot each, or
/// a crafted checkpoint could map a file over guest RAM or make the sizes wrap.
fn check_regions(regions: &[RegionState]) -> Result<(), String> {
    use crate::machine::layout::{FIRST_SHARED_SLOT, SHARED_WINDOW, SHARED_WINDOW_END};
    let mut seen = std::collections::HashSet::new();
    for r in regions {
        let end = r
            .len
            .checked_next_multiple_of(4096)
            .and_then(|l| r.gpa.checked_add(l));
        let fits = r.len > 0
            && r.gpa >= SHARED_WINDOW
            && r.gpa.is_multiple_of(4096)
            && end.is_some_and(|e| e <= SHARED_WINDOW_END)
            && r.file_offset.is_multiple_of(4096)
            && r.file_offset <= i64::MAX as u64
            && r.slot >= FIRST_SHARED_SLOT
            && seen.insert(r.slot);
        if !fits {
            return Err(format!(
                "{}: the shared mapping's memslot ({} bytes at {:#x}, slot {}) is not a possible one",
                r.path.display(),
                r.len,
                r.gpa,
                r.slot
            ));
        }
    }
    Ok(())
}
