//! The kernel layer's part of a checkpoint: everything about the job that lives in
//! vmctl rather than in guest memory, and how to rebuild it in a new vmctl.

use super::files::{FdEntry, FdTable, OpenFile};
use super::mm::{AddressSpace, Backing, FrameAllocator, SharedRegions};
use super::process::Process;
use super::{dup_stdio, Kernel};
use crate::machine::{GuestMemory, MachineError, VcpuState, Vm};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("{0}")]
    File(String),
    #[error(transparent)]
    Machine(#[from] MachineError),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FdKind {
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
    /// Something that cannot be reopened (pipe, socket, deleted file): restored as
    /// /dev/null with a warning.
    Lost { what: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FdState {
    pub fd: i32,
    pub cloexec: bool,
    pub kind: FdKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionState {
    pub gpa: u64,
    pub slot: u32,
    pub len: u64,
    pub file_offset: u64,
    pub writable: bool,
    pub path: PathBuf,
    /// Start addresses of the VMAs that map this region.
    pub vmas: Vec<u64>,
}

/// A process in a checkpoint: the process itself, and what lives in the host rather
/// than in it (the working directory, the descriptors).
#[derive(Debug, Serialize, Deserialize)]
pub struct ProcessState {
    #[serde(flatten)]
    pub process: Process,
    pub cwd: PathBuf,
    pub fds: Vec<FdState>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KernelState {
    pub process: ProcessState,
    pub frames: FrameAllocator,
    pub regions: Vec<RegionState>,
    pub vcpus: Vec<VcpuState>,
    /// The guest's CLOCK_MONOTONIC when the checkpoint was taken.
    pub monotonic_ns: i64,
    /// The TSC the guest would have read when the checkpoint was taken.
    #[serde(default)]
    pub tsc: u64,
    /// The guest's interval timers (ITIMER_REAL, _VIRTUAL, _PROF) as
    /// (interval, value) in microseconds. They are vmctl's own host timers, so they
    /// are read at the checkpoint and armed again on restore.
    #[serde(default)]
    pub itimers: Vec<(u64, u64)>,
}

fn read_itimers() -> Vec<(u64, u64)> {
    (0..3)
        .map(|which| {
            // SAFETY: getitimer writes into the local struct.
            let mut t: libc::itimerval = unsafe { std::mem::zeroed() };
            unsafe { libc::syscall(libc::SYS_getitimer, which, &mut t) };
            let us = |v: libc::timeval| v.tv_sec as u64 * 1_000_000 + v.tv_usec as u64;
            (us(t.it_interval), us(t.it_value))
        })
        .collect()
}

fn arm_itimers(timers: &[(u64, u64)]) {
    for (which, &(interval, value)) in timers.iter().enumerate() {
        if value == 0 {
            continue;
        }
        let tv = |us: u64| libc::timeval {
            tv_sec: (us / 1_000_000) as i64,
            tv_usec: (us % 1_000_000) as i64,
        };
        let t = libc::itimerval {
            it_interval: tv(interval),
            it_value: tv(value),
        };
        // SAFETY: setitimer reads the local struct; the old value is not wanted.
        unsafe {
            libc::syscall(
                libc::SYS_setitimer,
                which as i32,
                &t,
                std::ptr::null_mut::<libc::itimerval>(),
            )
        };
    }
}

fn host_fd_path(fd: RawFd) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()
}

fn fd_state(fd: i32, e: &FdEntry) -> FdState {
    let kind = if let Some(stream) = e.file.stdio {
        FdKind::Stdio { stream }
    } else {
        let h = e.file.raw();
        // SAFETY: fstat into a local struct on a descriptor we hold.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::fstat(h, &mut st) } == 0;
        let fmt = st.st_mode & libc::S_IFMT;
        let path = host_fd_path(h).or_else(|| e.file.path.clone());
        let deleted = path
            .as_ref()
            .is_some_and(|p| p.as_os_str().as_bytes().ends_with(b" (deleted)"));
        match (ok, fmt, path) {
            (true, libc::S_IFREG | libc::S_IFDIR | libc::S_IFCHR | libc::S_IFBLK, Some(path))
                if !deleted =>
            {
                // SAFETY: queries on a descriptor we hold.
                let (flags, offset) = unsafe {
                    (
                        libc::fcntl(h, libc::F_GETFL),
                        libc::lseek(h, 0, libc::SEEK_CUR),
                    )
                };
                FdKind::Path {
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
            (_, _, p) => FdKind::Lost {
                what: match fmt {
                    libc::S_IFIFO => "pipe".into(),
                    libc::S_IFSOCK => "socket".into(),
                    _ if deleted => format!(
                        "deleted file {}",
                        p.map(|p| p.display().to_string()).unwrap_or_default()
                    ),
                    _ => "unknown descriptor".into(),
                },
            },
        }
    };
    FdState {
        fd,
        cloexec: e.cloexec,
        kind,
    }
}

fn regions_of(mm: &AddressSpace) -> Vec<RegionState> {
    let mut out: Vec<RegionState> = Vec::new();
    for v in mm.vmas.values() {
        let Backing::File {
            file,
            region: Some(r),
            ..
        } = &v.backing
        else {
            continue;
        };
        match out.iter_mut().find(|x| x.gpa == r.gpa) {
            Some(x) => x.vmas.push(v.start),
            None => out.push(RegionState {
                gpa: r.gpa,
                slot: r.slot,
                len: r.len,
                file_offset: r.file_offset,
                writable: r.writable,
                path: file.path.clone(),
                vmas: vec![v.start],
            }),
        }
    }
    out
}

impl Kernel {
    /// Captures the kernel layer. None if the vCPU is not at a clean point yet: run it
    /// once more and ask again.
    pub fn snapshot(&mut self) -> Result<Option<KernelState>, MachineError> {
        let Some(vcpu) = self.vcpu.capture()? else {
            return Ok(None);
        };
        self.shared.msync_all();
        let p = &self.proc;
        let process = ProcessState {
            process: p.clone(),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            fds: p.files.iter().map(|(&fd, e)| fd_state(fd, e)).collect(),
        };
        Ok(Some(KernelState {
            regions: regions_of(&p.mm),
            process,
            frames: self.frames.clone(),
            vcpus: vec![vcpu],
            monotonic_ns: crate::clock::monotonic_ns() + self.clock_offset_ns,
            tsc: crate::clock::host_tsc().wrapping_add(self.tsc_offset),
            itimers: read_itimers(),
        }))
    }

    /// Rebuilds a kernel from `state` on `vm`, whose RAM already holds the memory image.
    pub fn restore(vm: Vm, state: KernelState) -> Result<Kernel, RestoreError> {
        let mem: Arc<GuestMemory> = vm.memory().clone();
        // The manifest passed its checksum, but it must also fit the VM it describes.
        if !state.frames.fits(mem.size()) || state.process.process.mm.root >= mem.size() {
            return Err(RestoreError::File(
                "the kernel state names guest memory beyond the checkpoint's RAM size".into(),
            ));
        }
        // The image is in guest RAM already; KVM needs memslots up to where it reaches.
        mem.ensure_backed(state.frames.high_water())
            .map_err(|e| RestoreError::File(format!("cannot expose guest RAM to KVM: {e}")))?;
        let ProcessState {
            process: mut proc,
            cwd,
            fds,
        } = state.process;
        let mm = &mut proc.mm;
        reopen_mapped_files(mm)?;
        let mut shared = SharedRegions::default();
        for r in &state.regions {
            let file = open_for(
                &r.path,
                if r.writable {
                    libc::O_RDWR
                } else {
                    libc::O_RDONLY
                },
            )?;
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
            for start in &r.vmas {
                if let Some(v) = mm.vmas.get_mut(start) {
                    if let Backing::File { region: slot, .. } = &mut v.backing {
                        *slot = Some(region.clone());
                    }
                }
            }
        }
        std::env::set_current_dir(&cwd).map_err(|e| {
            RestoreError::File(format!(
                "{}: cannot return to the job's working directory: {e}",
                cwd.display()
            ))
        })?;
        // SAFETY: umask cannot fail; files created for the guest use its umask.
        unsafe { libc::umask(proc.umask) };
        let mut files = FdTable::default();
        for f in &fds {
            let file = reopen_fd(f)?;
            files.install_at(
                f.fd,
                FdEntry {
                    file,
                    cloexec: f.cloexec,
                },
            );
        }
        let mut vcpu = vm.create_vcpu(0, proc.mm.root)?;
        let vstate = state
            .vcpus
            .first()
            .ok_or_else(|| RestoreError::File("the checkpoint has no vCPU state".into()))?;
        vcpu.restore(vstate)?;
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
        let (tsc_offset, tsc_trap) =
            if saved_tsc > now_tsc && crate::clock::trap_rdtsc_on_this_thread() {
                vcpu.set_tsd(true);
                (saved_tsc - now_tsc, true)
            } else {
                (0, false)
            };
        arm_itimers(&state.itimers);
        proc.files = files;
        Ok(Kernel {
            vm,
            vcpu,
            mem,
            frames: state.frames,
            proc,
            shared,
            warned: HashSet::new(),
            exit: None,
            // The guest's monotonic clock continues from where it stopped.
            clock_offset_ns: state.monotonic_ns - crate::clock::monotonic_ns(),
            tsc_offset,
            tsc_trap,
        })
    }
}

fn open_for(path: &std::path::Path, flags: i32) -> Result<OwnedFd, RestoreError> {
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

fn reopen_mapped_files(mm: &mut AddressSpace) -> Result<(), RestoreError> {
    use std::os::unix::fs::MetadataExt;
    for v in mm.vmas.values_mut() {
        let Backing::File { file, .. } = &mut v.backing else {
            continue;
        };
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

fn reopen_fd(f: &FdState) -> Result<Arc<OpenFile>, RestoreError> {
    match &f.kind {
        FdKind::Stdio { stream } => dup_stdio(*stream).ok_or_else(|| {
            RestoreError::File(format!(
                "fd {}: standard stream {stream} is closed in this vmctl",
                f.fd
            ))
        }),
        FdKind::Path {
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
                // SAFETY: fstat into a local struct.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                unsafe { libc::fstat(host.as_raw_fd(), &mut st) };
                if (st.st_mode & libc::S_IFMT) == libc::S_IFREG && (st.st_size as i64) < *offset {
                    return Err(RestoreError::File(format!(
                        "{}: now {} bytes, shorter than the saved offset {offset}; the job's view of it is gone",
                        path.display(),
                        st.st_size
                    )));
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
        FdKind::Lost { what } => {
            eprintln!(
                "vmctl: warning: fd {} was a {what}, which a checkpoint cannot carry; it is /dev/null now",
                f.fd
            );
            let host = open_for(std::path::Path::new("/dev/null"), libc::O_RDWR)?;
            Ok(Arc::new(OpenFile {
                host,
                path: None,
                stdio: None,
            }))
        }
    }
}
