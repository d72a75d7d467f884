//! Incremental checkpoint generations end to end: after a full generation, each
//! checkpoint stores only the pages written since the previous one (by the guest,
//! from KVM's dirty log, and by vmctl itself on the guest's behalf); a restore
//! assembles the chain and must give exactly what an uninterrupted native run
//! gives; a damaged or foreign link is named and an intact generation restored
//! instead; a writer killed mid-way leaves every earlier generation restorable.
//!
//! The workloads block reading stdin at known points (tests/fixtures/hotset.c,
//! readhold.c), so each checkpoint lands exactly where the test wants it.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use serde_json::Value;
// `checkpoint` here is `vmctl checkpoint --json`: these tests read its answer.
use vmwrap_tests::checkpoint_dir::checkpoint_json as checkpoint;
use vmwrap_tests::checkpoint_dir::{
    copy_generations, crc32, entries, fd_offset, flip_bit, gen_dir, hotset_job, inspect_json,
    kill_while_writing, manifest, native_fill, native_hotset, restore, rewrite_manifest, set_len,
    statuses,
};
use vmwrap_tests::{assert_bytes_eq, assert_contains, assert_file_eq, poll_until, tail_from};
use vmwrap_tests::{need_kvm, Invocation, Job, Rng, TempDir};
use vmwrap_tests::{EXIT_VMCTL_FAILED, STEP};

/// tests/fixtures/readhold.c: `readhold FILE CHUNK PIECES`, 2 stdin bytes a piece.
const READHOLD: &str = env!("VMWRAP_FIXTURE_READHOLD");
/// tests/fixtures/memkinds.c: `memkinds OUTFILE KIND MIB ROUNDS`, 1 stdin byte a round.
const MEMKINDS: &str = env!("VMWRAP_FIXTURE_MEMKINDS");

// ---------------------------------------------------------------------------
// Helpers

/// The `inspect --json` row of `generation`.
fn row(v: &Value, generation: u64) -> Value {
    v["generations"]
        .as_array()
        .expect("generations")
        .iter()
        .find(|r| r["generation"] == generation)
        .unwrap_or_else(|| panic!("no generation {generation} in {v}"))
        .clone()
}

// ---------------------------------------------------------------------------

