//! `visibility flows`: the flow map, as a table or as the JSON of flow records.

use std::{io::Write as _, path::Path, time::Duration};

use crate::{
    cli::{CliError, open_maps, output},
    config::protocol_name,
    flows::{
        record::{FlowRecord, GkeDetails},
        view::{Clock, Filter, SortKey, interface_names, read_all, record, select},
    },
    kubernetes::PodNames,
    maps::Maps,
};

/// What to show.
pub struct FlowsQuery {
    pub filters: Vec<Filter>,
    pub sort: SortKey,
    pub limit: Option<usize>,
    pub node_name: String,
}

/// The flows, each end named by the Pod that had its address at the flow's last
/// packet (as the running daemon last saved its Pods).
pub fn read(maps: &Maps, query: &FlowsQuery, pods: &PodNames) -> Vec<FlowRecord> {
    let clock = Clock::now();
    let names = interface_names();
    let name_of = |ifindex: u32| names.get(&ifindex).cloned();
    select(
        read_all(maps.flows()),
        &query.filters,
        query.sort,
        query.limit,
        |k, s| {
            let mut record = record(k, s, &clock, &query.node_name, &name_of)?;
            pods.name(&mut record, s.last_seen_ns);
            Some(record)
        },
    )
}

/// `namespace/pod`, or `-` for an end no Pod is known to have.
fn pod_column(details: Option<&GkeDetails>) -> String {
    details.map_or_else(
        || "-".to_owned(),
        |d| format!("{}/{}", d.pod.pod_namespace, d.pod.pod_name),
    )
}

fn render(records: &[FlowRecord]) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let c = &r.connection;
            vec![
                format!("{}:{}", c.src_ip, c.src_port),
                pod_column(r.src_gke_details.as_ref()),
                format!("{}:{}", c.dest_ip, c.dest_port),
                pod_column(r.dest_gke_details.as_ref()),
                protocol_name(c.protocol),
                r.packets_sent.to_string(),
                r.bytes_sent.to_string(),
                r.returned_packets.to_string(),
                r.start_time.get(11..19).unwrap_or("").to_owned(),
                r.end_time.get(11..19).unwrap_or("").to_owned(),
                r.tcp_flags.join(","),
                r.path.to_owned(),
            ]
        })
        .collect();
    output::table(
        &[
            "SOURCE",
            "SOURCE POD",
            "DESTINATION",
            "DESTINATION POD",
            "PROTO",
            "PACKETS",
            "BYTES",
            "RETURNED",
            "FIRST",
            "LAST",
            "TCP FLAGS",
            "PATH",
        ],
        &rows,
    )
}

pub fn flows(
    pin_dir: &Path,
    query: &FlowsQuery,
    json: bool,
    watch: Option<Duration>,
) -> Result<(), CliError> {
    let maps = open_maps(pin_dir)?;
    let Some(interval) = watch else {
        let records = read(&maps, query, &PodNames::saved(pin_dir));
        if json {
            return Ok(output::json(&records)?);
        }
        println!("{}", render(&records));
        println!(
            "{} flows (times are UTC; RETURNED counts packets that came back from the gateway)",
            records.len()
        );
        return Ok(());
    };
    // A live view for people at a terminal: redraw in place, like top.
    loop {
        let records = read(&maps, query, &PodNames::saved(pin_dir));
        let mut out = std::io::stdout().lock();
        write!(out, "\x1b[H\x1b[2J")?;
        writeln!(
            out,
            "visibility flows --watch: {} flows, refreshing every {:?}; Ctrl-C quits\n",
            records.len(),
            interval
        )?;
        writeln!(out, "{}", render(&records))?;
        out.flush()?;
        drop(out);
        std::thread::sleep(interval);
    }
}
