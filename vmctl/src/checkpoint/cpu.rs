//! The CPU features a guest was shown, and whether this host has them all.

use super::format::{CpuFeatures, CpuidWord};
use std::arch::x86_64::__cpuid_count;

/// (leaf, subleaf, register) words that describe instruction-set features.
const WORDS: &[(u32, u32, &str)] = &[
    (1, 0, "ecx"),
    (1, 0, "edx"),
    (7, 0, "ebx"),
    (7, 0, "ecx"),
    (7, 0, "edx"),
    (7, 1, "eax"),
    (0xd, 1, "eax"),
    (0x8000_0001, 0, "ecx"),
    (0x8000_0001, 0, "edx"),
];

/// Names for the features programs commonly select code paths on.
const NAMES: &[(u32, u32, &str, u32, &str)] = &[
    (1, 0, "ecx", 0, "sse3"),
    (1, 0, "ecx", 1, "pclmulqdq"),
    (1, 0, "ecx", 9, "ssse3"),
    (1, 0, "ecx", 12, "fma"),
    (1, 0, "ecx", 13, "cx16"),
    (1, 0, "ecx", 19, "sse4_1"),
    (1, 0, "ecx", 20, "sse4_2"),
    (1, 0, "ecx", 22, "movbe"),
    (1, 0, "ecx", 23, "popcnt"),
    (1, 0, "ecx", 25, "aes"),
    (1, 0, "ecx", 26, "xsave"),
    (1, 0, "ecx", 28, "avx"),
    (1, 0, "ecx", 29, "f16c"),
    (1, 0, "ecx", 30, "rdrand"),
    (7, 0, "ebx", 3, "bmi1"),
    (7, 0, "ebx", 5, "avx2"),
    (7, 0, "ebx", 8, "bmi2"),
    (7, 0, "ebx", 9, "erms"),
    (7, 0, "ebx", 16, "avx512f"),
    (7, 0, "ebx", 17, "avx512dq"),
    (7, 0, "ebx", 18, "rdseed"),
    (7, 0, "ebx", 19, "adx"),
    (7, 0, "ebx", 21, "avx512ifma"),
    (7, 0, "ebx", 28, "avx512cd"),
    (7, 0, "ebx", 29, "sha_ni"),
    (7, 0, "ebx", 30, "avx512bw"),
    (7, 0, "ebx", 31, "avx512vl"),
    (7, 0, "ecx", 1, "avx512vbmi"),
    (7, 0, "ecx", 6, "avx512_vbmi2"),
    (7, 0, "ecx", 8, "gfni"),
    (7, 0, "ecx", 9, "vaes"),
    (7, 0, "ecx", 10, "vpclmulqdq"),
    (7, 0, "ecx", 11, "avx512_vnni"),
    (7, 0, "ecx", 12, "avx512_bitalg"),
    (7, 0, "ecx", 14, "avx512_vpopcntdq"),
    (7, 0, "edx", 23, "avx512_fp16"),
    (7, 1, "eax", 4, "avx_vnni"),
    (7, 1, "eax", 5, "avx512_bf16"),
    (0x8000_0001, 0, "ecx", 5, "abm"),
    (0x8000_0001, 0, "ecx", 6, "sse4a"),
    (0x8000_0001, 0, "edx", 27, "rdtscp"),
];

fn read(leaf: u32, subleaf: u32, reg: &str) -> u32 {
    // Unsupported leaves read as zero or as the highest basic leaf, which only makes
    // the check stricter.
    let r = __cpuid_count(leaf, subleaf);
    match reg {
        "eax" => r.eax,
        "ebx" => r.ebx,
        "ecx" => r.ecx,
        _ => r.edx,
    }
}

fn vendor() -> String {
    let r = __cpuid_count(0, 0);
    let mut b = Vec::new();
    for w in [r.ebx, r.edx, r.ecx] {
        b.extend_from_slice(&w.to_le_bytes());
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// This host's features, with the XCR0 the guest was given.
pub fn host_features(xcr0: u64) -> CpuFeatures {
    CpuFeatures {
        vendor: vendor(),
        words: WORDS
            .iter()
            .map(|&(leaf, subleaf, reg)| CpuidWord {
                leaf,
                subleaf,
                register: reg.to_string(),
                bits: read(leaf, subleaf, reg),
            })
            .collect(),
        xcr0,
    }
}

/// Features the checkpoint's guest saw that this host lacks, by name.
pub fn missing_features(saved: &CpuFeatures, host_xcr0: u64) -> Vec<String> {
    let mut missing = Vec::new();
    for w in &saved.words {
        // Bit 27 of leaf 1 ECX is OSXSAVE, an OS setting rather than a CPU feature.
        let mask = if w.leaf == 1 && w.register == "ecx" {
            !(1 << 27)
        } else {
            !0
        };
        let have = read(w.leaf, w.subleaf, &w.register);
        let lacking = w.bits & !have & mask;
        for bit in 0..32 {
            if lacking & (1 << bit) == 0 {
                continue;
            }
            let name = NAMES
                .iter()
                .find(|n| n.0 == w.leaf && n.1 == w.subleaf && n.2 == w.register && n.3 == bit)
                .map(|n| n.4.to_string())
                .unwrap_or_else(|| {
                    format!("cpuid.{:#x}.{}.{}[{bit}]", w.leaf, w.subleaf, w.register)
                });
            missing.push(name);
        }
    }
    let lacking_xcr0 = saved.xcr0 & !host_xcr0;
    if lacking_xcr0 != 0 {
        missing.push(format!("xsave state components {lacking_xcr0:#x}"));
    }
    missing
}
