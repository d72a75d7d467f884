//! The SPANK entry points and the per-process state they share.
//!
//! Slurm loads the plugin into sbatch/salloc (allocator context), srun
//! (local), slurmd and slurmstepd (remote). Only slurmstepd runs a wrapped
//! step; the other contexts just register and validate `--vm-wrap`.

use std::ffi::{c_char, c_int, CStr, CString, OsStr, OsString};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use crate::batch;
use crate::dirs::{self, Cleared, StepPath, BATCH_STEP_ID, FINISHED_MARKER, IDENTITY_FILE};
use crate::events;
use crate::launch::{self, Env, Mode, StepIdentity, EXIT_CHECKPOINTED};
use crate::options::{Config, WrapOptions};
use crate::resume::{self, ResumedBy, SrunRecord};
use crate::spank::{self, sys, Context, Spank};

/// Step ids at and above this are Slurm's special steps (batch script,
/// extern, interactive, pending): SLURM_MAX_NORMAL_STEP_ID in slurm.h.
const MAX_NORMAL_STEP_ID: u32 = 0xffff_fff0;

/// SPANK hooks return 0 on success and a negative value on failure.
const OK: c_int = 0;
const FAIL: c_int = -1;

/// What slurmstepd prepared for a wrapped step (remote context only).
struct Prepared {
    path: StepPath,
    kvm_fd: RawFd,
    /// The write end of the events pipe (crate::events), close-on-exec like
    /// kvm_fd: exec_vmctl hands it to vmctl only.
    events: Option<std::os::fd::OwnedFd>,
    /// Ends when every copy of the write end is closed.
    relay: Option<std::sync::mpsc::Receiver<()>>,
    /// Set once the job was handed to `vmctl pin-class`.
    pinning: bool,
}

struct State {
    /// None until slurm_spank_init parsed plugstack.conf.
    config: Option<Config>,
    /// The parsed `--vm-wrap` argument; None if the option was not given.
    wrap: Option<Result<WrapOptions, String>>,
    prepared: Option<Prepared>,
    /// Why a step that should be wrapped cannot be. Failing
    /// init_post_opt instead would make Slurm 22.05 report the step as
    /// successful (srun exits 0, a batch job ends COMPLETED), so the
    /// error is kept until task_init, where failing makes each task exit 1.
    step_error: Option<String>,
}

/// The events pipe's write end as the task process sees it: set in task_init
/// before build_exec puts it in vmctl's environment (-1: none).
static EVENTS_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// /dev/userfaultfd, opened by prepare_step (as root) when plugstack.conf has
/// lazy_restore=yes and handed to `vmctl restore --uffd-fd` only (-1: none).
static UFFD_DEV_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

static STATE: Mutex<State> = Mutex::new(State {
    config: None,
    wrap: None,
    prepared: None,
    step_error: None,
});

impl State {
    fn config(&self) -> Config {
        self.config.clone().unwrap_or_default()
    }
}

fn state() -> MutexGuard<'static, State> {
    // A panic while holding the lock was already reported; the state
    // itself is plain data and still usable.
    STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs a hook body, turning a panic into a logged failure: unwinding into
/// slurmstepd's C frames would abort the whole step daemon.
fn guard(hook: &str, body: impl FnOnce() -> c_int) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(rc) => rc,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            spank::error(&format!("internal error in {hook}: {why}"));
            FAIL
        }
    }
}

/// # Safety
/// `argv` must hold `ac` valid C strings (Slurm's plugstack arguments).
unsafe fn plugin_args(ac: c_int, argv: *mut *mut c_char) -> Vec<String> {
    let count = usize::try_from(ac).unwrap_or(0);
    if argv.is_null() {
        return Vec::new();
    }
    (0..count)
        .map(|i| CStr::from_ptr(*argv.add(i)).to_string_lossy().into_owned())
        .collect()
}

fn option_table() -> &'static mut sys::spank_option {
    Box::leak(Box::new(sys::spank_option {
        name: c"vm-wrap".as_ptr().cast_mut(),
        arginfo: c"OPTS".as_ptr().cast_mut(),
        usage: c"Run the batch script and each srun step of the job in a checkpointable VM (vmctl). OPTS is an optional comma list of interval=SECS (>=10), keep=N (1-10), compress=off|lz4|zstd[:LEVEL], mem=SIZE[KMGT], signal=NAME (default USR2: checkpoint and continue), script=native (only the srun steps), timelimit=continue (requeue and continue before the time limit), margin=SECS, continuations=N."
            .as_ptr()
            .cast_mut(),
        // 2: the argument is optional (--vm-wrap or --vm-wrap=OPTS).
        has_arg: 2,
        val: 0,
        cb: Some(vm_wrap_option),
    }))
}

