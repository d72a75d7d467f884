/*
 * The vDSO's data page ([vvar]), written by vmctl and read by the guest.
 *
 * This layout is an ABI between vmctl and vDSO code that lives on in checkpoints:
 * a restored job keeps running the vDSO it started with (it holds pointers into
 * it), so a newer vmctl must keep writing the layout that vDSO reads. `seq` and
 * `mode` stay at offsets 0 and 4 forever: a vmctl that cannot serve a layout sets
 * `mode` to VVAR_MODE_SYSCALL and every call falls back to the real syscall.
 * vmctl/src/kernel/vdso.rs mirrors this struct (and checks its size).
 */
#ifndef VMWRAP_VVAR_H
#define VMWRAP_VVAR_H

#include <stdint.h>

#define VVAR_LAYOUT 1

/* `mode`: how the clocks are read. */
#define VVAR_MODE_SYSCALL 0 /* every clock call makes the syscall */
#define VVAR_MODE_TSC 1     /* clocks are computed from rdtsc and the model below */

/*
 * `getcpu_mode`. getcpu names the host CPU the calling guest thread's vCPU runs on
 * right now, which is what vmctl's getcpu syscall answers; each guest thread has a
 * vCPU and a host thread of its own, and this page is shared by all of them, so
 * vmctl writes VVAR_GETCPU_SYSCALL. (rdpid/rdtscp are no way out: on this platform
 * they report the host's TSC_AUX, but on KVM elsewhere the guest's own.)
 * VVAR_GETCPU_VVAR stays in the layout for a vmctl that can answer from the page,
 * e.g. a job bound to a single host CPU.
 */
#define VVAR_GETCPU_SYSCALL 0
#define VVAR_GETCPU_VVAR 1 /* getcpu_cpu / getcpu_node below */

/* Model clocks, in this order. */
#define VVAR_REALTIME 0
#define VVAR_MONOTONIC 1
#define VVAR_BOOTTIME 2
#define VVAR_MONOTONIC_RAW 3
#define VVAR_TAI 4
#define VVAR_NCLOCKS 5

#define VVAR_NRES 12 /* clock ids 0..11 */

/*
 * A clock's value at TSC `t` (t >= base_tsc) is
 *   base_ns + ((t - base_tsc) * mult + base_frac) >> 32   nanoseconds,
 * with the product taken in 128 bits. Carrying the fraction keeps a clock
 * continuous when vmctl starts a new segment.
 */
struct vvar_clock {
	uint64_t base_ns;
	uint64_t base_frac; /* 2^-32 ns, < 2^32 */
	uint64_t mult;      /* 2^-32 ns per TSC tick */
};

struct vvar {
	uint32_t seq; /* odd while vmctl writes */
	uint32_t mode;
	uint32_t layout;
	uint32_t getcpu_mode;
	uint64_t base_tsc;
	struct vvar_clock clock[VVAR_NCLOCKS];
	int32_t tz_minuteswest;
	int32_t tz_dsttime;
	/* clock_getres for clock ids 0..11; 0 means "ask the kernel". */
	int64_t res_ns[VVAR_NRES];
	uint32_t getcpu_cpu;
	uint32_t getcpu_node;
};

#endif
