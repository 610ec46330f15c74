//! Guest time: monotonic ns since boot, read from the TSC.
//!
//! Under Ferry's VMM the VMM owns the relation between TSC and guest time
//! through the clock page ([`ferry_abi::ClockPage`]) and rewrites it whenever
//! the guest resumes (after a pause, a restore, a migration), so guest time
//! runs on across all of them. Elsewhere the runtime fixes the relation at
//! boot from the loader's TSC rate (uhyve's boot info), or measures the rate.
//!
//! `rdtsc` traps on PVM (~1.5 us): callers read [`now`] once per loop turn.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering, compiler_fence};
use core::time::Duration;

use ferry_abi::ClockPage;

use crate::arch::{apic, cpu};

static PAGE: AtomicUsize = AtomicUsize::new(0);
static FIXED_TSC_BASE: AtomicU64 = AtomicU64::new(0);
static FIXED_MULT: AtomicU64 = AtomicU64::new(0);
static FIXED_KHZ: AtomicU64 = AtomicU64::new(0);
static FIXED_UNIX_AT_ZERO: AtomicU64 = AtomicU64::new(0);

pub(crate) fn init_clock_page(page: *const ClockPage) {
    PAGE.store(page as usize, Ordering::Release);
}

pub(crate) fn init_fixed(tsc_khz: u64, unix_ns_at_zero: u64) {
    let khz = tsc_khz.max(1);
    FIXED_TSC_BASE.store(cpu::rdtsc(), Ordering::Relaxed);
    FIXED_MULT.store(ferry_abi::mult_for_khz(khz), Ordering::Relaxed);
    FIXED_KHZ.store(khz, Ordering::Relaxed);
    FIXED_UNIX_AT_ZERO.store(unix_ns_at_zero, Ordering::Relaxed);
}

/// A consistent copy of the clock page (seqlock read).
fn read_page(page: *const ClockPage) -> ClockPage {
    loop {
        // SAFETY: the VMM maps the clock page for the VM's whole life; it is
        // read with volatile loads because the VMM rewrites it behind us.
        let before = unsafe { core::ptr::read_volatile(&raw const (*page).generation) };
        if before & 1 == 1 {
            core::hint::spin_loop();
            continue;
        }
        compiler_fence(Ordering::Acquire);
        // SAFETY: as above.
        let copy = unsafe { core::ptr::read_volatile(page) };
        compiler_fence(Ordering::Acquire);
        // SAFETY: as above.
        let after = unsafe { core::ptr::read_volatile(&raw const (*page).generation) };
        if before == after {
            return copy;
        }
    }
}

fn current_page() -> ClockPage {
    match PAGE.load(Ordering::Acquire) {
        0 => ClockPage {
            tsc_base: FIXED_TSC_BASE.load(Ordering::Relaxed),
            mult: FIXED_MULT.load(Ordering::Relaxed),
            tsc_khz: FIXED_KHZ.load(Ordering::Relaxed),
            unix_ns_at_zero: FIXED_UNIX_AT_ZERO.load(Ordering::Relaxed),
            ..ClockPage::default()
        },
        p => read_page(p as *const ClockPage),
    }
}

