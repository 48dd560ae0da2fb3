//! TCP throughput: one `iperf3` stream, both ends pinned.

use std::{process::Stdio, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use visibility_tests::{
    lab::{Background, Lab},
    node::poll,
};

use crate::options::*;

pub(crate) fn tcp_throughput(lab: &Lab, secs: u32) -> Result<(f64, Option<u64>)> {
    let server_ip = lab.pod_ipv4(SERVER_POD).to_string();
    let port = IPERF_PORT.to_string();
    let server_ns = lab.pod_ns(SERVER_POD);
    let mut cmd = server_ns.cmd(
        "taskset",
        [
            "-c",
            &SERVER_CPU.to_string(),
            "iperf3",
            "-s",
            "-1",
            "-B",
            &server_ip,
            "-p",
            &port,
        ],
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let server = Background::spawn(cmd)?;
    poll(Duration::from_secs(5), "iperf3 -s listening", || {
        let out = server_ns.run("ss", ["-Hltn", "sport", "=", &format!(":{port}")])?;
        Ok((!out.trim().is_empty()).then_some(()))
    })?;
    let out = lab.pod_ns(CLIENT_POD).run(
        "taskset",
        [
            "-c",
            &CLIENT_CPU.to_string(),
            "iperf3",
            "-c",
            &server_ip,
            "-p",
            &port,
            "-t",
            &secs.to_string(),
            "-J",
        ],
    );
    let _ = server.terminate(Duration::from_secs(2));
    let out = out.context("iperf3 client")?;
    let report: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    if let Some(error) = report["error"].as_str() {
        bail!("iperf3: {error}");
    }
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's report")?;
    let retransmits = report["end"]["sum_sent"]["retransmits"].as_u64();
    Ok((bps / 1e9, retransmits))
}
