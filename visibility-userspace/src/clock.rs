//! The datapath's clock: how the kernel's tick count maps onto the coarse monotonic
//! clock, measured with the never-attached `clock_sample` program and written to the
//! clock map, from which the programs read the time without a helper call.

use visibility_common::clock::{JiffiesClock, MIN_TICKS_BETWEEN_SAMPLES};

use crate::{datapath::Datapath, error::DatapathError, maps::Maps};

/// Measures how the kernel's tick count maps onto the coarse monotonic clock, or,
/// once measured, takes the offset anew (NTP slews the monotonic clock), and writes
/// it to the clock map, from which the programs read the time without a helper
/// call. The first measurement waits a few ticks (at most about 60 ms).
pub fn sync_clock(datapath: &Datapath, maps: &mut Maps) -> Result<JiffiesClock, DatapathError> {
    let first = datapath.sample_clock()?;
    let current = maps.clock()?;
    let clock = if current.ns_per_tick != 0 {
        current.resynced(first)
    } else {
        let mut measured = None;
        for _ in 0..6 {
            std::thread::sleep(std::time::Duration::from_millis(
                10 * MIN_TICKS_BETWEEN_SAMPLES.div_ceil(4),
            ));
            measured = JiffiesClock::from_samples(first, datapath.sample_clock()?);
            if measured.is_some() {
                break;
            }
        }
        measured.ok_or(DatapathError::ClockUnmeasurable)?
    };
    maps.set_clock(clock)?;
    Ok(clock)
}
