//! What is compared, and how: the modes, the client's and the server's CPUs and Pods,
//! the gateway kinds, and the command line.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail, ensure};

pub(crate) const CLIENT_CPU: usize = 0;
pub(crate) const SERVER_CPU: usize = 1;
pub(crate) const CLIENT_POD: usize = 0;
pub(crate) const SERVER_POD: usize = 1;
pub(crate) const IPERF_PORT: u16 = 5201;
pub(crate) const UDP_PAYLOAD: usize = 64;
pub(crate) const RR_PAYLOAD: usize = 64;
pub(crate) const MODES: [Mode; 3] = [Mode::Off, Mode::Netd, Mode::Visibility];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Off,
    Netd,
    Visibility,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Netd => "netd",
            Mode::Visibility => "visibility",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) rounds: usize,
    pub(crate) tcp_secs: u32,
    pub(crate) udp_secs: f64,
    pub(crate) udp_warmup_secs: f64,
    pub(crate) rr_requests: usize,
    pub(crate) rr_warmup: usize,
    pub(crate) quick: bool,
    /// `--gateway plain|offloaded`: what the stand-in VPC does with a packet (see
    /// [`GatewayKind`]), to show how much of the cost is the stand-in VPC's own work.
    pub(crate) gateway: GatewayKind,
    /// `--profile DIR`: after the rounds, one more UDP run per mode with `perf`
    /// recording the client CPU; the recordings and reports go to DIR, and the document
    /// says where each packet's time goes.
    pub(crate) profile_dir: Option<PathBuf>,
}

/// What the gateway namespace, the stand-in for the VPC, does with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GatewayKind {
    /// As in the demo and the tests: routes, with an nftables firewall and conntrack
    /// accounting (a flow log).
    Firewall,
    /// Only routes.
    Plain,
    /// Routes in TC ([`GatewayRouter`]), so its IP stack never runs: the nearest this
    /// machine comes to a VPC whose work happens off the node.
    Offloaded,
}

impl GatewayKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            GatewayKind::Firewall => "firewall",
            GatewayKind::Plain => "plain",
            GatewayKind::Offloaded => "offloaded",
        }
    }

    pub(crate) fn description(self) -> &'static str {
        match self {
            GatewayKind::Firewall => {
                "gateway namespace routes with an nftables firewall and conntrack accounting"
            }
            GatewayKind::Plain => {
                "gateway namespace only routes: no nftables table, no connection tracking"
            }
            GatewayKind::Offloaded => {
                "gateway namespace routes in TC (FIB lookup, MACs, one hop): its IP stack never runs, as if the VPC worked off the node"
            }
        }
    }
}

impl Options {
    pub(crate) fn full() -> Self {
        Self {
            rounds: 3,
            tcp_secs: 5,
            udp_secs: 4.0,
            udp_warmup_secs: 0.5,
            rr_requests: 20_000,
            rr_warmup: 2_000,
            quick: false,
            gateway: GatewayKind::Firewall,
            profile_dir: None,
        }
    }

    pub(crate) fn quick() -> Self {
        Self {
            rounds: 1,
            tcp_secs: 1,
            udp_secs: 1.0,
            udp_warmup_secs: 0.2,
            rr_requests: 2_000,
            rr_warmup: 200,
            quick: true,
            gateway: GatewayKind::Firewall,
            profile_dir: None,
        }
    }

    /// `--quick`, `--rounds N`; `--bench` (which cargo bench passes) is ignored.
    pub(crate) fn parse(args: impl Iterator<Item = String>) -> Result<Self> {
        let args: Vec<String> = args.collect();
        let mut options = if args.iter().any(|a| a == "--quick") {
            Self::quick()
        } else {
            Self::full()
        };
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            match arg.as_str() {
                "--quick" | "--bench" => {}
                "--rounds" => {
                    options.rounds = iter
                        .next()
                        .context("--rounds needs a number")?
                        .parse()
                        .context("--rounds")?;
                    ensure!(options.rounds >= 1, "--rounds must be at least 1");
                }
                "--gateway" => {
                    options.gateway = match iter.next().map(String::as_str) {
                        Some("firewall") => GatewayKind::Firewall,
                        Some("plain") => GatewayKind::Plain,
                        Some("offloaded") => GatewayKind::Offloaded,
                        other => {
                            bail!("--gateway takes firewall, plain or offloaded, not {other:?}")
                        }
                    };
                }
                "--profile" => {
                    let dir = iter.next().context("--profile needs a directory")?;
                    std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
                    options.profile_dir = Some(dir.into());
                }
                other => bail!(
                    "unknown argument {other:?} (known: --quick, --rounds N, --gateway firewall|plain|offloaded, --profile DIR)"
                ),
            }
        }
        Ok(options)
    }
}