#[no_mangle]
pub extern "C" fn slurm_spank_init(sp: sys::spank_t, ac: c_int, argv: *mut *mut c_char) -> c_int {
    guard("slurm_spank_init", || {
        let ctx = spank::context();
        // SAFETY: Slurm passes its plugstack.conf arguments as ac/argv.
        let args = unsafe { plugin_args(ac, argv) };
        let config = match Config::parse(args.iter().map(String::as_str)) {
            Ok(config) => config,
            Err(errors) => {
                for e in &errors {
                    spank::error(e);
                }
                if ctx == Context::Slurmd {
                    spank::error(
                        "every job step on this node will fail until plugstack.conf is fixed",
                    );
                    return OK;
                }
                // Only the step daemon must refuse to go on: a
                // misconfigured wrap could lose a user's work, while
                // sbatch and srun merely validate options.
                if ctx == Context::Remote {
                    return FAIL;
                }
                Config::default()
            }
        };
        if ctx == Context::Slurmd {
            // Once per slurmd start: tells admins which vmctl and checkpoint
            // root the nodes will use.
            spank::info(&format!(
                "loaded; vmctl={} checkpoint_root={}",
                config.vmctl.display(),
                config.checkpoint_root.display()
            ));
        }
        state().config = Some(config);
        if matches!(ctx, Context::Local | Context::Remote | Context::Allocator) {
            // SAFETY: `sp` is this hook's handle.
            let spank = unsafe { Spank::new(sp) };
            if let Err(e) = spank.register_option(option_table()) {
                spank::error(&format!("cannot register --vm-wrap: {e}"));
                return FAIL;
            }
        }
        OK
    })
}

