//! Turning a task into a vmctl invocation: the command line, the step
//! identity file, and the parts of slurmstepd's exec_task() that run after
//! the SPANK task_init hook and are skipped when the plugin execs vmctl itself
//! (PATH lookup, TMPDIR, propagated rlimits).

use std::ffi::{OsStr, OsString};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::options::WrapOptions;

/// vmctl's exit status for "checkpointed, resume me".
pub const EXIT_CHECKPOINTED: i32 = 75;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Run,
    Restore,
}

/// Builds the argv for vmctl. `program` is the task's argv with argv[0]
/// already resolved; it is ignored on restore, where the checkpoint holds
/// the program.
pub fn vmctl_argv(
    mode: Mode,
    vmctl: &Path,
    kvm_fd: RawFd,
    dir: &Path,
    opts: &WrapOptions,
    reexec: &[OsString],
    program: &[OsString],
) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![vmctl.as_os_str().to_owned()];
    match mode {
        Mode::Run => argv.push("run".into()),
        Mode::Restore => {
            argv.push("restore".into());
            argv.push(dir.as_os_str().to_owned());
        }
    }
    argv.push("--kvm-fd".into());
    argv.push(kvm_fd.to_string().into());
    if mode == Mode::Run {
        argv.push("--checkpoint-dir".into());
        argv.push(dir.as_os_str().to_owned());
    }
    argv.push("--on-signal".into());
    argv.push("TERM=checkpoint-exit".into());
    argv.push("--on-signal".into());
    argv.push(format!("{}=checkpoint", opts.signal).into());
    if let Some(interval) = opts.interval {
        argv.push("--checkpoint-interval".into());
        argv.push(interval.to_string().into());
    }
    if let Some(keep) = opts.keep {
        argv.push("--keep".into());
        argv.push(keep.to_string().into());
    }
    // On restore too: a resumed job writes its next generations the same way.
    if let Some(compress) = &opts.compress {
        argv.push("--compress".into());
        argv.push(compress.into());
    }
    // The same cap on restore as on run: the checkpoint's own sizes come from
    // a file the user can edit.
    if let Some(mem) = opts.mem {
        argv.push("--mem".into());
        argv.push(mem.to_string().into());
    }
    if let Some(files) = &opts.files {
        argv.push("--files".into());
        argv.push(files.into());
    }
    for program in reexec {
        argv.push("--reexec".into());
        argv.push(program.clone());
    }
    if mode == Mode::Run {
        argv.push("--".into());
        argv.extend(program.iter().cloned());
    }
    argv
}

/// What a checkpoint directory belongs to, written to step.json when a step
/// starts afresh and compared before resuming from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepIdentity {
    pub job_id: u32,
    pub step_id: u32,
    pub task_id: u32,
    pub argv: Vec<String>,
    pub cwd: String,
}

impl StepIdentity {
    /// Returns why `self` (found on disk) is not the checkpoint of `now`,
    /// or None if it is. The cwd is recorded for people, not compared: a
    /// requeued job may legitimately run from a different node's mount.
    pub fn mismatch(&self, now: &StepIdentity) -> Option<String> {
        if (self.job_id, self.step_id, self.task_id) != (now.job_id, now.step_id, now.task_id) {
            return Some(format!(
                "it belongs to job {} step {} task {}",
                self.job_id, self.step_id, self.task_id
            ));
        }
        if self.argv != now.argv {
            return Some(format!(
                "it was made for the command {:?}, this step runs {:?}",
                self.argv, now.argv
            ));
        }
        None
    }
}

/// Lossy UTF-8 text for step.json; the comparison only has to tell two
/// commands apart, and JSON strings cannot hold arbitrary bytes.
pub fn lossy(args: &[OsString]) -> Vec<String> {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// The task's environment as `KEY=VALUE` byte strings.
#[derive(Clone, Debug, Default)]
pub struct Env(pub Vec<Vec<u8>>);

impl Env {
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.iter().find_map(|entry| {
            let rest = entry.strip_prefix(key.as_bytes())?;
            rest.strip_prefix(b"=")
        })
    }

    pub fn set(&mut self, key: &str, value: &[u8]) {
        self.remove(key);
        let mut entry = key.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(value);
        self.0.push(entry);
    }

    pub fn remove(&mut self, key: &str) {
        self.0.retain(|entry| {
            !(entry.starts_with(key.as_bytes()) && entry.get(key.len()) == Some(&b'='))
        });
    }
}

/// Resolves a bare command name the way slurmstepd does (search the task's
/// PATH for an executable regular file). Names with a slash, and names not
/// found, are returned unchanged so vmctl reports them (exit 127) just as
/// the exec would have failed without the plugin.
pub fn resolve_program(argv0: &OsStr, env: &Env, cwd: &Path) -> OsString {
    use std::os::unix::fs::PermissionsExt;
    if argv0.as_bytes().contains(&b'/') || argv0.is_empty() {
        return argv0.to_owned();
    }
    let Some(path) = env.get("PATH") else {
        return argv0.to_owned();
    };
    for dir in path.split(|&b| b == b':') {
        // An empty PATH element means the current directory.
        let dir = if dir.is_empty() {
            cwd.to_path_buf()
        } else {
            Path::new(OsStr::from_bytes(dir)).to_path_buf()
        };
        let candidate = dir.join(argv0);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return candidate.into_os_string();
            }
        }
    }
    argv0.to_owned()
}

/// One `SLURM_RLIMIT_<NAME>` value the submitting side asked to propagate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RlimitRequest {
    pub name: String,
    pub value: u64,
    /// Set by `--propagate` on the command line (a 'U' prefix): Slurm
    /// then reports failures and does not clamp to the hard limit.
    pub user_requested: bool,
}

