//! Syscall dispatch. Each family lives in its own file; a handler gets the kernel and
//! the six argument registers and returns a value or an errno, which the dispatcher
//! puts in RAX as Linux would.

mod events;
pub(crate) mod fs;
mod identity;
mod memory;
mod misc;
mod names;
mod net;
mod procfs;
mod signal;
mod time;

use crate::kernel::{Kernel, SysResult};

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

pub fn handle(k: &mut Kernel) {
    let r = *k.vcpu.user_regs();
    let nr = r.rax;
    let a = [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9];
    let ret = match dispatch(k, nr, a) {
        Ok(ret) => ret,
        Err(e) if e.0 == libc::EINTR && !interrupts_guest(k, nr) => {
            // A host signal meant for vmctl (a checkpoint request, a signal with no
            // guest handler) stopped a blocking call: run the syscall again once we
            // are done, so the guest never notices (Linux's ERESTARTNOHAND).
            let r = k.vcpu.user_regs_mut();
            r.rip -= 2;
            r.rax = nr;
            return;
        }
        Err(e) => {
            // The guest sees this interruption itself, so a sleep it retries starts
            // over from its own arguments.
            if e.0 == libc::EINTR {
                k.proc.sleep_restart = None;
            }
            Ret::Value(-(e.0 as i64))
        }
    };
    if let Ret::Value(v) = ret {
        k.vcpu.user_regs_mut().rax = v as u64;
    }
}

