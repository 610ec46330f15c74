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

/// The VMM's guest clock.
#[derive(Clone, Debug)]
pub struct GuestClock {
    tsc_khz: u64,
    page: ClockPage,
}

impl GuestClock {
    /// A clock whose guest time 0 is now.
    pub fn start(tsc_khz: u32) -> Self {
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
