//! `vmctl fuzz-reader DIR` (hidden): a mutation test of the checkpoint reader.
//!
//! Starting from a real, intact checkpoint directory, each case builds a damaged copy
//! (the manifest edited as JSON and re-checksummed as an attacker would, raw bytes
//! flipped, the checksum line or the memory image damaged, files replaced by
//! symlinks, FIFOs or directories, generation directories and `latest` rearranged)
//! and runs, in this process, everything that reads a checkpoint before a VM exists:
//! listing the generations, loading and checking each manifest, verifying every
//! memory chunk, the CPU check and restore's memory cap. A case passes when the
//! reader answers with an error or a result; a panic is counted and reported with the
//! case's seed, and an abort (an allocation beyond the address-space limit this
//! command sets) or a hang ends the command, which its test reports.
//!
//! docs/CHECKPOINT-FORMAT.md says how to run it longer.

use crate::checkpoint::format::*;
use crate::checkpoint::read;
use clap::Args;
use serde_json::Value;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct FuzzReaderArgs {
    /// An intact checkpoint directory to start every case from
    pub dir: PathBuf,

    /// A scratch directory for the damaged copies (emptied and reused)
    #[arg(long)]
    pub scratch: PathBuf,

    /// Number of cases
    #[arg(long, default_value_t = 2000)]
    pub cases: u64,

    /// First case's seed; case i uses seed + i, so a failing case reruns alone with
    /// --seed S --cases 1
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// splitmix64: small, seedable and good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The address space the reader may use: far above what reading a checkpoint
/// needs, far below what a size taken on trust would ask for.
const ADDRESS_SPACE_LIMIT: u64 = 4 << 30;

pub fn fuzz_reader(args: FuzzReaderArgs) -> i32 {
    let gens = match read::list_generations(&args.dir) {
        Ok(g) if !g.is_empty() => g,
        _ => {
            eprintln!(
                "vmctl: {}: no checkpoint generation to start from",
                args.dir.display()
            );
            return super::EXIT_VMCTL_FAILED;
        }
    };
    // The newest generation's chain (just it when it is full): each case copies it
    // and damages one of its generations, so incremental links are damaged too.
    let chain: Vec<u64> = match read::load_chain(&args.dir, gens[0]) {
        Ok(links) => links.iter().map(|l| l.generation).collect(),
        Err(_) => vec![gens[0]],
    };
    let mut seeds = Vec::new();
    for &g in &chain {
        let dir = args.dir.join(generation_dir_name(g));
        let Ok(manifest) = fs::read(dir.join(MANIFEST)) else {
            eprintln!("vmctl: {}: no manifest", dir.display());
            return super::EXIT_VMCTL_FAILED;
        };
        let Ok(json) = serde_json::from_slice::<Value>(&manifest) else {
            eprintln!("vmctl: {}: manifest is not JSON", dir.display());
            return super::EXIT_VMCTL_FAILED;
        };
        seeds.push(SeedGeneration {
            generation: g,
            dir,
            manifest,
            json,
        });
    }
    let limit = libc::rlimit {
        rlim_cur: ADDRESS_SPACE_LIMIT,
        rlim_max: ADDRESS_SPACE_LIMIT,
    };
    // SAFETY: setrlimit with a local struct.
    unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) };
    // Panics are counted and reported below, not printed one by one.
    std::panic::set_hook(Box::new(|_| {}));
    let mut panics = Vec::new();
    let mut accepted = 0u64;
    for case in 0..args.cases {
        let seed = args.seed.wrapping_add(case);
        let _ = fs::remove_dir_all(&args.scratch);
        if let Err(e) = fs::create_dir_all(&args.scratch) {
            eprintln!("vmctl: {}: {e}", args.scratch.display());
            return super::EXIT_VMCTL_FAILED;
        }
        let work = args.scratch.join("ck");
        if let Err(e) = build_case(&seeds, &work, seed) {
            eprintln!("vmctl: case {seed}: cannot build it: {e}");
            return super::EXIT_VMCTL_FAILED;
        }
        match std::panic::catch_unwind(|| read_like_restore(&work)) {
            Ok(n) => accepted += n,
            Err(_) => panics.push(seed),
        }
    }
    let _ = fs::remove_dir_all(&args.scratch);
    println!(
        "{{\"cases\": {}, \"accepted_generations\": {accepted}, \"panics\": {panics:?}}}",
        args.cases
    );
    if panics.is_empty() {
        0
    } else {
        1
    }
}

