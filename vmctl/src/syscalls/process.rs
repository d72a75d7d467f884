//! Processes and threads: clone (threads, fork, vfork), execve, and waiting for
//! children.

use super::Ret;
use crate::kernel::exit::{child_info, wait_status};
use crate::kernel::files::FdTable;
use crate::kernel::loader::{self, ExecError};
use crate::kernel::mm::AddressSpace;
use crate::kernel::process::ExitStatus;
use crate::kernel::signals::{sig_bit, SigAction, ThreadSignals, SIG_IGN};
use crate::kernel::task::{Task, TaskHandle, ThreadState, INTR_FREEZE};
use crate::kernel::thread_group::{ExecRecord, ITimer, Life, Resources, TgState, ThreadGroup};
use crate::kernel::{comm_of, Errno, SysResult, MAX_TASKS};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const CSIGNAL: u64 = 0xff;
const CLONE_VM: u64 = libc::CLONE_VM as u64;
const CLONE_FS: u64 = libc::CLONE_FS as u64;
const CLONE_FILES: u64 = libc::CLONE_FILES as u64;
const CLONE_SIGHAND: u64 = libc::CLONE_SIGHAND as u64;
const CLONE_PIDFD: u64 = libc::CLONE_PIDFD as u64;
const CLONE_VFORK: u64 = libc::CLONE_VFORK as u64;
const CLONE_PARENT: u64 = libc::CLONE_PARENT as u64;
const CLONE_THREAD: u64 = libc::CLONE_THREAD as u64;
const CLONE_NEWNS_AND_FRIENDS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;
const CLONE_SETTLS: u64 = libc::CLONE_SETTLS as u64;
const CLONE_PARENT_SETTID: u64 = libc::CLONE_PARENT_SETTID as u64;
const CLONE_CHILD_CLEARTID: u64 = libc::CLONE_CHILD_CLEARTID as u64;
const CLONE_CHILD_SETTID: u64 = libc::CLONE_CHILD_SETTID as u64;
const CLONE_UNTRACED: u64 = libc::CLONE_UNTRACED as u64;
const CLONE_DETACHED: u64 = 0x0040_0000;
const CLONE_SYSVSEM: u64 = libc::CLONE_SYSVSEM as u64;
const CLONE_IO: u64 = libc::CLONE_IO as u64;
const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;

/// clone3: struct clone_args.
pub fn clone3(t: &mut Task, a: [u64; 6]) -> SysResult {
    let size = a[1] as usize;
    if !(64..=4096).contains(&size) {
        return Err(Errno(libc::EINVAL));
    }
    let b = t.read_user(a[0], 88.min(size))?;
    let w = |i: usize| {
        b.get(i * 8..i * 8 + 8)
            .map_or(0, |s| u64::from_le_bytes(s.try_into().expect("8")))
    };
    let (flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls) =
        (w(0), w(1), w(2), w(3), w(4), w(5), w(6), w(7));
    let set_tid_size = w(9);
    if set_tid_size != 0 || w(10) != 0 {
        // set_tid (choosing pids) and cgroup placement are not for a wrapped job.
        return Err(Errno(libc::EINVAL));
    }
    if flags & CSIGNAL != 0 || exit_signal > 64 || flags & CLONE_PIDFD != 0 && pidfd == 0 {
        return Err(Errno(libc::EINVAL));
    }
    let sp = if stack != 0 { stack + stack_size } else { 0 };
    clone(t, flags | exit_signal, sp, parent_tid, child_tid, tls)
}

