//! SIGTERM with records still to come: the daemon reads the flow map one last time and
//! writes every record before it exits. The interval is far longer than the test, so
//! every record in the file comes from that last read.

use visibility_tests::records::{RecordFile, totals};

use crate::common::{UdpFlow, node_with, records_to, wait_for_log};

#[test]
fn sigterm_writes_the_last_records_before_exit() {
    let file = RecordFile::new("f-sigterm");
    // Records every 15 minutes: no interval ends during the test.
    let mut node = node_with("f-sigterm", 2, &records_to(&file.path, "15m"));

    let flows = [
        UdpFlow::open(&node.lab, 0, 1, 7101),
        UdpFlow::open(&node.lab, 1, 0, 7102),
    ];
    flows[0].send(11);
    flows[1].send(4);
    assert!(file.records().unwrap().is_empty(), "no interval ended yet");

    node.stop_daemon().unwrap();
    assert!(!node.daemon_running());
    let records = file.records().unwrap();
    for (flow, sent) in flows.iter().zip([11, 4]) {
        let of_flow: Vec<_> = records.iter().filter(|r| flow.tuple().matches(r)).collect();
        assert_eq!(
            of_flow.len(),
            1,
            "one record of the last interval: {records:#?}"
        );
        assert_eq!(totals(of_flow).packets, sent, "{records:#?}");
    }
    wait_for_log(&node, "emitting the last flow records");
}
