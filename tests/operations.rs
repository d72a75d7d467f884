//! What operators rely on: `vmctl check`, `vmctl cpu-class`, the events of a
//! checkpoint directory, the generated man pages, and checkpoints written by an
//! earlier release (the committed fixture tests/fixtures/checkpoint-v1).

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use vmwrap_tests::checkpoint_dir::rewrite_manifest;
use vmwrap_tests::{need_kvm, run_command, vmctl_path, RunOutput, TempDir, STEP};

/// What tests/fixtures/upgrade.c prints once restored: the sum of its table.
const FIXTURE_OUTPUT: &str = "resumed sum=004f16cb1cb27800\n";

fn vmctl(args: &[&str]) -> RunOutput {
    let mut cmd = Command::new(vmctl_path());
    cmd.args(args);
    run_command(cmd, b"", STEP)
}

fn vmctl_env(args: &[&str], key: &str, value: &str) -> RunOutput {
    let mut cmd = Command::new(vmctl_path());
    cmd.args(args).env(key, value);
    run_command(cmd, b"", STEP)
}

/// Where tests/fixtures/make-upgrade-checkpoint ran the fixture's program from:
/// a restore reopens the program it mapped there and checks its size and mtime.
const FIXTURE_PROGRAM: &str = "/tmp/vmwrap-checkpoint-fixture/upgrade";

/// Puts the fixture's program back where the checkpoint expects it, once per
/// test process (the tests run in parallel), atomically for other processes.
fn install_fixture_program(from: &Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let manifest = fs::read_to_string(from.join("gen-000001/manifest.json")).unwrap();
        let mtime_ns: u64 = manifest
            .split("\"mtime_ns\":")
            .nth(1)
            .and_then(|t| t.trim_start().split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .expect("the fixture maps its program");
        let target = Path::new(FIXTURE_PROGRAM);
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        let tmp = target.with_extension(format!("tmp-{}", std::process::id()));
        fs::copy(from.join("upgrade"), &tmp).unwrap();
        let file = fs::File::options().write(true).open(&tmp).unwrap();
        file.set_times(
            fs::FileTimes::new()
                .set_modified(std::time::UNIX_EPOCH + Duration::from_nanos(mtime_ns)),
        )
        .unwrap();
        drop(file);
        fs::rename(&tmp, target).unwrap();
    });
}

/// A copy of the committed fixture checkpoint (a release's checkpoint format
/// as it was written then) that the current user owns, as restore requires.
fn fixture_copy(tmp: &TempDir) -> std::path::PathBuf {
    let from = vmwrap_tests::workspace_root().join("tests/fixtures/checkpoint-v1");
    install_fixture_program(&from);
    let dir = tmp.join("ckpt");
    fs::create_dir(&dir).unwrap();
    let gen = dir.join("gen-000001");
    fs::create_dir(&gen).unwrap();
    for file in ["manifest.json", "manifest.sum", "memory.img"] {
        fs::copy(from.join("gen-000001").join(file), gen.join(file)).unwrap();
    }
    std::os::unix::fs::symlink("gen-000001", dir.join("latest")).unwrap();
    dir
}

/// The committed checkpoint of format 1 (vmctl 0.1) either restores or is
/// refused with a message naming its format and this vmctl's, and is left
/// intact either way. Today's vmctl (formats 2 and 3, process trees) refuses it.
#[test]
fn checkpoint_of_the_previous_format_restores_or_is_refused_by_version() {
    need_kvm!();
    let tmp = TempDir::new("upgrade");
    let dir = fixture_copy(&tmp);
    let mut cmd = Command::new(vmctl_path());
    cmd.arg("restore").arg(&dir).current_dir("/");
    let out = run_command(cmd, b"go\n", STEP);
    if out.code == 0 {
        assert_eq!(out.stdout_str(), FIXTURE_OUTPUT, "{out:?}");
    } else {
        assert_eq!(out.code, 125, "{out:?}");
        let err = out.stderr_str();
        assert!(
            err.contains("checkpoint format 1") && err.contains("reads format"),
            "the refusal does not name both versions: {err}"
        );
        let gen = dir.join("gen-000001");
        let original =
            vmwrap_tests::workspace_root().join("tests/fixtures/checkpoint-v1/gen-000001");
        for file in ["manifest.json", "memory.img"] {
            assert_eq!(
                fs::read(gen.join(file)).unwrap(),
                fs::read(original.join(file)).unwrap(),
                "the refused checkpoint's {file} changed"
            );
        }
    }
}

