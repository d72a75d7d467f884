//! Compiles the C test programs in tests/fixtures/ into executables.
//!
//! The `cc` crate only builds static libraries, so it is used just to pick the
//! C compiler (honouring `CC`/`TARGET_CC` like every other cc-based build)
//! and the executables are linked by invoking that compiler directly with
//! flags we control: the whole point of the fixtures is their exact ELF
//! flavour (static, PIE, non-PIE), which cc's own library flags would blur.
//!
//! Each binary lands in OUT_DIR and its path is exported to the tests as
//! `VMWRAP_FIXTURE_<NAME>`; a copy goes to `<target>/fixtures/` for the
//! benchmark scripts, which cannot see OUT_DIR's hashed path.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Fixture {
    /// Binary file name; upper-cased it is the `VMWRAP_FIXTURE_` suffix.
    name: &'static str,
    source: &'static str,
    flags: &'static [&'static str],
}

const STATIC: &[&str] = &["-static"];
const PIE: &[&str] = &["-fPIE", "-pie"];
const NO_PIE: &[&str] = &["-fno-pie", "-no-pie"];

const FIXTURES: &[Fixture] = &[
    Fixture {
        name: "compute_static",
        source: "compute.c",
        flags: STATIC,
    },
    // static-pie is what e.g. Rust's musl target emits: a static binary that
    // relocates itself, with no interpreter.
    Fixture {
        name: "compute_static_pie",
        source: "compute.c",
        flags: &["-static-pie", "-fPIE"],
    },
    Fixture {
        name: "compute_pie",
        source: "compute.c",
        flags: PIE,
    },
    Fixture {
        name: "compute_nopie",
        source: "compute.c",
        flags: NO_PIE,
    },
    Fixture {
        name: "segv",
        source: "segv.c",
        flags: PIE,
    },
    Fixture {
        name: "abort",
        source: "abort.c",
        flags: PIE,
    },
    Fixture {
        name: "exitcode",
        source: "exitcode.c",
        flags: STATIC,
    },
    Fixture {
        name: "syscalls",
        source: "syscalls.c",
        flags: PIE,
    },
    Fixture {
        name: "syscalls_static",
        source: "syscalls.c",
        flags: STATIC,
    },
    // The benchmarks are static so that ld.so start-up does not dilute the
    // per-iteration numbers.
    Fixture {
        name: "cpuloop",
        source: "cpuloop.c",
        flags: STATIC,
    },
    Fixture {
        name: "getppid_loop",
        source: "getppid_loop.c",
        flags: STATIC,
    },
    // Checkpoint/restore workloads (tests/checkpoint.rs).
    Fixture {
        name: "fill",
        source: "fill.c",
        flags: PIE,
    },
    Fixture {
        name: "records",
        source: "records.c",
        flags: PIE,
    },
    Fixture {
        name: "readfile",
        source: "readfile.c",
        flags: STATIC,
    },
    // Hostile arguments to memory syscalls (tests/vmctl_run.rs).
    Fixture {
        name: "hostile",
        source: "hostile.c",
        flags: PIE,
    },
    // Routes from the guest into vmctl's own memory and descriptors, and guest
    // mistakes that must end the guest, never vmctl (tests/hostile.rs).
    Fixture {
        name: "escape",
        source: "escape.c",
        flags: PIE,
    },
    Fixture {
        name: "mistakes",
        source: "mistakes.c",
        flags: PIE,
    },
    // Another process of the same user trying to take vmctl's descriptors.
    Fixture {
        name: "steal",
        source: "steal.c",
        flags: PIE,
    },
    Fixture {
        name: "hugesplit",
        source: "hugesplit.c",
        flags: PIE,
    },
    Fixture {
        name: "churn",
        source: "churn.c",
        flags: PIE,
    },
    Fixture {
        name: "spin",
        source: "spin.c",
        flags: PIE,
    },
    // Incremental checkpoints (tests/checkpoint_incremental.rs).
    Fixture {
        name: "hotset",
        source: "hotset.c",
        flags: PIE,
    },
    // Kinds of memory for checkpoint compression (tests/checkpoint_incremental.rs,
    // tests/bench/checkpoint-compression).
    Fixture {
        name: "memkinds",
        source: "memkinds.c",
        flags: PIE,
    },
    Fixture {
        name: "readhold",
        source: "readhold.c",
        flags: PIE,
    },
    // Clock continuity across restore (tests/checkpoint_clocks.rs).
    Fixture {
        name: "clocks",
        source: "clocks.c",
        flags: PIE,
    },
    // Processes and threads (tests/processes.rs).
    Fixture {
        name: "procs",
        source: "procs.c",
        flags: &["-fPIE", "-pie", "-pthread"],
    },
    Fixture {
        name: "omp_reduce",
        source: "omp_reduce.c",
        flags: &["-fPIE", "-pie", "-fopenmp"],
    },
    // Process and thread benchmarks (tests/bench/run-benchmarks). Dynamic, as
    // a job's programs are: libgomp and libpthread come through ld.so.
    Fixture {
        name: "omp_bench",
        source: "omp_bench.c",
        flags: &["-fPIE", "-pie", "-fopenmp"],
    },
    Fixture {
        name: "futex_pingpong",
        source: "futex_pingpong.c",
        flags: &["-fPIE", "-pie", "-pthread"],
    },
    Fixture {
        name: "forktouch",
        source: "forktouch.c",
        flags: PIE,
    },
    // The guest's vDSO, through ld.so and through a static libc (tests/vdso.rs).
    Fixture {
        name: "vdso_clocks",
        source: "vdso_clocks.c",
        flags: PIE,
    },
    Fixture {
        name: "vdso_clocks_static",
        source: "vdso_clocks.c",
        flags: STATIC,
    },
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let src_dir = manifest_dir.join("tests").join("fixtures");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", src_dir.display());

    let compiler = cc::Build::new().cargo_metadata(false).get_compiler();
    let cc_path = compiler.path().to_path_buf();

    // Compiling in parallel keeps the build script off the critical path of
    // the workspace build.
    let built: Vec<PathBuf> = std::thread::scope(|s| {
        let handles: Vec<_> = FIXTURES
            .iter()
            .map(|f| {
                let (cc_path, src_dir, out_dir) = (&cc_path, &src_dir, &out_dir);
                s.spawn(move || compile(cc_path, src_dir, out_dir, f))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let copy_dir = target_dir(&out_dir).map(|t| t.join("fixtures"));
    for (fixture, path) in FIXTURES.iter().zip(&built) {
        println!(
            "cargo:rustc-env=VMWRAP_FIXTURE_{}={}",
            fixture.name.to_uppercase(),
            path.display()
        );
        if let Some(dir) = &copy_dir {
            copy_atomically(path, dir);
        }
    }
}

fn compile(cc: &Path, src_dir: &Path, out_dir: &Path, f: &Fixture) -> PathBuf {
    let out = out_dir.join(f.name);
    let src = src_dir.join(f.source);
    let output = Command::new(cc)
        .args(["-std=gnu11", "-O2", "-g", "-Wall", "-Wextra"])
        .args(f.flags)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .arg("-lm")
        .output()
        .unwrap_or_else(|e| panic!("cannot run C compiler {}: {e}", cc.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "compiling {} ({}) failed ({}):\n{stderr}\n\
             static fixtures need libc.a (Debian: apt-get install libc6-dev)",
            f.name,
            src.display(),
            output.status
        );
    }
    for line in stderr.lines() {
        println!("cargo:warning={}: {line}", f.name);
    }
    out
}

/// OUT_DIR is `<target>/<profile>/build/<pkg>-<hash>/out`; cargo gives build
/// scripts no direct way to learn `<target>`.
fn target_dir(out_dir: &Path) -> Option<PathBuf> {
    out_dir.ancestors().nth(4).map(Path::to_path_buf)
}

/// Debug and release builds may run this script concurrently and both write
/// the same copies, so each copy is renamed into place rather than rewritten.
fn copy_atomically(from: &Path, dir: &Path) {
    let name = from.file_name().unwrap();
    let tmp = dir.join(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = fs::create_dir_all(dir)
        .and_then(|()| fs::copy(from, &tmp))
        .and_then(|_| fs::rename(&tmp, dir.join(name)));
    if let Err(e) = result {
        // The copy is a convenience for scripts; the tests use OUT_DIR.
        println!(
            "cargo:warning=cannot copy {} to {}: {e}",
            from.display(),
            dir.display()
        );
        let _ = fs::remove_file(&tmp);
    }
}
