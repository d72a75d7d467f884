//! Per-chunk compression of memory images (`--compress`).
//!
//! Each chunk (at most `CHUNK_BYTES` of pages) is compressed on its own, so the
//! parallel writers and readers still work chunk by chunk. A chunk that does not get
//! smaller is stored as it is. A compressed chunk is padded with zeros to a whole
//! page in the image, so every chunk still starts page-aligned for direct I/O.
//! The manifest records the codec, the compressed length and the CRC32 of the stored
//! bytes; the chunk's `crc32` stays that of its pages, checked after decompression.

use super::format::*;
use std::alloc::{self, Layout};

/// Default zstd level of `--compress zstd`: see docs/BENCHMARKS.md for why.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Highest zstd level accepted: beyond it zstd needs far more memory and time
/// than a checkpoint can spend.
pub const MAX_ZSTD_LEVEL: i32 = 19;

/// How chunks are compressed when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    Off,
    Zstd(i32),
    Lz4,
}

impl Compression {
    /// Parses `off`, `zstd`, `zstd:LEVEL` (1 to 19) or `lz4`.
    pub fn parse(s: &str) -> Result<Compression, String> {
        match s {
            "off" | "none" => Ok(Compression::Off),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd(DEFAULT_ZSTD_LEVEL)),
            _ => match s.strip_prefix("zstd:").map(str::parse::<i32>) {
                Some(Ok(level)) if (1..=MAX_ZSTD_LEVEL).contains(&level) => {
                    Ok(Compression::Zstd(level))
                }
                Some(_) => Err(format!(
                    "'{s}': the zstd level must be a whole number from 1 to {MAX_ZSTD_LEVEL}"
                )),
                None => Err(format!(
                    "'{s}' is not a compression: use off, lz4, zstd or zstd:LEVEL (1-{MAX_ZSTD_LEVEL})"
                )),
            },
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Off => write!(f, "off"),
            Compression::Zstd(level) => write!(f, "zstd:{level}"),
            Compression::Lz4 => write!(f, "lz4"),
        }
    }
}

/// A zeroed, page-aligned buffer (direct I/O needs the alignment), `CHUNK_BYTES`
/// unless told otherwise.
pub struct ChunkBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is owned memory, used by one thread at a time through &mut.
unsafe impl Send for ChunkBuf {}

impl ChunkBuf {
    pub fn new() -> ChunkBuf {
        Self::with_len(CHUNK_BYTES as usize)
    }

