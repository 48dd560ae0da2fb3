//! What the comparison measures: its modes, its figures with their targets, the
//! gateway variants it runs again with, and each figure's ratio and cost against off.

use serde_json::Value;

/// The modes, in the order they run within a round.
pub(super) const MODES: [&str; 3] = ["off", "netd", "visibility"];

/// A comparison after the main one, whose gateway has a firewall and conntrack as in
/// the demo: the stand-in VPC doing less of its work on the node's CPUs.
pub(super) struct GatewayVariant {
    /// The compare bench's `--gateway` kind.
    pub(super) name: &'static str,
    /// What the gateway does, for the terminal.
    pub(super) does: &'static str,
    /// The README's title and explanation.
    pub(super) title: &'static str,
    pub(super) explanation: &'static str,
}

pub(super) const GATEWAY_VARIANTS: [GatewayVariant; 2] = [
    GatewayVariant {
        name: "plain",
        does: "only routes (no firewall, no conntrack)",
        title: "Without the stand-in VPC's firewall.",
        explanation: "only routes (no nftables firewall, no connection tracking). On GKE the VPC's firewall and flow logs do not run on the node",
    },
    GatewayVariant {
        name: "offloaded",
        does: "routes in TC, ahead of its IP stack (the VPC's work off the node)",
        title: "With the stand-in VPC's work off the gateway's stack.",
        explanation: "routes in TC, ahead of its IP stack (`lab_router`: a FIB lookup, new MACs, one hop spent, sent back out), so that of the gateway only two veth crossings and that program remain on CPU 0: the nearest this machine comes to GKE, where the VPC's routing, firewall and flow logs run off the node",
    },
];

/// One figure of the comparison.
pub(super) struct Figure {
    pub(super) key: &'static str,
    pub(super) label: &'static str,
    pub(super) short: &'static str,
    pub(super) higher_is_better: bool,
    /// The least (throughput) or most (latency) visibility/off may be.
    pub(super) target: Option<f64>,
}

/// How many figures the comparison has.
pub(super) const FIGURE_COUNT: usize = 5;

pub(super) const FIGURES: [Figure; FIGURE_COUNT] = [
    Figure {
        key: "tcp_gbps",
        label: "TCP Gbit/s",
        short: "TCP",
        higher_is_better: true,
        target: Some(0.96),
    },
    Figure {
        key: "udp_pps",
        label: "UDP 64 B pps",
        short: "UDP pps",
        higher_is_better: true,
        target: Some(0.86),
    },
    Figure {
        key: "rr_mean_us",
        label: "RR mean µs",
        short: "RR mean",
        higher_is_better: false,
        target: Some(1.06),
    },
    Figure {
        key: "rr_p99_us",
        label: "RR p99 µs",
        short: "RR p99",
        higher_is_better: false,
        target: None,
    },
    // The ping-pong with both ends busy-polling: the path's latency without the
    // wake-ups that dominate the figures above.
    Figure {
        key: "rr_busy_mean_us",
        label: "busy-poll RR mean µs",
        short: "busy-poll RR mean",
        higher_is_better: false,
        target: None,
    },
];

/// `mode`/off for each figure in each round of the compare bench's `rounds`, in round
/// order; rounds that lack either mode are left out.
pub(super) fn round_ratios(rounds: &Value, mode: &str) -> Vec<[f64; FIGURE_COUNT]> {
    let Value::Array(rows) = rounds else {
        return Vec::new();
    };
    let of = |round: f64, mode: &str| {
        rows.iter()
            .find(|row| row["round"].as_f64() == Some(round) && row["mode"].as_str() == Some(mode))
    };
    let mut numbers: Vec<f64> = rows
        .iter()
        .filter_map(|row| row["round"].as_f64())
        .collect();
    numbers.dedup();
    numbers
        .into_iter()
        .filter_map(|round| {
            let (measured, off) = (of(round, mode)?, of(round, MODES[0])?);
            // A figure a round lacks is NaN: the spread skips it, and it leaves no budget.
            let mut ratios = [f64::NAN; FIGURE_COUNT];
            for (ratio, figure) in ratios.iter_mut().zip(&FIGURES) {
                if let (Some(measured), Some(off)) =
                    (measured[figure.key].as_f64(), off[figure.key].as_f64())
                {
                    *ratio = measured / off;
                }
            }
            Some(ratios)
        })
        .collect()
}

/// A mode's cost on `figure` from its ratio to off: the share of throughput lost, or of
/// latency added.
pub(super) fn cost_of(ratio: f64, figure: usize) -> f64 {
    if FIGURES[figure].higher_is_better {
        1.0 - ratio
    } else {
        ratio - 1.0
    }
}

pub(super) fn format_value(key: &str, value: f64) -> String {
    if !value.is_finite() {
        return "-".to_owned();
    }
    match key {
        "udp_pps" if value >= 1e6 => format!("{:.2}M", value / 1e6),
        "udp_pps" => format!("{:.1}k", value / 1e3),
        "tcp_gbps" => format!("{value:.2}"),
        _ => format!("{value:.1}"),
    }
}
