//! `vmctl check`: can this node wrap, checkpoint and restore jobs? One line per
//! item, each failing one saying what to do.

use clap::Args;
use serde::Serialize;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Exit status when an item failed: this node cannot run wrapped jobs as set up.
pub const EXIT_FAILED: i32 = 1;
/// Exit status when nothing failed but something deserves a look.
pub const EXIT_WARNINGS: i32 = 2;

pub const DEFAULT_PLUGSTACK: &str = "/etc/slurm/plugstack.conf";
const DEFAULT_CHECKPOINT_ROOT: &str = "/var/lib/vmwrap/checkpoints";
/// Below this, a checkpoint of a modest job may not fit.
const LOW_SPACE_BYTES: u64 = 10 << 30;

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Print one JSON object instead of lines
    #[arg(long)]
    pub json: bool,

    /// The checkpoint root to check (default: checkpoint_root= from plugstack.conf,
    /// else /var/lib/vmwrap/checkpoints)
    #[arg(long, value_name = "DIR")]
    pub checkpoint_root: Option<PathBuf>,

    /// The plugstack.conf to read
    #[arg(long, value_name = "FILE", default_value = DEFAULT_PLUGSTACK)]
    pub plugstack: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Item {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn ok(name: &'static str, detail: impl Into<String>) -> Item {
    Item {
        name,
        status: Status::Ok,
        detail: detail.into(),
        fix: None,
    }
}

fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Item {
    Item {
        name,
        status: Status::Warn,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Item {
    Item {
        name,
        status: Status::Fail,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// The plugin's checkpoint_root= in `plugstack` (and the files it includes), else
/// the default.
pub fn configured_checkpoint_root(plugstack: &Path) -> PathBuf {
    find_plugin(plugstack)
        .ok()
        .and_then(|p| p.arg("checkpoint_root").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CHECKPOINT_ROOT))
}

pub fn check(args: CheckArgs) -> i32 {
    let plugstack = find_plugin(&args.plugstack);
    let root = args
        .checkpoint_root
        .clone()
        .or_else(|| {
            plugstack
                .as_ref()
                .ok()
                .and_then(|p| p.arg("checkpoint_root").map(PathBuf::from))
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CHECKPOINT_ROOT));
    let (class, overridden) = super::cpu_class::this_node();

    let mut items = vec![check_kvm(), check_thp()];
    items.extend(check_checkpoint_root(&root));
    items.push(plugin_item(&args.plugstack, &plugstack));
    items.extend(check_slurm());
    items.push(if overridden {
        warn(
            "cpu-class",
            format!("{class} (from {})", super::cpu_class::TEST_OVERRIDE_ENV),
            format!(
                "unset {} outside tests",
                super::cpu_class::TEST_OVERRIDE_ENV
            ),
        )
    } else {
        ok(
            "cpu-class",
            format!("{class} (add Features={class} to this node's NodeName line in slurm.conf)"),
        )
    });

    let worst = items.iter().map(|i| i.status).max().unwrap_or(Status::Ok);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "status": worst,
                "cpu_class": class,
                "checkpoint_root": root,
                "checks": items,
            })
        );
    } else {
        for i in &items {
            let tag = match i.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            match &i.fix {
                Some(fix) => println!("{tag} {}: {}; fix: {fix}", i.name, i.detail),
                None => println!("{tag} {}: {}", i.name, i.detail),
            }
        }
    }
    match worst {
        Status::Ok => 0,
        Status::Warn => EXIT_WARNINGS,
        Status::Fail => EXIT_FAILED,
    }
}

/// Which KVM module drives /dev/kvm: PVM (nested, paravirtual), Intel VMX or AMD SVM.
fn kvm_kind() -> &'static str {
    for (module, kind) in [
        ("kvm_pvm", "kvm_pvm (paravirtual, nested)"),
        ("kvm_intel", "kvm_intel"),
        ("kvm_amd", "kvm_amd"),
    ] {
        if Path::new("/sys/module").join(module).exists() {
            return kind;
        }
    }
    "unknown KVM module"
}

