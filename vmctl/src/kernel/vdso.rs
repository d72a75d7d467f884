//! The guest's vDSO and the clock model behind it.
//!
//! A clock read that exits to vmctl costs ~26 µs here; natively it is ~20 ns. So,
//! as Linux does, the guest gets a vDSO (built from `vmctl/vdso/` by build.rs) that
//! computes the clocks at CPL3 from `rdtsc` and a data page, `[vvar]`, that vmctl
//! keeps up to date. docs/ARCHITECTURE.md ("Clocks and the vDSO") has the design;
//! in short:
//!
//! - **Frames.** One vvar frame and the vDSO image's frames are allocated once per
//!   VM from the kernel-wide frame allocator and mapped into every address space by
//!   the loader (`[vvar]` just below `[vdso]`; the vDSO finds its data page at a
//!   fixed distance from its own ELF header). They live in guest RAM, so a
//!   checkpoint carries them; a restore keeps the image (the guest holds pointers
//!   into it) and rewrites the vvar page.
//! - **Model.** For each clock, value(tsc) = base + (tsc - base_tsc) · mult, with
//!   the TSC-to-ns rate calibrated against the host clock over the whole run. A
//!   helper thread samples the host clocks every [`REFRESH`] and starts a new
//!   segment at the model's own current value (so the clock is continuous and never
//!   goes back), with a rate slewed to close the gap to the host within
//!   [`SLEW_HORIZON_NS`]. The same model serves the clock syscalls, so a program
//!   mixing vDSO reads and raw syscalls sees one clock.
//! - **Restore.** A checkpoint saves the monotonic clocks' model values; a restore
//!   adds per-clock offsets to the new host's clocks so they continue from there.
//!   When the new host's TSC is behind, rdtsc is trapped (kernel/persist.rs) and the
//!   vvar says "make the syscall", which the model still serves.

use super::mm::{Access, AddressSpace, Backing, FrameAllocator, MmCtx, VmaKind};
use super::Errno;
use crate::machine::layout::PAGE_SIZE;
use crate::machine::GuestMemory;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The vDSO shared object, built from vmctl/vdso/ by build.rs.
pub const IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vdso.so"));

/// How often the helper thread re-reads the host clocks.
pub const REFRESH: Duration = Duration::from_millis(10);
/// A gap between model and host is closed by slewing over this long...
const SLEW_HORIZON_NS: i128 = 100_000_000;
/// ...at most this fast (1% of the rate, in parts per 2^32)...
const MAX_SLEW: i128 = (1 << 32) / 100;
/// ...unless it is larger than this: then a clock that may jump (REALTIME, TAI)
/// or a monotonic one that is behind steps to the host's value.
const STEP_NS: i128 = 20_000_000;

// Mirrors vmctl/vdso/vvar.h.
const VVAR_LAYOUT: u32 = 1;
const MODE_SYSCALL: u32 = 0;
const MODE_TSC: u32 = 1;
/// getcpu must name the host CPU the calling vCPU's thread runs on at that moment
/// (what the syscall answers), which no page shared by every vCPU can hold: the
/// vDSO's getcpu always makes the syscall (vvar.h has the alternatives).
const GETCPU_SYSCALL: u32 = 0;

/// The clocks the model keeps, in vvar order, with the host clock each follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelClock {
    Realtime = 0,
    Monotonic = 1,
    Boottime = 2,
    MonotonicRaw = 3,
    Tai = 4,
}
const NCLOCKS: usize = 5;
const CLOCKS: [ModelClock; NCLOCKS] = [
    ModelClock::Realtime,
    ModelClock::Monotonic,
    ModelClock::Boottime,
    ModelClock::MonotonicRaw,
    ModelClock::Tai,
];
const HOST_IDS: [libc::clockid_t; NCLOCKS] = [
    libc::CLOCK_REALTIME,
    libc::CLOCK_MONOTONIC,
    libc::CLOCK_BOOTTIME,
    libc::CLOCK_MONOTONIC_RAW,
    libc::CLOCK_TAI,
];

