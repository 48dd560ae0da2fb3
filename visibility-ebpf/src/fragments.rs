//! Fragments take the path of their datagram's first fragment.
//!
//! Only the first fragment carries the ports. When it is judged, its ports and its
//! verdict are remembered by the datagram's addresses, protocol and identification;
//! later fragments find them there, are judged the same way and counted in the same
//! flow. The node's conntrack reassembles and re-fragments in order, so after the
//! node's stack the first fragment comes first; a later one that comes first anyway is
//! judged without ports, and the datagram's other fragments follow it.

use visibility_common::{
    counters::Counter,
    packet::{FragmentPart, Packet},
};

use crate::{
    maps::FRAGMENTS,
    types::{FragmentEntry, FragmentKey},
};

impl FragmentEntry {
    /// The first fragment's verdict.
    #[inline(always)]
    pub fn verdict(&self) -> Option<Counter> {
        Counter::from_index(u32::from(self.verdict))
    }
}

#[inline(always)]
fn key_of(packet: &Packet) -> FragmentKey {
    FragmentKey {
        src: packet.src,
        dst: packet.dst,
        id: packet.fragment_id,
        family: packet.family as u8,
        protocol: packet.protocol,
        _pad: [0; 2],
    }
}

/// For a later fragment: what its first fragment left, with the datagram's ports put
/// into `packet`. `None` for whole datagrams and first fragments, and for a later
/// fragment whose first was not seen.
#[inline(always)]
pub fn of_later_fragment(packet: &mut Packet) -> Option<FragmentEntry> {
    if packet.fragment != FragmentPart::Later {
        return None;
    }
    // SAFETY: the value is copied out at once.
    let entry = *unsafe { FRAGMENTS.get(key_of(packet)) }?;
    packet.src_port = entry.src_port;
    packet.dst_port = entry.dst_port;
    Some(entry)
}

/// Remembers a fragment's ports and verdict for the fragments that follow it. Whole
/// datagrams need nothing remembered.
#[inline(always)]
pub fn remember(packet: &Packet, verdict: Counter) {
    if packet.fragment == FragmentPart::Whole {
        return;
    }
    let entry = FragmentEntry {
        src_port: packet.src_port,
        dst_port: packet.dst_port,
        verdict: verdict as u8,
        _pad: [0; 3],
    };
    // Best effort: without the entry, later fragments are judged without ports.
    let _ = FRAGMENTS.insert(key_of(packet), entry, 0);
}
