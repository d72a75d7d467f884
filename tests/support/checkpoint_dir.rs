//! Checkpoint directories and the vmctl commands on them (`checkpoint`,
//! `inspect`, `restore`), and the edits tests make to generations to check
//! that damaged or foreign ones are refused.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::{run_command, vmctl_path, RunOutput, STEP};

const FILL: &str = env!("VMWRAP_FIXTURE_FILL");

/// Runs `vmctl ARGS...` to completion with the given stdin, in `cwd`.
pub fn vmctl_in(cwd: &Path, args: &[&dyn AsRef<OsStr>], stdin: &[u8]) -> RunOutput {
    let mut cmd = Command::new(vmctl_path());
    cmd.args(args.iter().map(|a| a.as_ref())).current_dir(cwd);
    run_command(cmd, stdin, STEP)
}

/// Runs `vmctl ARGS...` to completion in `/` with no input.
pub fn vmctl(args: &[&dyn AsRef<OsStr>]) -> RunOutput {
    vmctl_in(Path::new("/"), args, b"")
}

/// `vmctl restore CKPT OPTS...` in `cwd` with `stdin`, to completion.
pub fn restore(cwd: &Path, ckpt: &Path, opts: &[&str], stdin: &[u8]) -> RunOutput {
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"restore", &ckpt];
    for o in opts {
        args.push(o);
    }
    vmctl_in(cwd, &args, stdin)
}

/// `vmctl checkpoint DIR --json`: must succeed; returns its JSON answer.
pub fn checkpoint_json(ckpt: &Path) -> Value {
    let out = vmctl(&[&"checkpoint", &ckpt, &"--json"]);
    assert_eq!(out.code, 0, "vmctl checkpoint --json:\n{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("vmctl checkpoint --json printed no JSON ({e}):\n{out:?}"));
    assert_eq!(v["ok"], true, "{v}");
    v
}

/// `vmctl inspect DIR --json [--verify]`: exit status and the JSON.
pub fn inspect_json(ckpt: &Path, verify: bool) -> (i32, Value) {
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"inspect", &ckpt, &"--json"];
    if verify {
        args.push(&"--verify");
    }
    let out = vmctl(&args);
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("vmctl inspect --json printed no JSON ({e}):\n{out:?}"));
    (out.code, v)
}