#[test]
fn incremental_generations_hold_the_hot_set_and_each_restores_like_native() {
    need_kvm!();
    const MIB: u64 = 128;
    const HOT_KIB: u64 = 2048;
    const ROUNDS: usize = 4;
    let tmp = TempDir::new("incr-hotset");
    let native_out = tmp.join("native.txt");
    let native = native_hotset(&tmp, &native_out, MIB, HOT_KIB, ROUNDS);
    let native_stdout = native.stdout_str();
    let out = tmp.join("vm.txt");
    let ck = tmp.join("ckpt");
    let mut job = hotset_job(
        &tmp,
        &ck,
        &["--mem", "512M", "--incremental=on", "--keep", "2"],
        &out,
        MIB,
        HOT_KIB,
        ROUNDS,
    );
    job.wait_for("filled ");
    let first = checkpoint(&ck);
    assert_eq!(first["generation"], 1, "{first}");
    assert_eq!(first["kind"], "full", "{first}");
    assert!(
        first["memory_bytes"].as_u64().unwrap() >= MIB << 20,
        "{first}"
    );
    for round in 1..ROUNDS as u64 {
        job.send(b"g");
        job.wait_for(&format!("round {round} "));
        let v = checkpoint(&ck);
        assert_eq!(v["generation"], round + 1, "{v}");
        assert_eq!(v["kind"], "incremental", "{v}");
        // The hot set, plus the few pages the program's stack, stdio buffer and
        // vmctl's bookkeeping touched: nowhere near the 128 MiB of the array.
        let bytes = v["memory_bytes"].as_u64().unwrap();
        assert!(
            (HOT_KIB << 10..(HOT_KIB << 10) + (1 << 20)).contains(&bytes),
            "generation {}: {bytes} bytes for a {HOT_KIB} KiB hot set",
            round + 1
        );
    }
    // --keep 2 keeps generations 3 and 4, and the ones they build on.
    assert_eq!(
        entries(&ck)
            .into_iter()
            .filter(|n| n.starts_with("gen-"))
            .count(),
        4
    );
    let (code, v) = inspect_json(&ck, true);
    assert_eq!(code, 0, "{v}");
    for g in 1..=4u64 {
        let r = row(&v, g);
        assert_eq!(r["status"], "verified", "{v}");
        if g == 1 {
            assert_eq!(
                (r["kind"].clone(), r["parent"].clone()),
                ("full".into(), Value::Null)
            );
        } else {
            assert_eq!(r["kind"], "incremental", "{v}");
            assert_eq!(r["parent"], g - 1, "{v}");
        }
    }
    let offsets: Vec<u64> = (1..=4).map(|g| fd_offset(&gen_dir(&ck, g), &out)).collect();
    for g in 1..=4u64 {
        copy_generations(
            &ck,
            &(1..=g).collect::<Vec<_>>(),
            &tmp.join(format!("at{g}")),
            true,
        );
    }
    let damaged = tmp.join("damaged");
    copy_generations(&ck, &[1, 2, 3, 4], &damaged, false);
    let foreign = tmp.join("foreign");
    copy_generations(&ck, &[1, 2, 3, 4], &foreign, false);
    let v1 = tmp.join("v1");
    copy_generations(&ck, &[1], &v1, false);

    // The job itself finishes like the native run.
    job.send(b"g");
    let run = job.finish();
    assert_eq!(run.code, 0, "{run:?}");
    assert_bytes_eq(
        "stdout with incremental checkpoints",
        &native.stdout,
        &run.stdout,
    );
    assert_file_eq("file with incremental checkpoints", &native_out, &out);

    // Every generation restores, in a fresh process, to the native run's rest.
    for g in 1..=4u64 {
        set_len(&out, offsets[g as usize - 1]);
        let r = restore(
            tmp.path(),
            &tmp.join(format!("at{g}")),
            &[],
            &vec![b'g'; ROUNDS + 1 - g as usize],
        );
        assert_eq!(r.code, 0, "restore of generation {g}:\n{r:?}");
        assert_bytes_eq(
            &format!("restored generation {g}"),
            tail_from(&native_stdout, &format!("round {g} ")).as_bytes(),
            &r.stdout,
        );
        assert_file_eq(
            &format!("file after restoring generation {g}"),
            &native_out,
            &out,
        );
    }

    // A damaged link in the middle of the chain: generations 4, 3 and 2 are
    // unusable (the message names generation 2's image), generation 1 restores.
    let img = gen_dir(&damaged, 2).join("memory.img");
    flip_bit(&img, fs::metadata(&img).unwrap().len() / 2, 5);
    let (code, v) = inspect_json(&damaged, true);
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        statuses(&v),
        [
            (4, "unusable".to_string()),
            (3, "unusable".to_string()),
            (2, "unusable".to_string()),
            (1, "verified".to_string())
        ],
        "{v}"
    );
    assert_contains(
        "inspect of generation 4",
        row(&v, 4)["error"].as_str().unwrap(),
        &["needs generation 2", &img.display().to_string(), "CRC32"],
    );
    let r = restore(tmp.path(), &damaged, &["--generation", "4"], &[b'g'; 1]);
    assert_eq!(
        r.code, EXIT_VMCTL_FAILED,
        "restore --generation 4 with a damaged link:\n{r:?}"
    );
    assert!(
        r.stdout.is_empty(),
        "a generation with a damaged link ran:\n{r:?}"
    );
    set_len(&out, offsets[0]);
    let r = restore(tmp.path(), &damaged, &[], &[b'g'; ROUNDS]);
    assert_eq!(r.code, 0, "restore with a damaged link:\n{r:?}");
    assert_contains(
        "restore with a damaged link",
        &r.stderr_str(),
        &[
            "generation 4 is unusable",
            "needs generation 2",
            &img.display().to_string(),
            "CRC32",
            "restored generation 1",
        ],
    );
    assert_bytes_eq(
        "restored past a damaged link",
        tail_from(&native_stdout, "round 1 ").as_bytes(),
        &r.stdout,
    );
    assert_file_eq("file restored past a damaged link", &native_out, &out);

    // A parent that is not the one its child was written against (here: its
    // manifest rewritten with a valid checksum) breaks the chain at that child.
    rewrite_manifest(&gen_dir(&foreign, 3), |m| m["host"] = "elsewhere".into());
    set_len(&out, offsets[2]);
    let r = restore(tmp.path(), &foreign, &[], &[b'g'; 2]);
    assert_eq!(r.code, 0, "restore with a foreign parent:\n{r:?}");
    assert_contains(
        "restore with a foreign parent",
        &r.stderr_str(),
        &[
            "generation 4 is unusable",
            "needs generation 3",
            "written against",
            "restored generation 3",
        ],
    );
    assert_bytes_eq(
        "restored generation 3",
        tail_from(&native_stdout, "round 3 ").as_bytes(),
        &r.stdout,
    );

    // A generation in the version 2 format (before incremental generations) restores.
    rewrite_manifest(&gen_dir(&v1, 1), |m| {
        m["format_version"] = 2.into();
        let o = m.as_object_mut().unwrap();
        o.remove("parent_manifest_crc32");
        m["memory"].as_object_mut().unwrap().remove("zero_runs");
    });
    set_len(&out, offsets[0]);
    let r = restore(tmp.path(), &v1, &[], &[b'g'; ROUNDS]);
    assert_eq!(r.code, 0, "restore of a format 2 generation:\n{r:?}");
    assert_bytes_eq(
        "restored format 2 generation",
        tail_from(&native_stdout, "round 1 ").as_bytes(),
        &r.stdout,
    );
}

