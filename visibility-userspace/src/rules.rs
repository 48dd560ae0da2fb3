//! Addresses, protocols and exemptions as the command line and the configuration write
//! them: parsed, and formatted back the same way.

use std::{net::IpAddr, str::FromStr};

use ipnet::IpNet;

use crate::{error::InputError, maps::Exemption};

/// Parses `10.52.0.0/24` or a bare address (as a /32 or /128).
pub fn parse_cidr(text: &str) -> Result<IpNet, InputError> {
    let text = text.trim();
    IpNet::from_str(text)
        .or_else(|_| IpAddr::from_str(text).map(IpNet::from))
        .map_err(|_| InputError::Cidr(text.to_owned()))
}

/// Parses a protocol name or number.
pub fn parse_protocol(text: &str) -> Result<u8, InputError> {
    match text.to_ascii_lowercase().as_str() {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        "icmpv6" => Ok(58),
        "sctp" => Ok(132),
        number => number
            .parse::<u8>()
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| InputError::Protocol(text.to_owned())),
    }
}

/// The name of a protocol number, for display.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        0 => "any".to_owned(),
        1 => "icmp".to_owned(),
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        58 => "icmpv6".to_owned(),
        132 => "sctp".to_owned(),
        other => other.to_string(),
    }
}

/// Parses `CIDR[,PROTO[/PORT]]`.
pub fn parse_exemption(text: &str) -> Result<Exemption, InputError> {
    let bad = || InputError::Exempt(text.to_owned());
    let (cidr, rest) = match text.split_once(',') {
        Some((cidr, rest)) => (cidr, Some(rest)),
        None => (text, None),
    };
    let cidr = parse_cidr(cidr).map_err(|_| bad())?.trunc();
    let (protocol, port) = match rest {
        None => (0, 0),
        Some(rest) => {
            let (protocol, port) = match rest.split_once('/') {
                Some((protocol, port)) => (protocol, Some(port)),
                None => (rest, None),
            };
            let protocol = parse_protocol(protocol)?;
            let port = match port {
                Some(port) => port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(bad)?,
                None => 0,
            };
            if port != 0 && !matches!(protocol, 6 | 17 | 132) {
                return Err(bad());
            }
            (protocol, port)
        }
    };
    Ok(Exemption {
        cidr,
        protocol,
        port,
    })
}

/// Formats an exemption the way [`parse_exemption`] reads it.
pub fn format_exemption(exemption: &Exemption) -> String {
    match (exemption.protocol, exemption.port) {
        (0, _) => exemption.cidr.to_string(),
        (protocol, 0) => format!("{},{}", exemption.cidr, protocol_name(protocol)),
        (protocol, port) => format!("{},{}/{port}", exemption.cidr, protocol_name(protocol)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exemptions_parse_and_format_round_trip() {
        for text in [
            "10.0.0.0/8",
            "10.0.0.10/32,udp/53",
            "fd00::/64,tcp",
            "10.1.0.0/16,132/9",
        ] {
            let exemption = parse_exemption(text).unwrap();
            assert_eq!(
                parse_exemption(&format_exemption(&exemption)).unwrap(),
                exemption,
                "{text}"
            );
        }
        let dns = parse_exemption("10.0.0.10,udp/53").unwrap();
        assert_eq!(
            (dns.cidr.prefix_len(), dns.protocol, dns.port),
            (32, 17, 53)
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/8,bogus",
            "10.0.0.0/8,udp/0",
            "10.0.0.0/8,udp/70000",
            "10.0.0.0/8,icmp/5",
        ] {
            assert!(parse_exemption(bad).is_err(), "{bad:?}");
        }
    }
}
