//! The report's tables, verdicts, chart and README section from sample results.

use serde_json::{Value, json};

use super::{
    breakdown::Breakdown,
    figures::{GATEWAY_VARIANTS, round_ratios},
    micro::{churn_line, flow_records_line, program_cost_line},
    parse_json,
    readme::{README_END, README_START, replace_marked},
    report::{Report, Verdict},
    svg,
};

fn sample() -> Value {
    parse_json(
        r#"{"date": "2025-01-02T03:04:05Z", "kernel": "6.18.0", "cpus": 2,
            "cpu_model": "AMD EPYC", "config": {"rounds": 3, "quick": false},
            "pinning": {"client_cpu": 0, "server_cpu": 1},
            "medians": {
              "off": {"tcp_gbps": 17.6, "udp_pps": 183000, "rr_mean_us": 60.9, "rr_p99_us": 84.7, "rr_busy_mean_us": 14.0},
              "netd": {"tcp_gbps": 15.4, "udp_pps": 105000, "rr_mean_us": 70.9, "rr_p99_us": 94.2, "rr_busy_mean_us": 18.0},
              "visibility": {"tcp_gbps": 17.2, "udp_pps": 160000, "rr_mean_us": 62.0, "rr_p99_us": 99.0, "rr_busy_mean_us": 15.0}
            },
            "background": {"share_of_all_cpus": 0.3, "top": [{"process": "qemu-system-x86", "cpu_seconds": 61.2}]},
            "profile": {"cpu": 0, "modes": {
              "off": {"busy_ns_per_packet": 4550.2, "idle_share": 0.16, "categories_ns_per_packet": {"datapath programs": 0, "netfilter": 0, "policy rules": 339.2}},
              "netd": {"busy_ns_per_packet": 7433.6, "idle_share": 0.157, "categories_ns_per_packet": {"datapath programs": 0, "netfilter": 631.0, "policy rules": 809.9}},
              "visibility": {"busy_ns_per_packet": 6226.8, "idle_share": 0.183, "categories_ns_per_packet": {"datapath programs": 709.3, "netfilter": 572.9, "policy rules": 0}}
            }}}"#,
    )
    .unwrap()
}

#[test]
fn targets_follow_the_lab_notes_numbers() {
    let report = Report::new(&sample()).unwrap();
    // TCP: netd costs 12.5%, visibility 2.3% (budget 4.2%); 17.2/17.6 = 0.977.
    assert!(report.third_of_netd(0) == Verdict::Pass);
    assert!(report.absolute(0) == Some(Verdict::Pass));
    // UDP: netd costs 42.6%, visibility 12.6% (budget 14.2%); 0.874 >= 0.86.
    assert!(report.third_of_netd(1) == Verdict::Pass);
    assert!(report.absolute(1) == Some(Verdict::Pass));
    // RR mean: netd +16.4%, visibility +1.8%.
    assert!(report.third_of_netd(2) == Verdict::Pass);
    // RR p99: netd +11.2%, visibility +16.9%: short.
    assert!(report.third_of_netd(3) == Verdict::Short);
    assert_eq!(report.absolute(3), None);
    let table = report.terminal_table();
    assert!(
        table.contains("client on CPU 0 (Pod 0), server on CPU 1 (Pod 1)"),
        "{table}"
    );
    assert!(table.contains("183.0k"), "{table}");
    assert!(
        table.contains(
            "other processes used 30% of the CPUs during the comparison (qemu-system-x86 61 s)"
        ),
        "{table}"
    );
    let svg = svg::chart(&report);
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<rect").count(), 1 + 15 + 3);
}

#[test]
fn the_breakdown_shows_each_modes_parts_and_each_gateway_variant_its_ratios_and_targets() {
    let json = sample();
    let breakdown = Breakdown::new(&json["profile"]).unwrap();
    let md = breakdown.markdown();
    assert!(
        md.contains("| mode | busy | datapath programs | netfilter | policy rules | idle |"),
        "{md}"
    );
    assert!(
        md.contains("| visibility | 6227 | 709 | 573 | 0 | 18% |"),
        "{md}"
    );
    let terminal = breakdown.terminal();
    assert!(
        terminal
            .lines()
            .any(|l| l.starts_with("netd") && l.contains("810")),
        "{terminal}"
    );
    // Without a profile there is no breakdown.
    assert!(Breakdown::new(&Value::Null).is_none());

    let report = Report::new(&json).unwrap();
    for (name, title) in [
        ("plain", "**Without the stand-in VPC's firewall.**"),
        (
            "offloaded",
            "**With the stand-in VPC's work off the gateway's stack.**",
        ),
    ] {
        let variant = GATEWAY_VARIANTS.iter().find(|v| v.name == name).unwrap();
        let md = report.markdown_variant(variant);
        assert!(md.starts_with(title), "{md}");
        assert!(
            md.contains("| visibility/off | 0.98 | 0.87 | 1.02 | 1.17 | 1.07 |"),
            "{md}"
        );
        assert!(
            md.contains("| UDP pps visibility/off ≥ 0.86 | 0.87 | PASS |"),
            "{md}"
        );
        let terminal = report.terminal_variant(variant);
        assert!(terminal.contains("targets (visibility/off"), "{terminal}");
    }
}

