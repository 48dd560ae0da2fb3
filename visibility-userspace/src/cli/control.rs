//! `enable`, `disable`, `exempt` and `pod-cidr`: changes to the live maps that take
//! effect on the next packet and survive daemon restarts (the maps are pinned).

use std::path::Path;

use crate::{
    cli::{CliError, open_maps, output},
    config::{format_exemption, parse_cidr, parse_exemption, protocol_name},
};

pub fn set_enabled(pin_dir: &Path, enabled: bool) -> Result<(), CliError> {
    let mut maps = open_maps(pin_dir)?;
    let _lock = maps.lock()?;
    let was = maps.settings()?.enabled != 0;
    maps.set_enabled(enabled)?;
    let word = if enabled { "on" } else { "off" };
    if was == enabled {
        println!("visibility was already {word}");
    } else {
        println!("visibility is now {word}, from the next packet on");
    }
    Ok(())
}

pub fn exempt_add(pin_dir: &Path, rule: &str) -> Result<(), CliError> {
    let exemption = parse_exemption(rule)?;
    let mut maps = open_maps(pin_dir)?;
    let _lock = maps.lock()?;
    let mut all = maps.exemptions();
    if all.contains(&exemption) {
        println!("{} is already exempt", format_exemption(&exemption));
        return Ok(());
    }
    all.push(exemption);
    maps.set_exemptions(&all)?;
    println!("exempt: {}", format_exemption(&exemption));
    Ok(())
}

pub fn exempt_remove(pin_dir: &Path, rule: &str) -> Result<(), CliError> {
    let exemption = parse_exemption(rule)?;
    let mut maps = open_maps(pin_dir)?;
    let _lock = maps.lock()?;
    let mut all = maps.exemptions();
    let before = all.len();
    all.retain(|e| *e != exemption);
    if all.len() == before {
        return Err(CliError::Input(crate::error::InputError::NotPresent(
            format!(
                "{} is not exempt; `visibility exempt list` shows what is",
                format_exemption(&exemption)
            ),
        )));
    }
    maps.set_exemptions(&all)?;
    println!("no longer exempt: {}", format_exemption(&exemption));
    Ok(())
}

#[derive(serde::Serialize)]
struct ExemptionRow {
    cidr: String,
    protocol: String,
    port: Option<u16>,
    rule: String,
}

pub fn exempt_list(pin_dir: &Path, json: bool) -> Result<(), CliError> {
    let maps = open_maps(pin_dir)?;
    let rows: Vec<ExemptionRow> = maps
        .exemptions()
        .iter()
        .map(|e| ExemptionRow {
            cidr: e.cidr.to_string(),
            protocol: protocol_name(e.protocol),
            port: (e.port != 0).then_some(e.port),
            rule: format_exemption(e),
        })
        .collect();
    if json {
        return Ok(output::json(&rows)?);
    }
    if rows.is_empty() {
        println!("no exempt ranges");
        return Ok(());
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.cidr.clone(),
                r.protocol.clone(),
                r.port.map_or("any".into(), |p| p.to_string()),
            ]
        })
        .collect();
    println!("{}", output::table(&["CIDR", "PROTOCOL", "PORT"], &cells));
    Ok(())
}

pub fn pod_cidr_add(pin_dir: &Path, cidr: &str) -> Result<(), CliError> {
    let net = parse_cidr(cidr)?.trunc();
    let mut maps = open_maps(pin_dir)?;
    let _lock = maps.lock()?;
    if maps.pod_cidrs().contains(&net) {
        println!("{net} is already a Pod CIDR");
        return Ok(());
    }
    maps.add_pod_cidr(&net, &crate::net::node_addresses())?;
    println!("Pod CIDR added: {net}");
    Ok(())
}

pub fn pod_cidr_remove(pin_dir: &Path, cidr: &str) -> Result<(), CliError> {
    let net = parse_cidr(cidr)?.trunc();
    let mut maps = open_maps(pin_dir)?;
    let _lock = maps.lock()?;
    if !maps.remove_pod_cidr(&net)? {
        return Err(CliError::Input(crate::error::InputError::NotPresent(
            format!("{net} is not a Pod CIDR; `visibility pod-cidr list` shows them"),
        )));
    }
    println!("Pod CIDR removed: {net}");
    Ok(())
}

pub fn pod_cidr_list(pin_dir: &Path, json: bool) -> Result<(), CliError> {
    let maps = open_maps(pin_dir)?;
    let cidrs: Vec<String> = maps.pod_cidrs().iter().map(ToString::to_string).collect();
    if json {
        return Ok(output::json(&cidrs)?);
    }
    if cidrs.is_empty() {
        println!("no Pod CIDRs");
    } else {
        println!("{}", cidrs.join("\n"));
    }
    Ok(())
}
