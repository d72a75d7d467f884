//! Checkpoint directory layout: ROOT/<user>/<jobid>/<stepid>[/task<N>].
//!
//! slurmstepd creates the per-user levels as root inside directories the user
//! owns, so every step below ROOT goes through directory file descriptors
//! opened with O_NOFOLLOW: a symlink planted by the user cannot redirect a
//! root mkdir, chown or file creation to somewhere else.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Name of the marker slurmstepd leaves when a wrapped task ended for good
/// (anything but "checkpointed, resume me"), so a rerun of the step does not
/// resume a program that had already finished.
pub const FINISHED_MARKER: &str = "finished";
/// The step's identity, written when a step starts afresh.
pub const IDENTITY_FILE: &str = "step.json";

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

    /// Creates (if needed) and opens the subdirectory `name`, then makes it
    /// mode 0700 and owned by uid:gid whatever state it was found in.
    pub fn make_private_child(&self, name: &OsStr, uid: u32, gid: u32) -> io::Result<Dir> {
        check_component(name)?;
        let c = cstring(name)?;
        // SAFETY: as in open_child.
        let rc = unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o700) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::AlreadyExists {
                return Err(err);
            }
        }
        let child = self.open_child(name)?;
        child.set_owner_mode(uid, gid, 0o700)?;
        Ok(child)
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

    /// Creates or truncates `name` for writing without following a
    /// symlink, owned by uid:gid, mode 0600.
    pub fn create_file(&self, name: &OsStr, uid: u32, gid: u32) -> io::Result<File> {
        check_component(name)?;
        let c = cstring(name)?;
        // SAFETY: as in open_child; the descriptor is checked before use.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly opened descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let meta = file.metadata()?;
        if meta.uid() != uid || meta.gid() != gid {
            // SAFETY: plain syscall on a descriptor we own.
            if unsafe { libc::fchown(file.as_raw_fd(), uid, gid) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(file)
    }
}

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
            .join(self.step_id.to_string())
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
        job.make_private_child(OsStr::new(&self.step_id.to_string()), uid, gid)?;
        Ok(self.step_dir())
    }

    /// Opens the checkpoint directory of one task without following
    /// symlinks anywhere below ROOT.
    pub fn open(&self, task_subdir: Option<&str>) -> io::Result<Dir> {
        let mut dir = Dir::open(&self.root)?
            .open_child(OsStr::new(&self.user))?
            .open_child(OsStr::new(&self.job_id.to_string()))?
            .open_child(OsStr::new(&self.step_id.to_string()))?;
        if let Some(sub) = task_subdir {
            dir = dir.open_child(OsStr::new(sub))?;
        }
        Ok(dir)
    }
}

/// Subdirectory of the step directory for one task of a multi-task step;
/// a single-task step checkpoints into the step directory itself.
pub fn task_subdir(total_tasks: u32, global_task_id: u32) -> Option<String> {
    (total_tasks > 1).then(|| format!("task{global_task_id}"))
}

/// Empties `dir` (as the job user) so a fresh run cannot be confused with
/// the checkpoints of an earlier, unrelated one.
pub fn clear_contents(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmwrap-spank-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
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
        sp.open(None)
            .unwrap()
            .create_file(OsStr::new(FINISHED_MARKER), uid, gid)
            .unwrap();
        assert!(dir.join(FINISHED_MARKER).exists());
        assert_eq!(clear_contents(&dir).unwrap(), 1);
        std::fs::remove_dir_all(root.parent().unwrap()).unwrap();
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
