//! Drives a job: runs the guest, and between exits serves what the outside world
//! asks for (host signals, checkpoint requests from the control socket or the timer).

use crate::checkpoint::{self, format::*, write};
use crate::control::signals::{self, SignalAction};
use crate::control::{socket, Request, Requests};
use crate::events::{self, Event};
use crate::kernel::task::Task;
use crate::kernel::timers::Timers;
use crate::kernel::{JobEnd, Kernel};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Exit status meaning "checkpointed on request; resume me with vmctl restore".
pub const EXIT_CHECKPOINTED: i32 = 75;

#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    pub dir: PathBuf,
    pub interval: Option<Duration>,
    pub keep: usize,
    /// Keep a digest of every page so that later generations are incremental.
    pub incremental: bool,
    /// Copy memory while the job runs when at least this much guest RAM is in use.
    pub precopy_from: Option<u64>,
    /// How memory image chunks are compressed.
    pub compress: checkpoint::compress::Compression,
}

#[derive(Debug, Clone)]
pub struct JobMeta {
    pub program: String,
    pub argv: Vec<String>,
}

pub struct Runner {
    kernel: Arc<Kernel>,
    tasks: Vec<Task>,
    ckpt: Option<CheckpointOptions>,
    requests: Requests,
    _socket: Option<socket::ControlSocket>,
    meta: JobMeta,
    waited: Vec<i32>,
    tracker: checkpoint::incremental::Tracker,
}

/// Creates (0700) or checks the checkpoint directory: it must be the caller's own.
pub fn prepare_dir(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(md) => {
            if !md.is_dir() {
                return Err(format!(
                    "--checkpoint-dir {}: not a directory",
                    dir.display()
                ));
            }
            // SAFETY: getuid cannot fail.
            let me = unsafe { libc::getuid() };
            if md.uid() != me {
                return Err(format!(
                    "--checkpoint-dir {}: owned by uid {}, not by you (uid {me}); use a directory of your own",
                    dir.display(),
                    md.uid()
                ));
            }
            if md.permissions().mode() & 0o077 != 0 {
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("--checkpoint-dir {}: cannot create it: {e}", dir.display())),
        Err(e) => Err(format!("--checkpoint-dir {}: {e}", dir.display())),
    }
}

pub struct Taken {
    pub generation: u64,
    pub kind: String,
    /// Bytes stored by each pre-copy round while the job ran (empty without pre-copy).
    pub precopy_rounds: Vec<u64>,
    /// Seconds from the pre-copy's start to the end of the checkpoint.
    pub precopy_seconds: f64,
    pub path: PathBuf,
    pub memory_bytes: u64,
    /// Bytes of guest memory in the image before compression.
    pub page_bytes: u64,
    pub total_bytes: u64,
    pub frozen_seconds: f64,
}

impl Taken {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": true,
            "generation": self.generation,
            "kind": self.kind,
            "precopy_round_bytes": self.precopy_rounds,
            "precopy_seconds": self.precopy_seconds,
            "path": self.path,
            "memory_bytes": self.memory_bytes,
            "page_bytes": self.page_bytes,
            "bytes": self.total_bytes,
            "seconds": self.frozen_seconds,
        })
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    unsafe { libc::gethostname(buf.as_mut_ptr() as *mut _, buf.len()) };
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Installs vmctl's signal handling. Must run on the main thread before any other
/// thread starts (they inherit its mask), so that host signals reach the main thread
/// only; returns the signals it will wait for.
pub fn setup_signals(on_signal: &[(i32, SignalAction)]) -> Vec<i32> {
    let extra: Vec<i32> = on_signal.iter().map(|&(s, _)| s).collect();
    let waited = signals::waited(&extra);
    signals::install(&waited);
    for &(sig, action) in on_signal {
        signals::set_action(sig, action);
    }
    waited
}