fn check_kvm() -> Item {
    use kvm_ioctls::Cap;
    const NAME: &str = "kvm";
    let md = match std::fs::metadata("/dev/kvm") {
        Ok(md) => md,
        Err(e) => {
            return fail(
                NAME,
                format!("/dev/kvm: {e}"),
                "load KVM (modprobe kvm_intel, kvm_amd or kvm_pvm) or use a node with virtualization enabled",
            )
        }
    };
    use std::os::unix::fs::FileTypeExt;
    if !md.file_type().is_char_device() {
        return fail(
            NAME,
            "/dev/kvm is not a character device",
            "recreate it: mknod /dev/kvm c 10 232",
        );
    }
    let kind = kvm_kind();
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            // SAFETY: geteuid cannot fail.
            let uid = unsafe { libc::geteuid() };
            return if uid == 0 {
                fail(
                    NAME,
                    format!("/dev/kvm ({kind}) cannot be opened: {e}"),
                    "check dmesg for KVM errors",
                )
            } else {
                // The plugin opens /dev/kvm as root for the job, so users need no access.
                warn(
                    NAME,
                    format!("/dev/kvm ({kind}) cannot be opened by uid {uid}: {e}"),
                    "run vmctl check as root to check KVM itself; the plugin opens /dev/kvm as root for jobs",
                )
            };
        }
    };
    let api = kvm.get_api_version();
    if api != 12 {
        return fail(
            NAME,
            format!("/dev/kvm ({kind}) has KVM API version {api}, not 12"),
            "use a Linux kernel with the standard KVM API",
        );
    }
    let needed = [
        (Cap::UserMemory, "USER_MEMORY"),
        (Cap::SyncRegs, "SYNC_REGS"),
        (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
        (Cap::Xsave, "XSAVE"),
        (Cap::Xcrs, "XCRS"),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(cap, _)| !kvm.check_extension(*cap))
        .map(|&(_, name)| name)
        .collect();
    if !missing.is_empty() {
        return fail(
            NAME,
            format!(
                "/dev/kvm ({kind}, API {api}) lacks KVM_CAP_{}",
                missing.join(", KVM_CAP_")
            ),
            "use a newer kernel or another KVM module",
        );
    }
    ok(
        NAME,
        format!("/dev/kvm opened: {kind}, API {api}, needed capabilities present"),
    )
}

fn check_thp() -> Item {
    const NAME: &str = "transparent-hugepages";
    const PATH: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
    let text = match std::fs::read_to_string(PATH) {
        Ok(t) => t,
        Err(e) => return warn(
            NAME,
            format!("{PATH}: {e}"),
            "use a kernel with transparent huge pages; guest memory is much slower without them",
        ),
    };
    let mode = text
        .split_whitespace()
        .find(|w| w.starts_with('['))
        .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string())
        .unwrap_or_else(|| text.trim().to_string());
    match mode.as_str() {
        "always" | "madvise" => ok(NAME, format!("{mode} (vmctl asks for them with madvise)")),
        _ => warn(
            NAME,
            format!("{mode}: guest memory is backed by 4 KiB pages, first touches are ~100x slower"),
            format!("echo madvise > {PATH} (and transparent_hugepage=madvise on the kernel command line)"),
        ),
    }
}

/// Network and cluster file systems by statfs f_type (linux/magic.h and the
/// file systems' own sources): a checkpoint root on one of them lets a requeued job
/// resume on another node.
const SHARED_FILESYSTEMS: &[(i64, &str)] = &[
    (0x6969, "nfs"),
    (0x0bd0_0bd0, "lustre"),
    (0x4750_4653, "gpfs"),
    (0x1983_0326, "beegfs"),
    (0x00c3_6400, "cephfs"),
    (0xfe53_4d42, "smb2"),
    (0xff53_4d42, "cifs"),
    (0x0102_1997, "9p"),
    (0x7461_636f, "ocfs2"),
    (0x0116_1970, "gfs2"),
    (0x6573_5546, "fuse"),
    (0x5346_414f, "afs"),
    (0xaad7_aaea, "panfs"),
    (0x2405_1905, "ubifs-or-weka"),
];

