//! `visibility status`: the live maps, plus what the daemon reported.

use std::{path::Path, process::ExitCode};

use serde::Serialize;

use crate::{
    cli::{CliError, open_maps, output},
    config::format_exemption,
    datapath::{EBPF_OBJECT, PinDir},
    kubernetes::KubeState,
    object::{self, ObjectInfo},
    pod_cidrs::CidrSource,
    state::{Check, DaemonStatus},
};

#[derive(Serialize)]
struct CounterRow {
    hook: &'static str,
    counter: &'static str,
    packets: u64,
    bytes: u64,
}

/// A Pod CIDR and where it came from.
#[derive(Serialize)]
struct PodCidrRow {
    cidr: String,
    /// `configured`, `kubernetes`, `cni` or `routes` (as the daemon last said), or
    /// `learned` for one the daemon learned when it is not running to say how.
    source: String,
}

/// The pinned eBPF object's identity (see [`crate::object`]).
#[derive(Serialize)]
struct ObjectRow {
    layout_version: u32,
    sha256: String,
    /// Whether it is this binary's own (built-in) object; when not, this binary's
    /// daemon, started (without `--ebpf-object`), replaces the programs.
    same_as_this_binary: bool,
}

#[derive(Serialize)]
struct Status {
    enabled: bool,
    daemon_running: bool,
    healthy: bool,
    daemon: Option<DaemonStatus>,
    pod_cidrs: Vec<String>,
    pod_cidr_sources: Vec<PodCidrRow>,
    exempt: Vec<String>,
    counters: Vec<CounterRow>,
    flow_map_capacity: u32,
    /// `None` for a datapath pinned by a daemon from before it was recorded.
    datapath_object: Option<ObjectRow>,
}