/// Crafted parent links and sizes in an incremental chain get a clear refusal of the
/// generation that depends on them (never a panic, an allocation taken on trust or a
/// loop), and the intact generations below them still verify.
#[test]
fn crafted_chains_are_refused_clearly() {
    need_kvm!();
    let tmp = TempDir::new("incr-crafted");
    let out = tmp.join("vm.txt");
    let ck = tmp.join("ckpt");
    let mut job = hotset_job(
        &tmp,
        &ck,
        &["--mem", "256M", "--incremental=on"],
        &out,
        8,
        256,
        2,
    );
    job.wait_for("filled ");
    assert_eq!(checkpoint(&ck)["kind"], "full");
    job.send(b"g");
    job.wait_for("round 1 ");
    assert_eq!(checkpoint(&ck)["kind"], "incremental");
    job.signal(libc::SIGKILL);
    job.finish();

    // Each case edits one manifest (re-signed, as its owner can) of a copy of the
    // chain; generation 1, the full one, must still verify.
    type Edit = fn(&mut Value);
    let cases: [(&str, u64, Edit, &str); 6] = [
        ("its own parent", 2, |m| m["parent"] = 2.into(), "not older"),
        ("a newer parent", 2, |m| m["parent"] = 7.into(), "not older"),
        (
            "another generation's number",
            2,
            |m| m["generation"] = 9.into(),
            "says it is generation 9",
        ),
        (
            "a huge zero run",
            2,
            |m| m["memory"]["zero_runs"] = serde_json::json!([{"gpa": 0, "pages": 1u64 << 60}]),
            "zero run 0 names 1152921504606846976 pages",
        ),
        (
            "a huge chunk",
            2,
            |m| m["memory"]["chunks"][0]["runs"][0]["pages"] = (1u64 << 48).into(),
            "chunk 0 names 281474976710656 pages",
        ),
        (
            "a page twice in one round",
            2,
            |m| {
                let chunks = m["memory"]["chunks"].as_array_mut().unwrap();
                let mut again = chunks[0].clone();
                again["offset"] = m["memory"]["data_bytes"].clone();
                let bytes = 4096
                    * again["runs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r["pages"].as_u64().unwrap())
                        .sum::<u64>();
                m["memory"]["chunks"].as_array_mut().unwrap().push(again);
                m["memory"]["data_bytes"] =
                    (m["memory"]["data_bytes"].as_u64().unwrap() + bytes).into();
            },
            "holds the page at",
        ),
    ];
    for (i, (what, g, edit, expected)) in cases.iter().enumerate() {
        let copy = tmp.join(format!("case{i}"));
        copy_generations(&ck, &[1, 2], &copy, false);
        rewrite_manifest(&gen_dir(&copy, *g), *edit);
        let (code, v) = inspect_json(&copy, true);
        assert_eq!(code, 0, "{what}: {v}");
        assert_eq!(row(&v, 1)["status"], "verified", "{what}: {v}");
        assert_eq!(row(&v, 2)["status"], "unusable", "{what}: {v}");
        assert_contains(what, row(&v, 2)["error"].as_str().unwrap(), &[expected]);
    }

    // A chain longer than a reader follows, every link signed: generations 3 to 259
    // each build on the one before, and the newest is refused before anything is
    // loaded (restore stops at its chain, not after following it without end).
    let long = tmp.join("long");
    copy_generations(&ck, &[1, 2], &long, true);
    let mut parent_crc = crc32(&fs::read(gen_dir(&long, 2).join("manifest.json")).unwrap());
    let template = manifest(&gen_dir(&ck, 2));
    let top = 259u64;
    for g in 3..=top {
        let mut m = template.clone();
        m["generation"] = g.into();
        m["parent"] = (g - 1).into();
        m["parent_manifest_crc32"] = parent_crc.into();
        m["memory"]["chunks"] = Value::Array(vec![]);
        m["memory"]["zero_runs"] = Value::Array(vec![]);
        m["memory"]["data_bytes"] = 0.into();
        let dir = gen_dir(&long, g);
        fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let bytes = serde_json::to_vec(&m).unwrap();
        parent_crc = crc32(&bytes);
        fs::write(dir.join("manifest.json"), &bytes).unwrap();
        fs::write(
            dir.join("manifest.sum"),
            format!("crc32 {parent_crc:08x} manifest.json\n"),
        )
        .unwrap();
        fs::write(dir.join("memory.img"), b"").unwrap();
    }
    let r = restore(tmp.path(), &long, &["--generation", &top.to_string()], &[]);
    assert_eq!(r.code, EXIT_VMCTL_FAILED, "{r:?}");
    assert_contains(
        "restore of a 259-generation chain",
        &r.stderr_str(),
        &["generation 259 is unusable", "more than 256 generations"],
    );
    assert!(r.stdout.is_empty(), "{r:?}");
}

/// A job restored from a chain continues it: its next checkpoint is an increment on
/// the restored generation, which also holds the pages the restoring vmctl wrote
/// itself (the kernel's restore, the vDSO and its clock page), and restoring that
/// increment in yet another process gives the native run's rest.
#[test]
fn a_restored_job_continues_its_chain() {
    need_kvm!();
    const MIB: u64 = 16;
    const HOT_KIB: u64 = 256;
    const ROUNDS: usize = 3;
    let tmp = TempDir::new("incr-continue");
    let native_out = tmp.join("native.txt");
    let native = native_hotset(&tmp, &native_out, MIB, HOT_KIB, ROUNDS);
    let out = tmp.join("vm.txt");
    let ck = tmp.join("ckpt");
    let mut job = hotset_job(
        &tmp,
        &ck,
        &["--mem", "256M", "--incremental=on"],
        &out,
        MIB,
        HOT_KIB,
        ROUNDS,
    );
    job.wait_for("filled ");
    assert_eq!(checkpoint(&ck)["kind"], "full");
    job.signal(libc::SIGKILL);
    job.finish();

    set_len(&out, fd_offset(&gen_dir(&ck, 1), &out));
    let mut job = Job::restore(tmp.path(), &ck, &["--incremental=on"]);
    job.send(b"g");
    job.wait_for("round 1 ");
    let v = checkpoint(&ck);
    assert_eq!(
        (v["generation"].clone(), v["kind"].clone()),
        (2.into(), "incremental".into()),
        "{v}"
    );
    job.signal(libc::SIGKILL);
    job.finish();
    let (code, v) = inspect_json(&ck, true);
    assert_eq!(code, 0, "{v}");
    assert_eq!(row(&v, 2)["parent"], 1, "{v}");
    assert_eq!(row(&v, 2)["status"], "verified", "{v}");

    set_len(&out, fd_offset(&gen_dir(&ck, 2), &out));
    let r = restore(tmp.path(), &ck, &[], &[b'g'; ROUNDS - 1]);
    assert_eq!(r.code, 0, "restore of the continued chain:\n{r:?}");
    assert_bytes_eq(
        "restored continued chain",
        tail_from(&native.stdout_str(), "round 2 ").as_bytes(),
        &r.stdout,
    );
    assert_file_eq("file after the continued chain", &native_out, &out);
}

#[test]
fn pages_only_vmctl_wrote_are_in_the_next_incremental_generation() {
    need_kvm!();
    const CHUNK: usize = 3 << 20;
    let tmp = TempDir::new("incr-hostwrites");
    let mut data = vec![0u8; 2 * CHUNK];
    Rng::new(10).fill(&mut data);
    let input = tmp.write_file("input.bin", &data, 0o644);
    let args: [&dyn AsRef<OsStr>; 3] = [&input, &CHUNK.to_string(), &"2"];
    let native = Invocation::new(READHOLD)
        .args(args.iter().map(|a| a.as_ref()))
        .stdin(b"gggg".to_vec())
        .cwd(tmp.path())
        .run_native();
    assert_eq!(native.code, 0, "{native:?}");
    let ck = tmp.join("ckpt");
    let mut job = Job::run(
        tmp.path(),
        &ck,
        &["--mem", "256M", "--incremental=on"],
        READHOLD,
        &args,
    );
    job.wait_for("ready");
    job.send(b"g");
    job.wait_for("read 1");
    assert_eq!(checkpoint(&ck)["kind"], "full");
    // The second read() refills the buffer: only vmctl writes those pages, never
    // the guest CPU, so they are in no KVM dirty log.
    job.send(b"gg");
    job.wait_for("read 2");
    let v = checkpoint(&ck);
    assert_eq!(v["kind"], "incremental", "{v}");
    assert!(v["memory_bytes"].as_u64().unwrap() >= CHUNK as u64, "{v}");
    job.signal(libc::SIGKILL);
    job.finish();

    let r = restore(tmp.path(), &ck, &[], b"g");
    assert_eq!(r.code, 0, "{r:?}");
    assert_bytes_eq(
        "restored after vmctl refilled the buffer",
        tail_from(&native.stdout_str(), "piece 2 ").as_bytes(),
        &r.stdout,
    );
}

#[test]
fn sigkill_during_an_incremental_write_leaves_earlier_generations_restorable() {
    need_kvm!();
    const MIB: u64 = 384;
    // Half the array each round: an increment big enough to catch mid-write.
    const HOT_KIB: u64 = 192 << 10;
    let tmp = TempDir::new("incr-sigkill");
    let native_out = tmp.join("native.txt");
    let native = native_hotset(&tmp, &native_out, MIB, HOT_KIB, 3);
    let out = tmp.join("vm.txt");
    let ck = tmp.join("ckpt");
    let mut job = hotset_job(
        &tmp,
        &ck,
        &["--mem", "1G", "--incremental=on"],
        &out,
        MIB,
        HOT_KIB,
        3,
    );
    job.wait_for("filled ");
    assert_eq!(checkpoint(&ck)["kind"], "full");
    job.send(b"g");
    job.wait_for("round 1 ");
    let v = checkpoint(&ck);
    assert_eq!(
        (v["generation"].as_u64(), v["kind"].as_str()),
        (Some(2), Some("incremental")),
        "{v}"
    );
    let offset2 = fd_offset(&gen_dir(&ck, 2), &out);
    let manifests: Vec<Vec<u8>> = (1..=2)
        .map(|g| fs::read(gen_dir(&ck, g).join("manifest.json")).unwrap())
        .collect();

    job.send(b"g");
    job.wait_for("round 2 ");
    let (tmp_gen, killed, answer) = kill_while_writing(job, &ck, 3);
    assert_eq!(killed.code, 128 + libc::SIGKILL, "{killed:?}");
    assert_ne!(answer.code, 0);
    assert!(
        !gen_dir(&ck, 3).exists(),
        "generation 3 completed before the kill ({tmp_gen} was seen); the test tested nothing"
    );
    let (code, v) = inspect_json(&ck, true);
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        statuses(&v),
        [(2, "verified".to_string()), (1, "verified".to_string())],
        "{v}"
    );
    for g in 1..=2u64 {
        assert_eq!(
            fs::read(gen_dir(&ck, g).join("manifest.json")).unwrap(),
            manifests[g as usize - 1]
        );
    }
    set_len(&out, offset2);
    let r = restore(tmp.path(), &ck, &[], b"gg");
    assert_eq!(r.code, 0, "{r:?}");
    assert_bytes_eq(
        "restore after a killed incremental write",
        tail_from(&native.stdout_str(), "round 2 ").as_bytes(),
        &r.stdout,
    );
    assert_file_eq("file after the restore", &native_out, &out);
}

