//! IPFIX export (RFC 7011) over UDP: the same per-interval flows as the JSON records,
//! sent to one or more collectors (`--ipfix HOST:PORT`). There is no maintained IPFIX
//! encoder for export in Rust, so the few parts of RFC 7011 an exporter over UDP
//! needs are written here: [`template`] lays out the records, [`encode`] builds the
//! messages, [`export`] sends them.

pub mod encode;
pub mod export;
mod template;
