//! IPFIX messages (RFC 7011): the message header, template sets (re-sent every
//! [`TEMPLATE_REFRESH`], as RFC 7011 §8.4 asks of UDP), and data sets with fixed and
//! variable-length fields, batched up to a message size.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use visibility_common::flow::{FlowKey, FlowStats, Path};

use super::template::{TEMPLATE_IPV4, TEMPLATE_IPV6, template_set};
use crate::{flows::view::Clock, net::addr_from_bytes};

/// How often templates are sent again (RFC 7011 §8.4: over UDP, periodically).
pub const TEMPLATE_REFRESH: Duration = Duration::from_secs(60);
/// The Observation Domain of every message: one exporter per node.
pub const OBSERVATION_DOMAIN: u32 = 1;

const VERSION: u16 = 10;
const MESSAGE_HEADER: usize = 16;
const SET_HEADER: usize = 4;

/// `flowDirection` 0: the node observes each flow as it enters from the sending Pod.
const DIRECTION_INGRESS: u8 = 0;

/// A Pod's namespace and name, when known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

/// One flow over one interval, as a data record says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportRecord {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub octets: u64,
    pub packets: u64,
    /// Milliseconds since the Unix epoch: first and last packet of the interval.
    pub start_ms: u64,
    pub end_ms: u64,
    pub tcp_flags: u8,
    pub ingress_ifindex: u32,
    pub egress_ifindex: u32,
    /// [`Path::name`], or `unknown`.
    pub path: &'static str,
    /// Filled once Pod names are known (sent as empty strings until then).
    pub src_pod: Option<PodName>,
    pub dst_pod: Option<PodName>,
}

impl ExportRecord {
    /// The record of one flow's interval deltas: the same key and stats the JSON record
    /// of the interval is made of.
    pub fn new(key: &FlowKey, stats: &FlowStats, clock: &Clock) -> Option<Self> {
        let family = key.family()?;
        Some(Self {
            src: addr_from_bytes(family, &key.src_addr),
            dst: addr_from_bytes(family, &key.dst_addr),
            src_port: key.src_port,
            dst_port: key.dst_port,
            protocol: key.protocol,
            octets: stats.bytes,
            packets: stats.packets,
            start_ms: clock.unix_millis(stats.first_seen_ns),
            end_ms: clock.unix_millis(stats.last_seen_ns),
            tcp_flags: stats.tcp_flags,
            ingress_ifindex: stats.ingress_ifindex,
            egress_ifindex: stats.egress_ifindex,
            path: stats.path().map_or("unknown", Path::name),
            src_pod: None,
            dst_pod: None,
        })
    }

    fn template_id(&self) -> u16 {
        if self.src.is_ipv6() {
            TEMPLATE_IPV6
        } else {
            TEMPLATE_IPV4
        }
    }

    /// Appends the data record, in the order of its template's fields.
    fn encode(&self, out: &mut Vec<u8>) {
        for addr in [self.src, self.dst] {
            match addr {
                IpAddr::V4(v4) => out.extend_from_slice(&v4.octets()),
                IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()),
            }
        }
        out.extend_from_slice(&self.src_port.to_be_bytes());
        out.extend_from_slice(&self.dst_port.to_be_bytes());
        out.push(self.protocol);
        out.extend_from_slice(&self.octets.to_be_bytes());
        out.extend_from_slice(&self.packets.to_be_bytes());
        out.extend_from_slice(&self.start_ms.to_be_bytes());
        out.extend_from_slice(&self.end_ms.to_be_bytes());
        out.extend_from_slice(&u16::from(self.tcp_flags).to_be_bytes());
        out.extend_from_slice(&self.ingress_ifindex.to_be_bytes());
        out.extend_from_slice(&self.egress_ifindex.to_be_bytes());
        out.push(DIRECTION_INGRESS);
        put_string(out, self.path);
        for pod in [&self.src_pod, &self.dst_pod] {
            let pod = pod.as_ref();
            put_string(out, pod.map_or("", |p| p.namespace.as_str()));
            put_string(out, pod.map_or("", |p| p.name.as_str()));
        }
    }
}