/// clone, fork and vfork. Each new thread gets its own vCPU and host thread; a new
/// process gets a copy-on-write copy of the address space.
pub fn clone(t: &mut Task, flags: u64, stack: u64, ptid: u64, ctid: u64, tls: u64) -> SysResult {
    let unsupported = CLONE_NEWNS_AND_FRIENDS | CLONE_PIDFD | CLONE_CLEAR_SIGHAND;
    if flags & unsupported != 0 {
        return Err(Errno(if flags & CLONE_NEWNS_AND_FRIENDS != 0 {
            libc::EPERM
        } else {
            libc::EINVAL
        }));
    }
    let known = CSIGNAL
        | CLONE_VM
        | CLONE_FS
        | CLONE_FILES
        | CLONE_SIGHAND
        | CLONE_VFORK
        | CLONE_PARENT
        | CLONE_THREAD
        | CLONE_SETTLS
        | CLONE_PARENT_SETTID
        | CLONE_CHILD_CLEARTID
        | CLONE_CHILD_SETTID
        | CLONE_UNTRACED
        | CLONE_DETACHED
        | CLONE_SYSVSEM
        | CLONE_IO;
    if flags & !known != 0 {
        return Err(Errno(libc::EINVAL));
    }
    // Linux's rules: threads share signal handlers, which needs a shared address space.
    if flags & CLONE_THREAD != 0 && flags & CLONE_SIGHAND == 0
        || flags & CLONE_SIGHAND != 0 && flags & CLONE_VM == 0
        || flags & CLONE_THREAD != 0 && flags & CSIGNAL != 0
    {
        return Err(Errno(libc::EINVAL));
    }
    let thread = flags & CLONE_THREAD != 0;
    let k = t.k.clone();
    // Limits: RLIMIT_NPROC counts the job's threads, as Linux counts a user's; each
    // thread also needs a vCPU.
    let nproc = t.rlimit(libc::RLIMIT_NPROC).0;
    {
        let pids = k.pids.lock().expect("pids poisoned");
        if pids.tasks.len() >= MAX_TASKS || pids.tasks.len() as u64 >= nproc {
            return Err(Errno(libc::EAGAIN));
        }
    }
    if thread && !matches!(t.tg().lock().life, Life::Running) {
        return Err(Errno(libc::EAGAIN));
    }
    // The address space: shared, or a copy-on-write copy.
    let mm = if flags & CLONE_VM != 0 {
        t.res.mm.clone()
    } else {
        let system = k.vm.system_half().clone();
        let child = t.with_mm(|mm, ctx| mm.fork(ctx, &system))?;
        // The parent's entries were write-protected from the host: make every vCPU's
        // shadow translations follow before anyone runs again.
        if let Err(e) = k.vm.flush_shadow() {
            eprintln!("vmctl: {e}");
            release(t, child);
            return Err(Errno(libc::ENOMEM));
        }
        Arc::new(Mutex::new(child))
    };
    let root = mm.lock().expect("address space poisoned").root;
    let mut vcpu = match k.take_vcpu(root) {
        Ok(v) => v,
        Err(e) => {
            drop_mm(t, mm);
            return Err(e);
        }
    };
    let files = if flags & CLONE_FILES != 0 {
        t.res.files.clone()
    } else {
        Arc::new(Mutex::new(t.files().clone()))
    };
    let fs = if flags & CLONE_FS != 0 {
        t.res.fs.clone()
    } else {
        let dup = t.fs().duplicate();
        match dup {
            Ok(f) => Arc::new(Mutex::new(f)),
            Err(_) => {
                k.put_vcpu(vcpu);
                drop_mm(t, mm);
                return Err(Errno(libc::ENOMEM));
            }
        }
    };
    let res = Resources { mm, files, fs };

    // Registers: the parent's, returning 0, on the new stack if one was given.
    let mut regs = *t.vcpu.user_regs();
    regs.rax = 0;
    if stack != 0 {
        regs.rsp = stack;
    }
    let fs_base = if flags & CLONE_SETTLS != 0 {
        tls
    } else {
        t.vcpu.fs_base()
    };
    let copied = t.vcpu.get_xsave().and_then(|x| vcpu.set_xsave(&x));
    if copied.is_err() {
        k.put_vcpu(vcpu);
        drop_mm(t, res.mm);
        return Err(Errno(libc::ENOMEM));
    }
    vcpu.start_user(regs, fs_base, t.vcpu.gs_base());

    let blocked = t.h.signals().blocked;
    let comm = *t.h.comm.lock().expect("comm poisoned");
    let mut pids = k.pids.lock().expect("pids poisoned");
    let tid = pids.alloc();
    let tg = if thread {
        t.tg().clone()
    } else {
        let parent = t.tg().lock();
        let st = TgState {
            ppid: if flags & CLONE_PARENT != 0 {
                parent.ppid
            } else {
                t.tgid()
            },
            pgid: parent.pgid,
            sid: parent.sid,
            life: Life::Running,
            exit_signal: (flags & CSIGNAL) as i32,
            actions: parent.actions.clone(),
            pending: Default::default(),
            exe: parent.exe.clone(),
            cmdline: parent.cmdline.clone(),
            rlimits: parent.rlimits.clone(),
            itimers: [ITimer::default(); 3],
            vfork_done: flags & CLONE_VFORK == 0,
            pdeath_signal: 0,
            // A forked copy of a program started again on a restore is ended there.
            reexec: parent
                .reexec
                .clone()
                .map(|r| ExecRecord { forked: true, ..r }),
            reexec_pending: false,
            threads: Vec::new(),
        };
        drop(parent);
        let g = ThreadGroup::new(tid, st);
        pids.groups.insert(tid, g.clone());
        g
    };
    let h = TaskHandle::new(
        tid,
        tg.clone(),
        res.clone(),
        ThreadSignals {
            blocked,
            pending: Default::default(),
        },
        comm,
    );
    tg.lock().threads.push(h.clone());
    pids.tasks.insert(tid, h.clone());
    drop(pids);
    if k.freezer.is_active() {
        h.interrupt(INTR_FREEZE);
    }

    let mut child_thread = ThreadState::default();
    if flags & CLONE_VM == 0 || flags & CLONE_VFORK != 0 {
        // A new process (or a vfork child, which runs on the parent's stack) keeps
        // the alternate signal stack.
        child_thread.altstack = t.thread.altstack;
    }
    if flags & CLONE_VM == 0 {
        child_thread.rseq = t.thread.rseq;
    }
    if flags & CLONE_CHILD_CLEARTID != 0 {
        child_thread.clear_child_tid = ctid;
    }
    let mut child = Task {
        k: k.clone(),
        h,
        vcpu,
        res,
        thread: child_thread,
        exit: None,
        recheck: false,
    };
    if flags & CLONE_PARENT_SETTID != 0 {
        let _ = t.write_user(ptid, &tid.to_le_bytes());
    }
    if flags & CLONE_CHILD_SETTID != 0 {
        let _ = child.write_user(ctid, &tid.to_le_bytes());
    }
    if flags & CLONE_VFORK != 0 {
        t.thread.vfork_child = Some(tid);
    }
    let spawned = std::thread::Builder::new()
        .name(format!("vmctl-task-{tid}"))
        .spawn(move || child.run());
    if spawned.is_err() {
        // The task never ran: take it out again (its vCPU and resources went with
        // the dropped Task).
        let mut pids = k.pids.lock().expect("pids poisoned");
        pids.tasks.remove(&tid);
        tg.lock().threads.retain(|h| h.tid != tid);
        if !thread {
            pids.groups.remove(&tid);
        }
        t.thread.vfork_child = None;
        return Err(Errno(libc::EAGAIN));
    }
    Ok(tid as i64)
}

