//! What a TC program returns, and the datapath's names for the hooks its programs run
//! at and for the lab's address families.

use visibility::datapath::ProgramKind;
use visibility_common::{packet::Family, verdict::Hook};

use crate::lab::IpFamily;

/// `TC_ACT_OK`: the packet goes on through the kernel, and no other TC program on the
/// hook sees it.
pub const TC_ACT_OK: u32 = 0;
/// `TC_ACT_UNSPEC` (-1) as the kernel reports it: the packet goes on to the next
/// program on the hook (`TCX_NEXT`), then through the kernel. What the datapath
/// returns for every packet it passes.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
/// `TC_ACT_SHOT`: the packet is dropped.
pub const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`: a redirect helper chose the packet's next device.
pub const TC_ACT_REDIRECT: u32 = 7;

/// The hook a program runs at.
pub fn hook_of(kind: ProgramKind) -> Hook {
    match kind {
        ProgramKind::PodIngress => Hook::PodIngress,
        ProgramKind::PodEgress => Hook::PodEgress,
        ProgramKind::UplinkIngress => Hook::Uplink,
    }
}

/// The datapath's family of a lab family.
pub fn family(family: IpFamily) -> Family {
    match family {
        IpFamily::V4 => Family::V4,
        IpFamily::V6 => Family::V6,
    }
}