#[test]
fn periodic_checkpoints_are_incremental_after_the_first() {
    need_kvm!();
    let tmp = TempDir::new("incr-interval");
    let ck = tmp.join("ckpt");
    let out = tmp.join("vm.txt");
    let mut job = hotset_job(
        &tmp,
        &ck,
        &["--mem", "256M", "--checkpoint-interval", "1", "--keep", "3"],
        &out,
        32,
        256,
        1,
    );
    job.wait_for("filled ");
    let v = poll_until("an incremental periodic generation", STEP, || {
        let (_, v) = inspect_json(&ck, false);
        v["generations"]
            .as_array()?
            .iter()
            .any(|r| r["kind"] == "incremental")
            .then_some(v)
    });
    let incr = v["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "incremental")
        .unwrap()
        .clone();
    // The job is blocked in read(): nothing but a few pages changes.
    assert!(incr["memory_bytes"].as_u64().unwrap() < 1 << 20, "{v}");
    job.send(b"g");
    let run = job.finish();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        !entries(&ck).iter().any(|n| n.starts_with("gen-")),
        "a finished job keeps no generations"
    );
}

/// tests/fixtures/fill.c: `fill OUTFILE [PASSES [MIB]]`, 2 stdin bytes a pass.
const FILL: &str = env!("VMWRAP_FIXTURE_FILL");

