//! Reads a whole hash map with `BPF_MAP_LOOKUP_BATCH`, and writes and deletes many
//! entries with `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH` (Linux 5.6+): a few
//! syscalls per thousand flows instead of one or two per flow. aya 0.14 has no batch
//! API, so these are the project's raw `bpf(2)` calls; on kernels without them, the
//! callers fall back to aya's per-key calls.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{HashMap, MapData};
use visibility_common::flow::{FlowKey, FlowStats};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
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

/// Runs the batch command `cmd` with `attr`; the error, if any, with `attr.count`
/// saying how many entries were done before it.
fn batch_syscall(cmd: libc::c_long, attr: &mut BatchAttr) -> Result<(), std::io::Error> {
    // SAFETY: the callers make attr point at buffers of `count` keys (and values) of
    // the map's sizes, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Writes `keys[i]` to `values[i]` in the hash map `map` (whose key and value sizes
/// are `K`'s and `V`'s) with `BPF_MAP_UPDATE_BATCH`. On an error, says how many entries
/// were written before it.
pub fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, std::io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    batch_syscall(BPF_MAP_UPDATE_BATCH, &mut attr).map_err(|e| (attr.count as usize, e))
}

/// Deletes `keys` from the hash map `map` with `BPF_MAP_DELETE_BATCH`. On an error (a
/// key not there: `ENOENT`), says how many keys were deleted before it.
pub fn delete_batch<K: aya::Pod>(map: &MapData, keys: &[K]) -> Result<(), (usize, std::io::Error)> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    batch_syscall(BPF_MAP_DELETE_BATCH, &mut attr).map_err(|e| (attr.count as usize, e))
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
        // attr points at buffers of `count` keys and values of the map's sizes, and at
        // two u32 batch positions, all alive for the call.
        let errno = batch_syscall(BPF_MAP_LOOKUP_BATCH, &mut attr)
            .err()
            .and_then(|e| e.raw_os_error());
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
