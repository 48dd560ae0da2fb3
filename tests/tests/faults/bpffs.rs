//! bpffs missing: a pin directory that is not on bpffs (a temporary directory, so
//! nothing real is unmounted) makes the daemon and the CLI fail at once with one line
//! that names the mount to add, on a node and in a DaemonSet, and creates nothing.

use std::{path::PathBuf, process::Output, time::Duration};

use visibility_tests::{
    lab::POD_CIDR_V4,
    node::{binary, output_within, run_cli},
    require_root,
};

/// The one line of standard error, which must name the mount to add.
fn the_one_line(what: &str, output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{what} succeeded: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: one line, not {stderr}");
    for needle in [
        "not on a bpffs mount",
        "mount -t bpf bpf /sys/fs/bpf",
        "hostPath volume /sys/fs/bpf",
        "--pin-dir",
    ] {
        assert!(
            lines[0].contains(needle),
            "{what}: {needle:?} missing in {stderr}"
        );
    }
    lines[0].to_owned()
}

#[test]
fn a_pin_dir_not_on_bpffs_fails_with_the_mount_to_add() {
    require_root();
    let scratch = PathBuf::from(format!("/tmp/vis-faults-bpffs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let pin_dir = scratch.join("visibility");

    let mut daemon = std::process::Command::new(binary());
    daemon
        .arg("--pin-dir")
        .arg(&pin_dir)
        .args(["daemon", "--pod-cidr", POD_CIDR_V4, "--metrics-addr", "off"])
        .args(["--records", "off"])
        .env("VISIBILITY_LOG", "info");
    let output = output_within(daemon, Duration::from_secs(30)).unwrap();
    let line = the_one_line("the daemon", &output);
    assert!(line.contains(pin_dir.to_str().unwrap()), "{line}");

    for args in [
        &["enable"][..],
        &["exempt", "add", "10.52.0.3/32"],
        &["flows"],
    ] {
        let output = run_cli(&pin_dir, args).unwrap();
        the_one_line(&format!("visibility {args:?}"), &output);
    }
    assert!(
        !pin_dir.exists(),
        "nothing may be created under a non-bpffs directory"
    );
    std::fs::remove_dir_all(&scratch).unwrap();
}