extern "C" fn vm_wrap_option(_val: c_int, optarg: *const c_char, remote: c_int) -> c_int {
    guard("--vm-wrap", || {
        let arg = if optarg.is_null() {
            None
        } else {
            // SAFETY: a non-NULL optarg is a C string owned by Slurm for the
            // duration of the callback.
            Some(
                unsafe { CStr::from_ptr(optarg) }
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        let mut st = state();
        let parsed = WrapOptions::parse(arg.as_deref(), &st.config());
        let rc = match &parsed {
            Ok(_) => OK,
            Err(e) => {
                spank::error(&format!(
                    "invalid --vm-wrap={}: {e}",
                    arg.as_deref().unwrap_or("")
                ));
                FAIL
            }
        };
        // In slurmstepd a failing callback is only logged and the step
        // would run unwrapped; keeping the error lets init_post_opt fail
        // the step instead.
        if rc == OK || remote != 0 {
            st.wrap = Some(parsed);
        }
        rc
    })
}

#[no_mangle]
pub extern "C" fn slurm_spank_init_post_opt(
    sp: sys::spank_t,
    _ac: c_int,
    _argv: *mut *mut c_char,
) -> c_int {
    guard("slurm_spank_init_post_opt", || {
        if spank::context() != Context::Remote {
            return OK;
        }
        // SAFETY: `sp` is this hook's handle.
        let spank = unsafe { Spank::new(sp) };
        if let Err(e) = prepare_step(spank) {
            spank::error(&e);
            state().step_error = Some(e);
        }
        OK
    })
}

/// Runs as root in slurmstepd before any task is forked: creates the
/// checkpoint directories and opens /dev/kvm for the tasks to inherit.
fn prepare_step(spank: Spank) -> Result<(), String> {
    let mut st = state();
    let Some(wrap) = st.wrap.clone() else {
        return Ok(());
    };
    let job_id = spank.u32_item(sys::S_JOB_ID)?;
    let step_id = spank.u32_item(sys::S_JOB_STEPID)?;
    let uid = spank.u32_item(sys::S_JOB_UID)?;
    // The batch script is wrapped like a step; the other special steps
    // (extern, interactive) run no user program to wrap.
    if step_id >= MAX_NORMAL_STEP_ID && step_id != BATCH_STEP_ID {
        return Ok(());
    }
    if step_id == BATCH_STEP_ID && wrap.as_ref().is_ok_and(|o| o.native_script) {
        spank::verbose(&format!(
            "job {job_id}: script=native: the batch script runs natively; its srun steps are wrapped"
        ));
        record_wrapped_in_slurm(job_id, uid);
        return Ok(());
    }
    let opts =
        wrap.map_err(|e| format!("job {job_id} step {step_id}: refusing to run: --vm-wrap: {e}"))?;
    record_wrapped_in_slurm(job_id, uid);
    let gid = spank.u32_item(sys::S_JOB_GID)?;
    let user = user_name(uid)?;
    let path = StepPath {
        root: st.config().checkpoint_root,
        user,
        job_id,
        step_id,
    };
    let dir = path.create(uid, gid).map_err(|e| {
        format!(
            "job {job_id} step {step_id}: cannot create checkpoint directory {}: {e}",
            path.step_dir().display()
        )
    })?;
    let kvm_fd = open_kvm()
        .map_err(|e| format!("job {job_id} step {step_id}: cannot open /dev/kvm: {e}"))?;
    spank::info(&format!(
        "job {job_id} step {step_id}: wrapping in a VM; checkpoints in {}, /dev/kvm is fd {kvm_fd}; {opts}",
        dir.display()
    ));
    if st.config().lazy_restore {
        // Without it a restore is eager: slower, never wrong.
        match open_userfaultfd() {
            Ok(fd) => UFFD_DEV_FD.store(fd, std::sync::atomic::Ordering::Relaxed),
            Err(e) => spank::error(&format!(
                "job {job_id} step {step_id}: lazy_restore=yes but /dev/userfaultfd cannot be opened ({e}); restores load all memory first"
            )),
        }
    }
    let (events, relay) = start_event_relay(job_id, step_id);
    st.prepared = Some(Prepared {
        path,
        kvm_fd,
        events,
        relay,
        pinning: false,
    });
    Ok(())
}

/// The events pipe and the slurmstepd thread logging what vmctl sends on it. An
/// error only costs the event lines, never the step.
fn start_event_relay(
    job_id: u32,
    step_id: u32,
) -> (
    Option<std::os::fd::OwnedFd>,
    Option<std::sync::mpsc::Receiver<()>>,
) {
    let (read_end, write_end) = match events::pipe_for_tasks() {
        Ok(p) => p,
        Err(e) => {
            spank::error(&format!(
                "job {job_id} step {step_id}: no event lines for this step: cannot create a pipe: {e}"
            ));
            return (None, None);
        }
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("vmwrap-events".into())
        .spawn(move || {
            events::relay(read_end, job_id, step_id.to_string(), spank::info);
            let _ = done_tx.send(());
        });
    match spawned {
        Ok(_) => (Some(write_end), Some(done_rx)),
        Err(e) => {
            spank::error(&format!(
                "job {job_id} step {step_id}: no event lines for this step: cannot start a thread: {e}"
            ));
            (None, None)
        }
    }
}

/// What the plugin writes into a wrapped job's AdminComment, for the job's
/// owner `uid`: the record contrib/vmwrap-drain trusts. Only Slurm
/// administrators (root here) can set AdminComment, so no user can mark
/// another user's job, or their own, as wrapped.
fn wrapped_mark(uid: u32) -> String {
    format!("vmwrap-uid={uid}")
}

/// Records in Slurm that job `job_id` runs wrapped steps, unless it already
/// says so. An AdminComment the site set for its own purposes is left alone
/// (the drain helper then treats the job as unwrapped and lets it run).
/// Failures are logged only: the step itself runs as well without it.
fn record_wrapped_in_slurm(job_id: u32, uid: u32) {
    let mark = wrapped_mark(uid);
    let job = job_id.to_string();
    let shown = Command::new("scontrol")
        .args(["show", "job", "-o", &job])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let existing = match shown {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find_map(|w| w.strip_prefix("AdminComment=").map(str::to_string)),
        Ok(out) => {
            spank::error(&format!(
                "job {job_id}: scontrol show job failed ({}); contrib/vmwrap-drain will not see that it is wrapped",
                out.status
            ));
            return;
        }
        Err(e) => {
            spank::error(&format!(
                "job {job_id}: cannot run scontrol: {e}; contrib/vmwrap-drain will not see that it is wrapped"
            ));
            return;
        }
    };
    match existing.as_deref() {
        Some(comment) if comment == mark => return,
        Some(comment) if !comment.is_empty() && comment != "(null)" => {
            spank::info(&format!(
                "job {job_id}: AdminComment is already set ({comment}...); not marking it as wrapped"
            ));
            return;
        }
        _ => {}
    }
    let status = Command::new("scontrol")
        .args([
            "update",
            &format!("jobid={job}"),
            &format!("AdminComment={mark}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !status.as_ref().is_ok_and(|s| s.success()) {
        spank::error(&format!(
            "job {job_id}: cannot set AdminComment={mark} ({status:?}); contrib/vmwrap-drain will not see that it is wrapped"
        ));
    }
}

/// Opens /dev/kvm as root with O_CLOEXEC: only vmctl gets it (exec_vmctl
/// clears the flag in the task right before executing vmctl), not the other
/// programs slurmstepd forks during the step, so users need no access to
/// the device node and cannot pick the descriptor up elsewhere.
fn open_kvm() -> std::io::Result<RawFd> {
    // SAFETY: a constant path; the result is checked.
    let fd = unsafe { libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn open_userfaultfd() -> std::io::Result<RawFd> {
    // SAFETY: a constant path; the result is checked.
    let fd = unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Lets `fd` survive the next execve. Only called in the task process, which
/// is about to become vmctl: slurmstepd's own copy keeps FD_CLOEXEC.
fn inherit_on_exec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_SETFD on a descriptor this process holds; no pointers.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn user_name(uid: u32) -> Result<String, String> {
    let mut buf = vec![0 as c_char; 4096];
    loop {
        // SAFETY: all-zero is a valid passwd value (NULL pointers, 0 ids).
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `pwd`, `buf` and `result` are valid for the call and
        // `buf.len()` is the buffer's real size.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            // A user without a passwd entry still needs a directory; the
            // uid is unique and cannot contain a slash.
            return Ok(uid.to_string());
        }
        // SAFETY: on success pw_name points into `buf`, NUL-terminated.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) }
            .to_string_lossy()
            .into_owned();
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Ok(uid.to_string());
        }
        return Ok(name);
    }
}

/// In srun (local context), once its step exists and before its tasks are
/// launched. Only an srun run by a wrapped batch script does anything: it
/// records which step it runs, or, started again by vmctl after the job was
/// restored (crate::resume), tells its new step's tasks which step's
/// checkpoint to resume. Failures only cost the resume, and say so.
#[no_mangle]
pub extern "C" fn slurm_spank_local_user_init(
    sp: sys::spank_t,
    _ac: c_int,
    _argv: *mut *mut c_char,
) -> c_int {
    guard("slurm_spank_local_user_init", || {
        if spank::context() != Context::Local || !matches!(state().wrap, Some(Ok(_))) {
            return OK;
        }
        let Some(batch_dir) = std::env::var_os("VMWRAP_CHECKPOINT_DIR").map(PathBuf::from) else {
            return OK;
        };
        if batch_dir.file_name() != Some(OsStr::new(dirs::BATCH_DIR)) {
            return OK;
        }
        // SAFETY: `sp` is this hook's handle.
        let spank = unsafe { Spank::new(sp) };
        let (Ok(job_id), Ok(step_id)) = (
            spank.u32_item(sys::S_JOB_ID),
            spank.u32_item(sys::S_JOB_STEPID),
        ) else {
            return OK;
        };
        // The guest pid: vmctl keeps it across a restore.
        let record = resume::record_path(&batch_dir, std::process::id());
        let reexecuted = std::env::var_os(resume::REEXECUTED_ENV).is_some_and(|v| v == "1");
        let mut stderr = std::io::stderr();
        if !reexecuted {
            let rec = SrunRecord { job_id, step_id };
            if let Err(e) = resume::write_json(&record, &rec) {
                let _ = writeln!(
                    stderr,
                    "vmwrap: warning: job {job_id} step {step_id}: {e}; if the job is requeued while this step runs, the step starts afresh"
                );
            }
            return OK;
        }
        // Not passed on: the step's tasks and later programs are not
        // re-executed. srun calls this hook from its main thread, before the
        // threads that launch the step exist.
        std::env::remove_var(resume::REEXECUTED_ENV);
        match resume::read_json::<SrunRecord>(&record) {
            Ok(old) if old.job_id == job_id && old.step_id < MAX_NORMAL_STEP_ID => {
                let _ = writeln!(
                    stderr,
                    "vmwrap: job {job_id}: the srun of step {} was running when the job stopped; it runs again as step {step_id}, whose tasks resume from step {}'s checkpoint",
                    old.step_id, old.step_id
                );
                // srun builds its tasks' environment from its own after this hook.
                std::env::set_var(resume::RESUME_ENV, old.step_id.to_string());
            }
            Ok(old) => {
                let _ = writeln!(
                    stderr,
                    "vmwrap: warning: job {job_id} step {step_id}: {} is about job {}, not this one; the step starts afresh",
                    record.display(),
                    old.job_id
                );
            }
            Err(e) => {
                let _ = writeln!(
                    stderr,
                    "vmwrap: warning: job {job_id} step {step_id}: this srun was started again after the job's restart but its record is unusable ({e}); the step starts afresh"
                );
            }
        }
        OK
    })
}

#[no_mangle]
pub extern "C" fn slurm_spank_task_init(
    sp: sys::spank_t,
    _ac: c_int,
    _argv: *mut *mut c_char,
) -> c_int {
    guard("slurm_spank_task_init", || {
        if spank::context() != Context::Remote {
            return OK;
        }
        // SAFETY: `sp` is this hook's handle.
        let spank = unsafe { Spank::new(sp) };
        let step_error = state().step_error.clone();
        if let Some(e) = step_error {
            return fail_task(&e);
        }
        let Some(plan) = ({
            let st = state();
            st.prepared.as_ref().map(|p| {
                let events_fd = p.events.as_ref().map(|fd| fd.as_raw_fd());
                (
                    p.path.clone(),
                    p.kvm_fd,
                    st.config().vmctl,
                    st.wrap.clone(),
                    events_fd,
                )
            })
        }) else {
            return OK;
        };
        let (path, kvm_fd, vmctl, Some(Ok(opts)), events_fd) = plan else {
            return OK;
        };
        if let Some(fd) = events_fd {
            EVENTS_FD.store(fd, std::sync::atomic::Ordering::Relaxed);
        }
        if path.is_batch() && opts.continue_at_limit {
            let watch = batch::Watch {
                job_id: path.job_id,
                margin: opts.margin,
                continuations: opts.continuations,
            };
            if let Err(e) = batch::start_watcher(
                watch,
                &[
                    kvm_fd,
                    UFFD_DEV_FD.load(std::sync::atomic::Ordering::Relaxed),
                    events_fd.unwrap_or(-1),
                ],
            ) {
                // The job itself can run; only the continuation is lost.
                spank::error(&e);
                let _ = writeln!(std::io::stderr(), "vmwrap: error: {e}");
            }
        }
        // Only returns on failure: on success the process is vmctl now.
        let e = exec_vmctl(spank, &path, kvm_fd, &vmctl, &opts);
        spank::error(&e);
        fail_task(&e)
    })
}

/// Ends a task that cannot be wrapped: slurmstepd exits the task with
/// status 1 when task_init fails, rather than running it unwrapped.
fn fail_task(why: &str) -> c_int {
    // The task's stderr is the user's: say why the step died there too.
    let _ = writeln!(std::io::stderr(), "vmwrap: error: {why}");
    FAIL
}

/// Runs in the task process, as the job user, right before slurmstepd would
/// execve() the task. The step's argv array cannot grow (S_JOB_ARGV returns
/// slurmstepd's own array, sized for the original command), so instead of
/// editing it the plugin execs vmctl itself, first doing what exec_task()
/// would still have done after this hook.
fn exec_vmctl(
    spank: Spank,
    path: &StepPath,
    kvm_fd: RawFd,
    vmctl: &Path,
    opts: &WrapOptions,
) -> String {
    match build_exec(spank, path, kvm_fd, vmctl, opts) {
        Ok((argv, env)) => {
            let argv_c = to_cstrings(argv.iter().map(|a| a.as_bytes()));
            let env_c = to_cstrings(env.0.iter().map(Vec::as_slice));
            let (Some(argv_c), Some(env_c)) = (argv_c, env_c) else {
                return "argument or environment contains a NUL byte".into();
            };
            let argv_p = null_terminated(&argv_c);
            let env_p = null_terminated(&env_c);
            if let Err(e) = inherit_on_exec(kvm_fd) {
                return format!("cannot pass /dev/kvm (fd {kvm_fd}) to vmctl: {e}");
            }
            let uffd = UFFD_DEV_FD.load(std::sync::atomic::Ordering::Relaxed);
            // Only vmctl's own options, before `--`: what follows is the
            // user's program and arguments, which may spell anything.
            let uffd_asked = argv
                .iter()
                .take_while(|a| *a != "--")
                .any(|a| a == "--uffd-fd");
            if uffd >= 0 && uffd_asked {
                if let Err(e) = inherit_on_exec(uffd) {
                    return format!("cannot pass /dev/userfaultfd (fd {uffd}) to vmctl: {e}");
                }
            }
            let events_fd = EVENTS_FD.load(std::sync::atomic::Ordering::Relaxed);
            if events_fd >= 0 {
                if let Err(e) = inherit_on_exec(events_fd) {
                    return format!("cannot pass the events pipe (fd {events_fd}) to vmctl: {e}");
                }
            }
            // SAFETY: both arrays are NULL-terminated and point into
            // CStrings that outlive the call (it only returns on failure).
            unsafe { libc::execve(argv_p[0], argv_p.as_ptr(), env_p.as_ptr()) };
            format!(
                "cannot execute {}: {}",
                vmctl.display(),
                std::io::Error::last_os_error()
            )
        }
        Err(e) => e,
    }
}

fn to_cstrings<'a>(items: impl Iterator<Item = &'a [u8]>) -> Option<Vec<CString>> {
    items.map(|b| CString::new(b).ok()).collect()
}

fn null_terminated(items: &[CString]) -> Vec<*const c_char> {
    items
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn build_exec(
    spank: Spank,
    path: &StepPath,
    kvm_fd: RawFd,
    vmctl: &Path,
    opts: &WrapOptions,
) -> Result<(Vec<OsString>, Env), String> {
    let argv = spank.argv()?;
    if argv.is_empty() {
        return Err("the step has no command".into());
    }
    let mut env = spank.env()?;
    let task_id = spank.u32_item(sys::S_TASK_GLOBAL_ID)?;
    let local_id = spank.int_item(sys::S_TASK_ID)?;
    let total = spank.u32_item(sys::S_JOB_TOTAL_TASK_COUNT)?;
    let restarts = restart_count(spank, &env);
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let where_ = if path.is_batch() {
        format!("job {} batch script", path.job_id)
    } else {
        format!("job {} step {} task {task_id}", path.job_id, path.step_id)
    };

    let mut dir = path.step_dir();
    if let Some(sub) = dirs::task_subdir(total, task_id) {
        dir.push(sub);
        // 0700 like the levels above: checkpoints hold the task's memory.
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("{where_}: cannot create {}: {e}", dir.display())),
        }
    }

    let identity = StepIdentity {
        job_id: path.job_id,
        step_id: path.step_id,
        task_id,
        argv: if path.is_batch() {
            batch::identity_argv(&argv)
        } else {
            launch::lossy(&argv)
        },
        cwd: cwd.to_string_lossy().into_owned(),
    };
    // Set by an srun that vmctl started again after the batch script was
    // restored (crate::resume): this step continues that old step.
    let resume_from = env.get(resume::RESUME_ENV).map(<[u8]>::to_vec);
    env.remove(resume::RESUME_ENV);
    env.remove(resume::REEXECUTED_ENV);
    let mut resumed = None;
    if let (Some(text), false) = (resume_from, path.is_batch()) {
        match resume::parse_step_id(&text, MAX_NORMAL_STEP_ID) {
            Some(old_step) => {
                resumed =
                    resume_old_step(path, old_step, total, task_id, &identity, vmctl, &where_)?;
                if let Some(old_dir) = &resumed {
                    dir = old_dir.clone();
                }
            }
            None => {
                let msg = format!(
                    "{where_}: {}={} is not a step id; the step starts afresh",
                    resume::RESUME_ENV,
                    String::from_utf8_lossy(&text)
                );
                spank::info(&msg);
                let _ = writeln!(std::io::stderr(), "vmwrap: {msg}");
            }
        }
    }
    if resumed.is_none() && !path.is_batch() {
        // Step ids start again at 0 in a requeued job: a new step may get the
        // id of an older one whose checkpoint a resumed step is still using.
        if let Some(by) = resume::in_use(&dir) {
            let whose = by.map_or_else(
                || "a step still running".to_string(),
                |s| format!("step {s}, which resumed it after the job's restart and still runs"),
            );
            return Err(format!(
                "{where_}: {} holds the checkpoint of {whose}; this step cannot use it and nothing was changed there (run this step again once that one has ended)",
                dir.display()
            ));
        }
    }
    let mode = if resumed.is_some() {
        Mode::Restore
    } else if restarts > 0 {
        match resumable(&dir, &identity, vmctl) {
            Ok(()) => Mode::Restore,
            Err(why) => {
                let msg = format!("{where_}: restart {restarts}: starting afresh: {why}");
                spank::info(&msg);
                let _ = writeln!(std::io::stderr(), "vmwrap: {msg}");
                spank::info(&events::fresh_start_line(
                    path.job_id,
                    path.step_id,
                    task_id,
                    restarts,
                    Some(&why),
                ));
                Mode::Run
            }
        }
    } else {
        spank::info(&events::fresh_start_line(
            path.job_id,
            path.step_id,
            task_id,
            0,
            None,
        ));
        Mode::Run
    };
    let mut program = argv;
    if mode == Mode::Run {
        start_afresh(&dir, &identity, &where_).map_err(|e| format!("{where_}: {e}"))?;
        if path.is_batch() {
            // Run the copy: the spool file is per node and goes with the run.
            let copy = batch::copy_script(Path::new(&program[0]), &dir)
                .map_err(|e| format!("{where_}: {e}"))?;
            program[0] = copy.into_os_string();
        }
    } else if path.is_batch() {
        // One line in the job's output for every run that continues.
        let generation = batch::latest_generation(&dir).unwrap_or_else(|| "?".into());
        let msg = format!(
            "{where_}: restart {restarts}: resuming from its checkpoint ({generation}); nothing that ran before it runs again"
        );
        spank::info(&msg);
        let _ = writeln!(std::io::stderr(), "vmwrap: {msg}");
        if batch::output_was_emptied() {
            let msg = format!(
                "{where_}: warning: the job's output file is empty again: Slurm truncated it when the job restarted, so what the job printed before the requeue is gone (resubmit with --open-mode=append, or ask the site for JobFileAppend=1)"
            );
            spank::info(&msg);
            let _ = writeln!(std::io::stderr(), "vmwrap: {msg}");
        }
        for (step, command, step_dir) in batch::interrupted_steps(&dir) {
            let msg = format!(
                "{where_}: step {step} ({command}) had not ended when the job stopped; the srun that ran it starts again and the step's tasks resume from their checkpoint in {}",
                step_dir.display()
            );
            spank::info(&msg);
            let _ = writeln!(std::io::stderr(), "vmwrap: {msg}");
        }
    }

    apply_rlimits(&mut env);
    // exec_task() gives the first local task a TMPDIR (creating it if set),
    // after task_init; keep that behaviour for wrapped tasks.
    if local_id == 0 {
        match env.get("TMPDIR") {
            None => env.set("TMPDIR", b"/tmp"),
            Some(tmp) => {
                let _ = std::fs::create_dir(Path::new(OsStr::from_bytes(tmp)));
            }
        }
    }
    env.set("VMWRAP_CHECKPOINT_DIR", dir.as_os_str().as_bytes());
    let events_fd = EVENTS_FD.load(std::sync::atomic::Ordering::Relaxed);
    if events_fd >= 0 {
        env.set(events::EVENTS_FD_ENV, events_fd.to_string().as_bytes());
    }

    program[0] = launch::resolve_program(&program[0], &env, &cwd);
    // An srun of the script is started again by a restore, not resumed: its
    // sockets cannot be carried (crate::resume).
    let mut reexec = Vec::new();
    if path.is_batch() {
        let srun = launch::resolve_program(OsStr::new("srun"), &env, &cwd);
        if Path::new(&srun).is_absolute() {
            reexec.push(srun);
        } else {
            spank::verbose(&format!(
                "{where_}: srun is not in the job's PATH; an srun step running at a requeue would not be resumed"
            ));
        }
    }
    let mut vm_argv = launch::vmctl_argv(mode, vmctl, kvm_fd, &dir, opts, &reexec, &program);
    let uffd = UFFD_DEV_FD.load(std::sync::atomic::Ordering::Relaxed);
    if mode == launch::Mode::Restore && uffd >= 0 {
        vm_argv.push("--uffd-fd".into());
        vm_argv.push(uffd.to_string().into());
    }
    spank::verbose(&format!(
        "{where_}: exec {}",
        vm_argv
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    ));
    Ok((vm_argv, env))
}

/// A task of a step that continues step `old_step`, interrupted when the job
/// stopped (crate::resume). Returns the old task's checkpoint directory to
/// restore, or None (the reason said on the job's stderr) to start afresh in
/// the step's own directory. A task that had already finished is not run again:
/// the process exits here with the status it had.
fn resume_old_step(
    path: &StepPath,
    old_step: u32,
    total: u32,
    task_id: u32,
    identity: &StepIdentity,
    vmctl: &Path,
    where_: &str,
) -> Result<Option<PathBuf>, String> {
    let mut old_dir = StepPath {
        step_id: old_step,
        ..path.clone()
    }
    .step_dir();
    if let Some(sub) = dirs::task_subdir(total, task_id) {
        old_dir.push(sub);
    }
    let say = |msg: &str| {
        spank::info(msg);
        let _ = writeln!(std::io::stderr(), "vmwrap: {msg}");
    };
    if old_dir.join(FINISHED_MARKER).exists() {
        // Its output was printed before the job stopped: nothing runs twice.
        // vmctl writes the marker whole (renamed into place); one the user
        // made unreadable still means the program ended.
        let status = resume::finished_status(&old_dir).unwrap_or(0);
        say(&format!(
            "{where_}: task {task_id} of step {old_step} had already finished (exit status {status}) when the job stopped; it does not run again"
        ));
        // SAFETY: ends this task process (forked by slurmstepd for the task)
        // with the finished task's status, as its program would have.
        unsafe { libc::_exit(status) };
    }
    let old_identity = StepIdentity {
        step_id: old_step,
        ..identity.clone()
    };
    match resumable(&old_dir, &old_identity, vmctl) {
        Ok(()) => {
            let by = ResumedBy {
                step_id: path.step_id,
            };
            if let Err(e) = resume::write_json(&old_dir.join(resume::RESUMED_MARKER), &by) {
                return Err(format!("{where_}: {e}"));
            }
            let generation = batch::latest_generation(&old_dir).unwrap_or_else(|| "?".into());
            say(&format!(
                "{where_}: resuming task {task_id} of step {old_step} from its checkpoint ({generation}) in {}",
                old_dir.display()
            ));
            Ok(Some(old_dir))
        }
        Err(why) => {
            say(&format!(
                "{where_}: cannot resume task {task_id} of step {old_step}: {why}; starting afresh"
            ));
            Ok(None)
        }
    }
}

fn restart_count(spank: Spank, env: &Env) -> u32 {
    // srun steps inherit SLURM_RESTART_COUNT from the batch script's
    // environment; the item covers steps launched some other way.
    let from_env = env
        .get("SLURM_RESTART_COUNT")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let from_item = spank.u32_item(sys::S_SLURM_RESTART_COUNT).unwrap_or(0);
    from_env.max(from_item)
}

/// Says why `dir` cannot be resumed, or Ok if vmctl restore should run.
fn resumable(dir: &Path, now: &StepIdentity, vmctl: &Path) -> Result<(), String> {
    if dir.join(FINISHED_MARKER).exists() {
        return Err("the previous run of this task had finished".into());
    }
    let text = match std::fs::read(dir.join(IDENTITY_FILE)) {
        Ok(text) => text,
        Err(e) => return Err(format!("no usable {IDENTITY_FILE}: {e}")),
    };
    let then: StepIdentity =
        serde_json::from_slice(&text).map_err(|e| format!("{IDENTITY_FILE} is unreadable: {e}"))?;
    if let Some(why) = then.mismatch(now) {
        return Err(format!(
            "the checkpoint does not belong to this step: {why}"
        ));
    }
    let out = Command::new(vmctl)
        .arg("inspect")
        .arg(dir)
        .arg("--verify")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {} inspect: {e}", vmctl.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        // inspect reports each damaged generation on stdout ("generation N:
        // UNUSABLE: why") and its own failures on stderr: the log line must
        // carry both, or an admin cannot tell why the work was lost.
        let why: Vec<String> = [&out.stdout, &out.stderr]
            .iter()
            .flat_map(|text| {
                String::from_utf8_lossy(text)
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        Err(format!(
            "vmctl inspect --verify found no valid checkpoint ({}): {}",
            out.status,
            why.join("; ")
        ))
    }
}

/// Prepares `dir` for a fresh run (as the job user, in the task). Nothing an
/// earlier run left is deleted but its own bookkeeping files: checkpoints
/// move into a kept-<time> subdirectory, and both the slurmd log and the
/// job's stderr say where, so a checkpoint this node could not use (a CPU
/// feature missing, a damaged newer generation, a crash of inspect) can
/// still be restored elsewhere or removed by the admin or `vmctl gc`.
fn start_afresh(dir: &Path, identity: &StepIdentity, where_: &str) -> Result<(), String> {
    match dirs::set_aside(dir, SystemTime::now()) {
        Ok(Cleared::Removed(0)) => {}
        Ok(Cleared::Removed(n)) => spank::verbose(&format!(
            "{where_}: removed {n} bookkeeping files of an earlier run from {}",
            dir.display()
        )),
        Ok(Cleared::KeptIn(kept)) => {
            let msg = format!(
                "{where_}: the earlier run's checkpoints are kept in {}; restore them with vmctl restore on a suitable node, or remove them (vmctl gc does once Slurm forgets the job)",
                kept.display()
            );
            spank::info(&msg);
            let _ = writeln!(std::io::stderr(), "vmwrap: {msg}");
        }
        Err(e) => {
            return Err(format!(
                "cannot set the earlier run's files in {} aside: {e}; nothing was deleted",
                dir.display()
            ))
        }
    }
    let json = serde_json::to_vec_pretty(identity).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(IDENTITY_FILE), json)
        .map_err(|e| format!("cannot write {}: {e}", dir.join(IDENTITY_FILE).display()))
}

/// Applies SLURM_RLIMIT_* as slurmstepd's set_user_limits() would have after
/// task_init: the soft limit is raised or lowered to the submit host's value,
/// capped at the hard limit unless the user asked with --propagate.
fn apply_rlimits(env: &mut Env) {
    for req in launch::take_rlimits(env) {
        let Some(resource) = rlimit_resource(&req.name) else {
            continue;
        };
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid out-pointer.
        if unsafe { libc::getrlimit(resource, &mut lim) } < 0 || lim.rlim_cur == req.value {
            continue;
        }
        lim.rlim_cur = req.value;
        if !req.user_requested && lim.rlim_cur > lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
        }
        // SAFETY: `lim` is a valid, initialised rlimit.
        if unsafe { libc::setrlimit(resource, &lim) } < 0 {
            let msg = format!(
                "cannot propagate RLIMIT_{} of {} from the submit host: {}",
                req.name,
                req.value,
                std::io::Error::last_os_error()
            );
            if req.user_requested {
                spank::error(&msg);
            } else {
                spank::verbose(&msg);
            }
        }
    }
}

fn rlimit_resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "CPU" => libc::RLIMIT_CPU,
        "FSIZE" => libc::RLIMIT_FSIZE,
        "DATA" => libc::RLIMIT_DATA,
        "STACK" => libc::RLIMIT_STACK,
        "CORE" => libc::RLIMIT_CORE,
        "RSS" => libc::RLIMIT_RSS,
        "NPROC" => libc::RLIMIT_NPROC,
        "NOFILE" => libc::RLIMIT_NOFILE,
        "MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "AS" => libc::RLIMIT_AS,
        _ => return None,
    })
}

