//! A cpio "newc" archive built in memory: the format of the guests' initramfs.

use std::{collections::BTreeMap, fs, os::unix::fs::PermissionsExt as _, path::Path};

use anyhow::Context as _;

/// A cpio "newc" archive, built in memory.
#[derive(Default)]
pub(super) struct Cpio {
    entries: BTreeMap<String, CpioEntry>,
}

enum CpioEntry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

impl Cpio {
    fn add_parents(&mut self, path: &str) {
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent {
            let dir_str = dir.to_string_lossy();
            if dir_str.is_empty() {
                break;
            }
            self.entries
                .entry(dir_str.into_owned())
                .or_insert(CpioEntry::Dir);
            parent = dir.parent();
        }
    }

    fn key(path: &str) -> String {
        path.trim_start_matches('/').to_owned()
    }

    pub(super) fn dir(&mut self, path: &str) {
        let key = Self::key(path);
        self.add_parents(&key);
        self.entries.insert(key, CpioEntry::Dir);
    }

    pub(super) fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        let key = Self::key(path);
        self.add_parents(&key);
        self.entries.insert(key, CpioEntry::File { data, mode });
    }

    pub(super) fn host_file(&mut self, path: &str, from: &Path) -> anyhow::Result<()> {
        let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        let mode = fs::metadata(from)?.permissions().mode() & 0o7777;
        self.file(path, data, mode);
        Ok(())
    }

    pub(super) fn symlink(&mut self, path: &str, target: &str) {
        let key = Self::key(path);
        self.add_parents(&key);
        self.entries
            .insert(key, CpioEntry::Symlink(target.to_owned()));
    }

    pub(super) fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&Self::key(path))
    }

    /// The archive; parents sort before their children, as the kernel needs.
    pub(super) fn write(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        fn header(
            out: &mut impl std::io::Write,
            ino: u32,
            mode: u32,
            nlink: u32,
            name: &str,
            size: usize,
        ) -> std::io::Result<()> {
            let name_len = name.len() + 1;
            write!(
                out,
                "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{name_len:08x}{:08x}",
                0, 0, 0, 0, 0, 0, 0, 0
            )?;
            out.write_all(name.as_bytes())?;
            out.write_all(&[0])?;
            pad(out, 110 + name_len)
        }
        fn pad(out: &mut impl std::io::Write, len: usize) -> std::io::Result<()> {
            out.write_all(&[0u8; 3][..(4 - len % 4) % 4])
        }
        for (ino, (name, entry)) in (1u32..).zip(&self.entries) {
            match entry {
                CpioEntry::Dir => header(out, ino, 0o040755, 2, name, 0)?,
                CpioEntry::File { data, mode } => {
                    header(out, ino, 0o100000 | mode, 1, name, data.len())?;
                    out.write_all(data)?;
                    pad(out, data.len())?;
                }
                CpioEntry::Symlink(target) => {
                    header(out, ino, 0o120777, 1, name, target.len())?;
                    out.write_all(target.as_bytes())?;
                    pad(out, target.len())?;
                }
            }
        }
        header(out, 0, 0, 1, "TRAILER!!!", 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_newc_with_parents_first() {
        let mut cpio = Cpio::default();
        cpio.file("/a/b/c", b"xyz".to_vec(), 0o644);
        cpio.symlink("/a/l", "b");
        let mut out = Vec::new();
        cpio.write(&mut out).unwrap();
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        let a = text.find("a\0").unwrap();
        let ab = text.find("a/b\0").unwrap();
        let abc = text.find("a/b/c\0").unwrap();
        assert!(a < ab && ab < abc);
        assert!(text.starts_with("070701"));
        assert!(text.contains("TRAILER!!!\0"));
    }
}
