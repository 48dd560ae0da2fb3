//! Names no other test process uses, `<tag>-<pid>-<n>`, for namespaces, pin directories
//! and files (and a file under such a name, removed on drop); and whether the process
//! that made such a name is gone, so that what it left behind may be removed.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

/// `<tag>-<pid>-<n>`: `n` counts the names this process made. Only the ASCII letters and
/// digits of `tag` are kept, lowercased, at most 12 (`x` when none is left), so that the
/// name fits an interface or namespace name and splits on `-`.
pub fn name(tag: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let tag: String = tag
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .take(12)
        .collect();
    let tag = if tag.is_empty() { "x" } else { &tag };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{tag}-{}-{n}", std::process::id())
}

/// Whether `pid`, read back from a [`name`], is another process that is gone: what it
/// left behind is nobody's.
pub fn is_left_over(pid: u32) -> bool {
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// A file of its own in the temporary directory, `vis-<name>`, removed on drop (also
/// when the test fails).
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    /// A file holding `bytes`.
    pub fn with_bytes(tag: &str, bytes: &[u8]) -> std::io::Result<Self> {
        let path = std::env::temp_dir().join(format!("vis-{}", name(tag)));
        std::fs::write(&path, bytes)?;
        Ok(Self { path })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_letters_and_digits_and_count_up() {
        let pid = std::process::id();
        let a = name("Status_JSON-with-a-long-tag");
        let b = name("");
        let (tag, rest) = a.split_once('-').unwrap();
        assert_eq!(tag, "statusjsonwi");
        assert!(rest.starts_with(&format!("{pid}-")));
        assert!(b.starts_with(&format!("x-{pid}-")));
        assert_ne!(a.rsplit('-').next(), b.rsplit('-').next());
        assert!(!is_left_over(pid));
    }
}