#[no_mangle]
pub extern "C" fn slurm_spank_task_exit(
    sp: sys::spank_t,
    _ac: c_int,
    _argv: *mut *mut c_char,
) -> c_int {
    guard("slurm_spank_task_exit", || {
        if spank::context() != Context::Remote {
            return OK;
        }
        // SAFETY: `sp` is this hook's handle.
        let spank = unsafe { Spank::new(sp) };
        let path = {
            let st = state();
            let Some(p) = st.prepared.as_ref() else {
                return OK;
            };
            p.path.clone()
        };
        if let Err(e) = log_exit(spank, &path) {
            spank::error(&e);
        }
        // Bookkeeping trouble must not change the task's own result.
        OK
    })
}

/// Runs as root in slurmstepd after a task ended, and only logs: root
/// writes nothing into the user's checkpoint directory. Whether the job
/// ended for good is vmctl's to record (its `finished` marker, written as
/// the job user when the program exited or was killed by its own signal);
/// any other end (a failed checkpoint-exit, vmctl's own failure, a task that
/// never reached vmctl, a kill) leaves every generation for the next run.
fn log_exit(spank: Spank, path: &StepPath) -> Result<(), String> {
    let status = spank.int_item(sys::S_TASK_EXIT_STATUS)?;
    let task_id = spank.u32_item(sys::S_TASK_GLOBAL_ID)?;
    let where_ = if path.is_batch() {
        format!("job {} batch script", path.job_id)
    } else {
        format!("job {} step {} task {task_id}", path.job_id, path.step_id)
    };
    if libc::WIFSIGNALED(status) {
        spank::info(&format!(
            "{where_}: vmctl killed by signal {}; a requeue resumes from the last checkpoint",
            libc::WTERMSIG(status)
        ));
        pin_requeued_job(path.job_id);
    } else if libc::WIFEXITED(status) {
        let code = libc::WEXITSTATUS(status);
        if code == EXIT_CHECKPOINTED {
            spank::info(&format!(
                "{where_}: checkpointed; a requeue of the job resumes it"
            ));
            pin_requeued_job(path.job_id);
        } else {
            spank::verbose(&format!(
                "{where_}: exit status {code}; its checkpoints stay unless vmctl recorded that the program ended"
            ));
        }
    }
    Ok(())
}