/// What inspect --verify, restore and prune read before a VM exists. Returns how
/// many generations passed every check.
fn read_like_restore(dir: &Path) -> u64 {
    let _ = read::latest(dir);
    let Ok(gens) = read::candidates(dir) else {
        return 0;
    };
    let _ = crate::checkpoint::write::needed_generations(dir, &gens, 1);
    let mut ok = 0;
    // Restore tries them all; the newest few are the ones a case crafts, and trying
    // every one of a forged chain's hundreds of generations would only take time.
    for g in gens.into_iter().take(4) {
        let Ok(links) = read::load_chain(dir, g) else {
            continue;
        };
        let newest = &links.last().expect("a chain holds its generation").manifest;
        let _ = super::restore::check_memory_cap(newest, 1 << 30);
        if read::verify_chain(&links).is_ok() && read::check_cpu(newest, u64::MAX).is_ok() {
            ok += 1;
        }
    }
    ok
}

/// One generation of the intact chain every case starts from.
struct SeedGeneration {
    generation: u64,
    dir: PathBuf,
    manifest: Vec<u8>,
    json: Value,
}

fn sum_line(manifest: &[u8]) -> String {
    format!("crc32 {:08x} {MANIFEST}\n", crc32fast::hash(manifest))
}

/// Copies the seed chain into `work` and damages one of its generations (and, in some
/// cases, the links between generations).
fn build_case(seeds: &[SeedGeneration], work: &Path, seed: u64) -> std::io::Result<()> {
    let mut rng = Rng(seed);
    let newest = seeds.last().expect("a chain holds a generation");
    fs::create_dir_all(work)?;
    symlink(generation_dir_name(newest.generation), work.join(LATEST))?;
    let victim = rng.below(seeds.len() as u64) as usize;
    for (i, s) in seeds.iter().enumerate() {
        let gen = work.join(generation_dir_name(s.generation));
        fs::create_dir_all(&gen)?;
        if i == victim {
            damage_generation(s, &gen, &mut rng)?;
        } else {
            fs::write(gen.join(MANIFEST), &s.manifest)?;
            fs::write(gen.join(MANIFEST_SUM), sum_line(&s.manifest))?;
            fs::hard_link(s.dir.join(MEMORY), gen.join(MEMORY))?;
        }
    }
    if rng.chance(10) {
        forge_links(seeds, work, &mut rng)?;
    }
    if rng.chance(20) {
        let gen = work.join(generation_dir_name(seeds[victim].generation));
        mutate_shape(work, &gen, &mut rng)?;
    }
    Ok(())
}

fn damage_generation(s: &SeedGeneration, gen: &Path, rng: &mut Rng) -> std::io::Result<()> {
    let image = gen.join(MEMORY);
    let mut manifest = s.manifest.clone();
    let mut resum = true;
    if rng.chance(8) && compressed_chunks(&s.json) > 0 {
        return damage_compressed_chunk(s, gen, rng);
    }
    match rng.below(100) {
        0..=54 => {
            let mut v = s.json.clone();
            for _ in 0..1 + rng.below(3) {
                mutate_value(&mut v, rng);
            }
            manifest = serde_json::to_vec(&v).unwrap_or_default();
        }
        55..=69 => mutate_bytes(&mut manifest, rng),
        70..=74 => {
            mutate_bytes(&mut manifest, rng);
            resum = false;
        }
        _ => {}
    }
    fs::write(gen.join(MANIFEST), &manifest)?;
    let sum = if resum {
        sum_line(&manifest)
    } else {
        sum_line(&s.manifest)
    };
    fs::write(gen.join(MANIFEST_SUM), sum)?;
    // The image is linked, not copied, unless this case damages it.
    if rng.chance(12) {
        let mut bytes = fs::read(s.dir.join(MEMORY))?;
        mutate_bytes(&mut bytes, rng);
        fs::write(&image, bytes)?;
    } else {
        fs::hard_link(s.dir.join(MEMORY), &image)?;
    }
    Ok(())
}