#[test]
fn the_targets_show_how_far_the_rounds_spread() {
    let mut json = sample();
    let rounds = parse_json(
        r#"[{"round": 1, "mode": "off", "tcp_gbps": 10, "udp_pps": 100000, "rr_mean_us": 50, "rr_p99_us": 80},
            {"round": 1, "mode": "visibility", "tcp_gbps": 9, "udp_pps": 85000, "rr_mean_us": 52, "rr_p99_us": 90},
            {"round": 2, "mode": "off", "tcp_gbps": 10, "udp_pps": 100000, "rr_mean_us": 50, "rr_p99_us": 80},
            {"round": 2, "mode": "netd", "tcp_gbps": 9, "udp_pps": 60000, "rr_mean_us": 60, "rr_p99_us": 90},
            {"round": 2, "mode": "visibility", "tcp_gbps": 11, "udp_pps": 92000, "rr_mean_us": 55, "rr_p99_us": 70}]"#,
    )
    .unwrap();
    json["rounds"] = rounds;
    let report = Report::new(&json).unwrap();
    let terminal = report.terminal_targets();
    assert!(
        terminal.contains("0.874 >= 0.86  PASS  (rounds 0.85..0.92)"),
        "{terminal}"
    );
    assert!(terminal.contains("(rounds 0.90..1.10)"), "{terminal}");
    let md = report.markdown_targets();
    assert!(
        md.contains("| UDP pps visibility/off ≥ 0.86 | 0.87 (rounds 0.85–0.92) | PASS |"),
        "{md}"
    );
    // One round says nothing about the spread.
    let one = parse_json(r#"[{"round": 1, "mode": "off", "tcp_gbps": 10, "udp_pps": 1, "rr_mean_us": 1, "rr_p99_us": 1},
                              {"round": 1, "mode": "visibility", "tcp_gbps": 9, "udp_pps": 1, "rr_mean_us": 1, "rr_p99_us": 1}]"#).unwrap();
    assert_eq!(round_ratios(&one, "visibility").len(), 1);
    let mut json = sample();
    json["rounds"] = one;
    assert!(
        !Report::new(&json)
            .unwrap()
            .terminal_targets()
            .contains("rounds")
    );
}

/// netd's RR mean cost is +2% in the medians, but one round shows none: a third of
/// it is no budget to judge by. Its UDP cost shows in every round.
#[test]
fn a_netd_cost_that_some_rounds_do_not_show_sets_no_budget() {
    let mut json = sample();
    let row = |round: u32, mode: &str, udp: u32, rr: f64| json!({"round": round, "mode": mode, "tcp_gbps": 10, "udp_pps": udp, "rr_mean_us": rr, "rr_p99_us": 80});
    json["rounds"] = json!([
        row(1, "off", 100_000, 50.0),
        row(1, "netd", 60_000, 53.0),
        row(1, "visibility", 90_000, 51.0),
        row(2, "off", 100_000, 50.0),
        row(2, "netd", 62_000, 49.0),
        row(2, "visibility", 91_000, 52.0),
    ]);
    let report = Report::new(&json).unwrap();
    let rr_mean = 2;
    assert!(!report.netd_costs_measurably(rr_mean));
    assert_eq!(report.third_of_netd(rr_mean), Verdict::NotApplicable);
    let udp = 1;
    assert!(report.netd_costs_measurably(udp));
    assert_eq!(report.third_of_netd(udp), Verdict::Pass);
    let md = report.markdown_targets();
    assert!(
        md.contains("| RR mean cost at most a third of netd's +16.4% (netd cost nothing in some rounds: within the noise) | +1.8% | n/a |"),
        "{md}"
    );
    assert!(
        report
            .terminal_targets()
            .contains("(netd cost nothing in some rounds: within the noise)  n/a"),
    );
}