impl Runner {
    /// `waited` comes from `setup_signals`, called before the kernel was built.
    pub fn new(
        kernel: Arc<Kernel>,
        tasks: Vec<Task>,
        ckpt: Option<CheckpointOptions>,
        on_signal: &[(i32, SignalAction)],
        meta: JobMeta,
        waited: Vec<i32>,
    ) -> Result<Runner, String> {
        kernel.set_main_thread();
        let requests = Requests::new();
        let mut sock = None;
        if let Some(c) = &ckpt {
            prepare_dir(&c.dir)?;
            // The job runs again: a marker left by an earlier end no longer holds.
            let _ = std::fs::remove_file(c.dir.join(FINISHED_MARKER));
            sock = Some(socket::serve(&c.dir, requests.clone()).map_err(|e| {
                format!(
                    "--checkpoint-dir {}: cannot serve the control socket: {e}",
                    c.dir.display()
                )
            })?);
            if let Some(i) = c.interval {
                requests.start_interval(i);
            }
        } else if on_signal.iter().any(|&(_, a)| a != SignalAction::Forward) {
            return Err("--on-signal ...=checkpoint needs --checkpoint-dir".into());
        }
        let tracker =
            checkpoint::incremental::Tracker::new(ckpt.as_ref().is_some_and(|c| c.incremental));
        Ok(Runner {
            kernel,
            tasks,
            ckpt,
            requests,
            _socket: sock,
            meta,
            waited,
            tracker,
        })
    }

    /// The job was restored from this chain: later generations may build on it.
    pub fn continue_chain(&mut self, chain: &checkpoint::incremental::Restored) {
        let limit = self.high_water();
        self.tracker.restored(&self.kernel.mem, chain, limit);
    }

    fn high_water(&self) -> u64 {
        self.kernel
            .frames
            .lock()
            .expect("frames poisoned")
            .high_water()
    }

    /// Runs the job to its end (or to its checkpoint-and-exit) and returns vmctl's
    /// exit status. With VMCTL_COUNT_EXITS, reports the exits of all its tasks.
    pub fn run(mut self) -> i32 {
        let code = self.run_job();
        self.kernel.report_exits();
        code
    }

    /// Each task runs on a thread of its own; this (main) thread waits for host
    /// signals, checkpoint requests and the job's end.
    fn run_job(&mut self) -> i32 {
        Timers::start(&self.kernel);
        self.kernel.start_watchdog();
        for t in std::mem::take(&mut self.tasks) {
            let tid = t.tid();
            if let Err(e) = std::thread::Builder::new()
                .name(format!("vmctl-task-{tid}"))
                .spawn(move || t.run())
            {
                eprintln!("vmctl: cannot start a thread for the job: {e}");
                return crate::cli::EXIT_VMCTL_FAILED;
            }
        }
        loop {
            if let Some(end) = self.kernel.job_status() {
                return self.finish(end);
            }
            let sig = signals::wait_for(&self.waited);
            let mut checkpoint_now = false;
            let mut exit_after: Option<i32> = None;
            if sig != signals::notify_signal() {
                match signals::action(sig) {
                    SignalAction::Forward => self.kernel.signal_all(sig),
                    SignalAction::Checkpoint => checkpoint_now = true,
                    SignalAction::CheckpointExit => exit_after = Some(sig),
                }
            }
            let requests = self.requests.take();
            if !(checkpoint_now || exit_after.is_some() || !requests.is_empty()) {
                continue;
            }
            if let Some(end) = self.kernel.job_status() {
                return self.finish(end);
            }
            let result = self.checkpoint(exit_after.is_some());
            self.report_checkpoint(&result);
            let reply = match &result {
                Ok(t) => t.to_json().to_string(),
                Err(e) => serde_json::json!({"ok": false, "error": e}).to_string(),
            };
            for Request { reply: tx } in requests {
                if let Some(tx) = tx {
                    let _ = tx.send(reply.clone());
                }
            }
            match (result, exit_after) {
                (Ok(t), Some(_)) => {
                    eprintln!(
                        "vmctl: checkpointed as generation {} ({}, {:.1} MiB, the job stopped for {:.3} s); resume it with vmctl restore",
                        t.generation,
                        t.kind,
                        t.memory_bytes as f64 / (1 << 20) as f64,
                        t.frozen_seconds
                    );
                    return EXIT_CHECKPOINTED;
                }
                (Err(e), Some(sig)) => {
                    eprintln!("vmctl: checkpoint failed: {e}; the job is stopped without one, as signal {sig} asked");
                    return 128 + sig;
                }
                (Err(e), None) => {
                    eprintln!("vmctl: checkpoint failed: {e}; the job goes on and earlier generations stay valid");
                }
                (Ok(_), None) => {}
            }
        }
    }