fn compressed_chunks(manifest: &Value) -> usize {
    manifest["memory"]["chunks"].as_array().map_or(0, |c| {
        c.iter().filter(|c| c.get("compressed").is_some()).count()
    })
}

/// Damages the stored bytes of a compressed chunk and signs them (the chunk's
/// `compressed.crc32` and the manifest's sum) as an attacker would, so that the
/// decompressor itself gets the crafted data; sometimes shortens the stored length.
fn damage_compressed_chunk(s: &SeedGeneration, gen: &Path, rng: &mut Rng) -> std::io::Result<()> {
    let mut v = s.json.clone();
    let pick = rng.below(compressed_chunks(&v) as u64) as usize;
    let chunk = v["memory"]["chunks"]
        .as_array_mut()
        .and_then(|c| {
            c.iter_mut()
                .filter(|c| c.get("compressed").is_some())
                .nth(pick)
        })
        .expect("a compressed chunk");
    let offset = chunk["offset"].as_u64().unwrap_or(0) as usize;
    let mut len = chunk["compressed"]["bytes"].as_u64().unwrap_or(0) as usize;
    let mut image = fs::read(s.dir.join(MEMORY))?;
    let Some(stored) = image.get_mut(offset..offset + len) else {
        return Ok(());
    };
    match rng.below(4) {
        0 => {
            let at = rng.below(stored.len() as u64) as usize;
            stored[at] ^= 1 << rng.below(8);
        }
        1 => {
            let at = rng.below(stored.len() as u64) as usize;
            stored[at..].iter_mut().for_each(|b| *b = rng.next() as u8);
        }
        2 => stored.iter_mut().for_each(|b| *b = 0),
        _ => len = 1 + rng.below(len as u64) as usize,
    }
    let crc = crc32fast::hash(&image[offset..offset + len]);
    chunk["compressed"]["bytes"] = len.into();
    chunk["compressed"]["crc32"] = crc.into();
    let manifest = serde_json::to_vec(&v).unwrap_or_default();
    fs::write(gen.join(MANIFEST), &manifest)?;
    fs::write(gen.join(MANIFEST_SUM), sum_line(&manifest))?;
    fs::write(gen.join(MEMORY), image)
}

/// Writes a crafted generation `generation` into `work`: the newest seed manifest
/// with its number, kind and parent link replaced and no memory, signed as an
/// attacker would. Returns its manifest's CRC32.
fn write_forged(
    seeds: &[SeedGeneration],
    work: &Path,
    generation: u64,
    parent: Option<u64>,
    parent_crc32: Option<u32>,
) -> std::io::Result<u32> {
    let mut v = seeds
        .last()
        .expect("a chain holds a generation")
        .json
        .clone();
    v["generation"] = generation.into();
    v["kind"] = if parent.is_some() {
        KIND_INCREMENTAL
    } else {
        KIND_FULL
    }
    .into();
    v["parent"] = parent.map_or(Value::Null, Value::from);
    v["parent_manifest_crc32"] = parent_crc32.map_or(Value::Null, Value::from);
    v["memory"]["chunks"] = Value::Array(Vec::new());
    v["memory"]["zero_runs"] = Value::Array(Vec::new());
    v["memory"]["data_bytes"] = 0.into();
    let manifest = serde_json::to_vec(&v).unwrap_or_default();
    let gen = work.join(generation_dir_name(generation));
    let _ = fs::remove_dir_all(&gen);
    fs::create_dir_all(&gen)?;
    fs::write(gen.join(MANIFEST), &manifest)?;
    fs::write(gen.join(MANIFEST_SUM), sum_line(&manifest))?;
    fs::write(gen.join(MEMORY), b"")?;
    Ok(crc32fast::hash(&manifest))
}

