//! `BPF_PROG_TEST_RUN`: one program run on one frame with the `__sk_buff` fields a test
//! sets, inside a namespace, once, repeatedly, timed, or with `CHECKSUM_COMPLETE`.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};

use crate::lab::Netns;

/// `sizeof(struct __sk_buff)` (linux/bpf.h, since Linux 5.16). Older kernels accept it
/// as long as the bytes past their own size are zero, which they are.
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_MARK: usize = 8;
const SK_BUFF_INGRESS_IFINDEX: usize = 36;
const SK_BUFF_IFINDEX: usize = 40;

/// The `__sk_buff` fields a run sets; the kernel rejects a context with any other
/// field it does not take from userspace set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbCtx {
    /// The device the skb is on (`skb->dev`); must exist in the namespace of the run.
    pub ifindex: u32,
    /// The device the skb entered the node on (`skb->skb_iif`).
    pub ingress_ifindex: u32,
    /// `skb->mark`.
    pub mark: u32,
}

impl SkbCtx {
    /// An skb on `ifindex` that entered there.
    pub fn on(ifindex: u32) -> Self {
        Self {
            ifindex,
            ingress_ifindex: ifindex,
            mark: 0,
        }
    }

    pub fn with_mark(self, mark: u32) -> Self {
        Self { mark, ..self }
    }

    /// The context as a zeroed `struct __sk_buff` with the three fields filled in.
    pub fn to_sk_buff(&self) -> [u8; SK_BUFF_SIZE] {
        let mut raw = [0u8; SK_BUFF_SIZE];
        for (offset, value) in [
            (SK_BUFF_MARK, self.mark),
            (SK_BUFF_INGRESS_IFINDEX, self.ingress_ifindex),
            (SK_BUFF_IFINDEX, self.ifindex),
        ] {
            raw[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        }
        raw
    }
}

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOutput {
    /// The program's return value (`TC_ACT_*`).
    pub return_value: u32,
    /// The frame after the program (after the last run, with `repeat`).
    pub data: Vec<u8>,
    /// The kernel's mean time per run.
    pub duration: Duration,
}

/// Room for a program that grows the frame.
const OUTPUT_SLACK: usize = 256;

/// Runs `program` on `frame` with `ctx`, `repeat` times, in `netns`.
///
/// The kernel runs the program `repeat` times on one skb: changes a run makes (a TTL
/// it spends, say) are what the next run sees.
pub fn test_run(
    netns: &Netns,
    program: &SchedClassifier,
    frame: &[u8],
    ctx: SkbCtx,
    repeat: u32,
) -> Result<RunOutput> {
    netns
        .in_ns(|| run_here(program, frame, ctx, repeat))?
        .with_context(|| format!("in netns {}", netns.name()))
}

/// Runs `program` `batches` times [`test_run`]`(.., repeat)` on a fresh copy of `frame`,
/// all from one thread in `netns`. Returns the mean time per run over all of them, in
/// nanoseconds, and the last run's output.
///
/// The kernel reports each batch's mean in whole nanoseconds, rounded down.
pub fn time_runs(
    netns: &Netns,
    program: &SchedClassifier,
    frame: &[u8],
    ctx: SkbCtx,
    repeat: u32,
    batches: u32,
) -> Result<(f64, RunOutput)> {
    ensure!(repeat > 0 && batches > 0, "nothing to run");
    netns
        .in_ns(|| {
            let mut total_ns = 0f64;
            let mut last = None;
            for _ in 0..batches {
                let out = run_here(program, frame, ctx, repeat)?;
                total_ns += out.duration.as_nanos() as f64 * f64::from(repeat);
                last = Some(out);
            }
            let runs = f64::from(repeat) * f64::from(batches);
            anyhow::Ok((total_ns / runs, last.expect("at least one batch")))
        })?
        .with_context(|| format!("in netns {}", netns.name()))
}

/// [`test_run`] in the calling thread's namespace.
fn run_here(
    program: &SchedClassifier,
    frame: &[u8],
    ctx: SkbCtx,
    repeat: u32,
) -> Result<RunOutput> {
    let sk_buff = ctx.to_sk_buff();
    let mut out = vec![0u8; frame.len() + OUTPUT_SLACK];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&sk_buff),
            repeat,
            ..TestRunOptions::default()
        })
        .with_context(|| {
            format!(
                "BPF_PROG_TEST_RUN of a {}-byte frame with {ctx:?}",
                frame.len()
            )
        })?;
    let size = usize::try_from(result.data_size_out)?;
    ensure!(size <= out.len(), "the kernel wrote {size} bytes");
    out.truncate(size);
    Ok(RunOutput {
        return_value: result.return_value,
        data: out,
        duration: result.duration,
    })
}

/// `BPF_F_TEST_SKB_CHECKSUM_COMPLETE` (linux/bpf.h): aya 0.14 does not offer the flag.
const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `BPF_PROG_TEST_RUN` with `BPF_F_TEST_SKB_CHECKSUM_COMPLETE`, by hand: the program's
/// return value, `None` when the kernel does not know the flag, an error with
/// `EBADMSG` when the program left `skb->csum` wrong.
pub(super) fn test_run_checksum_complete(
    program: &SchedClassifier,
    frame: &[u8],
    ctx: SkbCtx,
) -> Result<Option<u32>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = program
        .fd()
        .context("the program's fd")?
        .as_fd()
        .as_raw_fd();
    let sk_buff = ctx.to_sk_buff();
    let mut out = vec![0u8; frame.len() + OUTPUT_SLACK];
    // `union bpf_attr`'s `test` member: fields at their offsets, the rest zero.
    let mut attr = [0u8; 80];
    let mut put32 =
        |offset: usize, value: u32| attr[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
    put32(0, u32::try_from(fd)?);
    put32(8, u32::try_from(frame.len())?);
    put32(12, u32::try_from(out.len())?);
    put32(32, 1);
    put32(40, u32::try_from(sk_buff.len())?);
    put32(64, BPF_F_TEST_SKB_CHECKSUM_COMPLETE);
    attr[16..24].copy_from_slice(&(frame.as_ptr() as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
    attr[48..56].copy_from_slice(&(sk_buff.as_ptr() as u64).to_ne_bytes());
    // SAFETY: `attr` is a valid `bpf_attr` prefix whose pointers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            attr.as_mut_ptr(),
            attr.len(),
        )
    };
    if rc < 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EINVAL) {
            return Ok(None);
        }
        return Err(anyhow!(error).context("BPF_PROG_TEST_RUN with CHECKSUM_COMPLETE"));
    }
    Ok(Some(u32::from_ne_bytes(attr[4..8].try_into()?)))
}
