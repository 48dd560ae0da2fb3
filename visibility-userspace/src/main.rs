//! `visibility`: the node daemon and the operator CLI of intranode visibility.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use visibility::{
    cli::{self, flows::FlowsQuery},
    config::{Layer, NodeConfig},
    datapath::{DEFAULT_PIN_DIR, EbpfObject},
    flows::view::{Filter, SortKey},
};

/// Intranode visibility: same-node Pod-to-Pod traffic goes through the VPC gateway,
/// so firewall rules, routes, flow logs and packet mirroring apply to it.
///
/// Run `visibility daemon` on every node (a DaemonSet does it), then use the other
/// commands on the node, or through `kubectl exec`, to see and steer it. They read
/// and change the pinned BPF maps directly; changes take effect on the next packet.
#[derive(Parser)]
#[command(name = "visibility", version, propagate_version = true)]
struct Cli {
    /// Where programs, links and maps are pinned (must be on bpffs).
    #[arg(long, global = true, env = "VISIBILITY_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon in the foreground until SIGTERM.
    ///
    /// Loads and pins the datapath (or adopts a pinned one), attaches it to every Pod
    /// interface as Pods come and go, and reports health. Settings come from the
    /// built-in defaults, then --config, then flags, then VISIBILITY_* variables
    /// (VISIBILITY_POD_CIDR, VISIBILITY_EXEMPT, ...: lists separated by spaces).
    Daemon(Box<DaemonArgs>),
    /// Show whether visibility is on, the uplink and gateway, Pod CIDRs, exempt
    /// ranges, Pod interfaces, counters and health. Exits non-zero when the daemon is
    /// not running or a health check fails.
    Status {
        /// JSON for machines.
        #[arg(long)]
        json: bool,
    },
    /// Turn visibility on, from the next packet; nothing restarts, connections stay.
    Enable,
    /// Turn visibility off, from the next packet; Pod-to-Pod traffic stays on the node.
    Disable,
    /// Ranges that stay on the node: CIDR[,PROTO[/PORT]], e.g. 10.52.0.10/32,udp/53.
    #[command(subcommand)]
    Exempt(ExemptCommand),
    /// The node's Pod CIDRs: traffic between two addresses in them is redirected.
    #[command(subcommand, name = "pod-cidr")]
    PodCidr(PodCidrCommand),
    /// Per-flow counters from the flow map.
    ///
    /// Filters are KEY=VALUE, all of which must match: src, dst, ip (either end),
    /// sport, dport, port (either end), proto (tcp, udp, icmp, ... or a number) and
    /// path (via_gateway, via_gateway_after_nat, exempt, returned_from_gateway,
    /// not_same_node, local). --json prints VPC-flow-log-compatible records.
    Flows(FlowsArgs),
    /// Remove every program, link and pinned map: the node routes Pod-to-Pod traffic
    /// locally again. Stop the daemon first.
    Teardown,
}

#[derive(Subcommand)]
enum ExemptCommand {
    /// Exempt a range, e.g. `visibility exempt add 10.52.0.10/32,udp/53`.
    Add { rule: String },
    /// Remove an exemption, written as it was added.
    Remove { rule: String },
    /// List the exempt ranges.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PodCidrCommand {
    /// Add a Pod CIDR, e.g. `visibility pod-cidr add 10.52.0.0/24`.
    Add { cidr: String },
    /// Remove a Pod CIDR.
    Remove { cidr: String },
    /// List the Pod CIDRs.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct DaemonArgs {
    /// A TOML file with the same keys as the flags (pod-cidr = ["10.52.0.0/24"], ...),
    /// as a ConfigMap carries it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A Pod CIDR of this node (repeatable; IPv4 and IPv6). An override: by default the
    /// daemon learns them from the node's routes to Pod interfaces and its CNI's ranges.
    #[arg(long = "pod-cidr", value_name = "CIDR")]
    pod_cidr: Vec<String>,
    /// Where the CNI configuration is read, for host-local ranges (default /etc/cni/net.d).
    #[arg(long, value_name = "DIR")]
    cni_conf_dir: Option<String>,
    /// The uplink; by default the default route's interface, per family.
    #[arg(long, value_name = "IFACE")]
    uplink: Option<String>,
    /// The gateway (repeatable, one per family); by default the default route's.
    #[arg(long, value_name = "IP")]
    gateway: Vec<String>,
    /// A range that stays on the node: CIDR[,PROTO[/PORT]] (repeatable).
    #[arg(long, value_name = "CIDR[,PROTO[/PORT]]")]
    exempt: Vec<String>,
    /// Also treat interfaces whose name matches this glob as Pod interfaces.
    #[arg(long, value_name = "GLOB")]
    pod_interfaces: Option<String>,
    /// Entries of the flow map (LRU: a full map evicts the oldest flow).
    #[arg(long, value_name = "N")]
    flow_capacity: Option<u32>,
    /// Start with visibility off (when the datapath is first loaded).
    #[arg(long)]
    disabled: bool,
    /// Seconds between full reconciles; netlink events trigger them sooner.
    #[arg(long, value_name = "SECONDS")]
    reconcile_interval: Option<u64>,
    /// This node's name (a DaemonSet passes NODE_NAME from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Where flow records go: stdout, off, or a file (JSON lines, rotated by size).
    #[arg(long, value_name = "stdout|off|PATH")]
    records: Option<String>,
    /// Flow record aggregation interval: 5s, 30s, 1m, 5m, 10m or 15m (default 5s).
    #[arg(long, value_name = "INTERVAL")]
    records_interval: Option<String>,
    /// Rotate the record file at this many bytes (default 100 MiB).
    #[arg(long, value_name = "BYTES")]
    records_max_bytes: Option<u64>,
    /// Rotated record files to keep (default 5).
    #[arg(long, value_name = "N")]
    records_keep: Option<u32>,
    /// Prometheus endpoint address, or off (default 127.0.0.1:9476).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<String>,
    /// Also export flow records as IPFIX over UDP to this collector (repeatable).
    #[arg(long, value_name = "HOST:PORT")]
    ipfix: Vec<String>,
    /// The Kubernetes API, for Pod names in records and the Node's Pod CIDRs: auto
    /// (in-cluster when in a Pod), off, or a kubeconfig file (default auto).
    #[arg(long, value_name = "auto|off|KUBECONFIG")]
    kubernetes: Option<String>,
    /// The cluster's name, in records' *_gke_details.cluster.cluster_name.
    #[arg(long, value_name = "NAME")]
    cluster_name: Option<String>,
    /// Per-Pod metric series (namespace, pod, workload labels): their number grows with
    /// the Pods, so they are off by default.
    #[arg(long)]
    metrics_pod_labels: bool,
    /// Load the datapath from this eBPF object file instead of the one built into this
    /// binary: for tests (the upgrade test gives another build of the datapath) and
    /// advanced use. It must be a visibility-datapath built from visibility-ebpf with
    /// this binary's map layouts; it is checked before anything changes. A datapath
    /// pinned from another object is replaced with it, as on an upgrade; `status` then
    /// says the pinned object is not this binary's. Hidden from --help.
    #[arg(long, value_name = "FILE", env = "VISIBILITY_EBPF_OBJECT", hide = true)]
    ebpf_object: Option<PathBuf>,
}

