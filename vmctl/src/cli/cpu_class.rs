//! `vmctl cpu-class`: a short, stable name for the CPU features a guest on this node
//! sees. A checkpoint restores only on a CPU with every feature its guest saw
//! (CPUID cannot be virtualized here), so nodes of one class can restore each other's
//! checkpoints. Admins put the name in the nodes' Slurm Features and the plugin
//! pins a requeued job to the class it was checkpointed on (docs/OPERATIONS.md).

use crate::checkpoint::cpu::host_features;
use crate::checkpoint::format::CpuFeatures;
use clap::Args;

/// Replaces the computed class, for tests only: the local test cluster runs every
/// node on one machine and gives one of them a made-up class through it. A node
/// running with it set will be steered to by jobs that cannot really restore
/// there, so never set it on a production node.
pub const TEST_OVERRIDE_ENV: &str = "VMWRAP_TEST_CPU_CLASS";

#[derive(Args, Debug)]
pub struct CpuClassArgs {
    /// Also print the features the class is made of, one per line
    #[arg(long)]
    pub verbose: bool,
}

/// The class of `features`: `vmwrap-<vendor>-<8 hex digits>`, the digits a CRC32
/// of every feature word and XSAVE component the guest can use. OSXSAVE is left
/// out, as restore leaves it out (it is an OS setting, not a CPU feature).
pub fn class_of(features: &CpuFeatures) -> String {
    let vendor = match features.vendor.as_str() {
        "GenuineIntel" => "intel".to_string(),
        "AuthenticAMD" => "amd".to_string(),
        "HygonGenuine" => "hygon".to_string(),
        other => other
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect(),
    };
    let mut canonical = format!("{}|xcr0={:#x}", features.vendor, features.xcr0);
    for w in &features.words {
        let bits = if w.leaf == 1 && w.register == "ecx" {
            w.bits & !(1 << 27)
        } else {
            w.bits
        };
        canonical.push_str(&format!(
            "|{:#x}.{}.{}={bits:#x}",
            w.leaf, w.subleaf, w.register
        ));
    }
    format!(
        "vmwrap-{vendor}-{:08x}",
        crc32fast::hash(canonical.as_bytes())
    )
}

/// This node's class (or the test override), and whether it was overridden.
pub fn this_node() -> (String, bool) {
    if let Some(class) = std::env::var(TEST_OVERRIDE_ENV)
        .ok()
        .filter(|c| !c.is_empty())
    {
        return (class, true);
    }
    (
        class_of(&host_features(super::inspect::xcr0_of_this_host())),
        false,
    )
}

pub fn cpu_class(args: CpuClassArgs) -> i32 {
    let (class, overridden) = this_node();
    println!("{class}");
    if overridden {
        eprintln!("vmctl: warning: the CPU class comes from {TEST_OVERRIDE_ENV} (for tests only)");
    }
    if args.verbose {
        let features = host_features(super::inspect::xcr0_of_this_host());
        println!("vendor {}", features.vendor);
        println!("xcr0 {:#x}", features.xcr0);
        for w in &features.words {
            println!(
                "cpuid {:#x}.{}.{} {:#010x}",
                w.leaf, w.subleaf, w.register, w.bits
            );
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::format::CpuidWord;

    fn features(bits: u32, osxsave: bool) -> CpuFeatures {
        CpuFeatures {
            vendor: "AuthenticAMD".into(),
            words: vec![
                CpuidWord {
                    leaf: 1,
                    subleaf: 0,
                    register: "ecx".into(),
                    bits: if osxsave { 1 << 27 } else { 0 },
                },
                CpuidWord {
                    leaf: 7,
                    subleaf: 0,
                    register: "ebx".into(),
                    bits,
                },
            ],
            xcr0: 7,
        }
    }

    #[test]
    fn class_follows_features_only() {
        let a = class_of(&features(0x20, false));
        assert!(
            a.starts_with("vmwrap-amd-") && a.len() == "vmwrap-amd-".len() + 8,
            "{a}"
        );
        assert_eq!(
            a,
            class_of(&features(0x20, true)),
            "OSXSAVE must not matter"
        );
        assert_ne!(a, class_of(&features(0x21, false)));
        // Stable across releases: admins write it into slurm.conf, so a change of
        // this value breaks every site's configuration.
        assert_eq!(a, "vmwrap-amd-78246c0e");
    }

    #[test]
    fn this_host_is_stable() {
        let f = host_features(0x7);
        assert_eq!(class_of(&f), class_of(&host_features(0x7)));
    }
}