    /// The job is over: stop what still runs and report its status.
    fn finish(&self, end: JobEnd) -> i32 {
        self.kernel.kill_all();
        match end {
            JobEnd::Exited(status) => {
                self.finished(status.shell_code());
                status.shell_code()
            }
            JobEnd::Failed(why) => {
                eprintln!("vmctl: {why}");
                crate::cli::EXIT_VMCTL_FAILED
            }
        }
    }

    /// Freezes every task at a clean point, writes a generation, (unless the job is
    /// to stop) lets the tasks run again, and prunes old generations.
    pub fn checkpoint(&mut self, then_exit: bool) -> Result<Taken, String> {
        let Some(opts) = self.ckpt.clone() else {
            return Err("no --checkpoint-dir was given".into());
        };
        let result = match self.start_precopy(&opts) {
            Some(session) => self.finish_precopy(session, then_exit),
            None => {
                let t0 = crate::clock::monotonic_ns();
                let tasks = self.kernel.freeze_all();
                let result = self.write_frozen(&opts, tasks, t0);
                if !(then_exit && result.is_ok()) {
                    self.kernel.thaw_all();
                }
                result
            }
        };
        // Once the new generation is durable, the job need not wait while older ones
        // go: reading their manifests to keep their chains, and unlinking gigabytes
        // of images, took most of a pre-copy checkpoint's frozen time.
        if result.is_ok() {
            write::prune(&opts.dir, opts.keep);
        }
        result
    }

    /// Starts copying memory while the job runs, if it is big enough for that to
    /// matter; returns once the rounds are done. None to checkpoint the plain way.
    fn start_precopy(&mut self, opts: &CheckpointOptions) -> Option<checkpoint::precopy::Session> {
        let limit = self.high_water();
        if limit < opts.precopy_from? {
            return None;
        }
        // Armed with every task at a safe point: no write of vmctl's in flight.
        let _ = self.kernel.freeze_all();
        let (tx, rx) = std::sync::mpsc::channel();
        let started = checkpoint::precopy::Session::start(
            &opts.dir,
            self.kernel.mem.clone(),
            &mut self.tracker,
            limit,
            opts.compress,
            move || {
                let _ = tx.send(());
            },
        );
        self.kernel.thaw_all();
        match started {
            Ok(session) => {
                let _ = rx.recv();
                Some(session)
            }
            Err(e) => {
                eprintln!(
                    "vmctl: pre-copy could not start ({e}); checkpointing with the job stopped"
                );
                None
            }
        }
    }

    /// The last pre-copy round and the kernel state, with every task frozen.
    fn finish_precopy(
        &mut self,
        session: checkpoint::precopy::Session,
        then_exit: bool,
    ) -> Result<Taken, String> {
        let t0 = crate::clock::monotonic_ns();
        let tasks = self.kernel.freeze_all();
        crate::checkpoint::precopy::trace("frozen", t0);
        let result = (|| {
            if self.kernel.job_status().is_some() {
                return Err("the job ended before the checkpoint".to_string());
            }
            let mut manifest = self.manifest(session.generation(), tasks);
            crate::checkpoint::precopy::trace("kernel state", t0);
            let held = self.kernel.held_files();
            let journal = FileJournal::prepare(&self.kernel, &held, &mut manifest);
            // The last round copies and digests the vvar page too (see write_frozen).
            let vvar_still = self.kernel.clocks.hold();
            crate::checkpoint::precopy::trace("clock held", t0);
            let (written, summary) = session.finish(
                &self.kernel.mem,
                &mut self.tracker,
                &mut manifest,
                &journal.extra(),
            )?;
            drop(vvar_still);
            journal.activate(&self.kernel, &written.path);
            Ok(Taken {
                generation: written.generation,
                kind: manifest.kind.clone(),
                precopy_rounds: summary.rounds,
                precopy_seconds: summary.running_seconds,
                path: written.path,
                memory_bytes: written.memory_bytes,
                page_bytes: written.page_bytes,
                total_bytes: written.total_bytes,
                frozen_seconds: (crate::clock::monotonic_ns() - t0) as f64 / 1e9,
            })
        })();
        if !(then_exit && result.is_ok()) {
            self.kernel.thaw_all();
        }
        result
    }

