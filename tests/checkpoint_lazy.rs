//! Lazy restore (`vmctl restore --lazy=on`): the job runs again before its memory is
//! loaded, a loader filling guest RAM behind it. Its output must be exactly what an
//! uninterrupted native run gives, across an incremental chain; a chunk that proves
//! damaged only once the job runs stops the job with the generation and chunk named,
//! and leaves every generation in place.
//!
//! The workload blocks reading stdin between rounds (tests/fixtures/hotset.c), so a
//! checkpoint lands where the test wants it, and a restored job waits there while its
//! memory loads.

use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use vmwrap_tests::{diff, require_kvm, vmctl_path, Invocation, Job, RunOutput, TempDir};

/// tests/fixtures/hotset.c: `hotset OUTFILE MIB HOT_KIB ROUNDS`, 1 stdin byte a round.
const HOTSET: &str = env!("VMWRAP_FIXTURE_HOTSET");
const EXIT_VMCTL_FAILED: i32 = 125;
const MIB: u64 = 64;
const HOT_KIB: u64 = 512;
const ROUNDS: usize = 3;

fn manifest(gen: &Path) -> Value {
    serde_json::from_slice(&fs::read(gen.join("manifest.json")).unwrap()).unwrap()
}

/// The saved offset of the job's descriptor open on `file`.
fn fd_offset(gen: &Path, file: &Path) -> u64 {
    manifest(gen)["kernel"]["files"]
        .as_array()
        .expect("open files")
        .iter()
        .filter_map(|f| f.get("Path"))
        .find(|p| p["path"].as_str() == file.to_str())
        .and_then(|p| p["offset"].as_u64())
        .unwrap_or_else(|| panic!("{}: no descriptor on {}", gen.display(), file.display()))
}

fn checkpoint(ckpt: &Path) -> Value {
    let out = Command::new(vmctl_path())
        .arg("checkpoint")
        .arg(ckpt)
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "vmctl checkpoint: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `vmctl restore --lazy=on CKPT`, reporting its loader's figures on stderr.
fn lazy_restore(cwd: &Path, ckpt: &Path) -> Job {
    let mut cmd = Command::new(vmctl_path());
    cmd.arg("restore")
        .arg(ckpt)
        .arg("--lazy=on")
        .env("VMCTL_LAZY_STATS", "1")
        .current_dir(cwd);
    Job::spawn(cmd)
}

fn native_hotset(tmp: &TempDir, out: &Path) -> RunOutput {
    let run = Invocation::new(HOTSET)
        .args([
            out.as_os_str(),
            MIB.to_string().as_ref(),
            HOT_KIB.to_string().as_ref(),
            ROUNDS.to_string().as_ref(),
        ])
        .stdin(vec![b'g'; ROUNDS])
        .cwd(tmp.path())
        .run_native();
    assert_eq!(run.code, 0, "native hotset:\n{run:?}");
    run
}

/// Runs hotset in a VM with incremental checkpoints: generation 1 (full) after the
/// fill, generation 2 (incremental) after round 1; then kills it.
fn checkpointed_hotset(tmp: &TempDir, out: &Path, ck: &Path) {
    let mut job = Job::run(
        tmp.path(),
        ck,
        &["--mem", "256M", "--incremental=on"],
        HOTSET,
        &[
            &out,
            &MIB.to_string(),
            &HOT_KIB.to_string(),
            &ROUNDS.to_string(),
        ],
    );
    job.wait_for("filled ");
    assert_eq!(checkpoint(ck)["kind"], "full");
    job.send(b"g");
    job.wait_for("round 1 ");
    assert_eq!(checkpoint(ck)["kind"], "incremental");
    job.signal(libc::SIGKILL);
    job.finish();
}

fn tail_from<'a>(text: &'a str, prefix: &str) -> &'a str {
    let at = text
        .find(&format!("\n{prefix}"))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{text}"));
    &text[at + 1..]
}

#[test]
fn a_lazily_restored_chain_gives_the_native_output() {
    if !require_kvm() {
        return;
    }
    let tmp = TempDir::new("lazy-native");
    let native_out = tmp.join("native.txt");
    let native = native_hotset(&tmp, &native_out);
    let out = tmp.join("vm.txt");
    let ck = tmp.join("ckpt");
    checkpointed_hotset(&tmp, &out, &ck);

    let gen2 = ck.join("gen-000002");
    fs::OpenOptions::new()
        .write(true)
        .open(&out)
        .and_then(|f| f.set_len(fd_offset(&gen2, &out)))
        .unwrap();
    let mut job = lazy_restore(tmp.path(), &ck);
    job.send(&[b'g'; ROUNDS - 1]);
    let r = job.finish();
    assert_eq!(r.code, 0, "lazy restore:\n{r:?}");
    let native_stdout = native.stdout_str();
    let expected = tail_from(&native_stdout, "round 2 ");
    if expected.as_bytes() != r.stdout {
        panic!("{}", diff("output", expected.as_bytes(), &r.stdout));
    }
    assert_eq!(
        fs::read(&out).unwrap(),
        fs::read(&native_out).unwrap(),
        "the job's file after a lazy restore differs from the native run's"
    );
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains("lazy restore: loaded in"),
        "the restore was not lazy:\n{stderr}"
    );
}

#[test]
fn a_damaged_chunk_found_by_the_background_load_stops_the_job_naming_it() {
    if !require_kvm() {
        return;
    }
    let tmp = TempDir::new("lazy-bad-chunk");
    let out = tmp.join("vm.txt");
    let ck = tmp.join("ckpt");
    checkpointed_hotset(&tmp, &out, &ck);

    // The last chunk of the full generation: the restored job waits for stdin and
    // touches none of it, so only the background load reads it.
    let gen1 = ck.join("gen-000001");
    let chunks = manifest(&gen1)["memory"]["chunks"]
        .as_array()
        .unwrap()
        .clone();
    let last = chunks.len() - 1;
    let offset = chunks[last]["offset"].as_u64().unwrap() + 100;
    let image = gen1.join("memory.img");
    let mut data = fs::read(&image).unwrap();
    data[offset as usize] ^= 0x10;
    fs::write(&image, data).unwrap();

    let job = lazy_restore(tmp.path(), &ck);
    let r = job.finish();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(
        r.code, EXIT_VMCTL_FAILED,
        "lazy restore of a damaged chain:\n{r:?}"
    );
    let line = stderr
        .lines()
        .find(|l| l.contains("proved damaged"))
        .unwrap_or_else(|| panic!("no report of the damaged chunk:\n{stderr}"));
    for needle in [
        "generation 1 ",
        "gen-000001/memory.img",
        &format!("chunk {last} "),
        "CRC32",
        "--lazy=off",
    ] {
        assert!(line.contains(needle), "{needle:?} missing from: {line}");
    }
    assert!(r.stdout.is_empty(), "the job went on: {r:?}");
    // Nothing was removed: both generations are still there, and an eager restore
    // refuses the damaged chain and names it.
    assert!(gen1.join("memory.img").exists() && ck.join("gen-000002").exists());
    let eager = Command::new(vmctl_path())
        .arg("restore")
        .arg(&ck)
        .arg("--lazy=off")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let eager_err = String::from_utf8_lossy(&eager.stderr);
    assert_eq!(eager.status.code(), Some(EXIT_VMCTL_FAILED), "{eager_err}");
    assert!(
        eager_err.contains(&format!("chunk {last} ")),
        "eager restore: {eager_err}"
    );
}
