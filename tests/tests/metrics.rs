//! The daemon's Prometheus endpoint (`--metrics-addr`), scraped from inside the lab node's
//! namespace: the exposition must pass `promtool check metrics`, carry every series the
//! dashboards and alerts use, and its counters must move with the traffic.
//!
//! **These tests need root** (network namespaces, bpffs, BPF), the `visibility` binary
//! built (`cargo build -p visibility-userspace`), `curl`, and `promtool` (Debian's
//! `prometheus` package).
//!
//! Run: `cargo test -p visibility-tests --test metrics`

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use visibility_tests::node::{Node, poll};
use visibility_tests::require_root;

/// Each lab node has its own network namespace, so a fixed port cannot clash with another
/// test's daemon (nor with anything on the machine).
const METRICS_ADDR: &str = "127.0.0.1:19476";

/// A lab node whose daemon serves metrics on [`METRICS_ADDR`].
fn node_with_metrics(tag: &str) -> Node {
    require_root();
    let mut node = Node::new(tag, 2).expect("building the lab");
    node.capture_daemon_log();
    let mut args = Node::default_daemon_args();
    args.extend(["--metrics-addr".to_owned(), METRICS_ADDR.to_owned()]);
    node.start_daemon(args).expect("starting the daemon");
    node
}

/// `GET /metrics`, with curl inside the node's namespace (where the daemon listens).
fn scrape(node: &Node) -> Result<String> {
    let url = format!("http://{METRICS_ADDR}/metrics");
    node.lab.node().run(
        "curl",
        [
            "--silent",
            "--show-error",
            "--fail",
            "--max-time",
            "5",
            &url,
        ],
    )
}

/// Scrapes until the endpoint answers (it starts before the first reconcile).
fn scrape_when_up(node: &Node) -> String {
    poll(Duration::from_secs(10), "the metrics endpoint", || {
        Ok(scrape(node).ok())
    })
    .unwrap()
}

/// Runs `promtool check metrics` on `text`; returns its exit status and everything it said.
fn promtool_check(text: &str) -> Result<(bool, String)> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool (Debian package prometheus)")?;
    let mut stdin = child.stdin.take().context("promtool's stdin")?;
    let input = text.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().context("waiting for promtool")?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))?
        .context("writing to promtool")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), said))
}