/// Gives back a forked address space that will not be used.
fn release(t: &mut Task, mm: AddressSpace) {
    t.with_mm(|_, ctx| mm.release(ctx));
    t.k.flush_released();
}

fn drop_mm(t: &mut Task, mm: Arc<Mutex<AddressSpace>>) {
    if let Ok(m) = Arc::try_unwrap(mm) {
        release(t, m.into_inner().expect("address space poisoned"));
    }
}

/// Reads a NULL-terminated array of string pointers (argv, envp).
fn read_strings(t: &mut Task, mut ptr: u64) -> Result<Vec<Vec<u8>>, Errno> {
    const ARG_MAX: usize = 2 << 20;
    let mut out = Vec::new();
    if ptr == 0 {
        return Ok(out);
    }
    let mut total = 0usize;
    loop {
        let p = t.read_user_u64(ptr)?;
        if p == 0 {
            return Ok(out);
        }
        let s = t.with_mm(|mm, ctx| mm.read_cstr(ctx, p, ARG_MAX))?;
        total += s.len() + 1 + 8;
        if total > ARG_MAX {
            return Err(Errno(libc::E2BIG));
        }
        out.push(s);
        ptr += 8;
    }
}

fn exec_errno(e: &ExecError) -> Errno {
    Errno(match e {
        ExecError::NotFound(_) => libc::ENOENT,
        ExecError::Io(_, io) => io.raw_os_error().unwrap_or(libc::EIO),
        ExecError::NoMemory(_) => libc::ENOMEM,
        ExecError::NotExecutable(_, why) if why.contains("Permission") => libc::EACCES,
        ExecError::NotExecutable(_, why) if why.contains("directory") => libc::EACCES,
        ExecError::NotExecutable(..) => libc::ENOEXEC,
    })
}

