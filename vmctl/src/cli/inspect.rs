//! `vmctl inspect DIR`: what generations a checkpoint directory holds, and whether
//! they are intact.

use crate::checkpoint::read;
use clap::Args;
use std::path::PathBuf;

/// Exit status when the directory holds no usable generation.
pub const EXIT_NONE_USABLE: i32 = 1;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A checkpoint directory
    pub dir: PathBuf,

    /// Print JSON
    #[arg(long)]
    pub json: bool,

    /// Check every byte of every generation against its checksums
    #[arg(long)]
    pub verify: bool,
}

/// The XSAVE features KVM offers here, as a restore's VM would enable them.
pub fn xcr0_of_this_host() -> u64 {
    kvm_ioctls::Kvm::new()
        .ok()
        .and_then(|k| {
            k.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .ok()
        })
        .and_then(|c| {
            c.as_slice()
                .iter()
                .find(|e| e.function == 0xd && e.index == 0)
                .map(|e| (e.eax as u64) | ((e.edx as u64) << 32))
        })
        .unwrap_or(u64::MAX)
}

/// Seconds since the epoch as an RFC 3339 UTC time.
pub fn rfc3339(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Civil-from-days (proleptic Gregorian), as in Howard Hinnant's date algorithms.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

pub fn inspect(args: InspectArgs) -> i32 {
    let gens = match read::list_generations(&args.dir) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("vmctl: {e}");
            return super::EXIT_VMCTL_FAILED;
        }
    };
    let latest = read::latest(&args.dir);
    // What this host would give a guest, for the CPU check of --verify.
    let host_xcr0 = if args.verify { xcr0_of_this_host() } else { 0 };
    let mut rows = Vec::new();
    let mut usable = 0;
    for g in gens {
        // A generation is usable only with its whole chain.
        let result = read::load_chain(&args.dir, g).and_then(|mut links| {
            if args.verify {
                read::verify_chain(&links)?;
            }
            let newest = links.pop().expect("a chain holds its generation");
            if args.verify {
                read::check_cpu(&newest.manifest, host_xcr0)?;
            }
            let chain_bytes = links
                .iter()
                .map(|l| l.manifest.memory.data_bytes)
                .sum::<u64>()
                + newest.manifest.memory.data_bytes;
            Ok((newest.manifest, chain_bytes))
        });
        let row = match result {
            Ok((m, chain_bytes)) => {
                usable += 1;
                // What a restore of this generation would do to the job's files now.
                let files =
                    m.files
                        .as_ref()
                        .map(|_| match crate::filejournal::undo::plan(&args.dir, g) {
                            Ok(plan) => serde_json::json!({"restore": plan.files}),
                            Err(e) => serde_json::json!({"refused": e}),
                        });
                serde_json::json!({
                    "files": files,
                    "generation": g,
                    "latest": latest == Some(g),
                    "status": if args.verify { "verified" } else { "ok" },
                    "created": rfc3339(m.created_unix),
                    "host": m.host,
                    "program": m.program,
                    "argv": m.argv,
                    "kind": m.kind,
                    "parent": m.parent,
                    "memory_bytes": m.memory.data_bytes,
                    // Before compression (equal to memory_bytes without it).
                    "page_bytes": m.memory.chunks.iter().map(|c| c.bytes()).sum::<u64>(),
                    "chain_memory_bytes": chain_bytes,
                    "format_version": m.format_version,
                    "vmctl_version": m.vmctl_version,
                })
            }
            Err(e) => serde_json::json!({
                "generation": g,
                "latest": latest == Some(g),
                "status": "unusable",
                "error": e.to_string(),
            }),
        };
        rows.push(row);
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "dir": args.dir,
                "generations": rows,
                "events": crate::events::read_recent(&args.dir, crate::events::EVENTS_SHOWN),
            })
        );
    } else if rows.is_empty() {
        println!("{}: no checkpoint generations", args.dir.display());
    } else {
        for r in &rows {
            let g = r["generation"].as_u64().unwrap_or(0);
            let mark = if r["latest"].as_bool() == Some(true) {
                " (latest)"
            } else {
                ""
            };
            if r["status"] == "unusable" {
                println!(
                    "generation {g}{mark}: UNUSABLE: {}",
                    r["error"].as_str().unwrap_or("")
                );
            } else {
                let kind = match r["parent"].as_u64() {
                    Some(p) => format!("incremental on {p}"),
                    None => "full".into(),
                };
                let (stored, pages) = (r["memory_bytes"].as_u64(), r["page_bytes"].as_u64());
                let compressed = if stored != pages {
                    format!(
                        " (compressed from {:.1} MiB)",
                        pages.unwrap_or(0) as f64 / (1 << 20) as f64
                    )
                } else {
                    String::new()
                };
                println!(
                    "generation {g}{mark}: {} {}, {kind}, {:.1} MiB{compressed} ({:.1} MiB with its chain), host {}, program {}",
                    r["status"].as_str().unwrap_or(""),
                    r["created"].as_str().unwrap_or(""),
                    r["memory_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
                    r["chain_memory_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
                    r["host"].as_str().unwrap_or(""),
                    r["program"].as_str().unwrap_or("")
                );
                print_files(&r["files"]);
            }
        }
    }
    if usable > 0 {
        0
    } else {
        EXIT_NONE_USABLE
    }
}

/// The files a restore of a generation would bring back, one line each.
fn print_files(files: &serde_json::Value) {
    if files.is_null() {
        println!("  files: not recorded (--files=none); a restore leaves them as they are");
        return;
    }
    if let Some(e) = files["refused"].as_str() {
        println!("  files: a restore would REFUSE this generation: {e}");
        return;
    }
    let list = files["restore"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("  files: none open for writing");
    }
    for f in list {
        let path = f["path"].as_str().unwrap_or("");
        let now = f["size_now"].as_u64().unwrap_or(0);
        let to = f["size_restored"].as_u64().unwrap_or(0);
        if let Some(note) = f["note"].as_str() {
            println!("  file {path}: {note}");
        } else if f["stdio"].as_bool() == Some(true) {
            println!(
                "  output {path}: {now} -> {to} bytes (the job's {} bytes written since removed)",
                f["removed_bytes"].as_u64().unwrap_or(0)
            );
        } else {
            println!(
                "  file {path}: {now} -> {to} bytes ({} bytes written back)",
                f["write_back_bytes"].as_u64().unwrap_or(0)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn times() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