    fn write_frozen(
        &mut self,
        opts: &CheckpointOptions,
        tasks: Vec<crate::kernel::freeze::TaskSnapshot>,
        t0: i64,
    ) -> Result<Taken, String> {
        if self.kernel.job_status().is_some() || tasks.is_empty() {
            return Err("the job ended before the checkpoint".into());
        }
        let generation = write::next_generation(&opts.dir).map_err(|e| e.to_string())?;
        let mut manifest = self.manifest(generation, tasks);
        let held = self.kernel.held_files();
        let journal = FileJournal::prepare(&self.kernel, &held, &mut manifest);
        // Every task is parked, but the clock thread would still rewrite the vvar
        // page, which is guest RAM: the pages are digested, then checksummed as they
        // are written, and must not change in between.
        let vvar_still = self.kernel.clocks.hold();
        let plan = self.tracker.plan(&self.kernel.mem, self.high_water());
        plan.describe(&mut manifest);
        let pages = match &plan {
            checkpoint::incremental::Plan::Full => write::Pages::All {
                limit: self.high_water(),
            },
            checkpoint::incremental::Plan::Incremental { dirty, .. } => write::Pages::Dirty(dirty),
        };
        let written = write::write_generation(
            &opts.dir,
            &self.kernel.mem,
            pages,
            opts.compress,
            &mut manifest,
            &journal.extra(),
        )
        .map_err(|e| e.to_string())?;
        drop(vvar_still);
        journal.activate(&self.kernel, &written.path);
        self.tracker.written(&plan, &written);
        Ok(Taken {
            generation: written.generation,
            kind: manifest.kind.clone(),
            precopy_rounds: Vec::new(),
            precopy_seconds: 0.0,
            path: written.path,
            memory_bytes: written.memory_bytes,
            page_bytes: written.page_bytes,
            total_bytes: written.total_bytes,
            frozen_seconds: (crate::clock::monotonic_ns() - t0) as f64 / 1e9,
        })
    }

    /// The manifest of generation `generation` but for its memory image, from the
    /// frozen tasks.
    fn manifest(
        &self,
        generation: u64,
        tasks: Vec<crate::kernel::freeze::TaskSnapshot>,
    ) -> Manifest {
        let state = self.kernel.snapshot(tasks);
        Manifest {
            format_version: FORMAT_VERSION,
            vmctl_version: env!("CARGO_PKG_VERSION").to_string(),
            generation,
            kind: KIND_FULL.into(),
            parent: None,
            parent_manifest_crc32: None,
            created_unix: crate::clock::realtime_s(),
            host: hostname(),
            // SAFETY: getuid cannot fail.
            owner_uid: unsafe { libc::getuid() },
            program: self.meta.program.clone(),
            argv: self.meta.argv.clone(),
            cpu: checkpoint::cpu::host_features(self.kernel.vm.xcr0()),
            memory: MemoryImage {
                file: MEMORY.into(),
                page_size: PAGE_SIZE,
                ram_bytes: 0,
                data_bytes: 0,
                chunks: Vec::new(),
                zero_runs: Vec::new(),
            },
            kernel: state,
            files: None,
        }
    }

    fn report_checkpoint(&self, result: &Result<Taken, String>) {
        let Some(opts) = &self.ckpt else { return };
        let event = match result {
            Ok(t) => Event::new("checkpoint", t.generation, t.total_bytes, t.frozen_seconds),
            Err(e) => {
                let next = write::next_generation(&opts.dir).unwrap_or(0);
                Event::new("checkpoint", next, 0, 0.0).failed(e)
            }
        };
        events::emit(&opts.dir, &event);
    }

