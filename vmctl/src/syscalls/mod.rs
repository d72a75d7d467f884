//! Syscall dispatch. Each family lives in its own file; a handler gets the kernel and
//! the six argument registers and returns a value or an errno, which the dispatcher
//! puts in RAX as Linux would.

mod events;
pub(crate) mod fs;
mod guest_path;
mod identity;
mod memory;
mod misc;
mod names;
mod net;
pub(crate) mod process;
mod procfs;
mod signal;
mod time;

use crate::kernel::task::Task;
use crate::kernel::SysResult;

/// The number's name, for warnings.
pub fn name(nr: u64) -> &'static str {
    names::NAMES
        .binary_search_by_key(&nr, |&(n, _)| n)
        .map(|i| names::NAMES[i].1)
        .unwrap_or("unknown")
}

/// What a handler did with the guest's registers.
pub enum Ret {
    /// Put this in RAX (negative errno on failure).
    Value(i64),
    /// The handler set the registers itself (rt_sigreturn) or the process is gone.
    Registers,
}

pub fn handle(t: &mut Task) {
    let r = *t.vcpu.user_regs();
    let nr = r.rax;
    let a = [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9];
    let ret = match dispatch(t, nr, a) {
        Ok(ret) => ret,
        Err(e) if e.0 == libc::EINTR && !interrupts_guest(t, nr) => {
            // A host signal meant for vmctl (a checkpoint request, a signal with no
            // guest handler) stopped a blocking call: run the syscall again once we
            // are done, so the guest never notices (Linux's ERESTARTNOHAND).
            let r = t.vcpu.user_regs_mut();
            r.rip -= 2;
            r.rax = nr;
            return;
        }
        Err(e) => {
            // The guest sees this interruption itself, so a sleep it retries starts
            // over from its own arguments.
            if e.0 == libc::EINTR {
                t.thread.sleep_restart = None;
            }
            Ret::Value(-(e.0 as i64))
        }
    };
    if let Ret::Value(v) = ret {
        t.vcpu.user_regs_mut().rax = v as u64;
    }
}

/// Whether an interrupted syscall must fail with EINTR: a signal is about to run a
/// guest handler, and the call is not restarted after handlers (no SA_RESTART, or a
/// call Linux never restarts). Anything else that interrupted it (a freeze for a
/// checkpoint, a blocked or ignored signal) restarts it unseen.
fn interrupts_guest(t: &Task, nr: u64) -> bool {
    use crate::kernel::signals::{sig_bit, SA_RESTART, SIG_DFL, SIG_IGN};
    let never_restarted = matches!(
        nr as i64,
        libc::SYS_pause
            | libc::SYS_rt_sigsuspend
            | libc::SYS_nanosleep
            | libc::SYS_clock_nanosleep
            | libc::SYS_poll
            | libc::SYS_ppoll
            | libc::SYS_select
            | libc::SYS_pselect6
            | libc::SYS_rt_sigtimedwait
            | libc::SYS_epoll_wait
            | libc::SYS_epoll_pwait
            | libc::SYS_epoll_pwait2
    );
    let st = t.tg().lock();
    let ts = t.h.signals();
    let ready = (ts.pending.mask | st.pending.mask) & !ts.blocked;
    (1..=64).any(|sig| {
        if ready & sig_bit(sig) == 0 {
            return false;
        }
        let act = st.actions[sig as usize];
        act.handler != SIG_DFL
            && act.handler != SIG_IGN
            && (never_restarted || act.flags & SA_RESTART == 0)
    })
}

fn v(r: SysResult) -> Result<Ret, crate::kernel::Errno> {
    r.map(Ret::Value)
}

