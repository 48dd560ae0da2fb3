//! The datapath's clock: how the kernel's tick count maps onto the coarse monotonic
//! clock, measured with the never-attached `clock_sample` program and written to the
//! clock map, from which the programs read the time without a helper call.

use std::{
    future::Future,
    pin::pin,
    task::{Context, Poll, Waker},
    time::Duration,
};

use visibility_common::clock::{JiffiesClock, MIN_TICKS_BETWEEN_SAMPLES};

use crate::{datapath::Datapath, error::DatapathError, maps::Maps};

/// How long a first measurement waits between its samples, and how many times at most.
const SAMPLE_GAP: Duration = Duration::from_millis(10 * MIN_TICKS_BETWEEN_SAMPLES.div_ceil(4));
const SAMPLE_ATTEMPTS: usize = 6;

/// Measures how the kernel's tick count maps onto the coarse monotonic clock, or,
/// once measured, takes the offset anew (NTP slews the monotonic clock), and writes
/// it to the clock map, from which the programs read the time without a helper
/// call. The first measurement waits a few ticks (at most about 60 ms), blocking the
/// calling thread: for callers outside an async runtime, such as the tests' harness.
pub fn sync_clock(datapath: &Datapath, maps: &mut Maps) -> Result<JiffiesClock, DatapathError> {
    let blocking_wait = |gap| {
        std::thread::sleep(gap);
        std::future::ready(())
    };
    // Every wait is over by the time it is awaited, so one poll runs it to the end.
    match pin!(measure(datapath, maps, blocking_wait)).poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(result) => result,
        Poll::Pending => unreachable!("a blocking wait never leaves the measurement pending"),
    }
}

/// [`sync_clock`] for the daemon's async loop: the first measurement's waits are
/// timers of the runtime, which stays free for other work meanwhile.
pub async fn sync_clock_async(
    datapath: &Datapath,
    maps: &mut Maps,
) -> Result<JiffiesClock, DatapathError> {
    measure(datapath, maps, tokio::time::sleep).await
}

/// What both [`sync_clock`] and [`sync_clock_async`] do, waiting with `wait`.
async fn measure<W: Future<Output = ()>>(
    datapath: &Datapath,
    maps: &mut Maps,
    wait: impl Fn(Duration) -> W,
) -> Result<JiffiesClock, DatapathError> {
    let first = datapath.sample_clock()?;
    let current = maps.clock()?;
    let clock = if current.ns_per_tick != 0 {
        current.resynced(first)
    } else {
        let mut measured = None;
        for _ in 0..SAMPLE_ATTEMPTS {
            wait(SAMPLE_GAP).await;
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
