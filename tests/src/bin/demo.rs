//! The built-in demo: GKE's "verify intranode visibility" walkthrough, replayed in
//! network namespaces of its own. Run it with `cargo xtask demo` (needs root).
//!
//! It builds a node with an uplink, a gateway standing in for the VPC (a router that
//! sends the Pod range back, with an nftables firewall and per-flow accounting), and
//! three ptp-style Pods; it never touches the root namespace's routes, rules or
//! sysctls, and sends no traffic outside its namespaces. Everything is removed at the
//! end, on failure, and on Ctrl-C.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use visibility_tests::{
    lab::{IpFamily, Lab, Reply, TcpServer},
    node::Node,
};

const HTTP_PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(3);

/// What a Ctrl-C must clean up, since it skips destructors.
#[derive(Default)]
struct Cleanup {
    daemon_pid: Option<u32>,
    namespaces: Vec<String>,
    pin_dir: Option<PathBuf>,
}

fn step(number: u32, text: &str) {
    println!("\n[{number}] {text}");
}

fn say(text: &str) {
    println!("    {text}");
}

fn http_get(lab: &Lab, from: usize, to: usize) -> Result<String> {
    let addr = SocketAddr::new(lab.pod_ip(to, IpFamily::V4), HTTP_PORT);
    let reply =
        lab.pod_ns(from)
            .tcp_request(addr, b"GET / HTTP/1.0\r\nHost: pod-2\r\n\r\n", TIMEOUT)?;
    let text = String::from_utf8_lossy(&reply).into_owned();
    Ok(text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or(&text)
        .trim()
        .to_owned())
}

/// pod-2's web server: one "Hello, world!" per connection, with its name.
fn serve_hello(lab: &Lab, pod: usize, connections: usize, timeout: Duration) -> Result<TcpServer> {
    let body = format!("Hello, world! I am pod-{}.", pod + 1);
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let bind = SocketAddr::new(lab.pod_ip(pod, IpFamily::V4), HTTP_PORT);
    TcpServer::start(
        lab.pod_ns(pod),
        bind,
        connections,
        Reply::Fixed(response.into_bytes()),
        timeout,
    )
}

fn main() -> Result<()> {
    let cleanup = Arc::new(Mutex::new(Cleanup::default()));
    let on_signal = cleanup.clone();
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: cleaning up");
        if let Ok(state) = on_signal.lock() {
            clean_up(&state);
        }
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;
    let result = run(&cleanup);
    if let Err(error) = &result {
        eprintln!("\ndemo failed: {error:#}");
    }
    // The Node's destructor tears everything down; this only covers what it missed.
    if let Ok(state) = cleanup.lock() {
        clean_up(&state);
    }
    result
}