impl ModelClock {
    /// The model clock serving clock id `id` (coarse clocks read the fine ones).
    pub fn for_id(id: i32) -> Option<ModelClock> {
        Some(match id {
            libc::CLOCK_REALTIME | libc::CLOCK_REALTIME_COARSE => ModelClock::Realtime,
            libc::CLOCK_MONOTONIC | libc::CLOCK_MONOTONIC_COARSE => ModelClock::Monotonic,
            libc::CLOCK_BOOTTIME => ModelClock::Boottime,
            libc::CLOCK_MONOTONIC_RAW => ModelClock::MonotonicRaw,
            libc::CLOCK_TAI => ModelClock::Tai,
            _ => return None,
        })
    }

    /// Clocks that count from boot: they continue across a restore instead of
    /// following the new host. REALTIME and TAI are the host's wall clock.
    fn carried_across_restore(self) -> bool {
        matches!(
            self,
            ModelClock::Monotonic | ModelClock::Boottime | ModelClock::MonotonicRaw
        )
    }

    /// May jump backwards to follow the host (settimeofday, an NTP step).
    fn may_step_back(self) -> bool {
        matches!(self, ModelClock::Realtime | ModelClock::Tai)
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Segment {
    base_ns: u64,
    /// 2^-32 ns.
    base_frac: u64,
    /// 2^-32 ns per TSC tick.
    mult: u64,
}

impl Segment {
    /// The clock at `tsc`, as (ns, fraction in 2^-32 ns): exactly what vdso.c computes.
    fn at(&self, base_tsc: u64, tsc: u64) -> (u64, u64) {
        let delta = tsc.saturating_sub(base_tsc);
        let t = delta as u128 * self.mult as u128 + self.base_frac as u128;
        (
            self.base_ns.wrapping_add((t >> 32) as u64),
            (t & 0xffff_ffff) as u64,
        )
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Vvar {
    seq: u32,
    mode: u32,
    layout: u32,
    getcpu_mode: u32,
    base_tsc: u64,
    clock: [Segment; NCLOCKS],
    tz_minuteswest: i32,
    tz_dsttime: i32,
    res_ns: [i64; 12],
    getcpu_cpu: u32,
    getcpu_node: u32,
}
const _: () = assert!(std::mem::size_of::<Vvar>() == 256);
const _: () = assert!(std::mem::size_of::<Vvar>() as u64 <= PAGE_SIZE);

/// Where the vDSO lives in guest-physical memory. Kernel-wide: every address space
/// maps the same frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdsoFrames {
    pub vvar: u64,
    pub image: u64,
    pub image_pages: u64,
}

impl VdsoFrames {
    /// Allocates the frames and copies the vDSO image in.
    pub fn install(mem: &GuestMemory, frames: &mut FrameAllocator) -> Option<VdsoFrames> {
        let image_pages = (IMAGE.len() as u64).div_ceil(PAGE_SIZE);
        let base = frames.alloc_contiguous_pages(mem, 1 + image_pages)?;
        let f = VdsoFrames {
            vvar: base,
            image: base + PAGE_SIZE,
            image_pages,
        };
        mem.write(f.image, IMAGE);
        Some(f)
    }

    /// Whether a checkpoint's frames lie inside this VM's RAM, past the system area.
    pub fn fits(&self, ram: u64) -> bool {
        let aligned = self.vvar.is_multiple_of(PAGE_SIZE) && self.image.is_multiple_of(PAGE_SIZE);
        let end = |start: u64, pages: u64| {
            pages
                .checked_mul(PAGE_SIZE)
                .and_then(|l| start.checked_add(l))
        };
        aligned
            && self.vvar >= crate::machine::layout::SYSTEM_SIZE
            && self.image >= crate::machine::layout::SYSTEM_SIZE
            && (1..=16).contains(&self.image_pages)
            && end(self.vvar, 1).is_some_and(|e| e <= ram)
            && end(self.image, self.image_pages).is_some_and(|e| e <= ram)
    }

    /// Whether guest-physical `[gpa, gpa+len)` is the vvar page or inside the image:
    /// the only frames a [`Backing::Kernel`] VMA may map.
    pub fn covers(&self, gpa: u64, len: u64) -> bool {
        let inside = |start: u64, pages: u64| {
            gpa >= start && gpa.saturating_add(len) <= start + pages * PAGE_SIZE
        };
        inside(self.vvar, 1) || inside(self.image, self.image_pages)
    }

    /// Maps `[vvar]` and `[vdso]` into `mm` (top-down, like any mmap) and returns the
    /// address of the vDSO's ELF header, for AT_SYSINFO_EHDR.
    pub fn map_into(&self, mm: &mut AddressSpace, ctx: &mut MmCtx) -> Result<u64, Errno> {
        let len = (1 + self.image_pages) * PAGE_SIZE;
        let start = mm.find_free(0, len).ok_or(Errno(libc::ENOMEM))?;
        let image_va = start + PAGE_SIZE;
        mm.map(
            ctx,
            start,
            PAGE_SIZE,
            libc::PROT_READ,
            false,
            Backing::Kernel { gpa: self.vvar },
            VmaKind::Vvar,
        )?;
        mm.map(
            ctx,
            image_va,
            self.image_pages * PAGE_SIZE,
            libc::PROT_READ | libc::PROT_EXEC,
            false,
            Backing::Kernel { gpa: self.image },
            VmaKind::Vdso,
        )?;
        // Mapped now rather than on first touch: each fault would be an exit.
        let mut va = start;
        while va < start + len {
            mm.translate_for(ctx, va, Access::Read)?;
            va += PAGE_SIZE;
        }
        Ok(image_va)
    }
}

/// One reading of the host clocks, each bracketed by TSC reads.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Per clock: (TSC at the middle of the bracket, host ns).
    at: [(u64, i64); NCLOCKS],
}

pub(super) fn host_clock(id: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the local timespec. The raw syscall, never
    // the vDSO: this may run on the vCPU thread, where rdtsc can be trapped.
    unsafe { libc::syscall(libc::SYS_clock_gettime, id, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

impl Sample {
    /// Takes the tightest of a few brackets per clock: a bracket the thread was
    /// preempted in says little about when the clock was read.
    fn take() -> Sample {
        let mut at = [(0u64, 0i64); NCLOCKS];
        for (i, &id) in HOST_IDS.iter().enumerate() {
            let mut best = (u64::MAX, 0u64, 0i64);
            for _ in 0..3 {
                let t0 = crate::clock::host_tsc();
                let ns = host_clock(id);
                let t1 = crate::clock::host_tsc();
                let width = t1.wrapping_sub(t0);
                if width < best.0 {
                    best = (width, t0 + width / 2, ns);
                }
            }
            at[i] = (best.1, best.2);
        }
        Sample { at }
    }
}

/// The clock model: vmctl's copy of what the vvar page says, plus what it needs to
/// compute the next segment.
#[derive(Debug)]
struct Model {
    /// Added to each host clock (non-zero only for the monotonic ones after a restore).
    offsets: [i64; NCLOCKS],
    /// The first sample: the rate is measured over the whole run, so it gets more
    /// precise the longer the job runs.
    anchor: Sample,
    /// TSC ticks to ns (2^-32 ns per tick) for the NTP-disciplined clocks and for
    /// MONOTONIC_RAW.
    rate: u64,
    raw_rate: u64,
    base_tsc: u64,
    clock: [Segment; NCLOCKS],
    published: bool,
    /// The largest gap between model and host seen at a refresh (where it is
    /// largest, just before being corrected), not counting steps.
    max_error_ns: i128,
    /// Whether the guest may compute the clocks itself (rdtsc not trapped, TSC
    /// invariant).
    guest_reads_tsc: bool,
    /// Host facts the page also carries, read once rather than inside every write
    /// section: clock_getres per clock id, and the timezone.
    res_ns: [i64; 12],
    timezone: (i32, i32),
}

/// Minimum calibration baseline before the first segment is published.
const MIN_BASELINE_NS: i64 = 2_000_000;

fn rate_between(a: (u64, i64), b: (u64, i64)) -> Option<u64> {
    let ticks = b.0.checked_sub(a.0).filter(|&t| t > 0)?;
    let ns = b.1.checked_sub(a.1).filter(|&n| n > 0)?;
    u64::try_from(((ns as u128) << 32) / ticks as u128).ok()
}

impl Model {
    fn rates(&self, now: &Sample) -> Option<(u64, u64)> {
        let mono = ModelClock::Monotonic as usize;
        let raw = ModelClock::MonotonicRaw as usize;
        Some((
            rate_between(self.anchor.at[mono], now.at[mono])?,
            rate_between(self.anchor.at[raw], now.at[raw])?,
        ))
    }

    /// The host's clock `c` (plus its offset) extrapolated to `tsc`.
    fn host_at(&self, sample: &Sample, c: usize, tsc: u64) -> i128 {
        let (t, ns) = sample.at[c];
        let rate = if c == ModelClock::MonotonicRaw as usize {
            self.raw_rate
        } else {
            self.rate
        };
        let dt = tsc as i128 - t as i128;
        ns as i128 + self.offsets[c] as i128 + ((dt * rate as i128) >> 32)
    }

    /// Starts a new segment at `tsc` from `sample`.
    fn advance(&mut self, sample: &Sample, tsc: u64) {
        if let Some((rate, raw_rate)) = self.rates(sample) {
            self.rate = rate;
            self.raw_rate = raw_rate;
        }
        for (c, clock) in CLOCKS.into_iter().enumerate() {
            let rate = if clock == ModelClock::MonotonicRaw {
                self.raw_rate
            } else {
                self.rate
            } as i128;
            let target = self.host_at(sample, c, tsc).max(0);
            let (now_ns, now_frac) = self.clock[c].at(self.base_tsc, tsc);
            let err = target - now_ns as i128;
            let step =
                !self.published || err > STEP_NS || (err < -STEP_NS && clock.may_step_back());
            if !step {
                self.max_error_ns = self.max_error_ns.max(err.abs());
            }
            self.clock[c] = if step {
                Segment {
                    base_ns: target as u64,
                    base_frac: 0,
                    mult: rate as u64,
                }
            } else {
                // Continue from exactly where the old segment is at `tsc`.
                let slew = (err * (1 << 32) / SLEW_HORIZON_NS).clamp(-MAX_SLEW, MAX_SLEW);
                Segment {
                    base_ns: now_ns,
                    base_frac: now_frac,
                    mult: (rate + ((rate * slew) >> 32)).max(1) as u64,
                }
            };
        }
        self.base_tsc = tsc;
        self.published = true;
    }

    fn now(&self, c: ModelClock, tsc: u64) -> i64 {
        self.clock[c as usize].at(self.base_tsc, tsc).0 as i64
    }
}

/// The guest's clocks: the model, and the vvar page it is published in.
pub struct GuestClocks {
    mem: Arc<GuestMemory>,
    /// The vvar frame, or None for a job restored from a checkpoint made before
    /// vmctl had a vDSO (the model then only serves syscalls).
    vvar: Option<u64>,
    model: Mutex<Model>,
    stop: AtomicBool,
    /// VMCTL_TEST_HOST_CLOCKS: the clock syscalls read the host clocks directly, so
    /// a test can compare the vDSO against them.
    syscalls_read_host: bool,
}

fn tsc_is_invariant() -> bool {
    // CPUID 0x8000_0007 EDX bit 8: the TSC runs at a constant rate in every state.
    let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    max >= 0x8000_0007 && std::arch::x86_64::__cpuid(0x8000_0007).edx & (1 << 8) != 0
}

impl GuestClocks {
    /// Starts the model. `saved` holds the guest's monotonic clocks at a checkpoint
    /// (None on a fresh start); `guest_reads_tsc` is false when rdtsc is trapped.
    /// The first segment is published by [`GuestClocks::start`], which waits until
    /// this anchor sample is old enough to measure the TSC rate against.
    pub fn new(
        mem: Arc<GuestMemory>,
        vvar: Option<u64>,
        saved: Option<&SavedClocks>,
        guest_reads_tsc: bool,
    ) -> Arc<GuestClocks> {
        let anchor = Sample::take();
        let mut offsets = [0i64; NCLOCKS];
        if let Some(s) = saved {
            for (c, value) in [
                (ModelClock::Monotonic, s.monotonic_ns),
                (ModelClock::Boottime, s.boottime_ns),
                (ModelClock::MonotonicRaw, s.monotonic_raw_ns),
            ] {
                debug_assert!(c.carried_across_restore());
                offsets[c as usize] = value - anchor.at[c as usize].1;
            }
        }
        Arc::new(GuestClocks {
            mem,
            vvar,
            model: Mutex::new(Model {
                offsets,
                anchor,
                rate: 0,
                raw_rate: 0,
                base_tsc: 0,
                clock: [Segment::default(); NCLOCKS],
                published: false,
                max_error_ns: 0,
                guest_reads_tsc: guest_reads_tsc && tsc_is_invariant(),
                res_ns: resolutions(),
                timezone: host_timezone(),
            }),
            stop: AtomicBool::new(false),
            syscalls_read_host: std::env::var_os("VMCTL_TEST_HOST_CLOCKS").is_some(),
        })
    }

    /// The largest gap between the guest's clocks and the host's measured so far.
    pub fn max_error_ns(&self) -> i64 {
        self.lock().max_error_ns as i64
    }

    /// What is added to the host's clock `c` for the guest.
    pub fn offset_ns(&self, c: ModelClock) -> i64 {
        self.lock().offsets[c as usize]
    }

    /// Publishes the first segment, once the anchor is far enough back for a rate.
    fn calibrate(&self) {
        loop {
            let sample = Sample::take();
            let mono = ModelClock::Monotonic as usize;
            let waited = sample.at[mono].1 - self.lock().anchor.at[mono].1;
            if waited >= MIN_BASELINE_NS {
                self.refresh_with(&sample);
                return;
            }
            std::thread::sleep(Duration::from_nanos((MIN_BASELINE_NS - waited) as u64));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Samples the host and publishes a new segment.
    pub fn refresh(&self) {
        self.refresh_with(&Sample::take());
    }

    fn refresh_with(&self, sample: &Sample) {
        let mut model = self.lock();
        let Some(vvar) = self.vvar_page() else {
            let tsc = crate::clock::host_tsc();
            model.advance(sample, tsc);
            return;
        };
        // The segment starts at a TSC read inside the write section: a guest read
        // that saw the old segment took its TSC before the section began, so it is
        // at most the new segment's starting value.
        let seq = vvar.seq();
        seq.store(
            seq.load(Ordering::Relaxed).wrapping_add(1) | 1,
            Ordering::Relaxed,
        );
        fence(Ordering::SeqCst);
        let tsc = crate::clock::host_tsc();
        model.advance(sample, tsc);
        let page = Vvar {
            seq: 0,
            mode: if model.guest_reads_tsc {
                MODE_TSC
            } else {
                MODE_SYSCALL
            },
            layout: VVAR_LAYOUT,
            getcpu_mode: GETCPU_SYSCALL,
            base_tsc: model.base_tsc,
            clock: model.clock,
            tz_minuteswest: model.timezone.0,
            tz_dsttime: model.timezone.1,
            res_ns: model.res_ns,
            getcpu_cpu: 0,
            getcpu_node: 0,
        };
        vvar.write(page);
        fence(Ordering::SeqCst);
        seq.store(
            seq.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Release,
        );
    }

    fn vvar_page(&self) -> Option<VvarPage<'_>> {
        let gpa = self.vvar?;
        let ptr = self.mem.host_ptr(gpa, PAGE_SIZE)?;
        Some(VvarPage {
            ptr: ptr as *mut Vvar,
            _mem: &self.mem,
        })
    }

    /// Clock `c` as the guest sees it now (the clock syscalls).
    pub fn now_ns(&self, c: ModelClock) -> i64 {
        if self.syscalls_read_host {
            return host_clock(HOST_IDS[c as usize]) + self.lock().offsets[c as usize];
        }
        let model = self.lock();
        model.now(c, crate::clock::host_tsc())
    }

    /// The monotonic clocks to carry into a checkpoint: the model's values now, which
    /// no read the (frozen) guest has made can exceed.
    pub fn save(&self) -> SavedClocks {
        SavedClocks {
            monotonic_ns: self.now_ns(ModelClock::Monotonic),
            boottime_ns: self.now_ns(ModelClock::Boottime),
            monotonic_raw_ns: self.now_ns(ModelClock::MonotonicRaw),
        }
    }

    /// Keeps the vvar page still until the guard is dropped: a checkpoint writes
    /// guest RAM with checksums, and a page changing under it would fail them.
    pub fn hold(&self) -> Held<'_> {
        Held(self.lock())
    }

    /// Publishes the first segment and starts the helper thread that refreshes the
    /// model every [`REFRESH`]. It stops when the returned handle is dropped.
    pub fn start(self: &Arc<Self>) -> Refresher {
        self.calibrate();
        let clocks = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vmctl-clocks".into())
            .spawn(move || {
                crate::control::signals::block_in_this_thread();
                // A thread inherits its creator's rdtsc trap (PR_SET_TSC); this one
                // reads the TSC for itself.
                // SAFETY: changes only this thread's rdtsc permission.
                unsafe { libc::prctl(libc::PR_SET_TSC, libc::PR_TSC_ENABLE) };
                while !clocks.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(REFRESH);
                    clocks.refresh();
                }
            });
        if let Err(e) = spawned {
            // The clocks stay correct through the syscalls; only the vDSO's drift
            // bound is lost, so the guest is told to use the syscalls.
            eprintln!("vmctl: warning: cannot start the clock thread ({e}); guest clock reads will be slower");
            self.lock().guest_reads_tsc = false;
            self.refresh();
        }
        Refresher(self.clone())
    }
}

/// While alive, the vvar page does not change.
pub struct Held<'a>(#[allow(dead_code)] MutexGuard<'a, Model>);

/// Stops the refresher thread when dropped (it holds its own reference to guest
/// RAM, so it never writes to freed memory).
pub struct Refresher(Arc<GuestClocks>);

impl Drop for Refresher {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

/// The vvar page in guest RAM.
struct VvarPage<'a> {
    ptr: *mut Vvar,
    _mem: &'a Arc<GuestMemory>,
}

impl VvarPage<'_> {
    fn seq(&self) -> &AtomicU32 {
        // SAFETY: `ptr` points at a page of guest RAM that lives as long as `_mem`;
        // `seq` is its first, 4-byte aligned field. The guest only reads it.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.ptr).seq)) }
    }

    /// Writes everything but `seq`, inside the caller's write section.
    fn write(&self, v: Vvar) {
        // SAFETY: as above; volatile because the guest reads the page concurrently
        // (it retries on a torn read, which the seqlock detects).
        unsafe {
            let p = self.ptr;
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).mode), v.mode);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).layout), v.layout);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).getcpu_mode), v.getcpu_mode);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).base_tsc), v.base_tsc);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).clock), v.clock);
            std::ptr::write_volatile(
                std::ptr::addr_of_mut!((*p).tz_minuteswest),
                v.tz_minuteswest,
            );
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).tz_dsttime), v.tz_dsttime);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).res_ns), v.res_ns);
        }
    }
}

