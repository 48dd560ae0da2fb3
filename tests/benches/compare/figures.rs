//! What one mode's run gives (its figures), the arithmetic on them, and joining the
//! threads that measure them.

use anyhow::{Context as _, Result};

/// One mode's figures in one round.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub(crate) tcp_gbps: f64,
    pub(crate) tcp_retransmits: Option<u64>,
    pub(crate) udp_pps: f64,
    pub(crate) udp_sent_pps: f64,
    pub(crate) rr: RoundTrips,
    /// The ping-pong with both ends busy-polling.
    pub(crate) rr_busy: RoundTrips,
    pub(crate) gateway_forwarded: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct RoundTrips {
    pub(crate) mean_us: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) max_us: f64,
    pub(crate) lost: u64,
    pub(crate) requests: usize,
}

/// Nearest-rank percentile of sorted values.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Joins a measuring thread: its error with `what` as context, its panic passed on.
pub(crate) fn join<T>(handle: std::thread::JoinHandle<Result<T>>, what: &str) -> Result<T> {
    match handle.join() {
        Ok(result) => result.with_context(|| what.to_owned()),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
