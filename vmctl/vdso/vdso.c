/*
 * vmwrap's vDSO: clock_gettime, gettimeofday, time and clock_getres at CPL3,
 * without an exit to vmctl; getcpu answers from the page only when vmctl says it
 * can (vvar.h: today it never does, and getcpu makes the syscall). The clocks are a linear model of the host's,
 * which vmctl keeps in the [vvar] page mapped just below this image and refreshes
 * every few milliseconds (vmctl/src/kernel/vdso.rs has the design and the error
 * bound). Anything the model does not cover (CPU-time clocks, unknown ids, a
 * model switched off because rdtsc is trapped) makes the real syscall, which
 * vmctl serves from the same model, so the two never disagree.
 *
 * Built freestanding: no libc, no relocations, no writable data.
 */
#include <stddef.h>
#include <stdint.h>
#include "vvar.h"

#define PAGE_SIZE 4096
#define NSEC_PER_SEC 1000000000ULL

#define SYS_gettimeofday 96
#define SYS_time 201
#define SYS_clock_gettime 228
#define SYS_clock_getres 229
#define SYS_getcpu 309

/* Linux's own types, spelled out: there are no system headers here. */
struct kernel_timespec {
	int64_t tv_sec;
	int64_t tv_nsec;
};
struct kernel_timeval {
	int64_t tv_sec;
	int64_t tv_usec;
};
struct kernel_timezone {
	int32_t tz_minuteswest;
	int32_t tz_dsttime;
};

/* The ELF header of this image, placed by the linker at its first byte. */
extern const char __ehdr_start[] __attribute__((visibility("hidden")));

/* [vvar] is the page just below the image. */
static inline const volatile struct vvar *vvar(void)
{
	uintptr_t image = (uintptr_t)__ehdr_start;
	/* Hides the address's origin from the compiler, which would otherwise warn
	   about reading outside __ehdr_start's (unknown) bounds. */
	__asm__("" : "+r"(image));
	return (const volatile struct vvar *)(image - PAGE_SIZE);
}

static inline long syscall2(long nr, long a, long b)
{
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "0"(nr), "D"(a), "S"(b)
			 : "rcx", "r11", "memory");
	return ret;
}

