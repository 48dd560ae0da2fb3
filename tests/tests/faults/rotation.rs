//! The record file rotated away by an outside logrotate (renamed to `<file>.1`, a new
//! file expected at the path): the sink notices at its next write, opens a new file at
//! the configured path, logs it and counts it; across both files every packet of every
//! flow is in exactly one record.

use std::path::PathBuf;

use visibility_tests::{
    node::poll,
    records::{FiveTuple, RecordFile, records_at, totals},
};

use crate::common::{RECORD_WAIT, UdpFlow, metric, node_with, records_to, wait_for_log};

/// Packets of `tuple` in `records`.
fn packets(records: &[serde_json::Value], tuple: FiveTuple) -> u64 {
    totals(records.iter().filter(|r| tuple.matches(r))).packets
}

#[test]
fn a_file_rotated_away_is_written_anew_and_no_record_is_lost_or_doubled() {
    let file = RecordFile::new("f-rotate");
    let rotated = PathBuf::from(format!("{}.1", file.path.display()));
    let node = node_with("f-rotate", 3, &records_to(&file.path, "5s"));
    let (a, b) = (
        UdpFlow::open(&node.lab, 0, 1, 7201),
        UdpFlow::open(&node.lab, 2, 1, 7202),
    );

    a.send(6);
    poll(RECORD_WAIT, "the first records", || {
        Ok((packets(&file.records()?, a.tuple()) == 6).then_some(()))
    })
    .unwrap();
    // What logrotate does without copytruncate: rename, and expect a new file.
    std::fs::rename(&file.path, &rotated).unwrap();
    a.send(5);
    b.send(9);
    wait_for_log(&node, "moved away");
    poll(RECORD_WAIT, "records in a new file at the path", || {
        let new = file.records()?;
        Ok((packets(&new, b.tuple()) == 9).then_some(()))
    })
    .unwrap();
    let both: Vec<_> = records_at(&rotated)
        .unwrap()
        .into_iter()
        .chain(file.records().unwrap())
        .collect();
    assert_eq!(packets(&both, a.tuple()), 11, "{both:#?}");
    assert_eq!(packets(&both, b.tuple()), 9, "{both:#?}");
    assert_eq!(
        metric(&node, "visibility_flow_record_file_reopens_total"),
        1
    );
    assert_eq!(metric(&node, "visibility_flow_records_dropped_total"), 0);
}