/// (generation, status) of each row of `inspect --json`.
pub fn statuses(v: &Value) -> Vec<(u64, String)> {
    v["generations"]
        .as_array()
        .expect("generations array")
        .iter()
        .map(|r| {
            (
                r["generation"].as_u64().unwrap(),
                r["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The directory name of `generation`: gen-NNNNNN.
pub fn gen_name(generation: u64) -> String {
    format!("gen-{generation:06}")
}

pub fn gen_dir(ckpt: &Path, generation: u64) -> PathBuf {
    ckpt.join(gen_name(generation))
}

/// Names in `dir`, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Complete generation directories (gen-NNNNNN, no suffix) in `dir`.
pub fn generation_dirs(dir: &Path) -> Vec<String> {
    entries(dir)
        .into_iter()
        .filter(|n| {
            n.strip_prefix("gen-")
                .is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect()
}

/// A generation's manifest.json.
pub fn manifest(gen: &Path) -> Value {
    let p = gen.join("manifest.json");
    serde_json::from_slice(&fs::read(&p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The saved offset of the job's descriptor open on `file`.
pub fn fd_offset(gen: &Path, file: &Path) -> u64 {
    let m = manifest(gen);
    let files = m["kernel"]["files"].as_array().expect("open files");
    files
        .iter()
        .filter_map(|f| f.get("Path"))
        .find(|p| p["path"].as_str() == file.to_str())
        .and_then(|p| p["offset"].as_u64())
        .unwrap_or_else(|| {
            panic!(
                "{}: no descriptor open on {} in {}",
                gen.display(),
                file.display(),
                serde_json::to_string_pretty(files).unwrap()
            )
        })
}

/// CRC-32 (IEEE), as in manifest.sum.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// The manifest.sum line that vouches for manifest.json holding `bytes`.
pub fn manifest_sum(bytes: &[u8]) -> String {
    format!("crc32 {:08x} manifest.json\n", crc32(bytes))
}

/// Replaces a generation's manifest.json with `manifest` and writes a matching
/// manifest.sum, so only the content itself can make vmctl refuse it.
pub fn write_manifest(gen: &Path, manifest: &Value) {
    let bytes = serde_json::to_vec(manifest).unwrap();
    fs::write(gen.join("manifest.json"), &bytes).unwrap();
    fs::write(gen.join("manifest.sum"), manifest_sum(&bytes)).unwrap();
}

/// Edits a generation's manifest.json and writes a matching manifest.sum, so
/// only the edit itself can make vmctl refuse it.
pub fn rewrite_manifest(gen: &Path, edit: impl FnOnce(&mut Value)) {
    let mpath = gen.join("manifest.json");
    let spath = gen.join("manifest.sum");
    let bytes = fs::read(&mpath).unwrap();
    // Our CRC must agree with vmctl's, or the rewritten sum proves nothing.
    assert_eq!(
        fs::read_to_string(&spath).unwrap(),
        manifest_sum(&bytes),
        "{} does not hold the CRC-32 of manifest.json",
        spath.display()
    );
    let mut v: Value = serde_json::from_slice(&bytes).unwrap();
    edit(&mut v);
    write_manifest(gen, &v);
}

pub fn flip_bit(path: &Path, offset: u64, bit: u8) {
    let mut data = fs::read(path).unwrap();
    data[offset as usize] ^= 1 << bit;
    fs::write(path, data).unwrap();
}

pub fn set_len(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Copies generations of checkpoint directory `from` into a new one at `to`
/// (with `latest` pointing at the newest): hard links when `link` (cheap, for
/// copies that are only read), independent files otherwise (for copies the
/// test damages or chowns). Each copy can then be consumed by its own restore,
/// which removes its generations when the job finishes.
pub fn copy_generations(from: &Path, gens: &[u64], to: &Path, link: bool) {
    fs::DirBuilder::new().mode(0o700).create(to).unwrap();
    for &g in gens {
        let (src, dst) = (gen_dir(from, g), gen_dir(to, g));
        fs::DirBuilder::new().mode(0o700).create(&dst).unwrap();
        for name in entries(&src) {
            let (s, d) = (src.join(&name), dst.join(&name));
            if link {
                fs::hard_link(&s, &d).unwrap();
            } else {
                fs::copy(&s, &d).unwrap();
            }
        }
    }
    let newest = gens.iter().max().expect("some generation");
    std::os::unix::fs::symlink(gen_name(*newest), to.join("latest")).unwrap();
}

/// tests/fixtures/hotset.c run natively to the end: `rounds` rounds of `hot_kib`
/// rewritten over `mib` filled, its results in `out`.
pub fn native_hotset(
    tmp: &crate::TempDir,
    out: &Path,
    mib: u64,
    hot_kib: u64,
    rounds: usize,
) -> RunOutput {
    let run = crate::Invocation::new(crate::fixtures::HOTSET)
        .args([
            out.as_os_str(),
            mib.to_string().as_ref(),
            hot_kib.to_string().as_ref(),
            rounds.to_string().as_ref(),
        ])
        .stdin(vec![b'g'; rounds])
        .cwd(tmp.path())
        .run_native();
    assert_eq!(run.code, 0, "native hotset:\n{run:?}");
    run
}

/// tests/fixtures/hotset.c started in a VM by `vmctl run --checkpoint-dir CK
/// OPTS...` in `tmp`, with the arguments [`native_hotset`] takes; the test sends
/// it a stdin byte a round with [`crate::Job::send`].
pub fn hotset_job(
    tmp: &crate::TempDir,
    ck: &Path,
    opts: &[&str],
    out: &Path,
    mib: u64,
    hot_kib: u64,
    rounds: usize,
) -> crate::Job {
    crate::Job::run(
        tmp.path(),
        ck,
        opts,
        crate::fixtures::HOTSET,
        &[
            &out,
            &mib.to_string(),
            &hot_kib.to_string(),
            &rounds.to_string(),
        ],
    )
}

/// Asks `job`'s vmctl for a checkpoint and SIGKILLs it as soon as the temporary
/// directory of `generation` (gen-NNNNNN.tmp-*) appears, to test a write cut off
/// half-way. Returns that directory's name, the killed job's output and the
/// `vmctl checkpoint` client's.
pub fn kill_while_writing(
    job: crate::Job,
    ck: &Path,
    generation: u64,
) -> (String, RunOutput, RunOutput) {
    let client = {
        let ck = ck.to_path_buf();
        std::thread::spawn(move || vmctl(&[&"checkpoint", &ck]))
    };
    let prefix = format!("{}.tmp-", gen_name(generation));
    let tmp_gen = crate::poll_until(&format!("a {prefix}* directory"), STEP, || {
        entries(ck).into_iter().find(|n| n.starts_with(&prefix))
    });
    job.signal(libc::SIGKILL);
    let killed = job.finish();
    (tmp_gen, killed, client.join().unwrap())
}

/// The uninterrupted native run of `fill OUT PASSES MIB` in `dir`.
pub fn native_fill(dir: &crate::TempDir, out: &Path, passes: usize, mib: usize) -> RunOutput {
    let run = crate::Invocation::new(FILL)
        .args([
            out.as_os_str(),
            passes.to_string().as_ref(),
            mib.to_string().as_ref(),
        ])
        .stdin(vec![b'g'; 2 * passes])
        .cwd(dir.path())
        .run_native();
    assert_eq!(run.code, 0, "native fill:\n{run:?}");
    run
}