/// execve and execveat: a new program in a new address space. The other threads of
/// the process end; descriptors marked close-on-exec close; handled signals go back
/// to their default action.
pub fn execve(
    t: &mut Task,
    dirfd: u64,
    pathp: u64,
    argv: u64,
    envp: u64,
    flags: u64,
) -> Result<Ret, Errno> {
    const AT_EMPTY_PATH: u64 = libc::AT_EMPTY_PATH as u64;
    let name = t.read_cstr(pathp)?;
    let argv = read_strings(t, argv)?;
    let envp = read_strings(t, envp)?;
    // The file to load, as a host path vmctl can open.
    let path: PathBuf = if name.is_empty() {
        if flags & AT_EMPTY_PATH == 0 {
            return Err(Errno(libc::ENOENT));
        }
        let host = t.files().host(dirfd as i32)?;
        std::fs::read_link(format!("/proc/self/fd/{host}")).map_err(|_| Errno(libc::ENOENT))?
    } else if name.first() == Some(&b'/') {
        PathBuf::from(std::ffi::OsStr::from_bytes(&name))
    } else {
        let base = if dirfd as i32 == libc::AT_FDCWD {
            t.fs().cwd_path()
        } else {
            let host = t.files().host(dirfd as i32)?;
            std::fs::read_link(format!("/proc/self/fd/{host}")).map_err(|_| Errno(libc::EBADF))?
        };
        base.join(std::ffi::OsStr::from_bytes(&name))
    };
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(
        super::procfs::redirect(
            t,
            std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno(libc::EINVAL))?,
        )
        .as_bytes(),
    ));
    exec_program(t, &path, argv, envp)
}

/// The part of execve after its arguments are read: loads `path` with `argv` and
/// `envp` into a new address space and starts it in this task.
fn exec_program(
    t: &mut Task,
    path: &std::path::Path,
    argv: Vec<Vec<u8>>,
    envp: Vec<Vec<u8>>,
) -> Result<Ret, Errno> {
    let stack = t
        .rlimit(libc::RLIMIT_STACK)
        .0
        .clamp(128 << 10, 64 << 20)
        .next_multiple_of(4096);
    // Other threads of the process end first (Linux ends them only once the new
    // program is known to load; a multi-threaded process whose exec then fails
    // loses its other threads here).
    kill_other_threads(t)?;
    // Load into a new address space: a failure leaves the process as it was.
    let k = t.k.clone();
    let system = k.vm.system_half().clone();
    let loaded = t.with_mm(|_, ctx| {
        let mut mm = AddressSpace::new(ctx.mem, ctx.frames, &system).ok_or(Errno(libc::ENOMEM))?;
        match loader::load_program(&mut mm, ctx, path, &argv, &envp, stack, &k.host) {
            Ok(start) => Ok((mm, start)),
            Err(e) => {
                mm.release(ctx);
                Err(exec_errno(&e))
            }
        }
    });
    let (new_mm, start) = match loaded {
        Ok(x) => x,
        Err(e) => {
            k.flush_released();
            return Err(e);
        }
    };

    // Past the point of no return.
    let old = std::mem::replace(&mut t.res.mm, Arc::new(Mutex::new(new_mm)));
    t.vcpu.set_cr3(start_root(&t.res.mm));
    drop_mm(t, old);
    // A descriptor table shared with another process is copied first.
    if Arc::strong_count(&t.res.files) > 2 {
        let copy = t.files().clone();
        t.res.files = Arc::new(Mutex::new(copy));
    }
    t.files().close_on_exec();
    if Arc::strong_count(&t.res.fs) > 2 {
        let dup = t.fs().duplicate();
        if let Ok(f) = dup {
            t.res.fs = Arc::new(Mutex::new(f));
        }
    }
    t.h.set_resources(Some(t.res.clone()));
    let cmdline: Vec<u8> = argv
        .iter()
        .flat_map(|a| a.iter().copied().chain([0]))
        .collect();
    let (ppid, vfork_parent) = {
        let mut st = t.tg().lock();
        for a in st.actions.iter_mut() {
            if a.handler != SIG_IGN {
                *a = SigAction::default();
            }
        }
        st.reexec = if k.reexecuted_on_restore(&start.exe) {
            Some(ExecRecord {
                path: path.to_path_buf(),
                argv: argv.clone(),
                envp: envp.clone(),
                blocked: t.h.signals().blocked,
                ignored: st
                    .actions
                    .iter()
                    .enumerate()
                    .filter(|(sig, a)| (1..=64).contains(sig) && a.handler == SIG_IGN)
                    .fold(0u64, |m, (sig, _)| m | 1 << (sig - 1)),
                forked: false,
            })
        } else {
            None
        };
        st.exe = start.exe.clone();
        st.cmdline = cmdline;
        let was_vfork = !st.vfork_done;
        st.vfork_done = true;
        (st.ppid, was_vfork)
    };
    *t.h.comm.lock().expect("comm poisoned") = comm_of(&start.exe);
    if vfork_parent {
        if let Some(p) = k.pids.lock().expect("pids poisoned").group(ppid).cloned() {
            crate::kernel::exit::wake_all(&p);
        }
    }
    t.thread = ThreadState::default();
    t.vcpu.start_user(
        kvm_bindings::kvm_regs {
            rip: start.entry,
            rsp: start.stack_pointer,
            rflags: 0x202,
            ..Default::default()
        },
        0,
        0,
    );
    if t.vcpu.restore_fpu(&k.clean_fpu).is_err() {
        t.group_exit(ExitStatus::Signal(libc::SIGKILL));
    }
    Ok(Ret::Registers)
}