/// Crafted parent links, each signed as an attacker would: a generation naming
/// itself, a newer one or one not there as its parent, a manifest naming another
/// generation than its directory's (a loop through the name), a parent CRC32 that
/// does not match, and a chain longer than a reader follows.
fn forge_links(seeds: &[SeedGeneration], work: &Path, rng: &mut Rng) -> std::io::Result<()> {
    let top = seeds.last().expect("a chain holds a generation").generation;
    let (a, b) = (top + 1, top + 2);
    // The long chain writes hundreds of generations: rarely.
    match rng.below(20) {
        0..=4 => {
            write_forged(seeds, work, a, Some(a), Some(rng.next() as u32))?;
        }
        5..=8 => {
            write_forged(seeds, work, a, Some(b), None)?;
        }
        9..=13 => {
            // Directory a holds a manifest saying it is generation b, built on a.
            let crc = write_forged(seeds, work, a, None, None)?;
            let mut v = seeds
                .last()
                .expect("a chain holds a generation")
                .json
                .clone();
            v["generation"] = b.into();
            v["kind"] = KIND_INCREMENTAL.into();
            v["parent"] = a.into();
            v["parent_manifest_crc32"] = crc.into();
            let manifest = serde_json::to_vec(&v).unwrap_or_default();
            let gen = work.join(generation_dir_name(a));
            fs::write(gen.join(MANIFEST), &manifest)?;
            fs::write(gen.join(MANIFEST_SUM), sum_line(&manifest))?;
        }
        14..=18 => {
            write_forged(seeds, work, a, Some(top), Some(rng.next() as u32))?;
        }
        _ => {
            // A well-formed chain, every link signed, longer than a reader follows.
            let mut crc = write_forged(seeds, work, a, None, None)?;
            for g in a + 1..=a + read::MAX_CHAIN_LINKS as u64 + 1 {
                crc = write_forged(seeds, work, g, Some(g - 1), Some(crc))?;
            }
        }
    }
    Ok(())
}

fn interesting_number(rng: &mut Rng, old: &Value) -> Value {
    let old = old.as_u64().unwrap_or(0);
    match rng.below(12) {
        0 => 0.into(),
        1 => 1.into(),
        2 => 4095.into(),
        3 => (1u64 << 32).into(),
        4 => (1u64 << 48).into(),
        5 => u64::MAX.into(),
        6 => (u64::MAX - 4095).into(),
        7 => (-1i64).into(),
        8 => i64::MIN.into(),
        9 => old.wrapping_add(1 + rng.below(8192)).into(),
        10 => old.wrapping_mul(1 << rng.below(40)).into(),
        _ => rng.next().into(),
    }
}

