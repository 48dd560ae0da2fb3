//! The eBPF object a daemon loads: the datapath built into this binary, or one read from
//! a file (`--ebpf-object`, for tests and advanced use), checked before anything on the
//! node changes.

use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
};

use aya_obj::maps::PinningType;

use crate::{error::DatapathError, pins::ProgramKind};

/// The eBPF object, built by build.rs; empty when built with AYA_BUILD_SKIP.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/visibility-datapath"));

/// The benchmarks' eBPF object (`bench_baseline`, `lab_router`), built by build.rs
/// next to the datapath's; empty when built with AYA_BUILD_SKIP. Only the benches and
/// their lab load it (feature `bench-programs`); the daemon never does.
#[cfg(feature = "bench-programs")]
pub static BENCH_EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/visibility-bench"));

/// The object a daemon loads.
#[derive(Clone, Debug, Default)]
pub enum EbpfObject {
    /// [`EBPF_OBJECT`], this binary's own.
    #[default]
    BuiltIn,
    /// Read from `path`: a `visibility-datapath` object with this binary's map layouts.
    File { path: PathBuf, bytes: AlignedBytes },
}

impl EbpfObject {
    /// Reads the object at `path` and checks that it is a datapath object whose pinned
    /// maps are laid out as this binary's: the daemon takes them up through their pins
    /// and records the object with this binary's layout version, which must then be
    /// true. Nothing on the node changes before this passes.
    pub fn read(path: &Path) -> Result<Self, DatapathError> {
        let raw = fs::read(path).map_err(|source| DatapathError::ObjectFileUnreadable {
            path: path.to_owned(),
            source,
        })?;
        let bytes = AlignedBytes::copy_of(&raw);
        check_datapath(bytes.as_slice()).map_err(|source| DatapathError::ObjectFileInvalid {
            path: path.to_owned(),
            source,
        })?;
        Ok(EbpfObject::File {
            path: path.to_owned(),
            bytes,
        })
    }

    /// The object's bytes, aligned as aya's ELF parser wants them.
    pub fn bytes(&self) -> &[u8] {
        match self {
            EbpfObject::BuiltIn => EBPF_OBJECT,
            EbpfObject::File { bytes, .. } => bytes.as_slice(),
        }
    }
}

/// A file's bytes in 8-byte-aligned memory: ELF headers are read in place, and aya's
/// parser refuses them misaligned.
#[derive(Clone)]
pub struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    fn copy_of(bytes: &[u8]) -> Self {
        let words = bytes
            .chunks(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                u64::from_ne_bytes(word)
            })
            .collect();
        Self {
            words,
            len: bytes.len(),
        }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: the words own at least `len` initialized bytes (`copy_of` made one word
        // per eight bytes), any byte is a valid u8, and the slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}

impl fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.len)
    }
}

/// What an upgrade shares between two objects: each map pinned by name, with its type,
/// key size, value size and entries.
type PinnedMapLayouts = BTreeMap<String, [u32; 4]>;

fn pinned_map_layouts(object: &aya_obj::Object) -> PinnedMapLayouts {
    object
        .maps
        .iter()
        .filter(|(_, map)| map.pinning() == PinningType::ByName)
        .map(|(name, map)| {
            let layout = [
                map.map_type(),
                map.key_size(),
                map.value_size(),
                map.max_entries(),
            ];
            (name.clone(), layout)
        })
        .collect()
}

type Reason = Box<dyn std::error::Error + Send + Sync>;

/// Whether `bytes` are a datapath object: an eBPF ELF file with the three programs and
/// the pinned maps of this binary's own object, laid out the same.
fn check_datapath(bytes: &[u8]) -> Result<(), Reason> {
    let object = aya_obj::Object::parse(bytes)?;
    if let Some(missing) = ProgramKind::ALL
        .iter()
        .map(|kind| kind.name())
        .find(|name| !object.programs.contains_key(*name))
    {
        return Err(format!("it has no program {missing}").into());
    }
    if EBPF_OBJECT.is_empty() {
        return Err("this binary carries no object of its own to compare its maps with (built with AYA_BUILD_SKIP)".into());
    }
    let ours = pinned_map_layouts(&aya_obj::Object::parse(EBPF_OBJECT)?);
    let theirs = pinned_map_layouts(&object);
    if let Some(name) = ours
        .keys()
        .chain(theirs.keys())
        .find(|name| ours.get(*name) != theirs.get(*name))
    {
        return Err(
            format!("its pinned map {name} is not this binary's (another layout version)").into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(tag: &str, bytes: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("vis-ebpf-object-{tag}-{}.o", std::process::id()));
        fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn bytes_keep_their_length_and_sit_aligned() {
        for len in [0, 1, 7, 8, 9, 4096 + 3] {
            let raw: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let bytes = AlignedBytes::copy_of(&raw);
            assert_eq!(bytes.as_slice(), raw.as_slice());
            assert_eq!(bytes.as_slice().as_ptr().align_offset(8), 0);
        }
    }

    #[test]
    fn a_missing_or_foreign_file_is_refused_and_the_built_in_object_passes() {
        let missing = Path::new("/nonexistent/visibility-datapath");
        assert!(matches!(
            EbpfObject::read(missing),
            Err(DatapathError::ObjectFileUnreadable { .. })
        ));
        let not_elf = temp_file("not-elf", b"not an ELF file");
        let refused = EbpfObject::read(&not_elf);
        fs::remove_file(&not_elf).unwrap();
        assert!(matches!(
            refused,
            Err(DatapathError::ObjectFileInvalid { .. })
        ));
        if EBPF_OBJECT.is_empty() {
            return; // Built with AYA_BUILD_SKIP: no object to read back.
        }
        let own = temp_file("own", EBPF_OBJECT);
        let read = EbpfObject::read(&own);
        fs::remove_file(&own).unwrap();
        assert_eq!(read.unwrap().bytes(), EBPF_OBJECT);
    }
}
