//! The datapath's header rewrites redone on the host, byte for byte: the hop, and a
//! Service reply's source with its checksums, through the kernel's own checksum
//! arithmetic; and whether a transport checksum verifies, for the invariants.

use anyhow::Result;
use visibility_common::{
    packet::{
        ETH_HLEN, Family, FragmentPart, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
        IPV4_CHECKSUM_OFFSET, IPV4_TTL_OFFSET, IPV6_HOP_LIMIT_OFFSET, Packet, Transport,
        checksum_replace16, fold_checksum, parse,
    },
    testing::transport_sum,
};

/// `decrement_ttl` of `visibility-ebpf`: the headers are in the linear data here.
pub(super) fn decrement_ttl(data: &mut [u8], packet: &Packet) {
    let ttl = packet.ttl - 1;
    match packet.family {
        Family::V4 => {
            let old = u16::from_be_bytes([packet.ttl, packet.protocol]);
            let new = u16::from_be_bytes([ttl, packet.protocol]);
            let at = IPV4_CHECKSUM_OFFSET;
            let check = checksum_replace16(u16::from_be_bytes([data[at], data[at + 1]]), old, new);
            data[IPV4_TTL_OFFSET] = ttl;
            data[at..at + 2].copy_from_slice(&check.to_be_bytes());
        }
        Family::V6 => data[IPV6_HOP_LIMIT_OFFSET] = ttl,
    }
}

// ---------------------------------------------------------------------------------------
// The kernel's checksum helpers (include/net/checksum.h, net/core/utils.c), on an skb
// without a checksum offload (`CHECKSUM_NONE`, as BPF_PROG_TEST_RUN builds it). Values
// are the little-endian loads of the bytes, as on x86 and arm64.
// ---------------------------------------------------------------------------------------

pub(super) fn csum_add(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum.wrapping_add(u32::from(carry))
}

pub(super) fn csum_sub(a: u32, b: u32) -> u32 {
    csum_add(a, !b)
}

pub(super) fn load16(data: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([data[at], data[at + 1]])
}

pub(super) fn store16(data: &mut [u8], at: usize, value: u16) {
    data[at..at + 2].copy_from_slice(&value.to_le_bytes());
}

/// `csum_replace4`: what `bpf_l3_csum_replace` (size 4) and, without offload,
/// `bpf_l4_csum_replace` (sizes 2 and 4) do.
pub(super) fn csum_replace4(data: &mut [u8], at: usize, from: u32, to: u32) {
    let tmp = csum_sub(!u32::from(load16(data, at)), from);
    store16(data, at, fold_checksum(csum_add(tmp, to)));
}

/// `inet_proto_csum_replace_by_diff` without offload.
pub(super) fn csum_replace_by_diff(data: &mut [u8], at: usize, diff: u32) {
    let sum = csum_add(diff, !u32::from(load16(data, at)));
    store16(data, at, fold_checksum(sum));
}

/// `bpf_csum_diff(from, 16, to, 16, 0)`, up to the representation of the 32-bit sum,
/// which folding makes the same.
pub(super) fn csum_diff(from: &[u8; 16], to: &[u8; 16]) -> u32 {
    let mut sum = 0u32;
    for i in 0..4 {
        let word =
            |a: &[u8; 16]| u32::from_le_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
        sum = csum_add(sum, !word(from));
        sum = csum_add(sum, word(to));
    }
    sum
}

