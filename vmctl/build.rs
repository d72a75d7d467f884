//! Builds the guest's vDSO (vdso/) into OUT_DIR/vdso.so, which
//! src/kernel/vdso.rs embeds with include_bytes!.
//!
//! The `cc` crate only picks the C compiler (honouring CC/TARGET_CC); the shared
//! object is linked by calling that compiler with flags of our own, since the
//! image must be one flat read+execute segment with no relocations (vdso/vdso.lds).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let src = manifest_dir.join("vdso");
    for f in ["vdso.c", "vvar.h", "vdso.lds", "vdso.map"] {
        println!("cargo:rerun-if-changed={}", src.join(f).display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    let cc = cc::Build::new()
        .cargo_metadata(false)
        .get_compiler()
        .path()
        .to_path_buf();
    let out = out_dir.join("vdso.so");
    let output = Command::new(&cc)
        .current_dir(&src)
        .args([
            "-std=gnu11",
            "-O2",
            "-g0",
            "-Wall",
            "-Wextra",
            "-Werror",
            // Position independent, freestanding, and nothing that needs the
            // guest's libc or TLS (a stack canary would read the caller's %fs).
            "-fPIC",
            "-shared",
            "-nostdlib",
            "-ffreestanding",
            "-fno-builtin",
            "-fno-stack-protector",
            "-fcf-protection=none",
            "-Wl,-T,vdso.lds",
            "-Wl,--version-script=vdso.map",
            "-Wl,-soname=linux-vdso.so.1",
            "-Wl,--hash-style=both",
            "-Wl,--eh-frame-hdr",
            "-Wl,-Bsymbolic",
            "-Wl,--no-undefined",
            "-Wl,-z,max-page-size=4096",
            "-Wl,--build-id=none",
            "-o",
        ])
        .arg(&out)
        .arg("vdso.c")
        .output()
        .unwrap_or_else(|e| panic!("cannot run C compiler {}: {e}", cc.display()));
    if !output.status.success() {
        panic!(
            "building the guest vDSO ({}) failed ({}):\n{}",
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