fn clean_up(state: &Cleanup) {
    if let Some(pid) = state.daemon_pid {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if let Some(pin_dir) = &state.pin_dir
        && pin_dir.exists()
    {
        let _ = std::process::Command::new(visibility_tests::node::binary())
            .args(["--pin-dir", &pin_dir.display().to_string(), "teardown"])
            .output();
    }
    for name in &state.namespaces {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", name])
            .output();
    }
}

fn run(cleanup: &Arc<Mutex<Cleanup>>) -> Result<()> {
    let started = Instant::now();
    println!("Intranode visibility demo: same-node Pod-to-Pod traffic through the VPC gateway");

    step(
        1,
        "Creating a node with three Pods, and a gateway standing in for the VPC",
    );
    let records =
        std::env::temp_dir().join(format!("visibility-demo-{}.jsonl", std::process::id()));
    let mut node = Node::new("demo", 3)?;
    let log = node.capture_daemon_log();
    {
        let mut state = cleanup.lock().expect("not poisoned");
        state.namespaces = node
            .lab
            .namespaces()
            .iter()
            .map(|ns| ns.name().to_owned())
            .collect();
        state.pin_dir = Some(node.pin_dir.clone());
    }
    say(&format!(
        "pod-1 {}, pod-2 {}, pod-3 {} on one node; the gateway routes the Pod range back to the node",
        node.lab.pod_ipv4(0),
        node.lab.pod_ipv4(1),
        node.lab.pod_ipv4(2)
    ));
    say("the gateway has an nftables firewall and logs every flow (conntrack accounting)");

    step(
        2,
        "Starting the visibility daemon on the node (visibility on)",
    );
    let mut args = Node::default_daemon_args();
    args.extend([
        "--records".into(),
        records.display().to_string(),
        "--records-interval".into(),
        "5s".into(),
    ]);
    node.start_daemon(args)?;
    cleanup.lock().expect("not poisoned").daemon_pid = node.daemon_pid();
    say(&format!(
        "daemon running; {} Pod interfaces attached (its log: {})",
        node.lab.pod_count(),
        log.display()
    ));
    let lab = &node.lab;
    lab.flush_gateway_flows()?;

    step(
        3,
        "pod-1 sends an HTTP request to pod-2's server on port 8080",
    );
    let server = serve_hello(lab, 1, 1, TIMEOUT)?;
    let body = http_get(lab, 0, 1)?;
    server.join()?;
    say(&format!("pod-2 answered: {body:?}"));
    if !body.contains("Hello, world!") {
        bail!("unexpected reply {body:?}");
    }

    step(
        4,
        "The gateway saw the request: its flow log has pod-1 → pod-2",
    );
    let flows = lab.gateway_flows()?;
    let flow = flows
        .iter()
        .find(|f| f.is_between(lab.pod_ipv4(0), lab.pod_ipv4(1)) && f.dport == Some(HTTP_PORT))
        .context("the gateway has no flow for pod-1 → pod-2: the packet stayed on the node")?;
    say(&format!(
        "gateway flow: {} {}:{} → {}:{}, {} packets, {} bytes (replies: {} packets)",
        flow.protocol,
        flow.src,
        flow.sport.unwrap_or(0),
        flow.dst,
        flow.dport.unwrap_or(0),
        flow.packets,
        flow.bytes,
        flow.reply_packets
    ));

    step(
        5,
        "The node's own view: `visibility flows --filter port=8080`",
    );
    for line in node.cli_ok(&["flows", "--filter", "port=8080"])?.lines() {
        say(line);
    }

    step(
        6,
        "A flow record, as VPC flow logs write them (waiting for the 5 s interval)",
    );
    let record = wait_for_record(&records, &lab.pod_ipv4(0).to_string())?;
    say(&record);

    step(
        7,
        "A gateway firewall rule blocks pod-1 → pod-2: with visibility on, the request fails",
    );
    lab.block(lab.pod_ipv4(0), lab.pod_ipv4(1))?;
    let server = serve_hello(lab, 1, 1, Duration::from_secs(4))?;
    match http_get(lab, 0, 1) {
        Ok(body) => bail!("the firewall did not stop the request: {body:?}"),
        Err(_) => say("request timed out: the VPC firewall applies to same-node traffic"),
    }

    step(
        8,
        "Visibility off (`visibility disable`): the same request stays on the node, past the firewall",
    );
    node.cli_ok(&["disable"])?;
    let body = http_get(lab, 0, 1)?;
    drop(server);
    say(&format!("pod-2 answered: {body:?}"));
    node.cli_ok(&["enable"])?;
    lab.unblock(lab.pod_ipv4(0), lab.pod_ipv4(1))?;
    say("visibility on again, firewall rule removed");

    step(9, "Cleaning up: daemon, datapath, namespaces");
    drop(node);
    let _ = std::fs::remove_file(&records);
    cleanup.lock().expect("not poisoned").daemon_pid = None;
    println!(
        "\ndemo finished in {:.0} s: every step passed",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn wait_for_record(path: &std::path::Path, src: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(12);
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Some(line) = text
                .lines()
                .find(|l| l.contains(src) && l.contains(&format!("\"dest_port\":{HTTP_PORT}")))
        {
            let value: serde_json::Value = serde_json::from_str(line)?;
            return Ok(serde_json::to_string_pretty(&value)?
                .lines()
                .collect::<Vec<_>>()
                .join("\n    "));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("no flow record for {src}:{HTTP_PORT} in {}", path.display())
}
