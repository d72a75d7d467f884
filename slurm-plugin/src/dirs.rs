//! Checkpoint directory layout: ROOT/<user>/<jobid>/<stepid>[/task<N>].
//!
//! slurmstepd creates the per-user levels as root inside directories the user
//! owns, so every step below ROOT goes through directory file descriptors
//! opened with O_NOFOLLOW|O_DIRECTORY: a symlink, FIFO or file planted by the
//! user cannot redirect a root mkdir or chown to somewhere else, and a
//! directory the user moved in from elsewhere is refused rather than chowned.
//! Root creates nothing but these directories and never opens a file below
//! ROOT: the markers in a checkpoint directory are written by vmctl and the
//! plugin's task code, both running as the job user.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Name of the marker vmctl (as the job user) leaves when the wrapped program
/// really ended (it exited, or a signal of its own killed it), so a rerun of
/// the step does not resume a program that had already finished.
pub const FINISHED_MARKER: &str = "finished";
/// The step's identity, written when a step starts afresh.
pub const IDENTITY_FILE: &str = "step.json";
/// Prefix of the subdirectories a fresh start moves an earlier run's
/// checkpoints into (`kept-20261130T102302Z`) instead of deleting them.
pub const KEPT_PREFIX: &str = "kept-";
/// What a fresh start may remove outright: they describe an earlier run and
/// hold none of its state. Everything else is set aside.
const DISPOSABLE: &[&str] = &[
    IDENTITY_FILE,
    FINISHED_MARKER,
    "control.sock",
    crate::resume::RESUMED_MARKER,
];

/// An open directory, the anchor for *at() calls.
pub struct Dir {
    fd: OwnedFd,
}

fn cstring(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check_component(name: &OsStr) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad path component {name:?}"),
        ));
    }
    Ok(())
}