/// Set in a re-executed program's environment: it was started again by a restore
/// (its earlier run was checkpointed while it ran), with the value `1`.
pub const REEXECUTED_ENV: &[u8] = b"VMCTL_REEXECUTED";

/// Runs in the one task a restore kept of a process marked for re-execution
/// (`--reexec`), before it runs any guest code: execs the recorded program again,
/// with its recorded argv, environment (plus `VMCTL_REEXECUTED=1`), signal mask and
/// ignored signals, in the same process: same pid and parent, its descriptors (those
/// marked close-on-exec close; sockets came back as /dev/null), its working
/// directory. If the program can no longer be loaded the process exits with 127
/// (126 if it is not executable), and a line on stderr says why. A process the
/// program had forked (and that has not exec'd since) is ended with SIGKILL
/// instead: it belonged to the replaced run (srun's shepherd would otherwise see
/// its parent go and cancel a step by its old id).
pub fn reexec_after_restore(t: &mut Task, record: ExecRecord) {
    if record.forked {
        t.group_exit(ExitStatus::Signal(libc::SIGKILL));
        return;
    }
    let mut envp: Vec<Vec<u8>> = record
        .envp
        .iter()
        .filter(|e| !(e.starts_with(REEXECUTED_ENV) && e.get(REEXECUTED_ENV.len()) == Some(&b'=')))
        .cloned()
        .collect();
    let mut marker = REEXECUTED_ENV.to_vec();
    marker.extend_from_slice(b"=1");
    envp.push(marker);
    {
        let mut st = t.tg().lock();
        for (i, a) in st.actions.iter_mut().enumerate() {
            *a = SigAction::default();
            if (1..=64).contains(&i) && record.ignored & (1 << (i - 1)) != 0 {
                a.handler = SIG_IGN;
            }
        }
    }
    t.h.signals().blocked = record.blocked & !(sig_bit(libc::SIGKILL) | sig_bit(libc::SIGSTOP));
    if let Err(e) = exec_program(t, &record.path, record.argv.clone(), envp) {
        let code = if e.0 == libc::EACCES || e.0 == libc::ENOEXEC {
            126
        } else {
            127
        };
        eprintln!(
            "vmctl: process {}: cannot start {} again after the restore: {}; it exits with status {code}",
            t.tgid(),
            record.path.display(),
            std::io::Error::from_raw_os_error(e.0)
        );
        t.group_exit(ExitStatus::Code(code));
    }
}

fn start_root(mm: &Arc<Mutex<AddressSpace>>) -> u64 {
    mm.lock().expect("address space poisoned").root
}