static inline long syscall3(long nr, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "0"(nr), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

/* lfence keeps rdtsc from running ahead of the seqlock's first load. */
static inline uint64_t rdtsc_ordered(void)
{
	uint32_t lo, hi;
	__asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
	return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" ::: "memory");
}

/* The model clock serving `id`, or -1 for the syscall. */
static inline int model_clock(int id)
{
	switch (id) {
	case 0: /* CLOCK_REALTIME */
	case 5: /* CLOCK_REALTIME_COARSE */
		return VVAR_REALTIME;
	case 1: /* CLOCK_MONOTONIC */
	case 6: /* CLOCK_MONOTONIC_COARSE */
		return VVAR_MONOTONIC;
	case 7: /* CLOCK_BOOTTIME */
		return VVAR_BOOTTIME;
	case 4: /* CLOCK_MONOTONIC_RAW */
		return VVAR_MONOTONIC_RAW;
	case 11: /* CLOCK_TAI */
		return VVAR_TAI;
	default:
		return -1;
	}
}

/*
 * Reads model clock `c` in nanoseconds. Returns 0 when the model is off (the
 * caller then makes the syscall).
 */
static inline int read_clock(int c, uint64_t *ns)
{
	const volatile struct vvar *v = vvar();
	uint32_t seq;
	uint64_t value;
	do {
		seq = v->seq;
		if (seq & 1) {
			cpu_relax();
			continue;
		}
		__asm__ volatile("" ::: "memory");
		if (v->mode != VVAR_MODE_TSC)
			return 0;
		uint64_t tsc = rdtsc_ordered();
		uint64_t base_tsc = v->base_tsc;
		/* Another CPU's TSC may be a little behind the one vmctl sampled. */
		uint64_t delta = tsc > base_tsc ? tsc - base_tsc : 0;
		unsigned __int128 t = (unsigned __int128)delta * v->clock[c].mult +
				      v->clock[c].base_frac;
		value = v->clock[c].base_ns + (uint64_t)(t >> 32);
		__asm__ volatile("" ::: "memory");
	} while ((seq & 1) || v->seq != seq);
	*ns = value;
	return 1;
}

int __vdso_clock_gettime(int id, struct kernel_timespec *ts)
{
	int c = model_clock(id);
	uint64_t ns;
	if (c < 0 || !read_clock(c, &ns))
		return (int)syscall2(SYS_clock_gettime, id, (long)ts);
	ts->tv_sec = (int64_t)(ns / NSEC_PER_SEC);
	ts->tv_nsec = (int64_t)(ns % NSEC_PER_SEC);
	return 0;
}

int __vdso_gettimeofday(struct kernel_timeval *tv, struct kernel_timezone *tz)
{
	uint64_t ns;
	if (!read_clock(VVAR_REALTIME, &ns))
		return (int)syscall2(SYS_gettimeofday, (long)tv, (long)tz);
	if (tv) {
		tv->tv_sec = (int64_t)(ns / NSEC_PER_SEC);
		tv->tv_usec = (int64_t)(ns % NSEC_PER_SEC / 1000);
	}
	if (tz) {
		const volatile struct vvar *v = vvar();
		tz->tz_minuteswest = v->tz_minuteswest;
		tz->tz_dsttime = v->tz_dsttime;
	}
	return 0;
}

int64_t __vdso_time(int64_t *t)
{
	uint64_t ns;
	if (!read_clock(VVAR_REALTIME, &ns))
		return syscall2(SYS_time, (long)t, 0);
	int64_t s = (int64_t)(ns / NSEC_PER_SEC);
	if (t)
		*t = s;
	return s;
}

int __vdso_clock_getres(int id, struct kernel_timespec *res)
{
	const volatile struct vvar *v = vvar();
	int64_t ns = id >= 0 && id < VVAR_NRES ? v->res_ns[id] : 0;
	if (ns <= 0)
		return (int)syscall2(SYS_clock_getres, id, (long)res);
	if (res) {
		res->tv_sec = ns / (int64_t)NSEC_PER_SEC;
		res->tv_nsec = ns % (int64_t)NSEC_PER_SEC;
	}
	return 0;
}

int __vdso_getcpu(unsigned *cpu, unsigned *node, void *unused)
{
	const volatile struct vvar *v = vvar();
	if (v->getcpu_mode != VVAR_GETCPU_VVAR)
		return (int)syscall3(SYS_getcpu, (long)cpu, (long)node,
				     (long)unused);
	if (cpu)
		*cpu = v->getcpu_cpu;
	if (node)
		*node = v->getcpu_node;
	return 0;
}

/* The unversioned names some libcs (and Linux's own vDSO) also export. */
int clock_gettime(int, struct kernel_timespec *)
	__attribute__((weak, alias("__vdso_clock_gettime")));
int gettimeofday(struct kernel_timeval *, struct kernel_timezone *)
	__attribute__((weak, alias("__vdso_gettimeofday")));
int64_t time(int64_t *) __attribute__((weak, alias("__vdso_time")));
int clock_getres(int, struct kernel_timespec *)
	__attribute__((weak, alias("__vdso_clock_getres")));
int getcpu(unsigned *, unsigned *, void *)
	__attribute__((weak, alias("__vdso_getcpu")));

_Static_assert(offsetof(struct vvar, seq) == 0, "seq is at offset 0 forever");
_Static_assert(offsetof(struct vvar, mode) == 4, "mode is at offset 4 forever");
_Static_assert(sizeof(struct vvar) == 256, "vmctl/src/kernel/vdso.rs mirrors this");
_Static_assert(sizeof(struct vvar) <= PAGE_SIZE, "one page");
