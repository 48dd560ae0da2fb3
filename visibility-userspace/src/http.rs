//! The daemon's HTTP listener: `/metrics` (rendered by [`crate::metrics`]) and the
//! Kubernetes probes `/healthz` and `/readyz` (answered by [`crate::probes`]).

use std::{net::SocketAddr, sync::Arc};

use prometheus::{Encoder as _, TextEncoder};

use crate::{
    datapath::PinDir,
    maps::Maps,
    metrics::{self, Shared},
    probes,
};

/// Serves `/metrics`, and the probes `/healthz` and `/readyz` (see [`crate::probes`]),
/// on `addr` from a thread of its own.
pub fn serve(addr: SocketAddr, pins: PinDir, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    let bound = server.server_addr().to_ip().unwrap_or(addr);
    let maps = Maps::open(&pins).map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let probe = |answer: probes::Answer| {
                    tiny_http::Response::from_string(answer.body).with_status_code(answer.status)
                };
                let response = match request.url() {
                    "/metrics" => {
                        let header = tiny_http::Header::from_bytes(
                            "Content-Type",
                            TextEncoder::new().format_type(),
                        )
                        .expect("static header");
                        tiny_http::Response::from_string(metrics::render(&maps, &shared))
                            .with_header(header)
                    }
                    "/healthz" => probe(probes::liveness(&shared)),
                    "/readyz" => probe(probes::readiness(&shared)),
                    _ => tiny_http::Response::from_string("see /metrics, /healthz, /readyz\n")
                        .with_status_code(404),
                };
                let _ = request.respond(response);
            }
        })?;
    Ok(bound)
}
