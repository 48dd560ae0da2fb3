//! Our data records' templates (RFC 7011 §3.4.1): the information elements, IANA's and
//! our enterprise-specific ones, of the IPv4 and the IPv6 template, and the template set
//! that announces both.

/// The Private Enterprise Number of our own information elements: 32473, IANA's
/// number for documentation (RFC 5612), a placeholder until the project registers one.
pub const ENTERPRISE_NUMBER: u32 = 32473;
/// The template of IPv4 flows.
pub const TEMPLATE_IPV4: u16 = 256;
/// The template of IPv6 flows.
pub const TEMPLATE_IPV6: u16 = 257;
pub(super) const TEMPLATE_SET_ID: u16 = 2;
/// A field length that says "variable" (RFC 7011 §7).
pub(super) const VARIABLE_LENGTH: u16 = 0xffff;
/// The enterprise bit of a field specifier's element id.
pub(super) const ENTERPRISE_BIT: u16 = 0x8000;

/// Our enterprise-specific information elements (PEN [`ENTERPRISE_NUMBER`]).
pub mod enterprise {
    /// The path the flow took (`via_gateway`, `local`, `exempt`, …): string.
    pub const FLOW_PATH: u16 = 1;
    /// The source Pod's namespace: string, empty while unknown.
    pub const SOURCE_POD_NAMESPACE: u16 = 2;
    /// The source Pod's name: string, empty while unknown.
    pub const SOURCE_POD_NAME: u16 = 3;
    /// The destination Pod's namespace: string, empty while unknown.
    pub const DESTINATION_POD_NAMESPACE: u16 = 4;
    /// The destination Pod's name: string, empty while unknown.
    pub const DESTINATION_POD_NAME: u16 = 5;
}

/// One field specifier of a template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Field {
    id: u16,
    length: u16,
    enterprise: bool,
}

const fn iana(id: u16, length: u16) -> Field {
    Field {
        id,
        length,
        enterprise: false,
    }
}

const fn ours(id: u16) -> Field {
    Field {
        id,
        length: VARIABLE_LENGTH,
        enterprise: true,
    }
}

/// The fields of both templates after the addresses, in record order (IANA element ids).
const COMMON_FIELDS: [Field; 16] = [
    iana(7, 2),   // sourceTransportPort
    iana(11, 2),  // destinationTransportPort
    iana(4, 1),   // protocolIdentifier
    iana(1, 8),   // octetDeltaCount
    iana(2, 8),   // packetDeltaCount
    iana(152, 8), // flowStartMilliseconds
    iana(153, 8), // flowEndMilliseconds
    iana(6, 2),   // tcpControlBits (two octets since RFC 7125)
    iana(10, 4),  // ingressInterface
    iana(14, 4),  // egressInterface
    iana(61, 1),  // flowDirection
    ours(enterprise::FLOW_PATH),
    ours(enterprise::SOURCE_POD_NAMESPACE),
    ours(enterprise::SOURCE_POD_NAME),
    ours(enterprise::DESTINATION_POD_NAMESPACE),
    ours(enterprise::DESTINATION_POD_NAME),
];

/// The template of a family: its id and its fields.
fn template(ipv6: bool) -> (u16, Vec<Field>) {
    let (id, addresses) = if ipv6 {
        // sourceIPv6Address, destinationIPv6Address
        (TEMPLATE_IPV6, [iana(27, 16), iana(28, 16)])
    } else {
        // sourceIPv4Address, destinationIPv4Address
        (TEMPLATE_IPV4, [iana(8, 4), iana(12, 4)])
    };
    (id, addresses.into_iter().chain(COMMON_FIELDS).collect())
}

/// The template set: both templates.
pub(super) fn template_set() -> Vec<u8> {
    let mut set = Vec::new();
    set.extend_from_slice(&TEMPLATE_SET_ID.to_be_bytes());
    set.extend_from_slice(&[0, 0]); // length, below
    for ipv6 in [false, true] {
        let (id, fields) = template(ipv6);
        set.extend_from_slice(&id.to_be_bytes());
        set.extend_from_slice(&(fields.len() as u16).to_be_bytes());
        for field in fields {
            let id = if field.enterprise {
                field.id | ENTERPRISE_BIT
            } else {
                field.id
            };
            set.extend_from_slice(&id.to_be_bytes());
            set.extend_from_slice(&field.length.to_be_bytes());
            if field.enterprise {
                set.extend_from_slice(&ENTERPRISE_NUMBER.to_be_bytes());
            }
        }
    }
    let length = set.len() as u16;
    set[2..4].copy_from_slice(&length.to_be_bytes());
    set
}
