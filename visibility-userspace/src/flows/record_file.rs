//! The flow record file: JSON lines appended at a path, rotated by size
//! (`flows.jsonl` → `flows.jsonl.1` → … → `flows.jsonl.<keep>`), opened anew when a
//! program outside the daemon (logrotate) moved or removed it, and never left with a
//! partial line: a write that fails (a full disk) is cut back to its last whole line.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// What one write of lines achieved: how many went out whole, and why the rest did not.
#[derive(Debug)]
pub struct Written {
    pub lines: usize,
    pub error: Option<io::Error>,
}

/// Writes `chunk`, whose lines end at the offsets `ends`, to `out` until it is written or
/// a write fails. Returns the lines written whole and the bytes written in all.
pub fn write_counted(out: &mut impl Write, chunk: &[u8], ends: &[usize]) -> (Written, usize) {
    let mut done = 0;
    let mut error = None;
    while done < chunk.len() {
        match out.write(&chunk[done..]) {
            Ok(0) => {
                error = Some(io::Error::from(io::ErrorKind::WriteZero));
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let lines = ends.iter().take_while(|end| **end <= done).count();
    (Written { lines, error }, done)
}

/// The record file at its configured path.
pub struct RecordFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: fs::File,
    /// The file's size, as of the last write batch plus what this process wrote since.
    size: u64,
}

fn open_append(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new().create(true).append(true).open(path)
}

impl RecordFile {
    pub fn open(path: PathBuf, max_bytes: u64, keep: u32) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path,
            max_bytes: max_bytes.max(1),
            keep,
            file,
            size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn rotated(path: &Path, n: u32) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Opens the path anew when the open file is no longer there (renamed or removed
    /// by another program, as logrotate does); returns whether it did. Records written
    /// before stay in the moved file: none is lost, none written twice. Also takes the
    /// file's size anew, which a `copytruncate` rotation cut.
    pub fn reopen_if_moved(&mut self) -> io::Result<bool> {
        let open = self.file.metadata()?;
        let moved = fs::metadata(&self.path).map_or(true, |now| {
            now.dev() != open.dev() || now.ino() != open.ino()
        });
        if moved {
            self.file = open_append(&self.path)?;
        }
        self.size = self.file.metadata()?.len();
        Ok(moved)
    }

    /// Appends `lines` (a newline is added to each), rotating first whenever the next
    /// line would take a non-empty file past its size limit. Stops at the first failed
    /// write: the lines after it are not written.
    pub fn write_lines(&mut self, lines: &[String]) -> Written {
        let mut written = 0;
        let mut chunk = Vec::new();
        let mut ends = Vec::new();
        for line in lines {
            let len = line.len() as u64 + 1;
            let pending = self.size + chunk.len() as u64;
            if pending > 0 && pending + len > self.max_bytes {
                let done = self.append(&chunk, &ends);
                written += done.lines;
                if done.error.is_some() {
                    return Written {
                        lines: written,
                        error: done.error,
                    };
                }
                chunk.clear();
                ends.clear();
                if let Err(error) = self.rotate() {
                    // Keep writing to the file as it is: too big beats lost.
                    tracing::warn!(%error, path = %self.path.display(), "rotating the flow record file");
                }
            }
            chunk.extend_from_slice(line.as_bytes());
            chunk.push(b'\n');
            ends.push(chunk.len());
        }
        let done = self.append(&chunk, &ends);
        Written {
            lines: written + done.lines,
            error: done.error,
        }
    }

    /// Writes whole lines; after a failed write, cuts the file back to the end of the
    /// last line written whole, so that the next line starts on a line of its own.
    fn append(&mut self, chunk: &[u8], ends: &[usize]) -> Written {
        let (written, bytes) = write_counted(&mut self.file, chunk, ends);
        let whole = written.lines.checked_sub(1).map_or(0, |last| ends[last]);
        if bytes > whole {
            // Best effort: a device (such as /dev/full) cannot be cut, and has no lines.
            let _ = self.file.set_len(self.size + whole as u64);
        }
        self.size += whole as u64;
        written
    }

    /// Size-based rotation, then a new file at the path.
    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                let from = Self::rotated(&self.path, n);
                if from.exists() {
                    fs::rename(&from, Self::rotated(&self.path, n + 1))?;
                }
            }
            fs::rename(&self.path, Self::rotated(&self.path, 1))?;
        }
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vis-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn lines(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("line{i}")).collect()
    }

    #[test]
    fn files_rotate_by_size() {
        let dir = scratch("rotate");
        let path = dir.join("flows.jsonl");
        let mut file = RecordFile::open(path.clone(), 10, 2).unwrap();
        for _ in 0..5 {
            assert!(file.write_lines(&["12345".to_owned()]).error.is_none());
        }
        assert!(RecordFile::rotated(&path, 1).exists());
        assert!(RecordFile::rotated(&path, 2).exists());
        assert!(!RecordFile::rotated(&path, 3).exists());
        assert!(fs::metadata(&path).unwrap().len() <= 10);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_moved_away_is_opened_anew_and_nothing_is_lost_or_doubled() {
        let dir = scratch("moved");
        let path = dir.join("flows.jsonl");
        let moved = dir.join("flows.jsonl.logrotate");
        let mut file = RecordFile::open(path.clone(), u64::MAX, 1).unwrap();
        assert!(!file.reopen_if_moved().unwrap());
        assert_eq!(file.write_lines(&lines(3)).lines, 3);
        fs::rename(&path, &moved).unwrap();
        // Written before the check: into the moved file, as logrotate expects.
        assert_eq!(file.write_lines(&lines(1)).lines, 1);
        assert!(file.reopen_if_moved().unwrap());
        assert_eq!(file.write_lines(&lines(2)).lines, 2);
        let count = |p: &Path| fs::read_to_string(p).unwrap().lines().count();
        assert_eq!((count(&moved), count(&path)), (4, 2));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_device_writes_no_line() {
        let mut file = RecordFile::open(PathBuf::from("/dev/full"), u64::MAX, 1).unwrap();
        let written = file.write_lines(&lines(3));
        assert_eq!(written.lines, 0);
        assert_eq!(
            written.error.unwrap().raw_os_error(),
            Some(libc::ENOSPC),
            "/dev/full"
        );
    }

    /// A writer that takes `room` bytes, then fails as a full disk does.
    struct Room(usize, Vec<u8>);

    impl Write for Room {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            self.1.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn only_lines_written_whole_count() {
        let mut out = Room(8, Vec::new());
        // Lines of 4 bytes each: two whole, the third cut.
        let (written, bytes) = write_counted(&mut out, b"aaa\nbbb\nccc\n", &[4, 8, 12]);
        assert_eq!((written.lines, bytes), (2, 8));
        assert!(written.error.is_some());
        let mut out = Room(6, Vec::new());
        let (written, bytes) = write_counted(&mut out, b"aaa\nbbb\n", &[4, 8]);
        assert_eq!((written.lines, bytes), (1, 6));
    }
}
