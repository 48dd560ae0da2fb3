//! What the running daemon tells the CLI: a status file under /run, next to a pid.
//! Maps hold the datapath's state; this holds what only the daemon knows (what it
//! discovered, what failed, and the health checks).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Where the daemon that uses `pin_dir` keeps its status: one directory per pin
/// directory, so several daemons (tests, labs) never mix.
pub fn state_dir(pin_dir: &Path) -> PathBuf {
    let slug: String = pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Path::new("/run/visibility").join(slug)
}

/// One health check's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// A stable name, e.g. `gateway_neighbour_v4`.
    pub name: String,
    pub ok: bool,
    /// What was found, and when not ok, what to do.
    pub detail: String,
}

/// A Pod interface the daemon found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInterfaceState {
    pub name: String,
    pub ifindex: u32,
    /// Why it counts as a Pod interface: `route`, `bridge` or `glob`.
    pub reason: String,
    pub attached: bool,
    /// The last attach error, if any.
    pub error: Option<String>,
}

/// The uplink and gateway of one family.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkState {
    pub family: String,
    pub uplink: String,
    pub ifindex: u32,
    pub up: bool,
    pub gateway: String,
    /// The gateway's MAC as the neighbour table has it, if resolved.
    pub gateway_mac: Option<String>,
    pub attached: bool,
}

/// A Pod CIDR in the datapath, and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodCidrState {
    pub cidr: String,
    pub source: crate::pod_cidrs::CidrSource,
}

/// Flow record counts since the daemon started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordCounts {
    pub emitted: u64,
    /// Dropped because the sink was slow or full.
    pub dropped: u64,
    /// Flows the LRU evicted between two reads.
    pub evictions: u64,
    /// Entries of the flow map at the last read: its fill level. Named `active_flows`
    /// before; a status file an older daemon wrote is read under that name too.
    #[serde(alias = "active_flows")]
    pub flow_map_entries: u64,
    /// IPFIX messages or intervals that did not reach a collector.
    #[serde(default)]
    pub ipfix_export_errors: u64,
}

/// The status file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub node_name: String,
    /// RFC 3339.
    pub started_at: String,
    pub updated_at: String,
    /// `loaded` or `adopted`.
    pub origin: String,
    /// `tcx` or `clsact`.
    pub attach_mode: String,
    pub uplinks: Vec<UplinkState>,
    /// The Pod CIDRs in the datapath, each with its source.
    #[serde(default)]
    pub pod_cidrs: Vec<PodCidrState>,
    pub pod_interfaces: Vec<PodInterfaceState>,
    pub checks: Vec<Check>,
    pub records: RecordCounts,
    /// The IPFIX collectors records are exported to (`HOST:PORT`).
    #[serde(default)]
    pub ipfix_collectors: Vec<String>,
    /// The Kubernetes API: whether records name Pods, and if not, why.
    #[serde(default)]
    pub kubernetes: crate::kubernetes::KubeState,
}

/// Where [`DaemonStatus::write`] writes before it renames the file into place.
const STATUS_TMP: &str = "status.json.tmp";

impl DaemonStatus {
    pub fn healthy(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    fn path(pin_dir: &Path) -> PathBuf {
        state_dir(pin_dir).join("status.json")
    }

    /// Writes atomically (rename), readable by root only.
    pub fn write(&self, pin_dir: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        write_private(&Self::path(pin_dir), &bytes)
    }

    /// The status of a daemon that is running now; `None` when there is none.
    pub fn read_live(pin_dir: &Path) -> Option<Self> {
        let text = fs::read_to_string(Self::path(pin_dir)).ok()?;
        let status: Self = serde_json::from_str(&text).ok()?;
        process_alive(status.pid).then_some(status)
    }

    /// Removes the status file (on a clean exit, and by teardown), with the temporary
    /// file of a write that a killed daemon never finished: left behind, it kept the
    /// state directory from going (the cause of a flaky teardown test).
    pub fn remove(pin_dir: &Path) {
        let dir = state_dir(pin_dir);
        let _ = fs::remove_file(dir.join("status.json"));
        let _ = fs::remove_file(dir.join(STATUS_TMP));
        let pods = dir.join(crate::kubernetes::PODS_FILE);
        let _ = fs::remove_file(&pods);
        let _ = fs::remove_file(pods.with_extension("json.tmp"));
        let _ = fs::remove_dir(dir);
    }
}

/// Writes a file of the state directory atomically (a temporary file renamed into
/// place), readable by root only.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    {
        use io::Write as _;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
    }
    fs::rename(tmp, path)
}

/// Whether a process with this pid exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
        .is_some_and(|dead| !dead)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon killed between writing its status to the temporary file and renaming it
    /// leaves that file behind; removing the status removes it and the directory too.
    /// Needs root (it writes under /run/visibility).
    #[test]
    fn a_half_written_status_is_removed_with_its_directory() {
        let pin_dir = Path::new("/sys/fs/bpf/vis-unit-half-written");
        let dir = state_dir(pin_dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(STATUS_TMP), b"{").unwrap();
        DaemonStatus::remove(pin_dir);
        assert!(!dir.exists(), "{} is still there", dir.display());
    }

    #[test]
    fn state_dirs_differ_per_pin_dir() {
        assert_eq!(
            state_dir(Path::new("/sys/fs/bpf/visibility")),
            Path::new("/run/visibility/sys_fs_bpf_visibility")
        );
        assert_ne!(
            state_dir(Path::new("/sys/fs/bpf/a")),
            state_dir(Path::new("/sys/fs/bpf/b"))
        );
    }

    #[test]
    fn only_live_processes_count() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
    }
}