/// Once per step: hands the job to `vmctl pin-class` (crate::steer) so that
/// its restart goes to a node that can restore the checkpoint.
fn pin_requeued_job(job_id: u32) {
    let vmctl = {
        let mut st = state();
        if !st.config().steer_cpu_class {
            return;
        }
        let vmctl = st.config().vmctl;
        match st.prepared.as_mut() {
            Some(p) if !p.pinning => p.pinning = true,
            _ => return,
        }
        vmctl
    };
    crate::steer::pin_class(&vmctl, job_id);
}

#[no_mangle]
pub extern "C" fn slurm_spank_exit(
    _sp: sys::spank_t,
    _ac: c_int,
    _argv: *mut *mut c_char,
) -> c_int {
    guard("slurm_spank_exit", || {
        if let Some(mut p) = state().prepared.take() {
            // SAFETY: the descriptor was opened by prepare_step and is not
            // used after this point; the tasks hold their own copies.
            unsafe { libc::close(p.kvm_fd) };
            let uffd = UFFD_DEV_FD.swap(-1, std::sync::atomic::Ordering::Relaxed);
            if uffd >= 0 {
                // SAFETY: opened by prepare_step, not used after this point.
                unsafe { libc::close(uffd) };
            }
            // The tasks have exited: closing the last write end lets the relay
            // log what is left and stop. A process the job left behind may
            // still hold a copy, so do not wait for it long.
            drop(p.events.take());
            if let Some(done) = p.relay.take() {
                let _ = done.recv_timeout(std::time::Duration::from_secs(2));
            }
        }
        OK
    })
}