/// The host's clock_getres for clock ids 0..11, 0 where it has none.
fn resolutions() -> [i64; 12] {
    let mut out = [0i64; 12];
    for (id, r) in out.iter_mut().enumerate() {
        if ModelClock::for_id(id as i32).is_none() {
            continue; // the vDSO asks the kernel for the others
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_getres writes into the local timespec.
        if unsafe { libc::syscall(libc::SYS_clock_getres, id as i32, &mut ts) } == 0 {
            *r = ts.tv_sec * 1_000_000_000 + ts.tv_nsec;
        }
    }
    out
}

/// The host kernel's timezone (what gettimeofday reports in its second argument).
fn host_timezone() -> (i32, i32) {
    let mut tv = [0i64; 2];
    let mut tz = [0i32; 2];
    // SAFETY: gettimeofday writes into the local buffers.
    unsafe { libc::syscall(libc::SYS_gettimeofday, tv.as_mut_ptr(), tz.as_mut_ptr()) };
    (tz[0], tz[1])
}

/// The guest's monotonic clocks at a checkpoint.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SavedClocks {
    pub monotonic_ns: i64,
    pub boottime_ns: i64,
    pub monotonic_raw_ns: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(tsc: u64, ns: i64) -> Sample {
        Sample {
            at: [(tsc, ns); NCLOCKS],
        }
    }

    fn model(anchor: Sample) -> Model {
        Model {
            offsets: [0; NCLOCKS],
            anchor,
            rate: 0,
            raw_rate: 0,
            base_tsc: 0,
            clock: [Segment::default(); NCLOCKS],
            published: false,
            max_error_ns: 0,
            guest_reads_tsc: true,
            res_ns: [0; 12],
            timezone: (0, 0),
        }
    }

    #[test]
    fn segments_are_continuous_and_converge_on_the_host() {
        // A 3 GHz TSC against a host clock running 50 ppm fast of the first estimate.
        let mut m = model(sample(0, 0));
        let ticks = |ns: i64| (ns as u64) * 3;
        m.advance(&sample(ticks(2_000_000), 2_000_000), ticks(2_000_000));
        let mut last = 0;
        for i in 1..=200i64 {
            let host_ns = 2_000_000 + i * 10_000_000;
            let host = host_ns + host_ns / 20_000; // +50 ppm
            let tsc = ticks(host_ns);
            let before = m.now(ModelClock::Monotonic, tsc);
            m.advance(&sample(tsc, host), tsc);
            let after = m.now(ModelClock::Monotonic, tsc);
            assert_eq!(before, after, "a new segment starts where the old one is");
            assert!(after >= last, "monotonic");
            last = after;
            if i > 50 {
                assert!((after - host).abs() < 1_000, "step {i}: {after} vs {host}");
            }
        }
    }

    #[test]
    fn realtime_steps_but_monotonic_never_goes_back() {
        let mut m = model(sample(0, 1_000_000_000));
        m.advance(&sample(3_000_000, 1_001_000_000), 3_000_000);
        let mono_before = m.now(ModelClock::Monotonic, 6_000_000);
        // The host's clocks all jump back by a second.
        let mut s = sample(6_000_000, 2_000_000);
        s.at[ModelClock::Realtime as usize].1 = 2_000_000;
        m.advance(&s, 6_000_000);
        assert!(m.now(ModelClock::Realtime, 6_000_000) < 10_000_000);
        assert!(m.now(ModelClock::Monotonic, 6_000_000) >= mono_before);
        assert!(m.now(ModelClock::Monotonic, 9_000_000) >= mono_before);
    }

    #[test]
    fn the_image_is_one_flat_segment_with_the_exported_symbols() {
        let elf = goblin::elf::Elf::parse(IMAGE).expect("vdso.so parses");
        let loads: Vec<_> = elf
            .program_headers
            .iter()
            .filter(|p| p.p_type == goblin::elf::program_header::PT_LOAD)
            .collect();
        assert_eq!(loads.len(), 1);
        assert_eq!((loads[0].p_offset, loads[0].p_vaddr), (0, 0));
        assert!(loads[0].p_flags & goblin::elf::program_header::PF_W == 0);
        assert!(elf.dynrelas.is_empty() && elf.dynrels.is_empty() && elf.pltrelocs.is_empty());
        let names: Vec<&str> = elf
            .dynsyms
            .iter()
            .filter_map(|s| elf.dynstrtab.get_at(s.st_name))
            .collect();
        for want in [
            "__vdso_clock_gettime",
            "__vdso_gettimeofday",
            "__vdso_time",
            "__vdso_clock_getres",
            "__vdso_getcpu",
            "clock_gettime",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
    }
}