impl DaemonArgs {
    fn layer(&self) -> Layer {
        let list = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        Layer {
            pod_cidr: list(&self.pod_cidr),
            cni_conf_dir: self.cni_conf_dir.clone(),
            uplink: self.uplink.clone(),
            gateway: list(&self.gateway),
            exempt: list(&self.exempt),
            pod_interfaces: self.pod_interfaces.clone(),
            enabled: self.disabled.then_some(false),
            flow_capacity: self.flow_capacity,
            reconcile_interval: self.reconcile_interval,
            node_name: self.node_name.clone(),
            records: self.records.clone(),
            records_interval: self.records_interval.clone(),
            records_max_bytes: self.records_max_bytes,
            records_keep: self.records_keep,
            metrics_addr: self.metrics_addr.clone(),
            ipfix: list(&self.ipfix),
            kubernetes: self.kubernetes.clone(),
            cluster_name: self.cluster_name.clone(),
            metrics_pod_labels: self.metrics_pod_labels.then_some(true),
        }
    }
}

#[derive(Args)]
struct FlowsArgs {
    /// JSON records, the same schema as the daemon's flow records.
    #[arg(long)]
    json: bool,
    /// Order.
    #[arg(long, value_enum, default_value_t = SortKey::Bytes)]
    sort: SortKey,
    /// Show at most N flows.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// KEY=VALUE (repeatable): src, dst, ip, sport, dport, port, proto, path.
    #[arg(long, value_name = "KEY=VALUE")]
    filter: Vec<String>,
    /// Refresh in place every N seconds, like top.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "1")]
    watch: Option<f64>,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VISIBILITY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    init_logging(log_format);
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            match log_format {
                LogFormat::Text => eprintln!("error: {error:#}"),
                // One JSON line like every other, so log pipelines keep the fatal one.
                LogFormat::Json => tracing::error!("{error:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let pin_dir = cli.pin_dir;
    match cli.command {
        Command::Daemon(args) => {
            let file = match &args.config {
                Some(path) => Layer::from_file(path)?,
                None => Layer::default(),
            };
            let env = Layer::from_env(std::env::vars())?;
            let config = NodeConfig::resolve(file.overridden_by(args.layer()).overridden_by(env))?;
            let object = match &args.ebpf_object {
                Some(path) => EbpfObject::read(path)?,
                None => EbpfObject::BuiltIn,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting tokio")?;
            runtime.block_on(visibility::daemon::run(pin_dir, config, object))?;
        }
        Command::Status { json } => return Ok(cli::status::status(&pin_dir, json)?),
        Command::Enable => cli::control::set_enabled(&pin_dir, true)?,
        Command::Disable => cli::control::set_enabled(&pin_dir, false)?,
        Command::Exempt(ExemptCommand::Add { rule }) => cli::control::exempt_add(&pin_dir, &rule)?,
        Command::Exempt(ExemptCommand::Remove { rule }) => {
            cli::control::exempt_remove(&pin_dir, &rule)?
        }
        Command::Exempt(ExemptCommand::List { json }) => cli::control::exempt_list(&pin_dir, json)?,
        Command::PodCidr(PodCidrCommand::Add { cidr }) => {
            cli::control::pod_cidr_add(&pin_dir, &cidr)?
        }
        Command::PodCidr(PodCidrCommand::Remove { cidr }) => {
            cli::control::pod_cidr_remove(&pin_dir, &cidr)?
        }
        Command::PodCidr(PodCidrCommand::List { json }) => {
            cli::control::pod_cidr_list(&pin_dir, json)?
        }
        Command::Flows(args) => {
            let filters = args
                .filter
                .iter()
                .map(|f| f.parse::<Filter>())
                .collect::<Result<Vec<_>, _>>()?;
            let query = FlowsQuery {
                filters,
                sort: args.sort,
                limit: args.limit,
                node_name: std::env::var("NODE_NAME").unwrap_or_default(),
            };
            let watch = args.watch.map(|s| Duration::from_secs_f64(s.max(0.2)));
            cli::flows::flows(&pin_dir, &query, args.json, watch)?;
        }
        Command::Teardown => cli::teardown::teardown(&pin_dir)?,
    }
    Ok(ExitCode::SUCCESS)
}
