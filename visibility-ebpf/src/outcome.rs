//! What a program does with a packet, and the slot it is counted in: the outcome of
//! carrying out a verdict.

use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use visibility_common::counters::Counter;

/// What passed packets return: `TC_ACT_UNSPEC`, which hands the packet on to the next
/// TC or TCX program on the hook (`TCX_NEXT`), if any, and then to the kernel.
/// `TC_ACT_OK` would end the chain, and a program attached after ours would never see
/// the packet.
pub const PASS: i32 = TC_ACT_UNSPEC;
/// What dropped packets return.
pub const DROP: i32 = TC_ACT_SHOT;

/// What happened to a packet. Every field is set on every path: the verifier rejects
/// programs that spill registers LLVM left undefined, which enum payloads invite.
#[derive(Clone, Copy)]
pub struct Outcome {
    /// The slot the packet is counted in: the verdict, or why it was passed.
    pub counter: Counter,
    /// The program's return value.
    pub action: i32,
    /// The neighbour was unresolved; the kernel resolves it, then sends.
    pub via_neighbour: bool,
    /// The interface the packet leaves on, 0 when passed.
    pub ifindex: u32,
}

impl Outcome {
    pub const fn pass(counter: Counter) -> Self {
        Self {
            counter,
            action: PASS,
            via_neighbour: false,
            ifindex: 0,
        }
    }

    pub const fn drop(counter: Counter) -> Self {
        Self {
            counter,
            action: DROP,
            via_neighbour: false,
            ifindex: 0,
        }
    }

    /// A redirect helper's result: `TC_ACT_SHOT` means it refused.
    pub fn redirected(counter: Counter, action: i64, via_neighbour: bool, ifindex: u32) -> Self {
        if action == i64::from(TC_ACT_SHOT) {
            return Self::drop(Counter::DroppedRewriteFailed);
        }
        Self {
            counter,
            action: action as i32,
            via_neighbour,
            ifindex,
        }
    }
}
