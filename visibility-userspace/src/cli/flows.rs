//! `visibility flows`: the flow map, as a table or as the JSON of flow records.

use std::{io::Write as _, path::Path, time::Duration};

use crate::{
    cli::{CliError, open_maps, output},
    config::protocol_name,
    flows::{
        record::FlowRecord,
        view::{Clock, Filter, SortKey, interface_names, read_all, record, select},
    },
    maps::Maps,
};

/// What to show.
pub struct FlowsQuery {
    pub filters: Vec<Filter>,
    pub sort: SortKey,
    pub limit: Option<usize>,
    pub node_name: String,
}

pub fn read(maps: &Maps, query: &FlowsQuery) -> Vec<FlowRecord> {
    let clock = Clock::now();
    let names = interface_names();
    let name_of = |ifindex: u32| names.get(&ifindex).cloned();
    select(
        read_all(maps.flows()),
        &query.filters,
        query.sort,
        query.limit,
        |k, s| record(k, s, &clock, &query.node_name, &name_of),
    )
}

fn render(records: &[FlowRecord]) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let c = &r.connection;
            vec![
                format!("{}:{}", c.src_ip, c.src_port),
                format!("{}:{}", c.dest_ip, c.dest_port),
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
            "DESTINATION",
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
        let records = read(&maps, query);
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
        let records = read(&maps, query);
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