/// Whether an interrupted syscall must fail with EINTR: a signal is about to run a
/// guest handler, and the call is not restarted after handlers (no SA_RESTART, or a
/// call Linux never restarts).
fn interrupts_guest(k: &Kernel, nr: u64) -> bool {
    use crate::kernel::signals::{SA_RESTART, SIG_DFL, SIG_IGN};
    let forwarded = (1..64)
        .filter(|&s| crate::control::signals::peek_pending() & (1 << s) != 0)
        .filter(|&s| {
            crate::control::signals::action(s) == crate::control::signals::SignalAction::Forward
        })
        .fold(0u64, |m, s| m | crate::kernel::signals::sig_bit(s));
    let ready = (k.proc.signals.pending | forwarded) & !k.proc.signals.blocked;
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
    );
    (1..=64).any(|sig| {
        if ready & crate::kernel::signals::sig_bit(sig) == 0 {
            return false;
        }
        let act = k.proc.signals.action(sig);
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
fn dispatch(k: &mut Kernel, nr: u64, a: [u64; 6]) -> Result<Ret, crate::kernel::Errno> {
    use libc::*;
    let n = nr as i64;
    match n {
        // files and I/O
        SYS_read => v(fs::read(k, a)),
        SYS_write => v(fs::write(k, a)),
        SYS_pread64 => v(fs::pread(k, a)),
        SYS_pwrite64 => v(fs::pwrite(k, a)),
        SYS_readv => v(fs::readv(k, a, false)),
        SYS_writev => v(fs::readv(k, a, true)),
        SYS_preadv => v(fs::preadv(k, a, false)),
        SYS_pwritev => v(fs::preadv(k, a, true)),
        SYS_open => v(fs::openat(k, AT_FDCWD as u64, a[0], a[1], a[2])),
        SYS_creat => v(fs::openat(
            k,
            AT_FDCWD as u64,
            a[0],
            (O_CREAT | O_WRONLY | O_TRUNC) as u64,
            a[1],
        )),
        SYS_openat => v(fs::openat(k, a[0], a[1], a[2], a[3])),
        SYS_close => v(fs::close(k, a)),
        SYS_close_range => v(fs::close_range(k, a)),
        SYS_lseek => v(fs::lseek(k, a)),
        SYS_stat => v(fs::fstatat(k, AT_FDCWD as u64, a[0], a[1], 0)),
        SYS_lstat => v(fs::fstatat(
            k,
            AT_FDCWD as u64,
            a[0],
            a[1],
            AT_SYMLINK_NOFOLLOW as u64,
        )),
        SYS_fstat => v(fs::fstat(k, a)),
        SYS_newfstatat => v(fs::fstatat(k, a[0], a[1], a[2], a[3])),
        SYS_statx => v(fs::statx(k, a)),
        SYS_statfs => v(fs::statfs(k, a)),
        SYS_fstatfs => v(fs::fstatfs(k, a)),
        SYS_getdents64 => v(fs::getdents64(k, a)),
        SYS_access => v(fs::faccessat(k, AT_FDCWD as u64, a[0], a[1], 0)),
        SYS_faccessat => v(fs::faccessat(k, a[0], a[1], a[2], 0)),
        SYS_faccessat2 => v(fs::faccessat(k, a[0], a[1], a[2], a[3])),
        SYS_readlink => v(fs::readlinkat(k, AT_FDCWD as u64, a[0], a[1], a[2])),
        SYS_readlinkat => v(fs::readlinkat(k, a[0], a[1], a[2], a[3])),
        SYS_fcntl => v(fs::fcntl(k, a)),
        SYS_ioctl => v(fs::ioctl(k, a)),
        SYS_dup => v(fs::dup(k, a)),
        SYS_dup2 => v(fs::dup3(k, a[0], a[1], 0, true)),
        SYS_dup3 => v(fs::dup3(k, a[0], a[1], a[2], false)),
        SYS_pipe => v(fs::pipe2(k, a[0], 0)),
        SYS_pipe2 => v(fs::pipe2(k, a[0], a[1])),
        SYS_unlink => v(fs::unlinkat(k, AT_FDCWD as u64, a[0], 0)),
        SYS_unlinkat => v(fs::unlinkat(k, a[0], a[1], a[2])),
        SYS_rmdir => v(fs::unlinkat(k, AT_FDCWD as u64, a[0], AT_REMOVEDIR as u64)),
        SYS_rename => v(fs::renameat2(
            k,
            AT_FDCWD as u64,
            a[0],
            AT_FDCWD as u64,
            a[1],
            0,
        )),
        SYS_renameat => v(fs::renameat2(k, a[0], a[1], a[2], a[3], 0)),
        SYS_renameat2 => v(fs::renameat2(k, a[0], a[1], a[2], a[3], a[4])),
        SYS_mkdir => v(fs::mkdirat(k, AT_FDCWD as u64, a[0], a[1])),
        SYS_mkdirat => v(fs::mkdirat(k, a[0], a[1], a[2])),
        SYS_link => v(fs::linkat(
            k,
            AT_FDCWD as u64,
            a[0],
            AT_FDCWD as u64,
            a[1],
            0,
        )),
        SYS_linkat => v(fs::linkat(k, a[0], a[1], a[2], a[3], a[4])),
        SYS_symlink => v(fs::symlinkat(k, a[0], AT_FDCWD as u64, a[1])),
        SYS_symlinkat => v(fs::symlinkat(k, a[0], a[1], a[2])),
        SYS_chmod => v(fs::fchmodat(k, AT_FDCWD as u64, a[0], a[1])),
        SYS_fchmodat => v(fs::fchmodat(k, a[0], a[1], a[2])),
        SYS_fchmod => v(fs::fchmod(k, a)),
        SYS_chown => v(fs::fchownat(k, AT_FDCWD as u64, a[0], a[1], a[2], 0)),
        SYS_lchown => v(fs::fchownat(
            k,
            AT_FDCWD as u64,
            a[0],
            a[1],
            a[2],
            AT_SYMLINK_NOFOLLOW as u64,
        )),
        SYS_fchownat => v(fs::fchownat(k, a[0], a[1], a[2], a[3], a[4])),
        SYS_fchown => v(fs::fchown(k, a)),
        SYS_truncate => v(fs::truncate(k, a)),
        SYS_ftruncate => v(fs::ftruncate(k, a)),
        SYS_fsync | SYS_fdatasync | SYS_syncfs => v(fs::fsync(k, n, a)),
        SYS_sync => v(fs::sync()),
        SYS_fallocate => v(fs::fallocate(k, a)),
        SYS_fadvise64 => v(fs::fadvise(k, a)),
        SYS_flock => v(fs::flock(k, a)),
        SYS_utimensat => v(fs::utimensat(k, a)),
        SYS_utimes | SYS_utime | SYS_futimesat => v(fs::utimes_legacy(k, n, a)),
        SYS_getcwd => v(fs::getcwd(k, a)),
        SYS_chdir => v(fs::chdir(k, a)),
        SYS_fchdir => v(fs::fchdir(k, a)),
        SYS_umask => v(fs::umask(k, a)),
        SYS_poll => v(fs::poll(k, a[0], a[1], a[2] as i32 as i64)),
        SYS_ppoll => v(fs::ppoll(k, a)),
        SYS_select => v(fs::select(k, a, false)),
        SYS_pselect6 => v(fs::select(k, a, true)),
        SYS_sendfile => v(fs::sendfile(k, a)),
        SYS_copy_file_range => v(fs::copy_file_range(k, a)),
        SYS_memfd_create => v(fs::memfd_create(k, a)),
        SYS_eventfd2 | SYS_eventfd => v(fs::eventfd(k, n, a)),
        SYS_mknod | SYS_mknodat => v(fs::mknodat(k, n, a)),
        SYS_getxattr | SYS_lgetxattr | SYS_fgetxattr | SYS_setxattr | SYS_lsetxattr
        | SYS_fsetxattr | SYS_listxattr | SYS_llistxattr | SYS_flistxattr | SYS_removexattr
        | SYS_lremovexattr | SYS_fremovexattr => v(fs::xattr(k, n, a)),
        SYS_splice => v(fs::splice(k, a)),
        SYS_tee => v(fs::tee(k, a)),

        // event descriptors
        SYS_epoll_create | SYS_epoll_create1 => v(events::epoll_create(k, n, a)),
        SYS_epoll_ctl => v(events::epoll_ctl(k, a)),
        SYS_epoll_wait | SYS_epoll_pwait => v(events::epoll_wait(k, a, a[3] as i32 as i64)),
        SYS_epoll_pwait2 => {
            let t = fs::timespec_ms(k, a[3]);
            v(t.and_then(|t| events::epoll_wait(k, a, t)))
        }
        SYS_inotify_init => v(events::inotify_init(k, 0)),
        SYS_inotify_init1 => v(events::inotify_init(k, a[0])),
        SYS_inotify_add_watch => v(events::inotify_add_watch(k, a)),
        SYS_inotify_rm_watch => v(events::inotify_rm_watch(k, a)),
        SYS_timerfd_create => v(events::timerfd_create(k, a)),
        SYS_timerfd_settime => v(events::timerfd_settime(k, a)),
        SYS_timerfd_gettime => v(events::timerfd_gettime(k, a)),

        // sockets
        SYS_socket => v(net::socket(k, a)),
        SYS_socketpair => v(net::socketpair(k, a)),
        SYS_connect | SYS_bind => v(net::with_addr(k, n, a)),
        SYS_listen => v(net::listen(k, a)),
        SYS_shutdown => v(net::shutdown(k, a)),
        SYS_accept => v(net::accept4(k, a, 0)),
        SYS_accept4 => v(net::accept4(k, a, a[3])),
        SYS_getsockname | SYS_getpeername => v(net::sockname(k, n, a)),
        SYS_setsockopt => v(net::setsockopt(k, a)),
        SYS_getsockopt => v(net::getsockopt(k, a)),
        SYS_sendto => v(net::sendto(k, a)),
        SYS_recvfrom => v(net::recvfrom(k, a)),
        SYS_sendmsg => v(net::sendmsg(k, a)),
        SYS_recvmsg => v(net::recvmsg(k, a)),

        // memory
        SYS_mmap => v(memory::mmap(k, a)),
        SYS_munmap => v(memory::munmap(k, a)),
        SYS_mprotect => v(memory::mprotect(k, a)),
        SYS_mremap => v(memory::mremap(k, a)),
        SYS_brk => v(memory::brk(k, a)),
        SYS_madvise => v(memory::madvise(k, a)),
        SYS_msync => v(memory::msync(k, a)),
        SYS_mincore => v(memory::mincore(k, a)),
        SYS_mlock | SYS_munlock | SYS_mlockall | SYS_munlockall | SYS_mlock2 => Ok(Ret::Value(0)),
        // One memory node: every policy is the default one.
        SYS_get_mempolicy => v(memory::get_mempolicy(k, a)),
        SYS_set_mempolicy | SYS_mbind => Ok(Ret::Value(0)),

        // time
        SYS_clock_gettime => v(time::clock_gettime(k, a)),
        SYS_clock_getres => v(time::clock_getres(k, a)),
        SYS_gettimeofday => v(time::gettimeofday(k, a)),
        SYS_time => v(time::time(k, a)),
        SYS_nanosleep => v(time::nanosleep(k, a)),
        SYS_clock_nanosleep => v(time::clock_nanosleep(k, a)),
        SYS_times => v(time::times(k, a)),
        SYS_getrusage => v(time::getrusage(k, a)),

        // identity and limits
        SYS_getpid => Ok(Ret::Value(k.proc.pid as i64)),
        SYS_gettid => Ok(Ret::Value(k.proc.tid() as i64)),
        SYS_getppid => Ok(Ret::Value(k.proc.ppid as i64)),
        SYS_getpgrp => Ok(Ret::Value(k.proc.pgid as i64)),
        SYS_getpgid => v(identity::getpgid(k, a)),
        SYS_getsid => v(identity::getsid(k, a)),
        SYS_setpgid | SYS_setsid => v(identity::setpgid(k, n, a)),
        SYS_getuid => Ok(Ret::Value(unsafe_id(libc::getuid) as i64)),
        SYS_geteuid => Ok(Ret::Value(unsafe_id(libc::geteuid) as i64)),
        SYS_getgid => Ok(Ret::Value(unsafe_id(libc::getgid) as i64)),
        SYS_getegid => Ok(Ret::Value(unsafe_id(libc::getegid) as i64)),
        SYS_getresuid | SYS_getresgid => v(identity::getres(k, n, a)),
        SYS_getgroups => v(identity::getgroups(k, a)),
        SYS_setuid | SYS_setgid | SYS_setreuid | SYS_setregid | SYS_setresuid | SYS_setresgid
        | SYS_setfsuid | SYS_setfsgid | SYS_setgroups => v(identity::setid(n, a)),
        SYS_uname => v(identity::uname(k, a)),
        SYS_sysinfo => v(identity::sysinfo(k, a)),
        SYS_getrlimit => v(identity::prlimit(k, 0, a[0], 0, a[1])),
        SYS_setrlimit => v(identity::prlimit(k, 0, a[0], a[1], 0)),
        SYS_prlimit64 => v(identity::prlimit(k, a[0], a[1], a[2], a[3])),
        SYS_getpriority => Ok(Ret::Value(20)),
        SYS_setpriority => Ok(Ret::Value(0)),
        SYS_sched_getaffinity => v(identity::sched_getaffinity(k, a)),
        SYS_sched_setaffinity => Ok(Ret::Value(0)),
        SYS_sched_yield => Ok(Ret::Value(0)),
        SYS_sched_getscheduler => Ok(Ret::Value(0)),
        SYS_sched_getparam => v(identity::zero_struct(k, a[1], 4)),
        SYS_sched_get_priority_max | SYS_sched_get_priority_min => Ok(Ret::Value(0)),
        SYS_getcpu => v(identity::getcpu(k, a)),
        SYS_capget => v(identity::capget(k, a)),

        // signals
        SYS_rt_sigaction => v(signal::rt_sigaction(k, a)),
        SYS_rt_sigprocmask => v(signal::rt_sigprocmask(k, a)),
        SYS_rt_sigreturn => signal::rt_sigreturn(k),
        SYS_rt_sigpending => v(signal::rt_sigpending(k, a)),
        SYS_sigaltstack => v(signal::sigaltstack(k, a)),
        SYS_kill => v(signal::kill(k, a)),
        SYS_tgkill => v(signal::tgkill(k, a[0] as i32, a[1] as i32, a[2] as i32)),
        SYS_tkill => v(signal::tgkill(k, k.proc.pid, a[0] as i32, a[1] as i32)),
        SYS_rt_sigsuspend => v(signal::rt_sigsuspend(k, a)),
        SYS_pause => v(signal::suspend(k, None)),
        SYS_setitimer => v(signal::setitimer(k, a)),
        SYS_getitimer => v(signal::getitimer(k, a)),
        SYS_alarm => v(signal::alarm(a)),
        SYS_rt_sigtimedwait => v(signal::sigtimedwait(k, a)),

        // process and thread plumbing
        SYS_exit | SYS_exit_group => {
            k.exit(crate::kernel::process::ExitStatus::Code(a[0] as i32 & 0xff));
            Ok(Ret::Registers)
        }
        SYS_arch_prctl => v(misc::arch_prctl(k, a)),
        SYS_set_tid_address => {
            k.proc.clear_child_tid = a[0];
            Ok(Ret::Value(k.proc.tid() as i64))
        }
        SYS_set_robust_list => {
            k.proc.robust_list = (a[0], a[1]);
            Ok(Ret::Value(0))
        }
        SYS_get_robust_list => v(misc::get_robust_list(k, a)),
        SYS_rseq => v(misc::rseq(k, a)),
        SYS_futex => v(misc::futex(k, a)),
        SYS_getrandom => v(misc::getrandom(k, a)),
        SYS_prctl => v(misc::prctl(k, a)),
        SYS_wait4 | SYS_waitid => Ok(Ret::Value(-(ECHILD as i64))),
        SYS_membarrier => Ok(Ret::Value(0)),
        SYS_personality => Ok(Ret::Value(0)),
        _ => {
            k.warn_unsupported(nr);
            Ok(Ret::Value(-(ENOSYS as i64)))
        }
    }
}

fn unsafe_id(f: unsafe extern "C" fn() -> u32) -> u32 {
    // SAFETY: the identity getters take no arguments and cannot fail.
    unsafe { f() }
}