/// exec's de_thread: every other thread of the process ends before the new program
/// runs. Interrupted by a freeze (EINTR, the call is restarted after the thaw).
fn kill_other_threads(t: &mut Task) -> Result<(), Errno> {
    let others: Vec<Arc<TaskHandle>> = t
        .tg()
        .lock()
        .threads
        .iter()
        .filter(|h| h.tid != t.tid())
        .cloned()
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    for h in &others {
        h.interrupt(crate::kernel::task::INTR_KILL);
    }
    let tg = t.tg().clone();
    let me = t.tid();
    // They stop at their next exit.
    while tg.lock().threads.iter().any(|h| h.tid != me) {
        if t.h.flags() & (INTR_FREEZE | crate::kernel::task::INTR_KILL) != 0 {
            return Err(Errno(libc::EINTR));
        }
        for h in &others {
            h.kick();
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(())
}

/// Which children a wait call is about.
enum Which {
    Any,
    Pid(i32),
    Pgid(i32),
}

fn matches(which: &Which, g: &ThreadGroup, my_pgid: i32) -> bool {
    match *which {
        Which::Any => true,
        Which::Pid(p) => g.tgid == p,
        Which::Pgid(0) => g.lock().pgid == my_pgid,
        Which::Pgid(p) => g.lock().pgid == p,
    }
}

/// Finds (and unless `keep`, reaps) a zombie child. None: children exist but none
/// has ended; ECHILD: no such child.
fn take_zombie(t: &Task, which: &Which, keep: bool) -> Result<Option<(i32, ExitStatus)>, Errno> {
    let me = t.tgid();
    let my_pgid = t.tg().lock().pgid;
    let mut pids = t.k.pids.lock().expect("pids poisoned");
    let mut any = false;
    let mut found = None;
    for g in pids.groups.values() {
        if g.tgid == me || g.lock().ppid != me || !matches(which, g, my_pgid) {
            continue;
        }
        any = true;
        if let Life::Zombie(s) = g.lock().life {
            found = Some((g.tgid, s));
            break;
        }
    }
    match found {
        Some((pid, s)) => {
            if !keep {
                pids.groups.remove(&pid);
            }
            Ok(Some((pid, s)))
        }
        None if any => Ok(None),
        None => Err(Errno(libc::ECHILD)),
    }
}

pub fn wait4(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (pid, status_ptr, options, rusage) = (a[0] as i32, a[1], a[2] as i32, a[3]);
    if options
        & !(libc::WNOHANG
            | libc::WUNTRACED
            | libc::WCONTINUED
            | libc::__WALL
            | libc::__WCLONE
            | libc::__WNOTHREAD)
        != 0
    {
        return Err(Errno(libc::EINVAL));
    }
    let which = match pid {
        -1 => Which::Any,
        0 => Which::Pgid(0),
        p if p > 0 => Which::Pid(p),
        p => Which::Pgid(-p),
    };
    let nohang = options & libc::WNOHANG != 0;
    let got = t.wait_until(None, |t| match take_zombie(t, &which, false)? {
        Some(x) => Ok(Some(Some(x))),
        None if nohang => Ok(Some(None)),
        None => Ok(None),
    })?;
    let Some((child, status)) = got else {
        return Ok(0);
    };
    if status_ptr != 0 {
        t.write_user(status_ptr, &wait_status(status).to_le_bytes())?;
    }
    if rusage != 0 {
        t.write_user(rusage, &[0u8; 144])?;
    }
    Ok(child as i64)
}

pub fn waitid(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (idtype, id, info_ptr, options, rusage) =
        (a[0] as u32, a[1] as i32, a[2], a[3] as i32, a[4]);
    if options & (libc::WEXITED | libc::WSTOPPED | libc::WCONTINUED) == 0 {
        return Err(Errno(libc::EINVAL));
    }
    let which = match idtype {
        libc::P_ALL => Which::Any,
        libc::P_PID => Which::Pid(id),
        libc::P_PGID => Which::Pgid(id),
        _ => return Err(Errno(libc::EINVAL)),
    };
    let nohang = options & libc::WNOHANG != 0;
    let keep = options & libc::WNOWAIT != 0;
    let got = if options & libc::WEXITED == 0 {
        // Only stop/continue events were asked for, and the guest never stops.
        if nohang {
            None
        } else {
            t.wait_until(None, |_| Ok(None::<()>))?;
            None
        }
    } else {
        t.wait_until(None, |t| match take_zombie(t, &which, keep)? {
            Some(x) => Ok(Some(Some(x))),
            None if nohang => Ok(Some(None)),
            None => Ok(None),
        })?
    };
    if info_ptr != 0 {
        let mut b = [0u8; 128];
        if let Some((child, status)) = got {
            let (code, st) = child_info(status);
            b[0..4].copy_from_slice(&libc::SIGCHLD.to_le_bytes());
            b[8..12].copy_from_slice(&code.to_le_bytes());
            b[16..20].copy_from_slice(&child.to_le_bytes());
            b[20..24].copy_from_slice(&t.k.host.uid.to_le_bytes());
            b[24..28].copy_from_slice(&st.to_le_bytes());
        }
        t.write_user(info_ptr, &b)?;
    }
    if rusage != 0 {
        t.write_user(rusage, &[0u8; 144])?;
    }
    Ok(0)
}

impl FdTable {
    /// Closes every descriptor marked close-on-exec.
    pub fn close_on_exec(&mut self) {
        for fd in self.fds() {
            if self.get(fd).is_ok_and(|e| e.cloexec) {
                let _ = self.remove(fd);
            }
        }
    }
}
