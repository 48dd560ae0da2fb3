//! What a vm-test run covers: the kernels it boots, the test binaries it runs in them,
//! and the markers the guest writes on its console for the host to read back.

/// The kernels this tier boots.
pub(super) const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        name: "6.1",
        suite: "bookworm",
        what: "Debian 12's 6.1 LTS cloud kernel: no TCX, programs attach as clsact filters",
    },
    KernelSpec {
        name: "6.12",
        suite: "bookworm-backports",
        what: "bookworm-backports' 6.12 cloud kernel: programs attach with TCX",
    },
];

/// The test binaries (integration tests of visibility-tests) and the tests of each that
/// run in the VMs (libtest name filters; none: all). Chosen to stay within a few minutes
/// per kernel under TCG: every BPF_PROG_TEST_RUN test, every end-to-end datapath test, and
/// the daemon tests that attach, report (`status --json`) and detach.
pub(super) const DEFAULT_TESTS: &[(&str, &[&str])] = &[
    ("datapath_test_run", &[]),
    ("datapath_netns", &[]),
    (
        "daemon",
        &[
            "teardown_leaves_no_programs_links_or_pins",
            "status_shows_everything_and_fails_without_the_daemon",
        ],
    ),
];

/// Lines the guest's /init writes around the tests; parsed back from the console.
pub(super) const MARK: &str = "vm-test:";

/// A whole-test skip reported by a test: `SKIP: <test>: <reason>` (it passes in libtest's
/// count, and is counted as skipped here).
pub(super) const SKIP_MARK: &str = "SKIP:";

/// How much slower than the host the guest runs CPU-bound work (TCG, measured: about
/// 4.4×, lab-notes). The fixtures scale their budgets for CPU-bound work (loading and
/// verifying the programs) by it; exchanges on the network keep theirs.
pub(super) const GUEST_TIME_SCALE: &str = "5";

pub(super) struct KernelSpec {
    /// Short name, as given to `--kernel` and used for the log file.
    pub(super) name: &'static str,
    /// The suite whose `linux-image-cloud-amd64` it is.
    pub(super) suite: &'static str,
    pub(super) what: &'static str,
}

/// One test binary to run in the guest.
#[derive(Clone, Debug)]
pub(super) struct TestSelection {
    pub(super) binary: String,
    pub(super) filters: Vec<String>,
}