#[test]
fn precopy_while_the_job_rewrites_all_its_memory_restores_like_native() {
    need_kvm!();
    const PASSES: usize = 4;
    const MIB: usize = 128;
    let tmp = TempDir::new("incr-precopy");
    let native_out = tmp.join("native.bin");
    let native = native_fill(&tmp, &native_out, PASSES, MIB);
    let final_line = tail_from(&native.stdout_str(), "final ").to_owned();
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");
    let mut job = Job::run(
        tmp.path(),
        &ck,
        &[
            "--mem",
            "1G",
            "--precopy=on",
            "--incremental=on",
            "--keep",
            "5",
        ],
        FILL,
        &[&out, &PASSES.to_string(), &MIB.to_string()],
    );
    job.wait_for("filled ");
    // From here on the job rewrites its whole array without waiting, while the
    // checkpoints copy it.
    job.send(&[b'g'; 2 * PASSES]);
    job.wait_for("pass 1 start");
    let first = checkpoint(&ck);
    assert_eq!(first["kind"], "full", "{first}");
    assert!(
        !first["precopy_round_bytes"].as_array().unwrap().is_empty(),
        "{first}"
    );
    job.wait_for("pass 2 start");
    let second = checkpoint(&ck);
    assert_eq!(second["kind"], "incremental", "{second}");
    job.signal(libc::SIGKILL);
    job.finish();
    let offsets: Vec<u64> = (1..=2).map(|g| fd_offset(&gen_dir(&ck, g), &out)).collect();
    copy_generations(&ck, &[1], &tmp.join("at1"), true);
    for (g, dir) in [(1u64, tmp.join("at1")), (2, ck.clone())] {
        set_len(&out, offsets[g as usize - 1]);
        let r = restore(tmp.path(), &dir, &[], &[b'g'; 2 * PASSES]);
        assert_eq!(r.code, 0, "restore of generation {g}:\n{r:?}");
        assert!(
            r.stdout_str().ends_with(&final_line),
            "generation {g}: restored run ends differently from the native one ({final_line:?}):\n{r:?}"
        );
        assert_file_eq(
            &format!("file after restoring pre-copied generation {g}"),
            &native_out,
            &out,
        );
    }
}