/// One sample: its name, its labels as `key="value"` pairs (raw), and its value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses the samples of a text exposition (Prometheus 0.0.4 or OpenMetrics); comments
/// and blank lines are skipped. Label values here never hold `,` `"` or `}`.
fn samples(text: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value in {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .with_context(|| format!("unterminated labels in {line:?}"))?;
                let labels = inner
                    .split(',')
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (k, v) = pair
                            .split_once('=')
                            .with_context(|| format!("bad label {pair:?} in {line:?}"))?;
                        Ok((k.to_owned(), v.trim_matches('"').to_owned()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                (name, labels)
            }
            None => (series, Vec::new()),
        };
        let value = value
            .parse::<f64>()
            .with_context(|| format!("bad value in {line:?}"))?;
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// The value of the unlabelled series `name`.
fn value_of(samples: &[Sample], name: &str) -> Result<f64> {
    match samples.iter().find(|s| s.name == name) {
        Some(sample) => Ok(sample.value),
        None => bail!("no series {name}"),
    }
}

/// `promtool check metrics` (Debian's prometheus package) accepts the live exposition
/// as is, and every series the daemon promises is in it.
#[test]
fn the_exposition_passes_promtool_and_has_every_required_series() {
    let node = node_with_metrics("m-series");
    // Some traffic, so the labelled families have members.
    node.lab
        .pod_ns(0)
        .ping(node.lab.pod_ipv4(1), 2)
        .expect("ping pod 1");
    let text = scrape_when_up(&node);

    let (ok, said) = promtool_check(&text).unwrap();
    assert!(
        ok && said.trim().is_empty(),
        "promtool check metrics: {said}\n--- exposition ---\n{text}"
    );

    let samples = samples(&text).unwrap();
    let has = |name: &str, labels: &[&str]| {
        samples.iter().any(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|l| s.labels.iter().any(|(key, _)| key == l))
        })
    };
    let required: [(&str, &[&str]); 18] = [
        ("visibility_datapath_packets_total", &["hook", "verdict"]),
        ("visibility_redirected_packets_total", &[]),
        ("visibility_redirected_bytes_total", &[]),
        ("visibility_flow_map_entries", &[]),
        ("visibility_flow_map_fill_ratio", &[]),
        ("visibility_flow_evictions_total", &[]),
        ("visibility_pod_interfaces", &[]),
        ("visibility_attach_failures_total", &[]),
        ("visibility_health_check_passing", &["check"]),
        ("visibility_flow_records_emitted_total", &[]),
        ("visibility_flow_records_dropped_total", &[]),
        ("visibility_ipfix_export_errors_total", &[]),
        ("visibility_flow_record_write_errors_total", &[]),
        ("visibility_flow_record_file_reopens_total", &[]),
        ("visibility_uplink_changes_total", &[]),
        ("visibility_gateway_mac_changes_total", &[]),
        ("visibility_kubernetes_synced", &[]),
        ("visibility_kubernetes_pods", &[]),
    ];
    let missing: Vec<&str> = required
        .iter()
        .filter(|(name, labels)| !has(name, labels))
        .map(|(name, _)| *name)
        .collect();
    assert!(missing.is_empty(), "missing series {missing:?} in:\n{text}");

    // The gauges describe this node: both Pod interfaces attached, every check passing.
    let attached = samples
        .iter()
        .find(|s| {
            s.name == "visibility_pod_interfaces"
                && s.labels.contains(&("state".into(), "attached".into()))
        })
        .map(|s| s.value);
    assert_eq!(attached, Some(2.0), "{text}");
    let checks: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == "visibility_health_check_passing")
        .collect();
    assert!(!checks.is_empty(), "{text}");
    assert!(checks.iter().all(|s| s.value == 1.0), "{checks:?}");
    assert_eq!(
        value_of(&samples, "visibility_attach_failures_total").unwrap(),
        0.0
    );
}

#[test]
fn counters_move_with_the_traffic() {
    let node = node_with_metrics("m-moves");
    let lab = &node.lab;
    // A first packet may find the gateway's neighbour entry unresolved and be counted as
    // `neighbour_resolution` rather than redirected: warm up before the baseline.
    lab.pod_ns(0).ping(lab.pod_ipv4(1), 1).unwrap();
    let before_text = scrape_when_up(&node);
    let before = samples(&before_text).unwrap();

    // Each echo request and each reply is redirected to the gateway: 2 per ping.
    const PINGS: u32 = 5;
    lab.pod_ns(0).ping(lab.pod_ipv4(1), PINGS).unwrap();
    let after_text = scrape(&node).unwrap();
    let after = samples(&after_text).unwrap();

    let delta = |name: &str| value_of(&after, name).unwrap() - value_of(&before, name).unwrap();
    let packets = delta("visibility_redirected_packets_total");
    assert!(
        packets >= f64::from(2 * PINGS),
        "redirected packets moved by {packets} for {PINGS} pings\nbefore:\n{before_text}\nafter:\n{after_text}"
    );
    // An IPv4 echo of ping's default 56 bytes is 84 IP bytes.
    let bytes = delta("visibility_redirected_bytes_total");
    assert!(
        bytes >= f64::from(2 * PINGS * 84),
        "redirected bytes moved by {bytes}"
    );
    // The per-hook family moves too: the Pod's ingress hook redirected the requests.
    let redirected_total = |samples: &[Sample]| -> f64 {
        samples
            .iter()
            .filter(|s| {
                s.name == "visibility_datapath_packets_total"
                    && s.labels
                        .iter()
                        .any(|(k, v)| k == "verdict" && v.contains("redirect"))
            })
            .map(|s| s.value)
            .sum()
    };
    assert!(
        redirected_total(&after) - redirected_total(&before) >= f64::from(2 * PINGS),
        "before:\n{before_text}\nafter:\n{after_text}"
    );
}
