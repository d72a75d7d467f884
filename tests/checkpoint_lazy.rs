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

// `checkpoint` here is `vmctl checkpoint --json`: these tests read its answer.
use vmwrap_tests::checkpoint_dir::checkpoint_json as checkpoint;
use vmwrap_tests::checkpoint_dir::{
    fd_offset, flip_bit, hotset_job, manifest, native_hotset, set_len,
};
use vmwrap_tests::{diff, need_kvm, tail_from, vmctl_path, Job, TempDir, EXIT_VMCTL_FAILED};

const MIB: u64 = 64;
const HOT_KIB: u64 = 512;
const ROUNDS: usize = 3;

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

/// Runs hotset in a VM (with `opts`) with incremental checkpoints: generation 1
/// (full) after the fill, generation 2 (incremental) after round 1; then kills it.
fn checkpointed_hotset(tmp: &TempDir, out: &Path, ck: &Path, opts: &[&str]) {
    let mut job = hotset_job(
        tmp,
        ck,
        &[&["--mem", "256M", "--incremental=on"], opts].concat(),
        out,
        MIB,
        HOT_KIB,
        ROUNDS,
    );
    job.wait_for("filled ");
    assert_eq!(checkpoint(ck)["kind"], "full");
    job.send(b"g");
    job.wait_for("round 1 ");
    assert_eq!(checkpoint(ck)["kind"], "incremental");
    job.signal(libc::SIGKILL);
    job.finish();
}

#[test]
fn a_lazily_restored_chain_gives_the_native_output() {
    need_kvm!();
    lazily_restored_chain_gives_the_native_output("lazy-native", &[]);
}

/// The loader decompresses the chunks it reads (`--compress`) before it checks them.
#[test]
fn a_lazily_restored_compressed_chain_gives_the_native_output() {
    need_kvm!();
    lazily_restored_chain_gives_the_native_output("lazy-compressed", &["--compress=zstd"]);
}

fn lazily_restored_chain_gives_the_native_output(name: &str, opts: &[&str]) {
    let tmp = TempDir::new(name);
    let native_out = tmp.join("native.txt");
    let native = native_hotset(&tmp, &native_out, MIB, HOT_KIB, ROUNDS);
    let out = tmp.join("vm.txt");
    let ck = tmp.join("ckpt");
    checkpointed_hotset(&tmp, &out, &ck, opts);
    if !opts.is_empty() {
        // The program's random fill does not compress, the rest of the VM does.
        // (Generation 2, a few hot pages, may have nothing worth compressing.)
        let compressed = manifest(&ck.join("gen-000001"))["memory"]["chunks"]
            .as_array()
            .expect("chunks")
            .iter()
            .filter(|c| c.get("compressed").is_some_and(|z| !z.is_null()))
            .count();
        assert!(compressed > 0, "no chunk of generation 1 is compressed");
    }

    let gen2 = ck.join("gen-000002");
    set_len(&out, fd_offset(&gen2, &out));
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
    need_kvm!();
    let tmp = TempDir::new("lazy-bad-chunk");
    let out = tmp.join("vm.txt");
    let ck = tmp.join("ckpt");
    checkpointed_hotset(&tmp, &out, &ck, &[]);

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
    flip_bit(&image, offset, 4);

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
