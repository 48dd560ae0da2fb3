//! Commands run to completion (failing with their command line and standard error), and
//! processes in the background that are killed when dropped.

use std::{
    io::Write,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn check_output(cmd: &Command, output: Output) -> Result<String> {
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            command_line(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            if output.stdout.is_empty() {
                String::new()
            } else {
                format!(
                    " [stdout: {}]",
                    String::from_utf8_lossy(&output.stdout).trim()
                )
            }
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("`{}`: output is not UTF-8", command_line(cmd)))
}

pub(super) fn run_output(cmd: &mut Command) -> Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{}`", command_line(cmd)))?;
    check_output(cmd, output)
}

pub(super) fn run_output_with_stdin(cmd: &mut Command, input: &str) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}`", command_line(cmd)))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = input.to_owned();
    // Write from another thread so a chatty child cannot deadlock us.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{}`", command_line(cmd)))?;
    let _ = writer.join();
    check_output(cmd, output)
}

/// A process started in the background ([`Netns::spawn_process`], [`Background::spawn`]).
/// Dropping it kills the process (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct Background {
    child: Option<Child>,
}

impl Background {
    /// Starts `cmd`.
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting `{}`", command_line(&cmd)))?;
        Ok(Self { child: Some(child) })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit, then SIGKILLs it.
    pub fn terminate(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().expect("child present until dropped");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                return Ok(child.wait()?);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Gives up ownership of the process without killing it.
    pub fn into_child(mut self) -> Child {
        self.child.take().expect("child present until dropped")
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