#[test]
fn program_cost_rows_become_one_line() {
    let json = parse_json(
        r#"{"rows": [{"program": "pod_ingress", "case": "redirected, IPv4 UDP pod to pod", "ns_per_packet": 261.8},
                     {"program": "uplink_ingress", "case": "returned, IPv4 UDP to its pod", "ns_per_packet": 248.3}]}"#,
    )
    .unwrap();
    assert_eq!(
        program_cost_line(&json).unwrap(),
        "per-packet program cost (BPF_PROG_TEST_RUN medians): pod_ingress redirected, IPv4 UDP pod to pod 262 ns; uplink_ingress returned, IPv4 UDP to its pod 248 ns"
    );
    assert_eq!(program_cost_line(&Value::Null), None);
    let md = Report::new(&sample())
        .unwrap()
        .markdown(&[program_cost_line(&json).unwrap()]);
    assert!(
        md.contains("\nPer-packet program cost (BPF_PROG_TEST_RUN medians): pod_ingress"),
        "{md}"
    );
}

#[test]
fn flow_record_sizes_become_one_line() {
    let json: Value = serde_json::from_str(
        r#"{"sizes": [{"flows": 10000, "total_ms": 21.4, "read_ms": 3.2, "emit_ms": 9.6, "rss_mib": 18.2},
                      {"flows": 1000000, "total_ms": 2712.0, "read_ms": 401.0, "emit_ms": 1200.4, "rss_mib": 912.0}]}"#,
    )
    .unwrap();
    assert_eq!(
        flow_records_line(&json).unwrap(),
        "flow records, one interval in which every flow moved (read the flow map, build a record per flow, emit it as a JSON line): 10000 flows 21 ms (read 3 ms, emit 10 ms), RSS 18 MiB; 1000000 flows 2712 ms (read 401 ms, emit 1200 ms), RSS 912 MiB"
    );
    assert_eq!(flow_records_line(&json!({ "skipped": "needs root" })), None);
}

#[test]
fn churn_figures_become_one_line() {
    let json = json!({
        "interfaces": 500, "bursts": 10, "burst": 50, "p50_ms": 21.04, "p99_ms": 80.0,
        "max_ms": 95.5, "burst_ms_per_pod": 1.64, "daemon_cpu_seconds": 3.456, "seconds": 41.2,
        "daemon_rss_mib": 20.4, "daemon_peak_rss_mib": 24.6, "leftovers": 0
    });
    assert_eq!(
        churn_line(&json).unwrap(),
        "churn: 500 Pod interfaces made and deleted in 10 bursts of 50, netlink events alone: attach p50 21.0 ms, p99 80.0 ms, max 95.5 ms, a burst 1.6 ms a Pod; the daemon used 3.46 s of CPU over 41 s, RSS 20 MiB (peak 25 MiB); 0 left behind"
    );
    assert_eq!(churn_line(&json!({ "failed": "no root" })), None);
}

#[test]
fn readme_section_is_replaced_between_the_markers_only() {
    let text = "# T\n\nintro\n<!-- bench:start -->\nold\ntable\n<!-- bench:end -->\nrest\n";
    let out = replace_marked(text, "| new |\n").unwrap();
    assert_eq!(
        out,
        "# T\n\nintro\n<!-- bench:start -->\n| new |\n<!-- bench:end -->\nrest\n"
    );
    assert_eq!(replace_marked(&out, "| new |").unwrap(), out, "idempotent");
    assert!(replace_marked("no markers", "x").is_err());
    assert!(replace_marked("<!-- bench:end --> <!-- bench:start -->", "x").is_err());
    let fresh = format!("{README_START}\n{README_END}\n");
    assert_eq!(
        replace_marked(&fresh, "x").unwrap(),
        "<!-- bench:start -->\nx\n<!-- bench:end -->\n"
    );
    let md = Report::new(&sample()).unwrap().markdown(&[]);
    assert!(md.contains("| visibility/netd |"), "{md}");
    assert!(
        md.contains("| UDP pps visibility/off ≥ 0.86 | 0.87 | PASS |"),
        "{md}"
    );
    assert!(
        md.contains("| RR p99 cost at most a third of netd's +11.2% (≤ 3.7%) | +16.9% | SHORT |"),
        "{md}"
    );
    assert!(md.contains("_Measured 2025-01-02"), "{md}");
}