    pub fn with_len(len: usize) -> ChunkBuf {
        let layout =
            Layout::from_size_align(len.next_multiple_of(PAGE_SIZE as usize), PAGE_SIZE as usize)
                .expect("chunk layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        ChunkBuf { ptr, layout }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: layout.size() initialized (zeroed at allocation) bytes we own; &mut
        // self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Default for ChunkBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ChunkBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

/// One writer thread's compressor and output buffer.
pub struct Encoder {
    how: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    out: ChunkBuf,
}

impl Encoder {
    /// None when `how` is `Off`.
    pub fn new(how: Compression) -> Option<Encoder> {
        let zstd = match how {
            Compression::Off => return None,
            Compression::Zstd(level) => Some(zstd::bulk::Compressor::new(level).ok()?),
            Compression::Lz4 => None,
        };
        Some(Encoder {
            how,
            zstd,
            // lz4 wants room for its worst case even when the result is smaller.
            out: ChunkBuf::with_len(lz4_flex::block::get_maximum_output_size(
                CHUNK_BYTES as usize,
            )),
        })
    }

    /// Compresses a chunk's pages. Returns what to store (padded with zeros to a whole
    /// page) and its description, or None when the chunk does not get smaller, and is
    /// then stored as it is.
    pub fn encode(&mut self, data: &[u8]) -> Option<(&[u8], Compressed)> {
        // Only a saving of at least a page is worth a decompression.
        let room = data.len().checked_sub(PAGE_SIZE as usize)?;
        let out = self.out.as_mut_slice();
        let (codec, len) = match (self.how, self.zstd.as_mut()) {
            (Compression::Zstd(_), Some(z)) => (
                Codec::Zstd,
                z.compress_to_buffer(data, &mut out[..room]).ok()?,
            ),
            (Compression::Lz4, _) => (Codec::Lz4, lz4_flex::block::compress_into(data, out).ok()?),
            _ => return None,
        };
        if len > room {
            return None;
        }
        let padded = len.next_multiple_of(PAGE_SIZE as usize);
        let buf = self.out.as_mut_slice();
        buf[len..padded].fill(0);
        let stored = &buf[..padded];
        let described = Compressed {
            codec,
            bytes: len as u64,
            crc32: crc32fast::hash(&stored[..len]),
        };
        Some((stored, described))
    }
}

/// Decompresses a chunk's stored bytes into `out`, which has exactly the chunk's
/// size: nothing is allocated, and data that would decompress to more or fewer
/// bytes is refused.
pub fn decode(c: &Compressed, stored: &[u8], out: &mut [u8]) -> Result<(), String> {
    let n = match c.codec {
        Codec::Zstd => zstd::bulk::decompress_to_buffer(stored, out).map_err(|e| e.to_string()),
        Codec::Lz4 => lz4_flex::block::decompress_into(stored, out).map_err(|e| e.to_string()),
    }
    .map_err(|e| format!("does not decompress ({} data): {e}", c.codec.name()))?;
    if n != out.len() {
        return Err(format!(
            "decompresses to {n} bytes, the chunk holds {}",
            out.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_option() {
        assert_eq!(Compression::parse("off"), Ok(Compression::Off));
        assert_eq!(Compression::parse("lz4"), Ok(Compression::Lz4));
        assert_eq!(Compression::parse("zstd"), Ok(Compression::Zstd(1)));
        assert_eq!(Compression::parse("zstd:7"), Ok(Compression::Zstd(7)));
        assert!(Compression::parse("zstd:0")
            .unwrap_err()
            .contains("1 to 19"));
        assert!(Compression::parse("zstd:x")
            .unwrap_err()
            .contains("1 to 19"));
        assert!(Compression::parse("gzip")
            .unwrap_err()
            .contains("use off, lz4"));
        for s in ["off", "lz4", "zstd:3"] {
            assert_eq!(Compression::parse(s).unwrap().to_string(), s);
        }
    }

    fn round_trip(how: Compression) {
        let mut data = vec![0u8; CHUNK_BYTES as usize];
        for (i, b) in data.iter_mut().enumerate().step_by(7) {
            *b = (i % 251) as u8;
        }
        let mut enc = Encoder::new(how).expect("an encoder");
        let (stored, c) = enc.encode(&data).expect("compressible");
        assert!(stored.len() < data.len() && stored.len() % PAGE_SIZE as usize == 0);
        assert_eq!(c.crc32, crc32fast::hash(&stored[..c.bytes as usize]));
        let mut out = vec![0u8; data.len()];
        decode(&c, &stored[..c.bytes as usize], &mut out).unwrap();
        assert_eq!(out, data);
        // A smaller output buffer (a crafted chunk claiming fewer pages) is refused,
        // never overrun.
        let mut short = vec![0u8; data.len() / 2];
        assert!(decode(&c, &stored[..c.bytes as usize], &mut short).is_err());
        // Garbage is refused.
        let garbage = vec![0xa5u8; 1000];
        assert!(decode(&c, &garbage, &mut out).is_err());
    }

    #[test]
    fn zstd_and_lz4_round_trip_and_refuse_bad_data() {
        round_trip(Compression::Zstd(1));
        round_trip(Compression::Lz4);
    }

    #[test]
    fn incompressible_chunks_are_stored_as_they_are() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let data: Vec<u8> = (0..CHUNK_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for how in [Compression::Zstd(3), Compression::Lz4] {
            assert!(Encoder::new(how).unwrap().encode(&data).is_none());
        }
    }
}

/// Not a test: one thread's ratio and speed of each codec on a memory image
/// (docs/BENCHMARKS.md), e.g.
/// `PROBE=gen-000001/memory.img cargo test --release -p vmctl codec_speed -- --ignored --nocapture`
/// on an uncompressed generation.
#[cfg(test)]
mod speed {
    use super::*;
    #[test]
    #[ignore]
    fn codec_speed_probe() {
        let data = std::fs::read(std::env::var("PROBE").unwrap()).unwrap();
        for how in [Compression::Lz4, Compression::Zstd(1), Compression::Zstd(3)] {
            let mut e = Encoder::new(how).unwrap();
            let t = std::time::Instant::now();
            let mut stored = 0;
            let mut outs = Vec::new();
            for c in data.chunks(CHUNK_BYTES as usize) {
                match e.encode(c) {
                    Some((s, d)) => {
                        stored += s.len();
                        outs.push((s[..d.bytes as usize].to_vec(), d, c.len()));
                    }
                    None => stored += c.len(),
                }
            }
            let ct = t.elapsed().as_secs_f64();
            let mut out = vec![0u8; CHUNK_BYTES as usize];
            let t = std::time::Instant::now();
            let mut n = 0;
            for (s, d, len) in &outs {
                decode(d, s, &mut out[..*len]).unwrap();
                n += len;
            }
            let dt = t.elapsed().as_secs_f64();
            eprintln!(
                "{how}: ratio {:.3} compress {:.0} MB/s decompress {:.0} MB/s",
                stored as f64 / data.len() as f64,
                data.len() as f64 / ct / 1e6,
                n as f64 / dt / 1e6
            );
        }
    }
}
