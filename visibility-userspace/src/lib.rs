//! The node daemon and operator CLI of intranode visibility.
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod discovery;
pub mod error;
pub mod flows;
pub mod health;
pub mod maps;
pub mod metrics;
pub mod net;
pub mod node;
pub mod pod_cidrs;
pub mod probes;
pub mod state;
pub mod variant;