fn check_checkpoint_root(root: &Path) -> Vec<Item> {
    const NAME: &str = "checkpoint-root";
    let shown = root.display();
    let md = match std::fs::metadata(root) {
        Ok(md) => md,
        Err(e) => {
            return vec![fail(
                NAME,
                format!("{shown}: {e}"),
                format!("create it (as root: install -d -m 0755 {shown}) or set checkpoint_root= in plugstack.conf"),
            )]
        }
    };
    if !md.is_dir() {
        return vec![fail(
            NAME,
            format!("{shown} is not a directory"),
            "point checkpoint_root= at a directory",
        )];
    }
    let Ok(c_path) = CString::new(root.as_os_str().as_bytes()) else {
        return vec![fail(
            NAME,
            format!("{shown}: contains a NUL byte"),
            "use another path",
        )];
    };
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    // SAFETY: a valid C string; access only inspects the path.
    let writable = unsafe { libc::access(c_path.as_ptr(), libc::W_OK | libc::X_OK) } == 0;
    let mut items = Vec::new();
    use std::os::unix::fs::PermissionsExt;
    let mode = md.permissions().mode() & 0o7777;
    items.push(if !writable {
        fail(
            NAME,
            format!("{shown} is not writable by uid {uid}"),
            if uid == 0 {
                "make it writable by root (the plugin creates <user>/<job> directories in it as root); on NFS, do not squash root".to_string()
            } else {
                format!("run vmctl check as root: the plugin creates the per-user directories in {shown} as root")
            },
        )
    } else if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        warn(
            NAME,
            format!("{shown} is world-writable (mode {mode:o})"),
            format!("chmod 0755 {shown}: users must not create or replace each other's directories"),
        )
    } else {
        ok(NAME, format!("{shown} is writable by uid {uid} (mode {mode:o})"))
    });

    let mut vfs: libc::statvfs = unsafe_zeroed_statvfs();
    // SAFETY: a valid path and a statvfs to fill.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut vfs) } == 0 {
        let free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        let total = vfs.f_blocks.saturating_mul(vfs.f_frsize);
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let detail = format!(
            "{:.1} GiB free of {:.1} GiB; each generation of a job needs up to its guest RAM",
            gib(free),
            gib(total)
        );
        items.push(if free < LOW_SPACE_BYTES {
            warn(
                "checkpoint-space",
                detail,
                "free space or move checkpoint_root: a checkpoint that does not fit fails and the job keeps its older one",
            )
        } else {
            ok("checkpoint-space", detail)
        });
    }

    // SAFETY: all-zero is a valid statfs value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path and a statfs to fill.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } == 0 {
        let magic = fs.f_type as i64 & 0xffff_ffff;
        items.push(match SHARED_FILESYSTEMS.iter().find(|(m, _)| *m == magic) {
            Some((_, name)) => ok(
                "checkpoint-shared",
                format!("{shown} is on {name}: a requeued job can resume on any node that mounts it"),
            ),
            None => warn(
                "checkpoint-shared",
                format!("{shown} is on a local file system (type {magic:#x}): a requeued job resumes only if it returns to this node"),
                "put checkpoint_root on a shared file system (NFS, Lustre, GPFS, BeeGFS, CephFS) mounted on every node",
            ),
        });
    }
    items
}

fn unsafe_zeroed_statvfs() -> libc::statvfs {
    // SAFETY: all-zero is a valid statvfs value.
    unsafe { std::mem::zeroed() }
}

/// The plugin's plugstack.conf line.
#[derive(Debug)]
struct PluginLine {
    file: PathBuf,
    required: bool,
    plugin: PathBuf,
    args: Vec<String>,
}

impl PluginLine {
    fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find_map(|a| a.strip_prefix(key)?.strip_prefix('='))
    }
}

/// Looks for the vmwrap plugin in `conf` and the files it includes.
fn find_plugin(conf: &Path) -> Result<PluginLine, String> {
    let mut seen = Vec::new();
    find_plugin_in(conf, &mut seen, 0)?.ok_or_else(|| {
        format!(
            "no active vmwrap line in {} (looked in: {})",
            conf.display(),
            seen.join(", ")
        )
    })
}

