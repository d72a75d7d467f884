//! Generates Rust bindings for the SPANK API from the installed Slurm headers,
//! so the plugin is built against the exact Slurm it will be loaded into
//! (Slurm refuses plugins whose `plugin_version` differs from its own).

use std::env;
use std::path::PathBuf;

const HEADER: &str = "
#include <slurm/spank.h>
#include <slurm/slurm_version.h>
";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=/usr/include/slurm/spank.h");
    println!("cargo:rerun-if-changed=/usr/include/slurm/slurm_version.h");
    println!("cargo:rerun-if-env-changed=SLURM_INCLUDE_DIR");

    let mut builder = bindgen::Builder::default()
        .header_contents("vmwrap_spank.h", HEADER)
        .allowlist_function("spank_.*")
        .allowlist_function("slurm_(info|error|verbose|debug)")
        .allowlist_type("spank_.*")
        .allowlist_var("SPANK_.*|ESPANK_.*|S_.*|SLURM_VERSION_NUMBER")
        // Plain integer constants keep the FFI calls free of enum
        // conversions, and an out-of-range value from C cannot be UB.
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .layout_tests(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    // Non-default install prefixes (e.g. /opt/slurm/include) are common.
    if let Ok(dir) = env::var("SLURM_INCLUDE_DIR") {
        builder = builder.clang_arg(format!("-I{dir}"));
    }
    let bindings = builder
        .generate()
        .expect("bindgen failed on <slurm/spank.h>; install libslurm-dev and libclang-dev");

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("spank_bindings.rs"))
        .expect("cannot write spank_bindings.rs");
}
