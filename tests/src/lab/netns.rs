//! A named network namespace: creating and deleting it, and running commands, closures
//! and threads inside it.

use std::{
    ffi::{OsStr, OsString},
    fs::File,
    io::ErrorKind,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    thread::JoinHandle,
};

use anyhow::{Context, Result, anyhow};

use super::process::{Background, run_output, run_output_with_stdin};

/// A named network namespace (`/run/netns/NAME`).
///
/// This is only a handle: creating and deleting namespaces is up to [`Lab`] (or
/// [`Netns::create`] / [`Netns::delete`]). Cloning it is cheap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Netns {
    name: String,
}

/// Serializes `ip netns add/del` in this process: the very first `ip netns add` on a
/// machine makes `/run/netns` a shared mount, and concurrent first calls could stack two.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

impl Netns {
    /// A handle for the namespace named `name` (which need not exist yet).
    pub fn from_name(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    /// Creates the namespace (`ip netns add`) and brings its `lo` up.
    pub fn create(name: impl Into<String>) -> Result<Self> {
        let ns = Self::from_name(name);
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            run_output(Command::new("ip").args(["netns", "add", &ns.name]))
                .with_context(|| format!("creating netns {}", ns.name))?;
        }
        ns.run("ip", ["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Deletes the namespace. Succeeds if it is already gone.
    ///
    /// Sockets or processes still in the namespace keep it alive (without a name) until
    /// they end; nothing that the name points to remains.
    pub fn delete(&self) -> Result<()> {
        let path = self.path();
        let result = {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            run_output(Command::new("ip").args(["netns", "del", &self.name]))
        };
        if !path.exists() {
            return Ok(());
        }
        // `ip netns del` failed: detach the bind mount and remove the file ourselves.
        let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow!(
                "deleting netns {}: {e}; ip netns del said: {:?}",
                self.name,
                result.err()
            )),
        }
    }

    /// Whether `/run/netns/NAME` exists.
    pub fn exists(&self) -> bool {
        self.path().exists()
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A command that runs `program args...` in this namespace, through
    /// `nsenter --net=/run/netns/NAME` (the mount namespace, and with it bpffs, stays).
    pub fn cmd<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut net = OsString::from("--net=");
        net.push(self.path());
        let mut cmd = Command::new("nsenter");
        cmd.arg(net).arg("--").arg(program).args(args);
        cmd
    }

    /// Runs `program args...` in this namespace and returns its standard output.
    ///
    /// Fails with the command line, exit status and standard error if it does not exit 0.
    pub fn run<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.cmd(program, args);
        run_output(&mut cmd).with_context(|| format!("in netns {}", self.name))
    }

    /// Like [`Netns::run`], with `input` as the command's standard input.
    pub fn run_with_stdin<I, S>(
        &self,
        program: impl AsRef<OsStr>,
        args: I,
        input: &str,
    ) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.cmd(program, args);
        run_output_with_stdin(&mut cmd, input).with_context(|| format!("in netns {}", self.name))
    }

    /// Runs several `ip` commands (one per line, without the leading `ip`) in one
    /// `ip -batch -` in this namespace. Stops at the first failing line.
    pub fn ip_batch<S: AsRef<str>>(&self, lines: &[S]) -> Result<()> {
        let mut input = String::new();
        for line in lines {
            input.push_str(line.as_ref());
            input.push('\n');
        }
        self.run_with_stdin("ip", ["-batch", "-"], &input)
            .with_context(|| format!("ip batch:\n{input}"))?;
        Ok(())
    }

    /// Sets sysctls (`key`, `value`) in this namespace with one `sysctl -w` call.
    pub fn sysctl(&self, settings: &[(&str, &str)]) -> Result<()> {
        let mut args: Vec<String> = vec!["-q".into(), "-w".into()];
        args.extend(settings.iter().map(|(k, v)| format!("{k}={v}")));
        self.run("sysctl", &args)?;
        Ok(())
    }

    /// Reads one sysctl in this namespace (for example `net.ipv4.conf.eth0.rp_filter`).
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        Ok(self.run("sysctl", ["-n", key])?.trim().to_string())
    }

    /// Runs `f` on a new thread that has entered this namespace with `setns()`, waits for
    /// it and returns its result. A panic in `f` is passed on to the caller.
    ///
    /// Sockets created in `f` belong to this namespace for their whole life, so they can be
    /// returned and used from any thread:
    ///
    /// ```no_run
    /// # fn demo(ns: &visibility_tests::lab::Netns) -> anyhow::Result<()> {
    /// let listener = ns.in_ns(|| std::net::TcpListener::bind("0.0.0.0:8080"))??;
    /// # Ok(()) }
    /// ```
    pub fn in_ns<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(scope, move || -> Result<R> {
                    enter_netns(&path)?;
                    Ok(f())
                })
                .context("spawning a thread")?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Like [`Netns::in_ns`] for a fallible closure: its error is returned as is.
    pub fn try_in_ns<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> Result<R> + Send,
        R: Send,
    {
        self.in_ns(f)?
    }

    /// Runs `f` in the background on a new thread that has entered this namespace.
    pub fn spawn<F, R>(&self, f: F) -> Result<JoinHandle<Result<R>>>
    where
        F: FnOnce() -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let path = self.path();
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                enter_netns(&path)?;
                f()
            })
            .context("spawning a thread")
    }

    /// Starts `program args...` in this namespace in the background; it is killed when the
    /// returned guard drops. Its standard input is null; output is inherited.
    pub fn spawn_process<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Background>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.cmd(program, args);
        cmd.stdin(Stdio::null());
        Background::spawn(cmd)
    }

    /// The index of interface `ifname` in this namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let name = ifname.to_string();
        self.in_ns(move || nix::net::if_::if_nametoindex(name.as_str()))?
            .with_context(|| format!("no interface {ifname} in netns {}", self.name))
    }
}

fn enter_netns(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns({})", path.display()))
}

/// The names of all named network namespaces (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    let out = run_output(Command::new("ip").args(["netns", "list"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}