/// The chunks of a generation's manifest that are stored compressed with `codec`.
fn compressed_chunks(gen: &Path, codec: &str) -> Vec<Value> {
    manifest(gen)["memory"]["chunks"]
        .as_array()
        .expect("chunks")
        .iter()
        .filter(|c| c["compressed"]["codec"] == codec)
        .cloned()
        .collect()
}

/// Generations compressed with zstd and lz4 (with and without pre-copy) and a plain
/// one, in one chain, each restore in a fresh process like the native run; a
/// damaged compressed chunk is named and the restore falls back to an intact
/// generation; crafted compression fields are refused clearly.
#[test]
fn compressed_and_plain_generations_chain_and_restore_like_native() {
    need_kvm!();
    const MIB: u64 = 32;
    const ROUNDS: usize = 4;
    let tmp = TempDir::new("incr-compress");
    let native_out = tmp.join("native.txt");
    let args = |out: &Path| -> Vec<String> {
        vec![
            out.display().to_string(),
            "mixed".into(),
            MIB.to_string(),
            ROUNDS.to_string(),
        ]
    };
    let native = Invocation::new(MEMKINDS)
        .args(args(&native_out))
        .stdin(vec![b'g'; ROUNDS])
        .cwd(tmp.path())
        .run_native();
    assert_eq!(native.code, 0, "native memkinds:\n{native:?}");
    let native_stdout = native.stdout_str();
    let out = tmp.join("vm.txt");
    let ck = tmp.join("ckpt");
    let keep = ["--incremental=on", "--keep", "10"];
    // Generations 1 (full) and 2 with zstd.
    let vm_args = args(&out);
    let vm_args: Vec<&dyn AsRef<OsStr>> = vm_args.iter().map(|a| a as _).collect();
    let mut job = Job::run(
        tmp.path(),
        &ck,
        &[&keep[..], &["--mem", "256M", "--compress", "zstd"]].concat(),
        MEMKINDS,
        &vm_args,
    );
    job.wait_for("filled ");
    let v = checkpoint(&ck);
    assert_eq!(v["kind"], "full", "{v}");
    // A third of the memory is random: the rest must make up for it.
    let (stored, pages) = (v["memory_bytes"].as_u64(), v["page_bytes"].as_u64());
    assert!(
        stored.unwrap() < pages.unwrap() * 3 / 4 && pages.unwrap() >= MIB << 20,
        "{v}"
    );
    job.send(b"g");
    job.wait_for("round 1 ");
    assert_eq!(checkpoint(&ck)["kind"], "incremental");
    job.signal(libc::SIGKILL);
    job.finish();
    // Generation 3 plain, by a restore that continues the chain.
    let step = |from: u64, opts: &[&str]| {
        set_len(&out, fd_offset(&gen_dir(&ck, from), &out));
        let mut job = Job::restore(tmp.path(), &ck, &[&keep[..], opts].concat());
        job.send(b"g");
        job.wait_for(&format!("round {} ", from));
        let v = checkpoint(&ck);
        assert_eq!(
            (v["generation"].clone(), v["kind"].clone()),
            ((from + 1).into(), "incremental".into()),
            "{v}"
        );
        job.signal(libc::SIGKILL);
        job.finish();
    };
    step(2, &["--compress", "off"]);
    // Generation 4 with lz4, written by pre-copy rounds.
    step(3, &["--compress", "lz4", "--precopy=on"]);
    for (g, version, codec) in [(1, 4, "zstd"), (2, 4, "zstd"), (3, 3, ""), (4, 4, "lz4")] {
        let m = manifest(&gen_dir(&ck, g));
        assert_eq!(m["format_version"], version, "generation {g}");
        let chunks = m["memory"]["chunks"].as_array().unwrap();
        let compressed = compressed_chunks(&gen_dir(&ck, g), codec).len();
        if codec.is_empty() {
            assert!(chunks.iter().all(|c| c.get("compressed").is_none()));
        } else {
            assert!(compressed > 0, "generation {g}: no {codec} chunk in {m}");
        }
    }
    let (code, v) = inspect_json(&ck, true);
    assert_eq!(code, 0, "{v}");
    for g in 1..=4 {
        let r = row(&v, g);
        assert_eq!(r["status"], "verified", "{v}");
        let (stored, pages) = (r["memory_bytes"].as_u64(), r["page_bytes"].as_u64());
        assert_eq!(stored == pages, g == 3, "generation {g}: {r}");
    }
    let damaged = tmp.join("damaged");
    copy_generations(&ck, &[1, 2, 3, 4], &damaged, false);
    let crafted = tmp.join("crafted");
    copy_generations(&ck, &[1], &crafted, false);

    // The whole mixed chain restores like the native run.
    set_len(&out, fd_offset(&gen_dir(&ck, 4), &out));
    let r = restore(tmp.path(), &ck, &[], b"g");
    assert_eq!(r.code, 0, "restore of the mixed chain:\n{r:?}");
    assert_bytes_eq(
        "restored mixed chain",
        tail_from(&native_stdout, &format!("round {ROUNDS} ")).as_bytes(),
        &r.stdout,
    );
    assert_file_eq("file after the mixed chain", &native_out, &out);

    // A bit flipped inside a compressed chunk of generation 2: generations 4, 3
    // and 2 are unusable, naming generation 2's image; generation 1 restores.
    let img = gen_dir(&damaged, 2).join("memory.img");
    let chunk = &compressed_chunks(&gen_dir(&damaged, 2), "zstd")[0];
    let at = chunk["offset"].as_u64().unwrap() + chunk["compressed"]["bytes"].as_u64().unwrap() / 2;
    flip_bit(&img, at, 3);
    set_len(&out, fd_offset(&gen_dir(&damaged, 1), &out));
    let r = restore(tmp.path(), &damaged, &[], &[b'g'; ROUNDS]);
    assert_eq!(r.code, 0, "restore with a damaged compressed chunk:\n{r:?}");
    assert_contains(
        "restore with a damaged compressed chunk",
        &r.stderr_str(),
        &[
            "generation 4 is unusable",
            "needs generation 2",
            &img.display().to_string(),
            "fails its CRC32 (compressed data)",
            "restored generation 1",
        ],
    );
    assert_bytes_eq(
        "restored past a damaged compressed chunk",
        tail_from(&native_stdout, "round 1 ").as_bytes(),
        &r.stdout,
    );
    assert_file_eq("file restored past a damaged chunk", &native_out, &out);

    // Crafted compression fields, re-checksummed as an attacker would: each is
    // refused with what is wrong, before anything is allocated for it.
    let first = |m: &mut Value| -> usize {
        let chunks = m["memory"]["chunks"].as_array().unwrap();
        chunks
            .iter()
            .position(|c| c.get("compressed").is_some())
            .unwrap()
    };
    type Edit<'a> = &'a dyn Fn(&mut Value);
    let cases: [(&str, Edit); 3] = [
        ("compressed data must be smaller", &|m: &mut Value| {
            let i = first(m);
            m["memory"]["chunks"][i]["compressed"]["bytes"] = (1u64 << 40).into();
        }),
        ("unknown variant", &|m: &mut Value| {
            let i = first(m);
            m["memory"]["chunks"][i]["compressed"]["codec"] = "gzip".into();
        }),
        ("fails its CRC32", &|m: &mut Value| {
            // The stored bytes' CRC matches, but the pages' does not.
            let i = first(m);
            m["memory"]["chunks"][i]["crc32"] = 12345.into();
        }),
    ];
    for (i, (want, edit)) in cases.into_iter().enumerate() {
        let dir = tmp.join(format!("crafted-{i}"));
        copy_generations(&crafted, &[1], &dir, false);
        rewrite_manifest(&gen_dir(&dir, 1), edit);
        let (code, v) = inspect_json(&dir, true);
        assert_ne!(code, 0, "{want}: {v}");
        assert_contains(want, row(&v, 1)["error"].as_str().unwrap(), &[want]);
    }
}