// The syscall numbers keep libc's lower-case names, so the match reads like the man pages.
#[allow(non_upper_case_globals)]
fn dispatch(t: &mut Task, nr: u64, a: [u64; 6]) -> Result<Ret, crate::kernel::Errno> {
    use libc::*;
    let n = nr as i64;
    match n {
        // files and I/O
        SYS_read => v(fs::read(t, a)),
        SYS_write => v(fs::write(t, a)),
        SYS_pread64 => v(fs::pread(t, a)),
        SYS_pwrite64 => v(fs::pwrite(t, a)),
        SYS_readv => v(fs::readv(t, a, false)),
        SYS_writev => v(fs::readv(t, a, true)),
        SYS_preadv => v(fs::preadv(t, a, false)),
        SYS_pwritev => v(fs::preadv(t, a, true)),
        SYS_open => v(fs::openat(t, AT_FDCWD as u64, a[0], a[1], a[2])),
        SYS_creat => v(fs::openat(
            t,
            AT_FDCWD as u64,
            a[0],
            (O_CREAT | O_WRONLY | O_TRUNC) as u64,
            a[1],
        )),
        SYS_openat => v(fs::openat(t, a[0], a[1], a[2], a[3])),
        SYS_close => v(fs::close(t, a)),
        SYS_close_range => v(fs::close_range(t, a)),
        SYS_lseek => v(fs::lseek(t, a)),
        SYS_stat => v(fs::fstatat(t, AT_FDCWD as u64, a[0], a[1], 0)),
        SYS_lstat => v(fs::fstatat(
            t,
            AT_FDCWD as u64,
            a[0],
            a[1],
            AT_SYMLINK_NOFOLLOW as u64,
        )),
        SYS_fstat => v(fs::fstat(t, a)),
        SYS_newfstatat => v(fs::fstatat(t, a[0], a[1], a[2], a[3])),
        SYS_statx => v(fs::statx(t, a)),
        SYS_statfs => v(fs::statfs(t, a)),
        SYS_fstatfs => v(fs::fstatfs(t, a)),
        SYS_getdents64 => v(fs::getdents64(t, a)),
        SYS_access => v(fs::faccessat(t, AT_FDCWD as u64, a[0], a[1], 0)),
        SYS_faccessat => v(fs::faccessat(t, a[0], a[1], a[2], 0)),
        SYS_faccessat2 => v(fs::faccessat(t, a[0], a[1], a[2], a[3])),
        SYS_readlink => v(fs::readlinkat(t, AT_FDCWD as u64, a[0], a[1], a[2])),
        SYS_readlinkat => v(fs::readlinkat(t, a[0], a[1], a[2], a[3])),
        SYS_fcntl => v(fs::fcntl(t, a)),
        SYS_ioctl => v(fs::ioctl(t, a)),
        SYS_dup => v(fs::dup(t, a)),
        SYS_dup2 => v(fs::dup3(t, a[0], a[1], 0, true)),
        SYS_dup3 => v(fs::dup3(t, a[0], a[1], a[2], false)),
        SYS_pipe => v(fs::pipe2(t, a[0], 0)),
        SYS_pipe2 => v(fs::pipe2(t, a[0], a[1])),
        SYS_unlink => v(fs::unlinkat(t, AT_FDCWD as u64, a[0], 0)),
        SYS_unlinkat => v(fs::unlinkat(t, a[0], a[1], a[2])),
        SYS_rmdir => v(fs::unlinkat(t, AT_FDCWD as u64, a[0], AT_REMOVEDIR as u64)),
        SYS_rename => v(fs::renameat2(
            t,
            AT_FDCWD as u64,
            a[0],
            AT_FDCWD as u64,
            a[1],
            0,
        )),
        SYS_renameat => v(fs::renameat2(t, a[0], a[1], a[2], a[3], 0)),
        SYS_renameat2 => v(fs::renameat2(t, a[0], a[1], a[2], a[3], a[4])),
        SYS_mkdir => v(fs::mkdirat(t, AT_FDCWD as u64, a[0], a[1])),
        SYS_mkdirat => v(fs::mkdirat(t, a[0], a[1], a[2])),
        SYS_link => v(fs::linkat(
            t,
            AT_FDCWD as u64,
            a[0],
            AT_FDCWD as u64,
            a[1],
            0,
        )),
        SYS_linkat => v(fs::linkat(t, a[0], a[1], a[2], a[3], a[4])),
        SYS_symlink => v(fs::symlinkat(t, a[0], AT_FDCWD as u64, a[1])),
        SYS_symlinkat => v(fs::symlinkat(t, a[0], a[1], a[2])),
        SYS_chmod => v(fs::fchmodat(t, AT_FDCWD as u64, a[0], a[1])),
        SYS_fchmodat => v(fs::fchmodat(t, a[0], a[1], a[2])),
        SYS_fchmod => v(fs::fchmod(t, a)),
        SYS_chown => v(fs::fchownat(t, AT_FDCWD as u64, a[0], a[1], a[2], 0)),
        SYS_lchown => v(fs::fchownat(
            t,
            AT_FDCWD as u64,
            a[0],
            a[1],
            a[2],
            AT_SYMLINK_NOFOLLOW as u64,
        )),
        SYS_fchownat => v(fs::fchownat(t, a[0], a[1], a[2], a[3], a[4])),
        SYS_fchown => v(fs::fchown(t, a)),
        SYS_truncate => v(fs::truncate(t, a)),
        SYS_ftruncate => v(fs::ftruncate(t, a)),
        SYS_fsync | SYS_fdatasync | SYS_syncfs => v(fs::fsync(t, n, a)),
        SYS_sync => v(fs::sync()),
        SYS_fallocate => v(fs::fallocate(t, a)),
        SYS_fadvise64 => v(fs::fadvise(t, a)),
        SYS_flock => v(fs::flock(t, a)),
        SYS_utimensat => v(fs::utimensat(t, a)),
        SYS_utimes | SYS_utime | SYS_futimesat => v(fs::utimes_legacy(t, n, a)),
        SYS_getcwd => v(fs::getcwd(t, a)),
        SYS_chdir => v(fs::chdir(t, a)),
        SYS_fchdir => v(fs::fchdir(t, a)),
        SYS_umask => v(fs::umask(t, a)),
        SYS_poll => v(fs::poll(t, a[0], a[1], a[2] as i32 as i64)),
        SYS_ppoll => v(fs::ppoll(t, a)),
        SYS_select => v(fs::select(t, a, false)),
        SYS_pselect6 => v(fs::select(t, a, true)),
        SYS_sendfile => v(fs::sendfile(t, a)),
        SYS_copy_file_range => v(fs::copy_file_range(t, a)),
        SYS_memfd_create => v(fs::memfd_create(t, a)),
        SYS_eventfd2 | SYS_eventfd => v(fs::eventfd(t, n, a)),
        SYS_mknod | SYS_mknodat => v(fs::mknodat(t, n, a)),
        SYS_getxattr | SYS_lgetxattr | SYS_fgetxattr | SYS_setxattr | SYS_lsetxattr
        | SYS_fsetxattr | SYS_listxattr | SYS_llistxattr | SYS_flistxattr | SYS_removexattr
        | SYS_lremovexattr | SYS_fremovexattr => v(fs::xattr(t, n, a)),
        SYS_splice => v(fs::splice(t, a)),
        SYS_tee => v(fs::tee(t, a)),

        // event descriptors
        SYS_epoll_create | SYS_epoll_create1 => v(events::epoll_create(t, n, a)),
        SYS_epoll_ctl => v(events::epoll_ctl(t, a)),
        SYS_epoll_wait => v(events::epoll_wait(t, a, a[3] as i32 as i64)),
        SYS_epoll_pwait => v(signal::wait_with_mask(t, a[4], a[5])
            .and_then(|()| events::epoll_wait(t, a, a[3] as i32 as i64))),
        SYS_epoll_pwait2 => {
            let ms = fs::timespec_ms(t, a[3]);
            v(ms.and_then(|ms| {
                signal::wait_with_mask(t, a[4], a[5])?;
                events::epoll_wait(t, a, ms)
            }))
        }
        SYS_inotify_init => v(events::inotify_init(t, 0)),
        SYS_inotify_init1 => v(events::inotify_init(t, a[0])),
        SYS_inotify_add_watch => v(events::inotify_add_watch(t, a)),
        SYS_inotify_rm_watch => v(events::inotify_rm_watch(t, a)),
        SYS_timerfd_create => v(events::timerfd_create(t, a)),
        SYS_timerfd_settime => v(events::timerfd_settime(t, a)),
        SYS_timerfd_gettime => v(events::timerfd_gettime(t, a)),

        // sockets
        SYS_socket => v(net::socket(t, a)),
        SYS_socketpair => v(net::socketpair(t, a)),
        SYS_connect | SYS_bind => v(net::with_addr(t, n, a)),
        SYS_listen => v(net::listen(t, a)),
        SYS_shutdown => v(net::shutdown(t, a)),
        SYS_accept => v(net::accept4(t, a, 0)),
        SYS_accept4 => v(net::accept4(t, a, a[3])),
        SYS_getsockname | SYS_getpeername => v(net::sockname(t, n, a)),
        SYS_setsockopt => v(net::setsockopt(t, a)),
        SYS_getsockopt => v(net::getsockopt(t, a)),
        SYS_sendto => v(net::sendto(t, a)),
        SYS_recvfrom => v(net::recvfrom(t, a)),
        SYS_sendmsg => v(net::sendmsg(t, a)),
        SYS_recvmsg => v(net::recvmsg(t, a)),

        // memory
        SYS_mmap => v(memory::mmap(t, a)),
        SYS_munmap => v(memory::munmap(t, a)),
        SYS_mprotect => v(memory::mprotect(t, a)),
        SYS_mremap => v(memory::mremap(t, a)),
        SYS_brk => v(memory::brk(t, a)),
        SYS_madvise => v(memory::madvise(t, a)),
        SYS_msync => v(memory::msync(t, a)),
        SYS_mincore => v(memory::mincore(t, a)),
        SYS_mlock | SYS_munlock | SYS_mlockall | SYS_munlockall | SYS_mlock2 => Ok(Ret::Value(0)),
        // One memory node: every policy is the default one.
        SYS_get_mempolicy => v(memory::get_mempolicy(t, a)),
        SYS_set_mempolicy | SYS_mbind => Ok(Ret::Value(0)),

        // time
        SYS_clock_gettime => v(time::clock_gettime(t, a)),
        SYS_clock_getres => v(time::clock_getres(t, a)),
        SYS_gettimeofday => v(time::gettimeofday(t, a)),
        SYS_time => v(time::time(t, a)),
        SYS_nanosleep => v(time::nanosleep(t, a)),
        SYS_clock_nanosleep => v(time::clock_nanosleep(t, a)),
        SYS_times => v(time::times(t, a)),
        SYS_getrusage => v(time::getrusage(t, a)),

        // identity and limits
        SYS_getpid => Ok(Ret::Value(t.tgid() as i64)),
        SYS_gettid => Ok(Ret::Value(t.tid() as i64)),
        SYS_getppid => Ok(Ret::Value(t.tg().lock().ppid as i64)),
        SYS_getpgrp => Ok(Ret::Value(t.tg().lock().pgid as i64)),
        SYS_getpgid => v(identity::getpgid(t, a)),
        SYS_getsid => v(identity::getsid(t, a)),
        SYS_setpgid | SYS_setsid => v(identity::setpgid(t, n, a)),
        SYS_getuid => Ok(Ret::Value(unsafe_id(libc::getuid) as i64)),
        SYS_geteuid => Ok(Ret::Value(unsafe_id(libc::geteuid) as i64)),
        SYS_getgid => Ok(Ret::Value(unsafe_id(libc::getgid) as i64)),
        SYS_getegid => Ok(Ret::Value(unsafe_id(libc::getegid) as i64)),
        SYS_getresuid | SYS_getresgid => v(identity::getres(t, n, a)),
        SYS_getgroups => v(identity::getgroups(t, a)),
        SYS_setuid | SYS_setgid | SYS_setreuid | SYS_setregid | SYS_setresuid | SYS_setresgid
        | SYS_setfsuid | SYS_setfsgid | SYS_setgroups => v(identity::setid(n, a)),
        SYS_uname => v(identity::uname(t, a)),
        SYS_sysinfo => v(identity::sysinfo(t, a)),
        SYS_getrlimit => v(identity::prlimit(t, 0, a[0], 0, a[1])),
        SYS_setrlimit => v(identity::prlimit(t, 0, a[0], a[1], 0)),
        SYS_prlimit64 => v(identity::prlimit(t, a[0], a[1], a[2], a[3])),
        SYS_getpriority => Ok(Ret::Value(20)),
        SYS_setpriority => Ok(Ret::Value(0)),
        SYS_sched_getaffinity => v(identity::sched_getaffinity(t, a)),
        SYS_sched_setaffinity => Ok(Ret::Value(0)),
        SYS_sched_yield => Ok(Ret::Value(0)),
        SYS_sched_getscheduler => Ok(Ret::Value(0)),
        SYS_sched_getparam => v(identity::zero_struct(t, a[1], 4)),
        SYS_sched_get_priority_max | SYS_sched_get_priority_min => Ok(Ret::Value(0)),
        SYS_getcpu => v(identity::getcpu(t, a)),
        SYS_capget => v(identity::capget(t, a)),

        // signals
        SYS_rt_sigaction => v(signal::rt_sigaction(t, a)),
        SYS_rt_sigprocmask => v(signal::rt_sigprocmask(t, a)),
        SYS_rt_sigreturn => signal::rt_sigreturn(t),
        SYS_rt_sigpending => v(signal::rt_sigpending(t, a)),
        SYS_sigaltstack => v(signal::sigaltstack(t, a)),
        SYS_kill => v(signal::kill(t, a)),
        SYS_tgkill => v(signal::tgkill(t, a[0] as i32, a[1] as i32, a[2] as i32)),
        SYS_tkill => v(signal::tgkill(t, -1, a[0] as i32, a[1] as i32)),
        SYS_rt_sigsuspend => v(signal::rt_sigsuspend(t, a)),
        SYS_pause => v(signal::suspend(t, None)),
        SYS_setitimer => v(signal::setitimer(t, a)),
        SYS_getitimer => v(signal::getitimer(t, a)),
        SYS_alarm => v(signal::alarm(t, a)),
        SYS_rt_sigtimedwait => v(signal::sigtimedwait(t, a)),

        // processes and threads
        SYS_clone => v(process::clone(t, a[0], a[1], a[2], a[3], a[4])),
        SYS_clone3 => v(process::clone3(t, a)),
        SYS_fork => v(process::clone(t, libc::SIGCHLD as u64, 0, 0, 0, 0)),
        SYS_vfork => v(process::clone(
            t,
            (libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD) as u64,
            0,
            0,
            0,
            0,
        )),
        SYS_execve => process::execve(t, libc::AT_FDCWD as u64, a[0], a[1], a[2], 0),
        SYS_execveat => process::execve(t, a[0], a[1], a[2], a[3], a[4]),
        SYS_exit => {
            t.thread_exit(crate::kernel::process::ExitStatus::Code(a[0] as i32 & 0xff));
            Ok(Ret::Registers)
        }
        SYS_exit_group => {
            t.group_exit(crate::kernel::process::ExitStatus::Code(a[0] as i32 & 0xff));
            Ok(Ret::Registers)
        }
        SYS_wait4 => v(process::wait4(t, a)),
        SYS_waitid => v(process::waitid(t, a)),
        // Calls that reach into a process by pid. None of them is emulated, and none
        // may ever reach vmctl (whose memory and descriptors are not the guest's) or
        // another host process: the caller gets EPERM, any other pid ESRCH.
        SYS_ptrace => v(misc::ptrace(t, a)),
        SYS_process_vm_readv | SYS_process_vm_writev | SYS_kcmp | SYS_pidfd_open => {
            v(misc::other_process(t, a[0]))
        }
        // No pidfd can exist in the VM.
        SYS_pidfd_getfd | SYS_pidfd_send_signal => Ok(Ret::Value(-(EBADF as i64))),
        SYS_arch_prctl => v(misc::arch_prctl(t, a)),
        SYS_set_tid_address => {
            t.thread.clear_child_tid = a[0];
            Ok(Ret::Value(t.tid() as i64))
        }
        SYS_set_robust_list => {
            t.thread.robust_list = (a[0], a[1]);
            Ok(Ret::Value(0))
        }
        SYS_get_robust_list => v(misc::get_robust_list(t, a)),
        SYS_rseq => v(misc::rseq(t, a)),
        SYS_futex => v(misc::futex(t, a)),
        SYS_getrandom => v(misc::getrandom(t, a)),
        SYS_prctl => v(misc::prctl(t, a)),
        SYS_membarrier => Ok(Ret::Value(0)),
        SYS_personality => Ok(Ret::Value(0)),
        _ => {
            t.warn_unsupported(nr);
            Ok(Ret::Value(-(ENOSYS as i64)))
        }
    }
}

fn unsafe_id(f: unsafe extern "C" fn() -> u32) -> u32 {
    // SAFETY: the identity getters take no arguments and cannot fail.
    unsafe { f() }
}