/// Changes one random node of the manifest: a number, string, list or object.
fn mutate_value(v: &mut Value, rng: &mut Rng) {
    // Choose a random node (as a JSON pointer), walking down from the root.
    let mut pointer = String::new();
    let mut at: &Value = v;
    for _ in 0..rng.below(12) {
        let (step, next) = match at {
            Value::Object(m) if !m.is_empty() => {
                let (k, n) = m
                    .iter()
                    .nth(rng.below(m.len() as u64) as usize)
                    .expect("index");
                (k.replace('~', "~0").replace('/', "~1"), n)
            }
            Value::Array(a) if !a.is_empty() => {
                let i = rng.below(a.len() as u64) as usize;
                (i.to_string(), &a[i])
            }
            _ => break,
        };
        pointer.push('/');
        pointer.push_str(&step);
        at = next;
    }
    let Some(node) = v.pointer_mut(&pointer) else {
        return;
    };
    match node {
        Value::Number(_) => {
            let old = node.clone();
            *node = interesting_number(rng, &old);
        }
        Value::String(s) => {
            *s = match rng.below(5) {
                0 => String::new(),
                1 => "../../../../etc/passwd".into(),
                2 => "/dev/zero".into(),
                3 => "x".repeat(1 << rng.below(20)),
                _ => format!("{s}\u{0}{}", rng.next()),
            }
        }
        Value::Array(a) => match rng.below(4) {
            0 => a.clear(),
            1 if !a.is_empty() => {
                a.remove(rng.below(a.len() as u64) as usize);
            }
            2 if !a.is_empty() => {
                let e = a[rng.below(a.len() as u64) as usize].clone();
                for _ in 0..1 + rng.below(500) {
                    a.push(e.clone());
                }
            }
            _ => a.push(interesting_number(rng, &Value::Null)),
        },
        Value::Object(m) => {
            if let Some(k) = m.keys().nth(rng.below(m.len() as u64) as usize).cloned() {
                if rng.chance(50) {
                    m.remove(&k);
                } else {
                    m.insert(k, Value::Null);
                }
            }
        }
        Value::Bool(b) => *b = !*b,
        Value::Null => *node = interesting_number(rng, &Value::Null),
    }
}

fn mutate_bytes(b: &mut Vec<u8>, rng: &mut Rng) {
    match rng.below(4) {
        0 => {
            let n = rng.below(b.len() as u64 + 1) as usize;
            b.truncate(n);
        }
        1 => {
            for _ in 0..1 + rng.below(16) {
                if b.is_empty() {
                    break;
                }
                let i = rng.below(b.len() as u64) as usize;
                b[i] ^= 1 << rng.below(8);
            }
        }
        2 => {
            let at = rng.below(b.len() as u64 + 1) as usize;
            let extra: Vec<u8> = (0..1 + rng.below(64)).map(|_| rng.next() as u8).collect();
            b.splice(at..at, extra);
        }
        _ => b.extend((0..rng.below(8192)).map(|_| rng.next() as u8)),
    }
}

/// Rearranges the generation directory: files swapped for symlinks, FIFOs or
/// directories, files missing, extra or odd generation directories, `latest`
/// pointing elsewhere.
fn mutate_shape(work: &Path, gen: &Path, rng: &mut Rng) -> std::io::Result<()> {
    let files = [MANIFEST, MANIFEST_SUM, MEMORY];
    let victim = gen.join(files[rng.below(3) as usize]);
    match rng.below(9) {
        0 => fs::remove_file(&victim)?,
        1 => {
            fs::remove_file(&victim)?;
            symlink("/dev/zero", &victim)?;
        }
        2 => {
            fs::remove_file(&victim)?;
            let c = std::ffi::CString::new(victim.as_os_str().as_encoded_bytes())
                .map_err(std::io::Error::other)?;
            // SAFETY: mkfifo with a NUL-terminated path.
            unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        }
        3 => {
            fs::remove_file(&victim)?;
            fs::create_dir(&victim)?;
        }
        4 => {
            fs::remove_file(&victim)?;
            symlink(victim.file_name().unwrap_or_default(), &victim)?;
        }
        5 => fs::create_dir(work.join(generation_dir_name(1 + rng.below(1_000_000))))?,
        6 => fs::write(work.join(generation_dir_name(999_999)), b"not a directory")?,
        7 => {
            fs::remove_file(work.join(LATEST))?;
            let target = match rng.below(3) {
                0 => "gen-999999".to_string(),
                1 => "../../..".to_string(),
                _ => LATEST.to_string(),
            };
            symlink(target, work.join(LATEST))?;
        }
        _ => fs::create_dir(work.join("gen-99999999999999999999999"))?,
    }
    Ok(())
}