/// A variable-length field (RFC 7011 §7): one length octet, or 255 and two octets.
fn put_string(out: &mut Vec<u8>, text: &str) {
    let bytes = &text.as_bytes()[..text.len().min(usize::from(u16::MAX))];
    match u8::try_from(bytes.len()) {
        Ok(short) if short < 255 => out.push(short),
        _ => {
            out.push(255);
            out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(bytes);
}

/// Builds IPFIX messages for one collector: keeps its sequence number and when it last
/// sent templates.
#[derive(Debug)]
pub struct Encoder {
    /// The largest message: the path MTU less the IP and UDP headers.
    max_message: usize,
    /// Data records sent before the next message (RFC 7011 §3.1), modulo 2^32.
    sequence: u32,
    templates_sent: Option<Instant>,
}

impl Encoder {
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message: max_message.clamp(512, usize::from(u16::MAX)),
            sequence: 0,
            templates_sent: None,
        }
    }

    /// Whether the templates are due: never sent, or sent [`TEMPLATE_REFRESH`] ago.
    pub fn templates_due(&self, now: Instant) -> bool {
        self.templates_sent
            .is_none_or(|sent| now.duration_since(sent) >= TEMPLATE_REFRESH)
    }

    /// The messages that carry `records`, each no larger than the path allows; the
    /// first begins with the templates when they are due (and is sent even without
    /// records, to refresh them). `export_secs` is the time of export, Unix seconds.
    pub fn messages(
        &mut self,
        records: &[ExportRecord],
        now: Instant,
        export_secs: u32,
    ) -> Vec<Vec<u8>> {
        let mut messages = Vec::new();
        let mut message = Message::start(self.sequence, export_secs);
        if self.templates_due(now) {
            message.bytes.extend_from_slice(&template_set());
            self.templates_sent = Some(now);
        }
        let mut encoded = Vec::new();
        for record in records {
            encoded.clear();
            record.encode(&mut encoded);
            let template = record.template_id();
            let set_header = if message.open_set == Some(template) {
                0
            } else {
                SET_HEADER
            };
            if message.bytes.len() + set_header + encoded.len() > self.max_message
                && message.records > 0
            {
                messages.push(message.finish());
                message = Message::start(self.sequence, export_secs);
            }
            message.add(template, &encoded);
            self.sequence = self.sequence.wrapping_add(1);
        }
        if message.bytes.len() > MESSAGE_HEADER {
            messages.push(message.finish());
        }
        messages
    }
}

/// A message being built: the header, then sets, the last of which may be open.
struct Message {
    bytes: Vec<u8>,
    /// The template of the data set records are being added to, and where it starts.
    open_set: Option<u16>,
    open_set_start: usize,
    records: usize,
}

impl Message {
    fn start(sequence: u32, export_secs: u32) -> Self {
        let mut bytes = Vec::with_capacity(1500);
        bytes.extend_from_slice(&VERSION.to_be_bytes());
        bytes.extend_from_slice(&[0, 0]); // length, in finish
        bytes.extend_from_slice(&export_secs.to_be_bytes());
        bytes.extend_from_slice(&sequence.to_be_bytes());
        bytes.extend_from_slice(&OBSERVATION_DOMAIN.to_be_bytes());
        Self {
            bytes,
            open_set: None,
            open_set_start: 0,
            records: 0,
        }
    }

    fn add(&mut self, template: u16, record: &[u8]) {
        if self.open_set != Some(template) {
            self.close_set();
            self.open_set = Some(template);
            self.open_set_start = self.bytes.len();
            self.bytes.extend_from_slice(&template.to_be_bytes());
            self.bytes.extend_from_slice(&[0, 0]); // length, in close_set
        }
        self.bytes.extend_from_slice(record);
        self.records += 1;
    }

