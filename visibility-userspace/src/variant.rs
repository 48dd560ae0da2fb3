//! Which build of `pod_egress` the loader asks the kernel's verifier to take: the
//! fastest one it accepts, chosen through constants of the object's `.rodata`.

use std::fmt;

use aya::util::KernelVersion;

/// How many paths of `pod_egress` the verifier is asked to walk. Both variants give
/// the same verdicts and counts; they differ in cost per packet and in the number of
/// instructions the verifier walks, which every kernel caps at a million.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// With the flow shortcuts: a flow judged own-Pod-to-Pod lately skips the
    /// judgement's three lookups. Verified in about 515,000 instructions on Linux 6.12
    /// and 620,000 on 6.18; more than Linux 6.1's verifier walks.
    FlowShortcuts,
    /// Every packet judged with every lookup, and the parsed packet copied through a
    /// per-CPU slot so that the verifier walks all kinds of packet as one (about 15 ns
    /// a packet): what Linux 6.1 verifies (about 745,000 instructions).
    JudgeEveryPacket,
}

/// The oldest kernel (major, minor) whose verifier took the flow shortcuts in the VM
/// tier (`cargo xtask vm-test --test smoke:verifier_cost`); older ones judge every packet.
const FLOW_SHORTCUTS_MIN_KERNEL: (u8, u8) = (6, 12);

impl Variant {
    /// The variant to try first on `kernel` (`None`: unknown, so the cautious one).
    pub fn for_kernel(kernel: Option<KernelVersion>) -> Self {
        let (major, minor) = FLOW_SHORTCUTS_MIN_KERNEL;
        if kernel.is_some_and(|k| k >= KernelVersion::new(major, minor, 0)) {
            Self::FlowShortcuts
        } else {
            Self::JudgeEveryPacket
        }
    }

    /// What to try when the verifier refuses this one (a kernel that backported or
    /// lacks what its version promises).
    pub fn fallback(self) -> Option<Self> {
        match self {
            Self::FlowShortcuts => Some(Self::JudgeEveryPacket),
            Self::JudgeEveryPacket => None,
        }
    }

    /// `JUDGE_EVERY_PACKET` of the object (`visibility_common::global_names`).
    pub fn judge_every_packet(self) -> u8 {
        u8::from(self == Self::JudgeEveryPacket)
    }

    /// `WALK_PACKET_KINDS_AS_ONE` of the object.
    pub fn walk_packet_kinds_as_one(self) -> u8 {
        u8::from(self == Self::JudgeEveryPacket)
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::FlowShortcuts => "flow-shortcuts",
            Self::JudgeEveryPacket => "judge-every-packet",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kernel_starts_with_the_variant_its_verifier_took() {
        let on = |major, minor| Variant::for_kernel(Some(KernelVersion::new(major, minor, 0)));
        assert_eq!(on(6, 18), Variant::FlowShortcuts);
        assert_eq!(on(6, 12), Variant::FlowShortcuts);
        assert_eq!(on(7, 0), Variant::FlowShortcuts);
        assert_eq!(on(6, 11), Variant::JudgeEveryPacket);
        assert_eq!(on(6, 1), Variant::JudgeEveryPacket);
        assert_eq!(Variant::for_kernel(None), Variant::JudgeEveryPacket);
    }

    #[test]
    fn a_refusal_steps_down_to_judging_every_packet() {
        assert_eq!(
            Variant::FlowShortcuts.fallback(),
            Some(Variant::JudgeEveryPacket)
        );
        assert_eq!(Variant::JudgeEveryPacket.fallback(), None);
        let globals = |v: Variant| (v.judge_every_packet(), v.walk_packet_kinds_as_one());
        assert_eq!(globals(Variant::FlowShortcuts), (0, 0));
        assert_eq!(globals(Variant::JudgeEveryPacket), (1, 1));
    }
}