impl Dir {
    /// Opens an admin-controlled path (ROOT itself), following symlinks:
    /// sites often point the root at a scratch file system with one.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let c = cstring(path.as_os_str())?;
        // SAFETY: `c` is a NUL-terminated string that outlives the call; the
        // returned descriptor is checked before being owned.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        Self::from_raw(fd)
    }

    fn from_raw(fd: libc::c_int) -> io::Result<Dir> {
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly opened descriptor nobody else owns.
        Ok(Dir {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Opens the subdirectory `name`, refusing symlinks.
    pub fn open_child(&self, name: &OsStr) -> io::Result<Dir> {
        check_component(name)?;
        let c = cstring(name)?;
        // SAFETY: `self.fd` is an open directory and `c` a valid C string
        // for the duration of the call.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        Self::from_raw(fd)
    }

    /// Creates (if needed) and opens the subdirectory `name`, mode 0700 and
    /// owned by uid:gid. A directory that already existed is only given to
    /// uid:gid if it sits in a directory nobody but root can write (ROOT
    /// itself): in a user-writable directory it must already be the user's,
    /// or it could be another user's directory moved in to be chowned.
    pub fn make_private_child(&self, name: &OsStr, uid: u32, gid: u32) -> io::Result<Dir> {
        check_component(name)?;
        let c = cstring(name)?;
        // SAFETY: as in open_child.
        let rc = unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o700) };
        let created = if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::AlreadyExists {
                return Err(err);
            }
            false
        } else {
            true
        };
        let child = self.open_child(name)?;
        if !created && !self.only_root_writes()? {
            let owner = child.as_file()?.metadata()?.uid();
            if owner != uid {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} exists and belongs to uid {owner}, not to the job's user (uid {uid}); \
                         remove it",
                        name.to_string_lossy()
                    ),
                ));
            }
        }
        child.set_owner_mode(uid, gid, 0o700)?;
        Ok(child)
    }

    /// True if only root can add or rename entries in this directory.
    fn only_root_writes(&self) -> io::Result<bool> {
        let meta = self.as_file()?.metadata()?;
        Ok(meta.uid() == 0 && meta.mode() & 0o022 == 0)
    }

    fn set_owner_mode(&self, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
        let meta = self.as_file()?.metadata()?;
        if meta.uid() != uid || meta.gid() != gid {
            // SAFETY: plain syscall on a descriptor we own.
            if unsafe { libc::fchown(self.fd.as_raw_fd(), uid, gid) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if meta.mode() & 0o7777 != mode {
            // SAFETY: plain syscall on a descriptor we own.
            if unsafe { libc::fchmod(self.fd.as_raw_fd(), mode) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// A File sharing the descriptor, for std's metadata helpers.
    fn as_file(&self) -> io::Result<File> {
        Ok(File::from(self.fd.try_clone()?))
    }
}

/// Slurm's step id of a batch script: SLURM_BATCH_SCRIPT in slurm.h, which
/// bindgen does not see through spank.h (0xfffffffb since Slurm 20.11).
pub const BATCH_STEP_ID: u32 = 0xffff_fffb;
/// The checkpoint directory of a job's batch script: a name, not the id, so
/// operators can tell it from the srun steps' numbered directories.
pub const BATCH_DIR: &str = "batch";

/// Path components below ROOT for one step.
#[derive(Clone, Debug)]
pub struct StepPath {
    pub root: PathBuf,
    pub user: String,
    pub job_id: u32,
    pub step_id: u32,
}

impl StepPath {
    pub fn step_dir(&self) -> PathBuf {
        self.root
            .join(&self.user)
            .join(self.job_id.to_string())
            .join(self.step_name())
    }

    /// The step directory's name: the step id, or `batch` for the script.
    pub fn step_name(&self) -> String {
        if self.step_id == BATCH_STEP_ID {
            BATCH_DIR.to_string()
        } else {
            self.step_id.to_string()
        }
    }

    pub fn is_batch(&self) -> bool {
        self.step_id == BATCH_STEP_ID
    }

    /// Creates ROOT (0755, root's) and the user, job and step levels (0700,
    /// the job user's). Runs as root in slurmstepd.
    pub fn create(&self, uid: u32, gid: u32) -> io::Result<PathBuf> {
        if !self.root.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&self.root)?;
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o755))?;
        }
        let root = Dir::open(&self.root)?;
        let user = root.make_private_child(OsStr::new(&self.user), uid, gid)?;
        let job = user.make_private_child(OsStr::new(&self.job_id.to_string()), uid, gid)?;
        job.make_private_child(OsStr::new(&self.step_name()), uid, gid)?;
        Ok(self.step_dir())
    }
}

/// Subdirectory of the step directory for one task of a multi-task step;
/// a single-task step checkpoints into the step directory itself.
pub fn task_subdir(total_tasks: u32, global_task_id: u32) -> Option<String> {
    (total_tasks > 1).then(|| format!("task{global_task_id}"))
}

/// What a fresh start did with an earlier run's files.
#[derive(Debug, PartialEq, Eq)]
pub enum Cleared {
    /// Nothing but DISPOSABLE entries (or nothing at all) was there; they
    /// were removed.
    Removed(usize),
    /// Everything else was moved, by rename, into this subdirectory.
    KeptIn(PathBuf),
}

/// Makes `dir` ready for a fresh run without destroying anything an earlier
/// run left (runs as the job user, in the task). Checkpoint generations,
/// whether or not they verified here, are moved into a new `kept-<UTC time>`
/// subdirectory together with the files describing them (`step.json`,
/// `latest`), so it stays a checkpoint directory `vmctl restore` and
/// `vmctl inspect` accept; `vmctl gc` removes it with the job's directory.
/// Earlier `kept-*` directories stay where they are.
pub fn set_aside(dir: &Path, now: std::time::SystemTime) -> io::Result<Cleared> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.as_bytes().starts_with(KEPT_PREFIX.as_bytes()) {
            continue;
        }
        let disposable = DISPOSABLE.iter().any(|d| name.as_bytes() == d.as_bytes())
            && !entry.file_type()?.is_dir();
        entries.push((name, disposable));
    }
    if entries.iter().all(|(_, disposable)| *disposable) {
        for (name, _) in &entries {
            std::fs::remove_file(dir.join(name))?;
        }
        return Ok(Cleared::Removed(entries.len()));
    }
    let kept = make_kept_dir(dir, now)?;
    for (name, _) in &entries {
        std::fs::rename(dir.join(name), kept.join(name))?;
    }
    Ok(Cleared::KeptIn(kept))
}

