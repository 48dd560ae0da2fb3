//! The record file's disk full: the daemon runs in a mount namespace of its own with a
//! tiny tmpfs at the records' directory (nothing real is mounted over), which the test
//! fills. A write that fails counts its records as dropped, never as emitted, leaves no
//! partial line, and is logged and counted; once there is room again, records are
//! written, and the lost interval's are not written late.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use visibility_tests::{
    node::{Node, poll},
    records::{records_at, totals},
    unique,
};

use crate::common::{
    RECORD_WAIT, UdpFlow, metric, node_under, records_to, wait_for_log, wait_for_metric,
};

/// The directory the daemon mounts its tmpfs on, removed on drop.
struct Mountpoint(PathBuf);

impl Drop for Mountpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `path` inside the daemon's mount namespace, seen from this one.
fn in_daemon(node: &Node, path: &Path) -> PathBuf {
    let pid = node.daemon_pid().expect("the daemon runs");
    Path::new(&format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap())
}

/// Writes `path` until the filesystem has no room left.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let block = [0u8; 4096];
    loop {
        match file.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

/// Waits until the daemon counts as emitted exactly the records in the file (a write
/// in flight may keep them apart for a moment), which holds whole lines only.
fn emitted_matches_the_file(node: &Node, file: &Path) -> Vec<serde_json::Value> {
    poll(RECORD_WAIT, "emitted records = lines in the file", || {
        let text = std::fs::read_to_string(file)?;
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "a partial line: {text:?}"
        );
        let records = records_at(file)?;
        let emitted = metric(node, "visibility_flow_records_emitted_total");
        Ok((emitted == records.len() as u64).then_some(records))
    })
    .unwrap()
}

#[test]
fn a_full_disk_drops_and_counts_records_and_never_emits_them() {
    let mountpoint = Mountpoint(PathBuf::from(format!(
        "/tmp/vis-faults-full-{}",
        unique::name("full")
    )));
    std::fs::create_dir_all(&mountpoint.0).unwrap();
    let records = mountpoint.0.join("flows.jsonl");
    let wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        r#"mount -t tmpfs -o size=16k tmpfs "$0" && exec "$@""#,
        mountpoint.0.to_str().unwrap(),
    ];
    let node = node_under(
        "f-full",
        2,
        wrapper.iter().map(|a| a.to_string()).collect(),
        &records_to(&records, "5s"),
    );
    let file = in_daemon(&node, &records);
    let filler = in_daemon(&node, &mountpoint.0.join("filler"));
    assert!(file.exists(), "the daemon's record file, in its tmpfs");
    let (a, b) = (
        UdpFlow::open(&node.lab, 0, 1, 7301),
        UdpFlow::open(&node.lab, 1, 0, 7302),
    );

    fill(&filler);
    let dropped_before = metric(&node, "visibility_flow_records_dropped_total");
    a.send(5);
    wait_for_metric(&node, "visibility_flow_record_write_errors_total", 1);
    wait_for_log(&node, "writing flow records failed");
    assert!(metric(&node, "visibility_flow_records_dropped_total") > dropped_before);
    let written = emitted_matches_the_file(&node, &file);
    assert!(
        !written.iter().any(|r| a.tuple().matches(r)),
        "{written:#?}"
    );

    std::fs::remove_file(&filler).unwrap();
    b.send(7);
    poll(RECORD_WAIT, "records once there is room", || {
        let written = records_at(&file)?;
        Ok((totals(written.iter().filter(|r| b.tuple().matches(r))).packets == 7).then_some(()))
    })
    .unwrap();
    wait_for_log(&node, "writing flow records works again");
    let written = emitted_matches_the_file(&node, &file);
    assert!(
        !written.iter().any(|r| a.tuple().matches(r)),
        "the dropped interval's records are not written late: {written:#?}"
    );
}
