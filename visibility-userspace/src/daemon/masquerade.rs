//! The masquerade health check, kept off the reconcile's path: `iptables-save` forks a
//! process, so it runs on a blocking thread, and only when the Pod CIDRs changed or the
//! last answer is half a reconcile interval old, not after every netlink event.

use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::{health, state::Check};

/// The last answer, and what it was for.
pub struct MasqueradeCheck {
    /// How long an answer stands for the same Pod CIDRs.
    fresh_for: Duration,
    last: Option<(Vec<IpNet>, Instant, Check)>,
}

impl MasqueradeCheck {
    pub fn new(reconcile_interval: Duration) -> Self {
        Self {
            fresh_for: reconcile_interval / 2,
            last: None,
        }
    }

    /// Runs the check again if its answer is stale for `pod_cidrs`.
    pub async fn refresh(&mut self, pod_cidrs: Vec<IpNet>) {
        if let Some((cidrs, at, _)) = &self.last
            && *cidrs == pod_cidrs
            && at.elapsed() < self.fresh_for
        {
            return;
        }
        let checked = pod_cidrs.clone();
        let check = match tokio::task::spawn_blocking(move || health::masquerade(&checked)).await {
            Ok(check) => check,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        };
        self.last = Some((pod_cidrs, Instant::now(), check));
    }

    /// The last answer; none before the first [`MasqueradeCheck::refresh`].
    pub fn check(&self) -> Option<Check> {
        self.last.as_ref().map(|(_, _, check)| check.clone())
    }
}