/// Prints the status; the exit code is non-zero when the daemon is not running or a
/// health check fails.
pub fn status(pin_dir: &Path, json: bool) -> Result<ExitCode, CliError> {
    let maps = open_maps(pin_dir)?;
    let settings = maps.settings()?;
    let daemon = DaemonStatus::read_live(pin_dir);
    let counters = maps
        .counters()?
        .into_iter()
        .map(|(hook, counter, value)| CounterRow {
            hook: hook.name(),
            counter: counter.name(),
            packets: value.packets,
            bytes: value.bytes,
        })
        .collect();
    let pod_cidr_sources = maps
        .pod_cidrs_learned()
        .into_iter()
        .map(|(net, learned)| {
            let cidr = net.to_string();
            let reported = daemon
                .iter()
                .flat_map(|d| &d.pod_cidrs)
                .find(|c| c.cidr == cidr)
                .map(|c| c.source.name());
            let source = match (reported, learned) {
                (Some(source), _) => source,
                (None, true) => "learned",
                (None, false) => CidrSource::Configured.name(),
            };
            PodCidrRow {
                cidr,
                source: source.to_owned(),
            }
        })
        .collect();
    let status = Status {
        pod_cidr_sources,
        enabled: settings.enabled != 0,
        daemon_running: daemon.is_some(),
        healthy: daemon.as_ref().is_some_and(DaemonStatus::healthy),
        pod_cidrs: maps.pod_cidrs().iter().map(ToString::to_string).collect(),
        exempt: maps.exemptions().iter().map(format_exemption).collect(),
        counters,
        flow_map_capacity: maps.flow_capacity(),
        datapath_object: object::pinned(&PinDir::new(pin_dir)).map(|pinned| ObjectRow {
            layout_version: pinned.layout_version,
            sha256: pinned.sha256_hex(),
            same_as_this_binary: pinned == ObjectInfo::of(EBPF_OBJECT),
        }),
        daemon,
    };
    if json {
        output::json(&status)?;
    } else {
        print_text(&status);
    }
    Ok(if status.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_text(status: &Status) {
    println!(
        "Visibility:     {}",
        if status.enabled { "on" } else { "off" }
    );
    match &status.daemon {
        Some(d) => println!(
            "Daemon:         running (pid {}, node {}, {} datapath, {} attach, since {})",
            d.pid, d.node_name, d.origin, d.attach_mode, d.started_at
        ),
        None => println!(
            "Daemon:         NOT RUNNING: the datapath keeps its last state; start `visibility daemon`"
        ),
    }
    if let Some(d) = &status.daemon {
        for u in &d.uplinks {
            println!(
                "Uplink ({}):    {} (ifindex {}, {}), gateway {} at {}, return program {}",
                u.family,
                u.uplink,
                u.ifindex,
                if u.up { "up" } else { "DOWN" },
                u.gateway,
                u.gateway_mac.as_deref().unwrap_or("(unresolved)"),
                if u.attached {
                    "attached"
                } else {
                    "NOT attached"
                },
            );
        }
    }
    let pod_cidrs: Vec<String> = status
        .pod_cidr_sources
        .iter()
        .map(|c| format!("{} ({})", c.cidr, c.source))
        .collect();
    println!("Pod CIDRs:      {}", list_or_none(&pod_cidrs));
    println!("Exempt:         {}", list_or_none(&status.exempt));
    println!(
        "Flow map:       {} entries at most",
        status.flow_map_capacity
    );
    match &status.datapath_object {
        Some(o) => println!(
            "eBPF object:    sha256 {}, layout version {}{}",
            o.sha256,
            o.layout_version,
            if o.same_as_this_binary {
                ""
            } else {
                " (not this binary's own: this binary's daemon, started, replaces it)"
            }
        ),
        None => println!("eBPF object:    unknown (pinned by an older daemon)"),
    }
    if let Some(d) = &status.daemon {
        let r = &d.records;
        println!(
            "Flow records:   {} emitted, {} dropped (slow or full sink), {} flows evicted, {} in the flow map",
            r.emitted, r.dropped, r.evictions, r.flow_map_entries
        );
        if !d.ipfix_collectors.is_empty() {
            println!(
                "IPFIX export:   to {}, {} errors (collector down, unreachable or slow)",
                d.ipfix_collectors.join(", "),
                r.ipfix_export_errors
            );
        }
        println!("Kubernetes:     {}", kubernetes_line(&d.kubernetes));
        println!("\nPod interfaces ({}):", d.pod_interfaces.len());
        let rows: Vec<Vec<String>> = d
            .pod_interfaces
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.ifindex.to_string(),
                    p.reason.clone(),
                    if p.attached {
                        "yes".into()
                    } else {
                        format!("NO {}", p.error.clone().unwrap_or_default())
                    },
                ]
            })
            .collect();
        println!(
            "{}",
            indent(&output::table(
                &["INTERFACE", "IFINDEX", "FOUND BY", "ATTACHED"],
                &rows
            ))
        );
    }
    let rows: Vec<Vec<String>> = status
        .counters
        .iter()
        .filter(|c| c.packets > 0)
        .map(|c| {
            vec![
                c.hook.to_owned(),
                c.counter.to_owned(),
                c.packets.to_string(),
                c.bytes.to_string(),
            ]
        })
        .collect();
    println!("\nCounters (non-zero; --json shows all):");
    println!(
        "{}",
        indent(&output::table(
            &["HOOK", "COUNTER", "PACKETS", "BYTES"],
            &rows
        ))
    );
    if let Some(d) = &status.daemon {
        println!("\nHealth:");
        for Check { name, ok, detail } in &d.checks {
            println!("  {} {name}: {detail}", if *ok { "ok  " } else { "FAIL" });
        }
    }
}

/// Whether records name Pods, and if not, why.
fn kubernetes_line(k: &KubeState) -> String {
    let cidrs = if k.node_pod_cidrs.is_empty() {
        String::new()
    } else {
        format!(", Node Pod CIDRs {}", k.node_pod_cidrs.join(", "))
    };
    match k.names_missing {
        None if k.synced => format!(
            "Pods named from the API ({}; {} Pods on this node{cidrs})",
            k.access, k.pods
        ),
        None => format!("({})", k.access),
        Some(why) => format!(
            "records carry NO Pod names: {} ({}){}{cidrs}",
            why.describe(),
            k.access,
            k.last_error
                .as_ref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        ),
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_owned()
    } else {
        items.join(", ")
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
