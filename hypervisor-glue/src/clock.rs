//! The guest clock: Ferry's side of the clock page ([`ferry_abi::ClockPage`]).
//!
//! Guest time is `ns_base + (tsc - tsc_base) * mult >> 32`. At boot the VMM
//! states "guest time 0 is now". When the guest stops (pause, snapshot,
//! migration) the VMM records the guest's time, and on resume, on whatever
//! host, it restates the relation against that host's TSC so guest time runs
//! on by the real time that passed and never goes backwards.

use std::time::{SystemTime, UNIX_EPOCH};

use ferry_abi::ClockPage;
use ferry_abi::layout::CLOCK_PAGE_ADDR;

use crate::memory::{self, GuestRam};

/// Reads the host TSC.
pub fn host_tsc() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// What a stopped clock keeps: the guest's time when it stopped and the
/// host's wall-clock time then, to add the real time that passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ClockState {
    /// Guest time at the stop, ns since guest boot.
    pub guest_ns: u64,
    /// Host wall-clock time at the stop, ns since the Unix epoch.
    pub realtime_ns: u64,
    /// The page's generation at the stop.
    pub generation: u32,
    /// Wall-clock time of guest time 0 (for the guest's wall clock).
    pub unix_ns_at_zero: u64,
}

/// The VMM's guest clock.
#[derive(Clone, Debug)]
pub struct GuestClock {
    tsc_khz: u64,
    page: ClockPage,
}

impl GuestClock {
    /// A clock whose guest time 0 is now.
    pub fn start(tsc_khz: u32) -> Self {
        let unix_now = unix_now_ns();
        let page = ClockPage::new(host_tsc(), 0, u64::from(tsc_khz), unix_now);
        GuestClock {
            tsc_khz: u64::from(tsc_khz),
            page: ClockPage {
                generation: 2,
                ..page
            },
        }
    }

    /// Guest time now, in ns.
    pub fn now_ns(&self) -> u64 {
        self.page.ns_at(host_tsc())
    }

    /// The TSC rate in kHz.
    pub fn tsc_khz(&self) -> u64 {
        self.tsc_khz
    }

    /// Writes the page into guest memory, as a seqlock writer: odd
    /// generation, the fields, the next even generation.
    pub fn publish(&self, mem: &GuestRam) -> Result<(), memory::Error> {
        let odd = self.page.generation.wrapping_add(1);
        memory::write(mem, CLOCK_PAGE_ADDR, &odd.to_le_bytes())?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        memory::write_value(
            mem,
            CLOCK_PAGE_ADDR,
            ClockPage {
                generation: odd,
                ..self.page
            },
        )?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        memory::write(mem, CLOCK_PAGE_ADDR, &self.page.generation.to_le_bytes())
    }
}

impl crate::devices::Persist for GuestClock {
    type State = ClockState;
    /// The TSC rate of this host, in kHz.
    type Args<'a> = u32;
    type Error = std::convert::Infallible;

    /// Stops the clock: guest time and wall-clock time now.
    fn save(&self) -> ClockState {
        ClockState {
            guest_ns: self.now_ns(),
            realtime_ns: unix_now_ns(),
            generation: self.page.generation,
            unix_ns_at_zero: self.page.unix_ns_at_zero,
        }
    }

    /// Restarts a stopped clock on this host: guest time goes on from where
    /// it stopped plus the wall-clock time since (never backwards), against
    /// this host's TSC and rate.
    fn restore(tsc_khz: u32, state: &ClockState) -> Result<Self, Self::Error> {
        let elapsed = unix_now_ns().saturating_sub(state.realtime_ns);
        let page = ClockPage::new(
            host_tsc(),
            state.guest_ns.saturating_add(elapsed),
            u64::from(tsc_khz),
            state.unix_ns_at_zero,
        );
        Ok(GuestClock {
            tsc_khz: u64::from(tsc_khz),
            page: ClockPage {
                generation: (state.generation & !1).wrapping_add(2),
                ..page
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Persist;

    #[test]
    fn published_page_is_even_and_readable() {
        let mem = memory::create(memory::MIN_MEMORY).unwrap();
        let clock = GuestClock::start(2_000_000);
        clock.publish(&mem).unwrap();
        let generation = memory::read_u64(&mem, CLOCK_PAGE_ADDR).unwrap() as u32;
        assert_eq!(generation % 2, 0);
        let a = clock.now_ns();
        let b = clock.now_ns();
        assert!(b >= a);
    }

    #[test]
    fn a_resumed_clock_goes_on_by_the_real_time_that_passed() {
        let clock = GuestClock::start(2_000_000);
        let mut saved = clock.save();
        // Pretend it stopped 50 ms ago at guest time 1 s.
        saved.guest_ns = 1_000_000_000;
        saved.realtime_ns -= 50_000_000;
        let resumed = GuestClock::restore(3_000_000, &saved).unwrap();
        let now = resumed.now_ns();
        assert!(
            (1_050_000_000..1_050_000_000 + 1_000_000_000).contains(&now),
            "{now}"
        );
        assert_eq!(resumed.tsc_khz(), 3_000_000);
        assert!(
            resumed.page.generation > saved.generation && resumed.page.generation.is_multiple_of(2)
        );
        // A wall clock that went backwards never takes guest time back.
        saved.realtime_ns += 10_000_000_000;
        assert!(GuestClock::restore(2_000_000, &saved).unwrap().now_ns() >= saved.guest_ns);
    }
}