    fn close_set(&mut self) {
        if self.open_set.take().is_some() {
            let length = (self.bytes.len() - self.open_set_start) as u16;
            let at = self.open_set_start + 2;
            self.bytes[at..at + 2].copy_from_slice(&length.to_be_bytes());
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.close_set();
        let length = self.bytes.len() as u16;
        self.bytes[2..4].copy_from_slice(&length.to_be_bytes());
        self.bytes
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::flows::ipfix::template::{
        ENTERPRISE_BIT, ENTERPRISE_NUMBER, TEMPLATE_SET_ID, VARIABLE_LENGTH, enterprise,
    };

    /// A record of a TCP flow from `src_port`, for the tests here and the exporter's.
    pub fn record(ipv6: bool, src_port: u16) -> ExportRecord {
        let (src, dst): (IpAddr, IpAddr) = if ipv6 {
            ("fd00::2".parse().unwrap(), "fd00::3".parse().unwrap())
        } else {
            ("10.52.0.2".parse().unwrap(), "10.52.0.3".parse().unwrap())
        };
        ExportRecord {
            src,
            dst,
            src_port,
            dst_port: 8080,
            protocol: 6,
            octets: 351,
            packets: 6,
            start_ms: 1_700_000_000_000,
            end_ms: 1_700_000_000_250,
            tcp_flags: 0x1b,
            ingress_ifindex: 7,
            egress_ifindex: 9,
            path: "via_gateway",
            src_pod: None,
            dst_pod: None,
        }
    }

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([bytes[at], bytes[at + 1]])
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    /// The sets of a message: (set id, body), checking that their lengths add up to the
    /// message's.
    fn sets(message: &[u8]) -> Vec<(u16, &[u8])> {
        assert_eq!(u16_at(message, 0), VERSION);
        assert_eq!(usize::from(u16_at(message, 2)), message.len());
        assert_eq!(u32_at(message, 12), OBSERVATION_DOMAIN);
        let mut at = MESSAGE_HEADER;
        let mut out = Vec::new();
        while at < message.len() {
            let id = u16_at(message, at);
            let length = usize::from(u16_at(message, at + 2));
            assert!(length >= SET_HEADER && at + length <= message.len());
            out.push((id, &message[at + SET_HEADER..at + length]));
            at += length;
        }
        assert_eq!(at, message.len());
        out
    }

    /// A field specifier parsed back: element id, length, enterprise number.
    type Specifier = (u16, u16, Option<u32>);

    /// A template set parsed back: each template's id and field specifiers.
    fn templates(body: &[u8]) -> Vec<(u16, Vec<Specifier>)> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < body.len() {
            let id = u16_at(body, at);
            let count = u16_at(body, at + 2);
            at += 4;
            let mut fields = Vec::new();
            for _ in 0..count {
                let element = u16_at(body, at);
                let length = u16_at(body, at + 2);
                at += 4;
                let pen = (element & ENTERPRISE_BIT != 0).then(|| {
                    at += 4;
                    u32_at(body, at - 4)
                });
                fields.push((element & !ENTERPRISE_BIT, length, pen));
            }
            out.push((id, fields));
        }
        out
    }

    /// An IPFIX record and the JSON record of one flow's interval say the same.
    #[test]
    fn the_ipfix_and_json_records_of_an_interval_carry_the_same_counts() {
        let mut key = FlowKey {
            family: 6,
            protocol: 17,
            src_port: 4000,
            dst_port: 53,
            ..Default::default()
        };
        key.src_addr = "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        key.dst_addr = "fd00::3".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let stats = FlowStats {
            packets: 12,
            bytes: 1776,
            first_seen_ns: 1_000_000_000,
            last_seen_ns: 3_500_000_000,
            tcp_flags: 0x12,
            path: Path::ViaGateway as u8,
            ..Default::default()
        };
        let clock = Clock::now();
        let ipfix = ExportRecord::new(&key, &stats, &clock).unwrap();
        let json = crate::flows::view::record(&key, &stats, &clock, "n", &|_| None).unwrap();
        assert_eq!(ipfix.src.to_string(), json.connection.src_ip);
        assert_eq!(ipfix.dst.to_string(), json.connection.dest_ip);
        assert_eq!(ipfix.src_port, json.connection.src_port);
        assert_eq!(ipfix.dst_port, json.connection.dest_port);
        assert_eq!(ipfix.protocol, json.connection.protocol);
        assert_eq!(
            (ipfix.packets, ipfix.octets),
            (json.packets_sent, json.bytes_sent)
        );
        assert_eq!(ipfix.path, json.path);
        assert_eq!(ipfix.end_ms - ipfix.start_ms, 2_500);
    }