/// Creates `dir/kept-YYYYMMDDTHHMMSSZ` (with a `-N` suffix if two fresh
/// starts fall in one second), mode 0700 like the checkpoints it holds.
fn make_kept_dir(dir: &Path, now: std::time::SystemTime) -> io::Result<PathBuf> {
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stamp = utc_stamp(secs);
    for n in 1u32.. {
        let name = if n == 1 {
            format!("{KEPT_PREFIX}{stamp}")
        } else {
            format!("{KEPT_PREFIX}{stamp}-{n}")
        };
        let path = dir.join(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    unreachable!("u32 suffixes exhausted")
}

/// `YYYYMMDDTHHMMSSZ` for a Unix time (days-to-civil, proleptic Gregorian).
fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmwrap-spank-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        if matches!(name, "aside" | "disposable") {
            std::fs::create_dir_all(&dir).unwrap();
        }
        dir
    }

    /// The test process's own uid and gid, as the owner of a file it made.
    fn me() -> (u32, u32) {
        // Tests run in parallel threads of one process: each probe needs its own name.
        static PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let probe = scratch(&format!("me-{n}"));
        std::fs::write(&probe, b"").unwrap();
        let m = std::fs::metadata(&probe).unwrap();
        std::fs::remove_file(&probe).unwrap();
        (m.uid(), m.gid())
    }

    #[test]
    fn creates_layout_with_modes() {
        let root = scratch("layout").join("ckpt");
        let (uid, gid) = me();
        let sp = StepPath {
            root: root.clone(),
            user: "alice".into(),
            job_id: 42,
            step_id: 0,
        };
        let dir = sp.create(uid, gid).unwrap();
        assert_eq!(dir, root.join("alice/42/0"));
        for p in [root.join("alice"), root.join("alice/42"), dir.clone()] {
            assert_eq!(
                std::fs::metadata(&p).unwrap().mode() & 0o7777,
                0o700,
                "{p:?}"
            );
        }
        assert_eq!(std::fs::metadata(&root).unwrap().mode() & 0o7777, 0o755);
        // Idempotent: a requeued job finds its directories in place.
        sp.create(uid, gid).unwrap();
        std::fs::remove_dir_all(root.parent().unwrap()).unwrap();
    }

    /// A directory another user owns, moved into the job user's tree, is
    /// refused instead of being handed to the job user. Only meaningful as
    /// root (as CI runs): otherwise the test cannot make a foreign directory.
    #[test]
    fn refuses_a_foreign_directory_below_the_user_level() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to make a directory of another uid");
            return;
        }
        let base = scratch("foreign");
        let root = base.join("ckpt");
        let (alice, bob) = (4242, 4343);
        let sp = StepPath {
            root: root.clone(),
            user: "alice".into(),
            job_id: 7,
            step_id: 0,
        };
        std::fs::create_dir_all(root.join("alice/7")).unwrap();
        std::os::unix::fs::chown(root.join("alice"), Some(alice), Some(alice)).unwrap();
        std::os::unix::fs::chown(root.join("alice/7"), Some(bob), Some(bob)).unwrap();
        let err = sp.create(alice, alice).unwrap_err();
        assert!(err.to_string().contains("uid 4343"), "{err}");
        let meta = std::fs::metadata(root.join("alice/7")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (bob, bob));
        // The user level lives in root's own ROOT: a stale one is taken over.
        std::os::unix::fs::chown(root.join("alice"), Some(bob), Some(bob)).unwrap();
        std::fs::remove_dir(root.join("alice/7")).unwrap();
        sp.create(alice, alice).unwrap();
        assert_eq!(std::fs::metadata(root.join("alice")).unwrap().uid(), alice);
        std::fs::remove_dir_all(&base).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A fresh start never deletes a generation: everything but the
    /// disposable files moves into one kept-<time> directory, FIFOs and
    /// links included (renamed, never opened), earlier kept ones stay.
    #[test]
    fn fresh_start_sets_generations_aside() {
        let dir = scratch("aside");
        std::fs::create_dir_all(dir.join("gen-000001")).unwrap();
        std::fs::write(dir.join("gen-000001/memory.img"), b"state").unwrap();
        std::os::unix::fs::symlink("gen-000001", dir.join("latest")).unwrap();
        std::fs::write(dir.join(IDENTITY_FILE), b"{}").unwrap();
        std::fs::write(dir.join(FINISHED_MARKER), b"{}").unwrap();
        std::fs::create_dir(dir.join("kept-19700101T000000Z")).unwrap();
        let fifo = CString::new(dir.join("planted").as_os_str().as_bytes()).unwrap();
        // SAFETY: `fifo` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_034_182);
        let kept = dir.join("kept-20261130T102302Z");
        assert_eq!(set_aside(&dir, now).unwrap(), Cleared::KeptIn(kept.clone()));
        assert_eq!(
            names(&dir),
            ["kept-19700101T000000Z", "kept-20261130T102302Z"]
        );
        assert_eq!(
            names(&kept),
            ["finished", "gen-000001", "latest", "planted", "step.json"]
        );
        assert_eq!(
            std::fs::read(kept.join("latest/memory.img")).unwrap(),
            b"state"
        );
        assert_eq!(std::fs::metadata(&kept).unwrap().mode() & 0o777, 0o700);

        // A second fresh start in the same second gets its own directory.
        std::fs::create_dir(dir.join("gen-000002")).unwrap();
        assert_eq!(
            set_aside(&dir, now).unwrap(),
            Cleared::KeptIn(dir.join("kept-20261130T102302Z-2"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fresh_start_removes_only_disposable_files() {
        let dir = scratch("disposable");
        std::fs::write(dir.join(IDENTITY_FILE), b"{}").unwrap();
        std::fs::write(dir.join(FINISHED_MARKER), b"{}").unwrap();
        let now = std::time::SystemTime::now();
        assert_eq!(set_aside(&dir, now).unwrap(), Cleared::Removed(2));
        assert!(names(&dir).is_empty());
        assert_eq!(set_aside(&dir, now).unwrap(), Cleared::Removed(0));
        // A directory by a disposable name is not what the plugin wrote: keep it.
        std::fs::create_dir(dir.join(IDENTITY_FILE)).unwrap();
        assert!(matches!(set_aside(&dir, now).unwrap(), Cleared::KeptIn(_)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_796_034_182), "20261130T102302Z");
    }

    #[test]
    fn refuses_symlinks_below_root() {
        let base = scratch("symlink");
        let root = base.join("ckpt");
        let elsewhere = base.join("elsewhere");
        std::fs::create_dir_all(root.join("mallory")).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("mallory/7")).unwrap();
        let sp = StepPath {
            root,
            user: "mallory".into(),
            job_id: 7,
            step_id: 0,
        };
        let (uid, gid) = me();
        assert!(sp.create(uid, gid).is_err());
        assert!(!elsewhere.join("0").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn rejects_bad_components() {
        let d = Dir::open(Path::new("/")).unwrap();
        for bad in ["", ".", "..", "a/b"] {
            assert!(d.open_child(OsStr::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn task_subdirs() {
        assert_eq!(task_subdir(1, 0), None);
        assert_eq!(task_subdir(4, 3).as_deref(), Some("task3"));
    }
}
