//! The answers of the Kubernetes probes, served next to `/metrics`: `/healthz` says
//! only whether the daemon's loop is alive (liveness: restart a stuck daemon), and
//! `/readyz` whether the node is healthy (readiness: a failing health check, such as a
//! configuration problem, is reported, never cured by a restart loop).

use std::{
    sync::atomic::Ordering,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::metrics::Shared;

/// How long the loop may go without a pass before it counts as stuck. It passes every
/// 250 ms (it forwards the programs' logs), so only a pass that hangs comes near this.
pub const LOOP_STALE_AFTER: Duration = Duration::from_secs(60);

/// A probe's answer: HTTP status and a one-line body that says why.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Shared {
    /// Notes that the daemon's loop finished a pass now.
    pub fn note_loop_pass(&self) {
        self.loop_passed_at_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// How long ago the loop last passed (`None` before its first pass).
    fn since_loop_pass(&self, now_ms: u64) -> Option<Duration> {
        match self.loop_passed_at_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_millis(now_ms.saturating_sub(at))),
        }
    }
}

/// `/healthz`: the loop passed within [`LOOP_STALE_AFTER`].
pub fn liveness(shared: &Shared) -> Answer {
    liveness_at(shared, now_ms())
}

fn liveness_at(shared: &Shared, now_ms: u64) -> Answer {
    match shared.since_loop_pass(now_ms) {
        Some(ago) if ago <= LOOP_STALE_AFTER => Answer {
            status: 200,
            body: format!("ok: the daemon's loop passed {} ms ago\n", ago.as_millis()),
        },
        Some(ago) => Answer {
            status: 503,
            body: format!(
                "the daemon's loop has not passed for {} s: it is stuck\n",
                ago.as_secs()
            ),
        },
        None => Answer {
            status: 503,
            body: "the daemon's loop has not started\n".to_owned(),
        },
    }
}

/// `/readyz`: alive, and every health check passed at the last reconcile.
pub fn readiness(shared: &Shared) -> Answer {
    readiness_at(shared, now_ms())
}

fn readiness_at(shared: &Shared, now_ms: u64) -> Answer {
    let alive = liveness_at(shared, now_ms);
    if alive.status != 200 {
        return alive;
    }
    let status = shared.status.lock().ok().and_then(|s| s.clone());
    let Some(status) = status else {
        return Answer {
            status: 503,
            body: "starting: no reconcile has finished yet\n".to_owned(),
        };
    };
    let failing: Vec<String> = status
        .checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    if failing.is_empty() {
        Answer {
            status: 200,
            body: "ok: every health check passes\n".to_owned(),
        }
    } else {
        Answer {
            status: 503,
            body: format!("failing: {}\n", failing.join("; ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Check, DaemonStatus, RecordCounts};

    fn status(checks: Vec<Check>) -> DaemonStatus {
        DaemonStatus {
            pid: 1,
            node_name: "n".into(),
            started_at: String::new(),
            updated_at: String::new(),
            origin: "loaded".into(),
            attach_mode: "tcx".into(),
            uplinks: vec![],
            pod_cidrs: vec![],
            pod_interfaces: vec![],
            checks,
            records: RecordCounts::default(),
            ipfix_collectors: vec![],
            kubernetes: Default::default(),
        }
    }

    #[test]
    fn liveness_follows_the_loop_only_and_readiness_the_checks_too() {
        let shared = Shared::default();
        assert_eq!(liveness_at(&shared, 1_000).status, 503);
        shared.loop_passed_at_ms.store(1_000, Ordering::Relaxed);
        assert_eq!(liveness_at(&shared, 2_000).status, 200);
        assert_eq!(readiness_at(&shared, 2_000).status, 503, "no status yet");

        let failing = Check {
            name: "pod_cidr_v6".into(),
            ok: false,
            detail: "no v6 Pod CIDR".into(),
        };
        *shared.status.lock().unwrap() = Some(status(vec![failing]));
        assert_eq!(
            liveness_at(&shared, 2_000).status,
            200,
            "a failing check is no restart"
        );
        let ready = readiness_at(&shared, 2_000);
        assert_eq!(ready.status, 503);
        assert!(ready.body.contains("pod_cidr_v6"), "{}", ready.body);

        *shared.status.lock().unwrap() = Some(status(vec![]));
        assert_eq!(readiness_at(&shared, 2_000).status, 200);
        let stuck = 1_000 + LOOP_STALE_AFTER.as_millis() as u64 + 1;
        assert_eq!(liveness_at(&shared, stuck).status, 503);
        assert_eq!(readiness_at(&shared, stuck).status, 503);
    }
}