    #[test]
    fn templates_use_the_standard_elements_and_ours() {
        let mut encoder = Encoder::new(1472);
        let messages = encoder.messages(&[], Instant::now(), 1);
        assert_eq!(messages.len(), 1, "templates alone make a message");
        let sets = sets(&messages[0]);
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].0, TEMPLATE_SET_ID);
        let templates = templates(sets[0].1);
        assert_eq!(
            templates.iter().map(|t| t.0).collect::<Vec<_>>(),
            [TEMPLATE_IPV4, TEMPLATE_IPV6]
        );
        let standard = |t: &[Specifier]| -> Vec<u16> {
            t.iter().filter(|f| f.2.is_none()).map(|f| f.0).collect()
        };
        let common = [7, 11, 4, 1, 2, 152, 153, 6, 10, 14, 61];
        let v4: Vec<u16> = [8, 12].into_iter().chain(common).collect();
        let v6: Vec<u16> = [27, 28].into_iter().chain(common).collect();
        assert_eq!(standard(&templates[0].1), v4);
        assert_eq!(standard(&templates[1].1), v6);
        for (_, fields) in &templates {
            let enterprise: Vec<_> = fields.iter().filter(|f| f.2.is_some()).collect();
            assert_eq!(enterprise.len(), 5);
            assert!(enterprise.iter().all(|f| f.1 == VARIABLE_LENGTH));
            assert!(enterprise.iter().all(|f| f.2 == Some(ENTERPRISE_NUMBER)));
            assert_eq!(enterprise[0].0, enterprise::FLOW_PATH);
        }
    }

    #[test]
    fn a_data_record_carries_every_field_in_template_order() {
        let mut encoder = Encoder::new(1472);
        let r = record(false, 40000);
        let messages = encoder.messages(std::slice::from_ref(&r), Instant::now(), 7);
        let sets = sets(&messages[0]);
        assert_eq!(sets.len(), 2, "templates, then data");
        let (id, data) = sets[1];
        assert_eq!(id, TEMPLATE_IPV4);
        assert_eq!(&data[0..4], &[10, 52, 0, 2]);
        assert_eq!(&data[4..8], &[10, 52, 0, 3]);
        assert_eq!(u16_at(data, 8), 40000);
        assert_eq!(u16_at(data, 10), 8080);
        assert_eq!(data[12], 6);
        assert_eq!(u64_at(data, 13), 351);
        assert_eq!(u64_at(data, 21), 6);
        assert_eq!(u64_at(data, 29), r.start_ms);
        assert_eq!(u64_at(data, 37), r.end_ms);
        assert_eq!(u16_at(data, 45), 0x1b);
        assert_eq!(u32_at(data, 47), 7);
        assert_eq!(u32_at(data, 51), 9);
        assert_eq!(data[55], DIRECTION_INGRESS);
        assert_eq!(data[56], 11);
        assert_eq!(&data[57..68], b"via_gateway");
        // Four empty Pod strings while names are unknown.
        assert_eq!(&data[68..], &[0, 0, 0, 0]);
        assert_eq!(u32_at(&messages[0], 4), 7, "export time");
    }

    #[test]
    fn long_strings_take_the_three_octet_length() {
        let mut out = Vec::new();
        put_string(&mut out, &"p".repeat(300));
        assert_eq!(&out[..3], &[255, 1, 44]);
        assert_eq!(out.len(), 303);
        out.clear();
        put_string(&mut out, &"p".repeat(254));
        assert_eq!(out[0], 254);
    }

    #[test]
    fn records_are_batched_up_to_the_message_size_with_counted_sequence_numbers() {
        let max = 600;
        let mut encoder = Encoder::new(max);
        let records: Vec<ExportRecord> = (0..40).map(|i| record(i % 3 == 0, i)).collect();
        let now = Instant::now();
        let messages = encoder.messages(&records, now, 1);
        assert!(messages.len() > 1);
        let mut sequence = 0;
        let mut data_records = 0;
        for message in &messages {
            assert!(message.len() <= max, "{} > {max}", message.len());
            assert_eq!(u32_at(message, 8), sequence, "records sent before it");
            let mut in_message = 0;
            for (id, body) in sets(message) {
                if id == TEMPLATE_SET_ID {
                    continue;
                }
                let one = if id == TEMPLATE_IPV6 { 96 } else { 72 };
                assert_eq!(body.len() % one, 0);
                in_message += body.len() / one;
            }
            // Full: another record of either family would not have fitted.
            if message != messages.last().unwrap() {
                assert!(message.len() + SET_HEADER + 96 > max);
            }
            sequence += in_message as u32;
            data_records += in_message;
        }
        assert_eq!(data_records, records.len());
        // The next message goes on from there, without templates (not yet due).
        let next = encoder.messages(&records[..1], now + Duration::from_secs(1), 2);
        assert_eq!(u32_at(&next[0], 8), 40);
        assert!(sets(&next[0]).iter().all(|(id, _)| *id != TEMPLATE_SET_ID));
    }

    #[test]
    fn templates_are_sent_again_on_the_timer() {
        let mut encoder = Encoder::new(1472);
        let start = Instant::now();
        assert!(encoder.templates_due(start));
        encoder.messages(&[], start, 1);
        assert!(!encoder.templates_due(start + TEMPLATE_REFRESH / 2));
        assert!(
            encoder
                .messages(&[], start + TEMPLATE_REFRESH / 2, 1)
                .is_empty()
        );
        let later = start + TEMPLATE_REFRESH;
        assert!(encoder.templates_due(later));
        let again = encoder.messages(&[record(true, 1)], later, 1);
        assert_eq!(sets(&again[0])[0].0, TEMPLATE_SET_ID);
    }
}