fn find_plugin_in(
    conf: &Path,
    seen: &mut Vec<String>,
    depth: usize,
) -> Result<Option<PluginLine>, String> {
    if depth > 8 {
        return Ok(None);
    }
    let text = std::fs::read_to_string(conf).map_err(|e| format!("{}: {e}", conf.display()))?;
    seen.push(conf.display().to_string());
    let dir = conf.parent().unwrap_or(Path::new("/"));
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        match words.next() {
            Some("include") => {
                for pattern in words {
                    for path in expand_include(dir, pattern) {
                        // A broken include is Slurm's to report; keep looking.
                        if let Ok(Some(found)) = find_plugin_in(&path, seen, depth + 1) {
                            return Ok(Some(found));
                        }
                    }
                }
            }
            Some(kind @ ("required" | "optional")) => {
                let Some(plugin) = words.next() else { continue };
                if !plugin.contains("vmwrap") {
                    continue;
                }
                return Ok(Some(PluginLine {
                    file: conf.to_path_buf(),
                    required: kind == "required",
                    plugin: PathBuf::from(plugin),
                    args: words.map(str::to_string).collect(),
                }));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Slurm expands `include` patterns with glob(3), relative to the including file.
fn expand_include(dir: &Path, pattern: &str) -> Vec<PathBuf> {
    let full = if pattern.starts_with('/') {
        PathBuf::from(pattern)
    } else {
        dir.join(pattern)
    };
    let (Some(parent), Some(name)) = (full.parent(), full.file_name()) else {
        return Vec::new();
    };
    let name = name.to_string_lossy();
    if !name.contains(['*', '?', '[']) {
        return vec![full.clone()];
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| wildcard_match(&name, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    paths.sort();
    paths
}

/// `*` and `?` wildcards (what plugstack includes use in practice).
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len() && !name.starts_with('.')
}

fn plugin_item(conf: &Path, found: &Result<PluginLine, String>) -> Item {
    const NAME: &str = "plugstack";
    match found {
        Err(why) => warn(
            NAME,
            why.clone(),
            format!(
                "enable the vmwrap line in /etc/slurm/plugstack.conf.d/vmwrap.conf (included from {}) on every node and submit host",
                conf.display()
            ),
        ),
        Ok(line) if !line.plugin.exists() => fail(
            NAME,
            format!("{}: the plugin {} does not exist", line.file.display(), line.plugin.display()),
            "install the vmwrap package or fix the path",
        ),
        Ok(line) => {
            let vmctl = line.arg("vmctl").unwrap_or("/usr/local/bin/vmctl");
            if !Path::new(vmctl).exists() {
                return fail(
                    NAME,
                    format!("{}: vmctl={vmctl} does not exist", line.file.display()),
                    "set vmctl= to the installed vmctl (/usr/bin/vmctl from the package)",
                );
            }
            let detail = format!(
                "{} loads {} with {}",
                line.file.display(),
                line.plugin.display(),
                if line.args.is_empty() { "no arguments".into() } else { line.args.join(" ") }
            );
            if line.required {
                ok(NAME, detail)
            } else {
                warn(
                    NAME,
                    detail + " as optional",
                    "use required: with optional, a node that fails to load it runs --vm-wrap jobs without checkpoints",
                )
            }
        }
    }
}

/// The Slurm settings wrapped jobs depend on, from `scontrol show config`.
fn check_slurm() -> Vec<Item> {
    const NAME: &str = "slurm";
    let output = run_with_timeout("scontrol", &["show", "config"], Duration::from_secs(15));
    let text = match output {
        Ok(t) => t,
        Err(why) => {
            return vec![warn(
                NAME,
                format!("cannot read the Slurm configuration: {why}"),
                "run vmctl check where scontrol can reach slurmctld to check JobRequeue, KillWait and PreemptMode",
            )]
        }
    };
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    let mut items = Vec::new();
    items.push(match value("JobRequeue").as_deref() {
        Some("1") => ok(
            "slurm-jobrequeue",
            "JobRequeue=1: batch jobs are requeued by default",
        ),
        Some(v) => warn(
            "slurm-jobrequeue",
            format!("JobRequeue={v}: jobs are not requeued unless submitted with --requeue"),
            "set JobRequeue=1 in slurm.conf, or tell users to submit wrapped jobs with --requeue",
        ),
        None => warn(
            "slurm-jobrequeue",
            "JobRequeue not shown by scontrol",
            "check slurm.conf",
        ),
    });
    let kill_wait =
        value("KillWait").and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    items.push(match kill_wait {
        Some(s) if s >= 30 => ok(
            "slurm-killwait",
            format!("KillWait={s}s: time a job has to checkpoint after SIGTERM"),
        ),
        Some(s) => warn(
            "slurm-killwait",
            format!("KillWait={s}s: a large job may not finish its checkpoint before SIGKILL"),
            "raise KillWait in slurm.conf (30 or more; about checkpoint size / disk bandwidth)",
        ),
        None => warn(
            "slurm-killwait",
            "KillWait not shown by scontrol",
            "check slurm.conf",
        ),
    });
    items.push(match value("PreemptMode") {
        Some(v) if v.to_ascii_uppercase().contains("REQUEUE") => ok(
            "slurm-preemptmode",
            format!("PreemptMode={v}: preempted jobs are requeued and resume"),
        ),
        Some(v) if v.eq_ignore_ascii_case("OFF") => ok(
            "slurm-preemptmode",
            "PreemptMode=OFF: no preemption (requeues and drains still resume)",
        ),
        Some(v) => warn(
            "slurm-preemptmode",
            format!(
                "PreemptMode={v}: preempted wrapped jobs are not requeued, so they cannot resume"
            ),
            "set PreemptMode=REQUEUE (see contrib/slurm.conf.preempt.example)",
        ),
        None => warn(
            "slurm-preemptmode",
            "PreemptMode not shown by scontrol",
            "check slurm.conf",
        ),
    });
    let _ = NAME;
    items
}

/// Runs a command with no input, returning its stdout, killing it after `timeout`
/// (scontrol waits a long time for an unreachable slurmctld).
pub fn run_with_timeout(program: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    // Read while the program runs: output larger than a pipe's buffer (squeue on a
    // big cluster) would otherwise stop it until the timeout.
    let read_all = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("piped")));
    let stderr = read_all(Box::new(child.stderr.take().expect("piped")));
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{program} {} timed out", args.join(" ")));
            }
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        let err = String::from_utf8_lossy(&stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(format!(
            "{program} {} failed ({status}): {last}",
            args.join(" "),
        ));
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*.conf", "vmwrap.conf"));
        assert!(!wildcard_match("*.conf", "vmwrap.conf.dpkg-old"));
        assert!(!wildcard_match("*.conf", ".hidden.conf"));
        assert!(wildcard_match("v?wrap*", "vmwrap.conf"));
    }

    #[test]
    fn plugstack_includes_are_followed() {
        let dir = std::env::temp_dir().join(format!("vmctl-check-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("plugstack.conf.d")).unwrap();
        std::fs::write(
            dir.join("plugstack.conf"),
            "# comment\ninclude plugstack.conf.d/*.conf\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("plugstack.conf.d/other.conf"),
            "required /usr/lib/other.so\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("plugstack.conf.d/vmwrap.conf"),
            "# required /x/libvmwrap_spank.so off\nrequired /x/libvmwrap_spank.so vmctl=/usr/bin/vmctl checkpoint_root=/ckpt # note\n",
        )
        .unwrap();
        let line = find_plugin(&dir.join("plugstack.conf")).unwrap();
        assert!(line.required);
        assert_eq!(line.plugin, PathBuf::from("/x/libvmwrap_spank.so"));
        assert_eq!(line.arg("checkpoint_root"), Some("/ckpt"));
        assert_eq!(line.arg("vmctl"), Some("/usr/bin/vmctl"));
        std::fs::write(dir.join("plugstack.conf.d/vmwrap.conf"), "# all off\n").unwrap();
        assert!(find_plugin(&dir.join("plugstack.conf"))
            .unwrap_err()
            .contains("no active vmwrap line"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