/// A point in guest monotonic time (ns since boot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    /// The instant `ns` nanoseconds after boot.
    pub const fn from_nanos(ns: u64) -> Instant {
        Instant(ns)
    }
    /// Nanoseconds since the guest booted.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }
    /// Time since boot as a duration.
    pub const fn since_boot(self) -> Duration {
        Duration::from_nanos(self.0)
    }
    /// `self + d`, saturating.
    pub fn saturating_add(self, d: Duration) -> Instant {
        Instant(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
    /// Time from `earlier` to `self` (zero if `earlier` is later).
    pub fn duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// Guest monotonic time now. Never goes backwards.
pub fn now() -> Instant {
    Instant(current_page().ns_at(cpu::rdtsc()))
}

/// Wall-clock time now as ns since the Unix epoch, if the platform said.
pub fn unix_time_ns() -> Option<u64> {
    let page = current_page();
    (page.unix_ns_at_zero != 0).then(|| {
        page.unix_ns_at_zero
            .saturating_add(page.ns_at(cpu::rdtsc()))
    })
}

/// The TSC rate the guest's time is based on, in kHz.
pub fn tsc_khz() -> u64 {
    current_page().tsc_khz
}

/// Sleeps until `deadline`: HLT with a one-shot TSC-deadline timer
/// (tickless), so an idle guest costs the host nothing. Without an APIC
/// timer it polls.
pub fn sleep_until(deadline: Instant) {
    loop {
        let page = current_page();
        let tsc = cpu::rdtsc();
        let now = page.ns_at(tsc);
        if now >= deadline.0 {
            return;
        }
        if !apic::timer_ready() {
            core::hint::spin_loop();
            continue;
        }
        let ticks = ferry_abi::ns_to_ticks(deadline.0 - now, page.tsc_khz).max(1);
        cpu::disable_interrupts();
        apic::arm_deadline(tsc.saturating_add(ticks));
        cpu::enable_interrupts_and_halt();
    }
}

/// Waits for one wake-up: any interrupt (a device's, say), or `deadline`
/// if given. `still_idle` runs with interrupts off just before the HLT; if
/// it says work arrived meanwhile, there is no HLT. An interrupt that comes
/// after that check still ends the HLT (STI's shadow covers it), so no
/// wake-up is lost. Returns at once without an APIC timer and a deadline.
pub fn halt_until(deadline: Option<Instant>, still_idle: impl FnOnce() -> bool) {
    cpu::disable_interrupts();
    if let Some(deadline) = deadline {
        if !apic::timer_ready() {
            return;
        }
        let page = current_page();
        let tsc = cpu::rdtsc();
        let now = page.ns_at(tsc);
        if now >= deadline.0 {
            return;
        }
        let ticks = ferry_abi::ns_to_ticks(deadline.0 - now, page.tsc_khz).max(1);
        apic::arm_deadline(tsc.saturating_add(ticks));
    }
    if still_idle() {
        cpu::enable_interrupts_and_halt();
    }
}

/// Sleeps for `d`.
pub fn sleep(d: Duration) {
    sleep_until(now().saturating_add(d));
}

/// Measures the TSC rate on loaders that say nothing of it (QEMU PVH):
/// the hypervisor timing leaf, else kvmclock's scale, else CPUID 0x15/0x16,
/// else 20 ms of PIT channel 2.
pub(crate) fn calibrate_tsc_khz() -> u64 {
    let [max_hv_leaf, b, c, d] = cpu::cpuid(0x4000_0000, 0);
    if (0x4000_0010..0x4000_0100).contains(&max_hv_leaf) {
        let [khz, ..] = cpu::cpuid(0x4000_0010, 0);
        if khz != 0 {
            return u64::from(khz);
        }
    }
    let is_kvm = [b, c, d] == [0x4b4d_564b, 0x564b_4d56, 0x0000_004d]; // "KVMKVMKVM\0\0\0"
    if is_kvm && max_hv_leaf >= 0x4000_0001 {
        let [features, ..] = cpu::cpuid(0x4000_0001, 0);
        if features & (1 << 3) != 0
            && let Some(khz) = kvmclock_khz()
        {
            return khz;
        }
    }
    let [max_leaf, ..] = cpu::cpuid(0, 0);
    if max_leaf >= 0x15 {
        let [den, num, crystal_hz, _] = cpu::cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal_hz != 0 {
            return u64::from(crystal_hz) * u64::from(num) / u64::from(den) / 1000;
        }
    }
    if max_leaf >= 0x16 {
        let [base_mhz, ..] = cpu::cpuid(0x16, 0);
        if base_mhz != 0 {
            return u64::from(base_mhz) * 1000;
        }
    }
    pit_khz()
}

/// `struct pvclock_vcpu_time_info`, written by KVM.
#[repr(C, align(64))]
#[derive(Default)]
struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

/// The TSC rate kvmclock uses: `ns = (ticks << shift) * mul >> 32`.
fn kvmclock_khz() -> Option<u64> {
    const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    let mut pv = PvClock::default();
    let addr = &raw mut pv as u64;
    // SAFETY: CPUID says kvmclock exists; KVM writes the 32-byte struct at
    // `addr` (identity-mapped, live until disabled below).
    unsafe { cpu::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, addr | 1) };
    // SAFETY: KVM filled the struct when the MSR was written; volatile
    // because the compiler cannot see that write.
    let (mul, shift) = unsafe {
        (
            core::ptr::read_volatile(&raw const pv.tsc_to_system_mul),
            core::ptr::read_volatile(&raw const pv.tsc_shift),
        )
    };
    // SAFETY: as above; stops KVM writing into this stack frame.
    unsafe { cpu::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0) };
    if mul == 0 {
        return None;
    }
    let scaled = 1_000_000u128 << 32;
    let khz = if shift >= 0 {
        scaled / (u128::from(mul) << shift)
    } else {
        (scaled << (-shift)) / u128::from(mul)
    };
    u64::try_from(khz).ok().filter(|&k| k > 0)
}

fn pit_khz() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    const COUNT: u64 = PIT_HZ / 50; // 20 ms
    let gate = cpu::inb(0x61) & 0xFC;
    cpu::outb(0x61, gate);
    cpu::outb(0x43, 0xB0); // channel 2, lo/hi byte, mode 0, binary
    cpu::outb(0x42, COUNT as u8);
    cpu::outb(0x42, (COUNT >> 8) as u8);
    cpu::outb(0x61, gate | 1);
    let t0 = cpu::rdtsc();
    let mut spins = 0u64;
    while cpu::inb(0x61) & 0x20 == 0 {
        spins += 1;
        if spins > 10_000_000 {
            break; // no PIT: give up with whatever we measured
        }
    }
    let ticks = cpu::rdtsc().saturating_sub(t0);
    (ticks * PIT_HZ / (COUNT * 1000)).max(1)
}