/// A helper that reads or writes `len` bytes at `at` fails past the end of the packet.
pub(super) fn within(data: &[u8], at: usize, len: usize) -> Result<(), ()> {
    if at + len <= data.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// `bpf_l4_csum_replace` with `BPF_F_MARK_MANGLED_0` (`mangled`, for UDP): a checksum
/// field of 0 (none) is left alone, and a result of 0 is written as 0xffff.
pub(super) fn l4_replace(
    data: &mut [u8],
    at: usize,
    mangled: bool,
    update: impl FnOnce(&mut [u8]),
) {
    if mangled && load16(data, at) == 0 {
        return;
    }
    update(data);
    if mangled && load16(data, at) == 0 {
        store16(data, at, 0xffff);
    }
}

/// What `rewrite_source` of `visibility-ebpf` must do, step by step and with the same
/// helpers' checks (a failing helper leaves what the steps before it wrote). This is
/// the intended behaviour where the datapath has open findings (see
/// `tests/fuzz/corpus/README.md`): a later fragment carries neither the ports nor the
/// transport checksum, so only its address changes (finding B); a UDP checksum that
/// sums to zero is written as 0xffff, as `BPF_F_MARK_MANGLED_0` does (finding C).
pub(super) fn rewrite_source(
    data: &mut [u8],
    packet: &Packet,
    addr: &[u8; 16],
    port: u16,
) -> Result<(), ()> {
    let l4 = usize::from(packet.l4_offset);
    let check = match packet.protocol {
        IPPROTO_TCP => l4 + 16,
        _ => l4 + 6,
    };
    let later = packet.fragment == FragmentPart::Later;
    let udp_without_checksum =
        !later && packet.family == Family::V4 && packet.protocol == IPPROTO_UDP && {
            within(data, check, 2)?;
            load16(data, check) == 0
        };
    let l4_update = !later && !udp_without_checksum;
    let mangled = packet.protocol == IPPROTO_UDP;
    match packet.family {
        Family::V4 => {
            let old =
                u32::from_le_bytes([packet.src[0], packet.src[1], packet.src[2], packet.src[3]]);
            let new = u32::from_le_bytes([addr[0], addr[1], addr[2], addr[3]]);
            if l4_update {
                within(data, check, 2)?;
                l4_replace(data, check, mangled, |d| csum_replace4(d, check, old, new));
            }
            csum_replace4(data, IPV4_CHECKSUM_OFFSET, old, new);
            data[ETH_HLEN + 12..ETH_HLEN + 16].copy_from_slice(&addr[..4]);
        }
        Family::V6 => {
            let diff = csum_diff(&packet.src, addr);
            if l4_update {
                within(data, check, 2)?;
                l4_replace(data, check, mangled, |d| {
                    csum_replace_by_diff(d, check, diff)
                });
            }
            data[ETH_HLEN + 8..ETH_HLEN + 24].copy_from_slice(addr);
        }
    }
    let old_port = packet.src_port.to_be();
    let new_port = port.to_be();
    if old_port != new_port && !later {
        if l4_update {
            within(data, check, 2)?;
            l4_replace(data, check, mangled, |d| {
                csum_replace4(d, check, u32::from(old_port), u32::from(new_port))
            });
        }
        within(data, l4, 2)?;
        data[l4..l4 + 2].copy_from_slice(&port.to_be_bytes());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Checksums, for the invariants
// ---------------------------------------------------------------------------------------

/// Whether the transport checksum of a whole, complete TCP, UDP, ICMP or ICMPv6 packet
/// verifies; `None` for anything else (fragments, other protocols, unreadable headers).
/// A UDP checksum of zero over IPv4 (none) verifies; over IPv6 it does not.
pub fn l4_checksum_ok(frame: &[u8]) -> Option<bool> {
    let packet = parse(frame, frame.len()).ok()?;
    if packet.fragment != FragmentPart::Whole || packet.transport != Transport::Read {
        return None;
    }
    let l4 = usize::from(packet.l4_offset);
    let end = ETH_HLEN + usize::from(packet.ip_len);
    let body = frame.get(l4..end)?;
    let checked = match packet.protocol {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        IPPROTO_ICMP if packet.family == Family::V4 => 2,
        IPPROTO_ICMPV6 if packet.family == Family::V6 => 2,
        _ => return None,
    };
    if body.len() < checked + 2 {
        return None;
    }
    if packet.protocol == IPPROTO_UDP && body[6..8] == [0, 0] {
        return Some(packet.family == Family::V4);
    }
    let sum = transport_sum(&packet, body);
    Some(sum == 0)
}
