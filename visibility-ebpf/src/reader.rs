//! Lets the shared parser read the skb: straight from the linear data when the
//! headers are there (almost always), with `bpf_skb_load_bytes` when they are not.

use aya_ebpf::programs::TcContext;
use visibility_common::packet::PacketReader;

pub struct SkbReader<'a>(pub &'a TcContext);

impl PacketReader for SkbReader<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        match packet_ptr::<[u8; N]>(self.0, offset) {
            // SAFETY: `packet_ptr` checked that the bytes lie within the linear data.
            Some(ptr) => Some(unsafe { ptr.read_unaligned() }),
            None => self.0.load::<[u8; N]>(offset).ok(),
        }
    }
}

/// Headers further into the packet than this are read with the helper. The bound also
/// tells the verifier how far a pointer can reach: older kernels (6.1) lose track of
/// an offset summed over IPv6 extension headers and refuse the access otherwise.
const MAX_DIRECT_OFFSET: usize = 1024;

/// A pointer to a `T` at `offset` in the linear packet data, if all of it is there.
/// Direct access saves a helper call per read or write; the verifier checks the
/// bound, and un-clones the skb before the program runs if the program writes.
#[inline(always)]
pub fn packet_ptr<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    // Opaque to LLVM, so that the bound is checked on the very register the pointer is
    // computed from: LLVM would otherwise move the check onto an earlier value (before
    // the extension headers' lengths were added), where the verifier cannot use it.
    let offset = core::hint::black_box(offset);
    if offset > MAX_DIRECT_OFFSET {
        return None;
    }
    let start = ctx.data() + offset;
    if start + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(start as *mut T)
}
