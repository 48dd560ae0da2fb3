//! The microbenchmarks that run after the comparison, and the one line each of their
//! JSON documents becomes.

use serde_json::Value;

/// The microbenchmarks, run after the comparisons, and their arguments: each prints a
/// JSON document with `--json`.
pub(super) fn microbenches(quick: bool) -> [(&'static str, Vec<String>); 4] {
    let json = || vec!["--json".to_owned()];
    // A smaller lab of Pod interfaces, and fewer of them churned.
    let sized = || {
        let mut args = json();
        if quick {
            args.push("--quick".to_owned());
        }
        args
    };
    [
        ("attach_latency", sized()),
        ("churn", sized()),
        ("program_cost", json()),
        ("flow_records", json()),
    ]
}

/// "per-packet program cost (BPF_PROG_TEST_RUN medians): ..." from program_cost's JSON.
pub(super) fn program_cost_line(program_cost: &Value) -> Option<String> {
    items_line(
        "per-packet program cost (BPF_PROG_TEST_RUN medians)",
        &program_cost["rows"],
        |row| {
            Some(format!(
                "{} {} {:.0} ns",
                row["program"].as_str()?,
                row["case"].as_str()?,
                row["ns_per_packet"].as_f64()?
            ))
        },
    )
}

/// "`label`: ITEM; ITEM; ..." with one item per element of the array `items` that
/// `item` can describe; `None` when there is none.
pub(super) fn items_line(
    label: &str,
    items: &Value,
    item: impl Fn(&Value) -> Option<String>,
) -> Option<String> {
    let described: Vec<String> = items.as_array()?.iter().filter_map(item).collect();
    (!described.is_empty()).then(|| format!("{label}: {}", described.join("; ")))
}

pub(super) fn attach_line(attach: &Value) -> Option<String> {
    let p50 = attach["p50_ms"].as_f64()?;
    let p99 = attach["p99_ms"].as_f64()?;
    let parts = match (
        attach["route_to_first_program_p50_ms"].as_f64(),
        attach["first_to_second_program_p50_ms"].as_f64(),
    ) {
        (Some(first), Some(second)) => format!(
            "; p50 split: route -> first program {first:.1} ms, first -> second {second:.1} ms"
        ),
        _ => String::new(),
    };
    Some(format!(
        "attach latency: {} new Pods with {} Pod interfaces present: p50 {p50:.1} ms, p99 {p99:.1} ms (route appears -> both programs attached{parts})",
        attach["new"].as_f64().unwrap_or(0.0),
        attach["present"].as_f64().unwrap_or(0.0),
    ))
}

/// "churn: 500 Pod interfaces made and deleted in 10 bursts of 50: ..." from churn's
/// JSON.
pub(super) fn churn_line(churn: &Value) -> Option<String> {
    Some(format!(
        "churn: {} Pod interfaces made and deleted in {} bursts of {}, netlink events alone: attach p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, a burst {:.1} ms a Pod; the daemon used {:.2} s of CPU over {:.0} s, RSS {:.0} MiB (peak {:.0} MiB); {} left behind",
        churn["interfaces"].as_u64()?,
        churn["bursts"].as_u64()?,
        churn["burst"].as_u64()?,
        churn["p50_ms"].as_f64()?,
        churn["p99_ms"].as_f64()?,
        churn["max_ms"].as_f64()?,
        churn["burst_ms_per_pod"].as_f64()?,
        churn["daemon_cpu_seconds"].as_f64()?,
        churn["seconds"].as_f64()?,
        churn["daemon_rss_mib"].as_f64()?,
        churn["daemon_peak_rss_mib"].as_f64()?,
        churn["leftovers"].as_u64()?,
    ))
}

/// "flow records, one interval ...: 10000 flows 37 ms (read 9 ms, emit 14 ms), RSS
/// 15 MiB; ..." from flow_records' JSON.
pub(super) fn flow_records_line(flow_records: &Value) -> Option<String> {
    items_line(
        "flow records, one interval in which every flow moved (read the flow map, build a record per flow, emit it as a JSON line)",
        &flow_records["sizes"],
        |size| {
            Some(format!(
                "{} flows {:.0} ms (read {:.0} ms, emit {:.0} ms), RSS {:.0} MiB",
                size["flows"].as_u64()?,
                size["total_ms"].as_f64()?,
                size["read_ms"].as_f64()?,
                size["emit_ms"].as_f64()?,
                size["rss_mib"].as_f64()?,
            ))
        },
    )
}
