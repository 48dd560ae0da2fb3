//! Reads a whole hash map with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+): a few syscalls per
//! thousand flows instead of two per flow. aya 0.14 has no batch API, so this is the
//! one raw `bpf(2)` call in the project; on kernels without it, it falls back to
//! aya's per-key iteration.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{HashMap, MapData};
use visibility_common::flow::{FlowKey, FlowStats};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries fetched per syscall.
const CHUNK: usize = 4096;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of the flow map.
pub fn read_flows(map: &HashMap<MapData, FlowKey, FlowStats>) -> Vec<(FlowKey, FlowStats)> {
    use aya::maps::IterableMap as _;
    let fd = map.map().fd().as_fd().as_raw_fd();
    match lookup_batch(fd) {
        Some(entries) => entries,
        None => map.iter().filter_map(Result::ok).collect(),
    }
}

/// `None` when the kernel has no batch lookup for this map.
fn lookup_batch(fd: i32) -> Option<Vec<(FlowKey, FlowStats)>> {
    let mut out = Vec::new();
    let mut keys = vec![FlowKey::default(); CHUNK];
    let mut values = vec![FlowStats::default(); CHUNK];
    // Hash maps use a bucket index as the opaque batch position.
    let mut position: u32 = 0;
    let mut next: u32 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_mut(&mut position) as u64
            },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: attr points at buffers of `count` keys and values of the map's sizes,
        // and at two u32 batch positions, all alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                std::ptr::from_mut(&mut attr),
                size_of::<BatchAttr>(),
            )
        };
        let errno = if rc < 0 {
            std::io::Error::last_os_error().raw_os_error()
        } else {
            None
        };
        let filled = attr.count as usize;
        out.extend(
            keys[..filled]
                .iter()
                .copied()
                .zip(values[..filled].iter().copied()),
        );
        match errno {
            None => {}
            Some(libc::ENOENT) => return Some(out),
            // No batch support (old kernel or map type): let the caller iterate.
            Some(_) if first && filled == 0 => return None,
            Some(_) => return Some(out),
        }
        position = next;
        first = false;
    }
}