    /// A job that ended on its own needs no checkpoint: record that it ended (what
    /// tells a launcher such as the Slurm plugin not to resume it), then remove its
    /// generations. This is the only place generations are removed because the job
    /// is over: every other way vmctl stops (a failed checkpoint-exit, its own
    /// failure, a kill) leaves them for the next restore.
    fn finished(&self, status: i32) {
        if let Some(c) = &self.ckpt {
            if let Err(e) = mark_finished(&c.dir, status) {
                eprintln!(
                    "vmctl: cannot record in {} that the job ended: {e}; its checkpoints are kept",
                    c.dir.display()
                );
                return;
            }
            if let Ok(gens) = checkpoint::read::list_generations(&c.dir) {
                for g in gens {
                    write::remove_generation(&c.dir, g);
                }
            }
            let _ = std::fs::remove_file(c.dir.join(LATEST));
        }
    }
}

/// Marker vmctl leaves in the checkpoint directory when the program ended on its
/// own (exited, or was killed by a signal of its own), holding the exit status.
pub const FINISHED_MARKER: &str = "finished";

/// Writes FINISHED_MARKER as a fresh file renamed into place: whatever the guest
/// (which can write this directory) planted under that name, a FIFO, a symlink or
/// a hard link to another file, is replaced, never opened, followed or truncated.
pub fn mark_finished(dir: &Path, status: i32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".{FINISHED_MARKER}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let text = serde_json::json!({
        "exit_status": status,
        "ended_unix": crate::clock::realtime_s(),
    });
    file.write_all(format!("{text}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(FINISHED_MARKER))?;
    write::fsync_dir(dir).map_err(|e| std::io::Error::other(e.to_string()))
}

pub const DEFAULT_KEEP: usize = 2;
pub const DEFAULT_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);

/// The file journal of the generation being written (see crate::filejournal): recorded
/// from the files the frozen job holds, written into the generation, and active from
/// the moment the generation is complete.
struct FileJournal(Option<crate::filejournal::track::Prepared>);

impl FileJournal {
    fn prepare(
        kernel: &Kernel,
        held: &crate::kernel::persist::HeldFiles,
        manifest: &mut Manifest,
    ) -> Self {
        let prepared = kernel
            .files_journal
            .prepare(manifest.generation, held.list.iter().copied());
        manifest.files = prepared.as_ref().map(|j| j.info.clone());
        FileJournal(prepared)
    }

    fn extra(&self) -> Vec<(&str, &[u8])> {
        self.0
            .iter()
            .map(|j| (crate::filejournal::JOURNAL, j.bytes.as_slice()))
            .collect()
    }

    fn activate(self, kernel: &Kernel, gen_dir: &std::path::Path) {
        if let Some(j) = self.0 {
            kernel.files_journal.activate(j, gen_dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmctl-runner-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn read_status(dir: &Path) -> i64 {
        let text = std::fs::read(dir.join(FINISHED_MARKER)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        v["exit_status"].as_i64().unwrap()
    }

    /// Whatever the guest planted under the marker's name is replaced: the file a
    /// hard link or symlink points to keeps its bytes, and a FIFO does not block.
    #[test]
    fn finished_marker_replaces_planted_entries() {
        let dir = scratch("planted");
        let precious = dir.join("precious");
        std::fs::write(&precious, b"keep me").unwrap();
        let marker = dir.join(FINISHED_MARKER);

        std::fs::hard_link(&precious, &marker).unwrap();
        mark_finished(&dir, 3).unwrap();
        assert_eq!(read_status(&dir), 3);
        assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");

        std::fs::remove_file(&marker).unwrap();
        std::os::unix::fs::symlink(&precious, &marker).unwrap();
        mark_finished(&dir, 4).unwrap();
        assert_eq!(read_status(&dir), 4);
        assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
        assert!(!std::fs::symlink_metadata(&marker)
            .unwrap()
            .file_type()
            .is_symlink());

        std::fs::remove_file(&marker).unwrap();
        let c = CString::new(marker.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        mark_finished(&dir, 5).unwrap();
        assert_eq!(read_status(&dir), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