/// Names slurmstepd understands, in its own order (slurm_rlimits_info.c).
pub const RLIMIT_NAMES: &[&str] = &[
    "CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NPROC", "NOFILE", "MEMLOCK", "AS",
];

/// Extracts and removes the propagated rlimits from `env`, as slurmstepd's
/// set_user_limits() does: the submit host only exports the limits that
/// PropagateResourceLimits (or --propagate) selects.
pub fn take_rlimits(env: &mut Env) -> Vec<RlimitRequest> {
    let mut requests = Vec::new();
    for name in RLIMIT_NAMES {
        let key = format!("SLURM_RLIMIT_{name}");
        let Some(raw) = env.get(&key).map(<[u8]>::to_vec) else {
            continue;
        };
        env.remove(&key);
        let (user_requested, digits) = match raw.strip_prefix(b"U") {
            Some(rest) => (true, rest),
            None => (false, raw.as_slice()),
        };
        let Some(value) = std::str::from_utf8(digits)
            .ok()
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        requests.push(RlimitRequest {
            name: (*name).to_string(),
            value,
            user_requested,
        });
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{Config, WrapOptions};
    use std::path::PathBuf;

    fn strings(v: &[OsString]) -> Vec<&str> {
        v.iter().map(|s| s.to_str().unwrap()).collect()
    }

    #[test]
    fn run_argv() {
        let opts = WrapOptions::parse(
            Some("interval=600,keep=2,compress=zstd:3,mem=8G"),
            &Config::default(),
        )
        .unwrap();
        let argv = vmctl_argv(
            Mode::Run,
            Path::new("/usr/bin/vmctl"),
            5,
            Path::new("/ck/u/1/0"),
            &opts,
            &[],
            &["/bin/echo".into(), "hi there".into()],
        );
        assert_eq!(
            strings(&argv),
            [
                "/usr/bin/vmctl",
                "run",
                "--kvm-fd",
                "5",
                "--checkpoint-dir",
                "/ck/u/1/0",
                "--on-signal",
                "TERM=checkpoint-exit",
                "--on-signal",
                "USR2=checkpoint",
                "--checkpoint-interval",
                "600",
                "--keep",
                "2",
                "--compress",
                "zstd:3",
                "--mem",
                "8G",
                "--",
                "/bin/echo",
                "hi there"
            ]
        );
    }

    #[test]
    fn restore_argv() {
        let opts = WrapOptions::parse(
            Some("signal=USR1,mem=64M,files=truncate"),
            &Config::default(),
        )
        .unwrap();
        let argv = vmctl_argv(
            Mode::Restore,
            Path::new("/v"),
            7,
            Path::new("/ck"),
            &opts,
            &["/usr/bin/srun".into()],
            &["/bin/echo".into()],
        );
        assert_eq!(
            strings(&argv),
            [
                "/v",
                "restore",
                "/ck",
                "--kvm-fd",
                "7",
                "--on-signal",
                "TERM=checkpoint-exit",
                "--on-signal",
                "USR1=checkpoint",
                "--mem",
                "64M",
                "--files",
                "truncate",
                "--reexec",
                "/usr/bin/srun"
            ]
        );
    }

    #[test]
    fn identity() {
        let a = StepIdentity {
            job_id: 1,
            step_id: 0,
            task_id: 0,
            argv: vec!["a".into()],
            cwd: "/x".into(),
        };
        let mut b = a.clone();
        b.cwd = "/y".into();
        assert_eq!(a.mismatch(&b), None);
        b.argv.push("extra".into());
        assert!(a.mismatch(&b).unwrap().contains("command"));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<StepIdentity>(&json).unwrap(), a);
    }

    #[test]
    fn env_and_rlimits() {
        let mut env = Env(vec![
            b"PATH=/bin".to_vec(),
            b"SLURM_RLIMIT_NOFILE=1024".to_vec(),
            b"SLURM_RLIMIT_CORE=U0".to_vec(),
            b"SLURM_RLIMIT_STACKX=1".to_vec(),
        ]);
        assert_eq!(env.get("PATH"), Some(&b"/bin"[..]));
        assert_eq!(env.get("PAT"), None);
        let r = take_rlimits(&mut env);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            RlimitRequest {
                name: "CORE".into(),
                value: 0,
                user_requested: true
            }
        );
        assert_eq!(r[1].name, "NOFILE");
        assert_eq!(env.get("SLURM_RLIMIT_NOFILE"), None);
        assert!(env.get("SLURM_RLIMIT_STACKX").is_some());
        env.set("PATH", b"/usr/bin");
        assert_eq!(env.get("PATH"), Some(&b"/usr/bin"[..]));
        assert_eq!(env.0.iter().filter(|e| e.starts_with(b"PATH=")).count(), 1);
    }

    #[test]
    fn path_lookup() {
        let env = Env(vec![b"PATH=/nonexistent:/bin:/usr/bin".to_vec()]);
        let cwd = PathBuf::from("/");
        let found = resolve_program(OsStr::new("sh"), &env, &cwd);
        assert!(found.to_str().unwrap().ends_with("/sh"), "{found:?}");
        assert!(found.to_str().unwrap().starts_with('/'));
        assert_eq!(
            resolve_program(OsStr::new("./a.out"), &env, &cwd),
            "./a.out"
        );
        assert_eq!(
            resolve_program(OsStr::new("no-such-cmd-xyz"), &env, &cwd),
            "no-such-cmd-xyz"
        );
    }
}
