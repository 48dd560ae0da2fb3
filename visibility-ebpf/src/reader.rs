//! Lets the shared parser read the skb, linear or not, with `bpf_skb_load_bytes`.

use aya_ebpf::programs::TcContext;
use visibility_common::packet::PacketReader;

pub struct SkbReader<'a>(pub &'a TcContext);

impl PacketReader for SkbReader<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.0.load::<[u8; N]>(offset).ok()
    }
}