#[test]
fn checkpoint_of_a_newer_format_is_refused_naming_both_versions() {
    need_kvm!();
    let tmp = TempDir::new("newer");
    let dir = fixture_copy(&tmp);
    let gen = dir.join("gen-000001");
    rewrite_manifest(&gen, |m| m["format_version"] = 999.into());
    let out = vmctl(&["restore", dir.to_str().unwrap()]);
    assert_eq!(out.code, 125, "{out:?}");
    let err = out.stderr_str();
    assert!(
        err.contains("format 999") && err.contains("reads format"),
        "the refusal does not name both versions: {err}"
    );
    assert!(
        gen.join("memory.img").exists(),
        "the refused generation was removed"
    );
}

/// Checkpoints and restores of a directory are listed by `vmctl inspect --json`.
#[test]
fn inspect_json_lists_checkpoint_and_restore_events() {
    need_kvm!();
    use std::io::{BufRead, BufReader};
    let tmp = TempDir::new("events");
    install_fixture_program(&vmwrap_tests::workspace_root().join("tests/fixtures/checkpoint-v1"));
    let dir = tmp.join("ckpt");
    let mut child = Command::new(vmctl_path())
        .args(["run", "--checkpoint-dir"])
        .arg(&dir)
        .args(["--", FIXTURE_PROGRAM])
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");
    let out = vmctl(&["checkpoint", dir.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    // Killed outright, as a node failure would be: the checkpoint stays.
    child.kill().unwrap();
    child.wait().unwrap();

    let mut cmd = Command::new(vmctl_path());
    cmd.arg("restore").arg(&dir).current_dir("/");
    let out = run_command(cmd, b"go\n", STEP);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout_str(), FIXTURE_OUTPUT, "{out:?}");

    let inspect = vmctl(&["inspect", "--json", dir.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&inspect.stdout_str()).unwrap();
    let kinds: Vec<(String, u64, String)> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["generation"].as_u64().unwrap(),
                e["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, u64, String)> = [("checkpoint", 1), ("restore", 1)]
        .iter()
        .map(|&(e, g)| (e.to_string(), g, "ok".to_string()))
        .collect();
    assert_eq!(kinds, expected, "{v}");
    let checkpoint = &v["events"][0];
    assert_eq!(checkpoint["kind"], "full");
    assert!(checkpoint["bytes"].as_u64().unwrap() > 0);
    assert!(checkpoint["frozen_s"].as_f64().unwrap() >= 0.0);
}

const CHECK_ITEMS: &[&str] = &[
    "kvm",
    "transparent-hugepages",
    "checkpoint-root",
    "checkpoint-space",
    "checkpoint-shared",
    "plugstack",
    "cpu-class",
];

#[test]
fn check_reports_every_item_of_this_node() {
    need_kvm!();
    let root = TempDir::new("check-root");
    let out = vmctl(&["check", "--checkpoint-root", root.path().to_str().unwrap()]);
    // 0 or 2: whether Slurm answers and the root is shared depends on the machine.
    assert!(out.code == 0 || out.code == 2, "{out:?}");
    let text = out.stdout_str();
    for item in CHECK_ITEMS {
        let line = text
            .lines()
            .find(|l| l[5..].starts_with(&format!("{item}:")))
            .unwrap_or_else(|| panic!("no {item} line:\n{text}"));
        assert!(!line.starts_with("FAIL"), "{line}");
        if line.starts_with("WARN") {
            assert!(line.contains("; fix: "), "a warning without a fix: {line}");
        }
    }
    assert!(text.lines().any(|l| l[5..].starts_with("slurm")), "{text}");
    let kvm = text.lines().find(|l| l[5..].starts_with("kvm:")).unwrap();
    assert!(kvm.starts_with("ok") && kvm.contains("API 12"), "{kvm}");
}

#[test]
fn check_fails_on_a_missing_checkpoint_root() {
    let out = vmctl(&[
        "check",
        "--checkpoint-root",
        "/nonexistent/vmwrap-checkpoints",
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    let text = out.stdout_str();
    let line = text
        .lines()
        .find(|l| l.starts_with("FAIL checkpoint-root:"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("/nonexistent/vmwrap-checkpoints") && line.contains("; fix: "),
        "{line}"
    );
}

#[test]
fn check_json_parses_and_matches_cpu_class() {
    let root = TempDir::new("check-json");
    let out = vmctl(&[
        "check",
        "--json",
        "--checkpoint-root",
        root.path().to_str().unwrap(),
    ]);
    let v: Value =
        serde_json::from_str(&out.stdout_str()).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    let status = v["status"].as_str().unwrap();
    let expected_code = match status {
        "ok" => 0,
        "warn" => 2,
        "fail" => 1,
        other => panic!("status {other}"),
    };
    assert_eq!(out.code, expected_code, "{v}");
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert!(c["detail"].is_string() && c["status"].is_string(), "{c}");
            c["name"].as_str().unwrap()
        })
        .collect();
    for item in CHECK_ITEMS {
        assert!(names.contains(item), "{item} missing from {names:?}");
    }
    let class = vmctl(&["cpu-class"]);
    assert_eq!(class.code, 0, "{class:?}");
    assert_eq!(v["cpu_class"].as_str().unwrap(), class.stdout_str().trim());
}

#[test]
fn cpu_class_is_short_and_overridable_for_tests() {
    let out = vmctl(&["cpu-class"]);
    assert_eq!(out.code, 0, "{out:?}");
    let class = out.stdout_str().trim().to_string();
    let (prefix, hash) = class.rsplit_once('-').unwrap();
    assert!(prefix.starts_with("vmwrap-") && prefix.len() > 7, "{class}");
    assert!(
        hash.len() == 8 && hash.chars().all(|c| c.is_ascii_hexdigit()),
        "{class}"
    );
    assert_eq!(
        vmctl(&["cpu-class"]).stdout_str().trim(),
        class,
        "not stable"
    );
    let over = vmctl_env(&["cpu-class"], "VMWRAP_TEST_CPU_CLASS", "vmwrap-test-b");
    assert_eq!(over.stdout_str().trim(), "vmwrap-test-b");
    assert!(over.stderr_str().contains("for tests only"), "{over:?}");
}

/// The man pages come from the command-line definitions: one per command, each
/// naming its options.
#[test]
fn generated_man_pages_cover_every_command() {
    let tmp = TempDir::new("docs");
    let out = vmctl(&["generate-docs", tmp.path().to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    let help = vmctl(&["--help"]).stdout_str();
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(
        commands.contains(&"check") && commands.contains(&"run"),
        "{help}"
    );
    for c in &commands {
        let page = tmp.join(format!("man/vmctl-{c}.1"));
        assert!(page.exists(), "no man page for {c}");
    }
    let check = fs::read_to_string(tmp.join("man/vmctl-check.1")).unwrap();
    assert!(check.contains("checkpoint\\-root"), "{check}");
    for f in ["vmctl.bash", "_vmctl", "vmctl.fish"] {
        let text = fs::read_to_string(tmp.join("completions").join(f)).unwrap();
        assert!(text.contains("cpu-class"), "{f} lacks cpu-class");
    }
    assert!(Path::new(&tmp.join("man/vmctl.1")).exists());
}
