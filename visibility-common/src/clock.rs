//! The datapath's clock: `CLOCK_MONOTONIC` nanoseconds, read per packet without a
//! helper call.
//!
//! `bpf_ktime_get_coarse_ns` is a function call, and on CPUs whose returns are
//! mitigated against speculation (AMD's SRSO "safe RET") it costs about a fifth of
//! what a redirected packet costs in all. `bpf_jiffies64` the verifier inlines into
//! two loads. Both move once per scheduler tick, so the coarse clock is the tick
//! count times the tick's length plus an offset. The daemon measures the two (see
//! [`JiffiesClock::from_samples`]) and keeps the offset current as NTP slews the
//! monotonic clock (see [`JiffiesClock::resynced`]); until it has, the datapath
//! reads the coarse clock itself.

/// The value of the clock map: how to turn jiffies into `CLOCK_MONOTONIC`
/// nanoseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JiffiesClock {
    /// The length of a tick; 0 until measured.
    pub ns_per_tick: u64,
    /// What to subtract from `jiffies * ns_per_tick` (wrapping).
    pub offset_ns: u64,
}

/// One reading of both clocks at the same instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockSample {
    pub jiffies: u64,
    pub coarse_ns: u64,
}

/// At least this many ticks between the two samples of a measurement: the tick's
/// length comes out to within a part in a thousand at any `HZ` from 100 up.
pub const MIN_TICKS_BETWEEN_SAMPLES: u64 = 5;

impl JiffiesClock {
    /// The time of a jiffies reading, or `None` while the tick is not measured.
    #[inline(always)]
    pub const fn now_ns(&self, jiffies: u64) -> Option<u64> {
        if self.ns_per_tick == 0 {
            return None;
        }
        Some(
            jiffies
                .wrapping_mul(self.ns_per_tick)
                .wrapping_sub(self.offset_ns),
        )
    }

    /// The clock that two samples, taken some ticks apart, give; `None` when too few
    /// ticks passed between them.
    pub fn from_samples(first: ClockSample, second: ClockSample) -> Option<Self> {
        let ticks = second.jiffies.checked_sub(first.jiffies)?;
        if ticks < MIN_TICKS_BETWEEN_SAMPLES {
            return None;
        }
        let elapsed = second.coarse_ns.checked_sub(first.coarse_ns)?;
        // The kernel's own tick length, TICK_NSEC, is rounded to the nanosecond too.
        let ns_per_tick = (elapsed + ticks / 2) / ticks;
        (ns_per_tick > 0).then(|| Self::default().with_tick(ns_per_tick, second))
    }

    /// The same tick length, with the offset taken from a new sample.
    pub fn resynced(self, sample: ClockSample) -> Self {
        Self::default().with_tick(self.ns_per_tick, sample)
    }

    fn with_tick(self, ns_per_tick: u64, sample: ClockSample) -> Self {
        Self {
            ns_per_tick,
            offset_ns: sample
                .jiffies
                .wrapping_mul(ns_per_tick)
                .wrapping_sub(sample.coarse_ns),
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `repr(C)`, two u64 fields, no padding.
    unsafe impl aya::Pod for super::JiffiesClock {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jiffies start near 2^32 minus five minutes of ticks, as the kernel's do.
    const BOOT_JIFFIES: u64 = (1 << 32) - 300 * 250;

    fn sample(ticks: u64, ns_per_tick: u64, boot_ns: u64) -> ClockSample {
        ClockSample {
            jiffies: BOOT_JIFFIES + ticks,
            coarse_ns: boot_ns + ticks * ns_per_tick,
        }
    }

    #[test]
    fn two_samples_give_the_coarse_clock_back() {
        for ns_per_tick in [1_000_000, 3_333_333, 4_000_000, 10_000_000] {
            let boot = 7_000_000_123;
            let clock = JiffiesClock::from_samples(
                sample(100, ns_per_tick, boot),
                sample(130, ns_per_tick, boot),
            )
            .expect("30 ticks apart");
            assert_eq!(clock.ns_per_tick, ns_per_tick);
            let later = sample(1_000_000, ns_per_tick, boot);
            assert_eq!(clock.now_ns(later.jiffies), Some(later.coarse_ns));
        }
    }

    #[test]
    fn too_few_ticks_or_a_clock_going_back_measure_nothing() {
        let a = sample(100, 4_000_000, 0);
        assert_eq!(
            JiffiesClock::from_samples(a, sample(102, 4_000_000, 0)),
            None
        );
        assert_eq!(
            JiffiesClock::from_samples(sample(200, 4_000_000, 0), a),
            None
        );
        assert_eq!(JiffiesClock::default().now_ns(a.jiffies), None);
    }

    #[test]
    fn a_resync_follows_a_slewed_monotonic_clock() {
        let clock =
            JiffiesClock::from_samples(sample(0, 4_000_000, 0), sample(50, 4_000_000, 0)).unwrap();
        // NTP has slowed the monotonic clock by 3 ms over the hour.
        let slewed = ClockSample {
            jiffies: BOOT_JIFFIES + 900_000,
            coarse_ns: 900_000 * 4_000_000 - 3_000_000,
        };
        assert_ne!(clock.now_ns(slewed.jiffies), Some(slewed.coarse_ns));
        assert_eq!(
            clock.resynced(slewed).now_ns(slewed.jiffies),
            Some(slewed.coarse_ns)
        );
    }
}
