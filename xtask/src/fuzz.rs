//! `cargo xtask fuzz`: the differential fuzz harness (`tests/src/fuzz`): the host's
//! parser and verdict against the kernel's programs, on the same frames, through
//! `BPF_PROG_TEST_RUN` in a lab of its own. Failing cases go to `tests/fuzz/corpus/`,
//! which every run replays first.

use crate::{
    run::{require_root, run, test_binary},
    setup,
};

/// How long `cargo xtask test` runs the harness.
pub const TEST_SECONDS: u64 = 60;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// How long to run random cases, after the corpus and the truncation sweep.
    #[arg(long, default_value_t = TEST_SECONDS)]
    seconds: u64,
    /// The generator's seed (printed by every run), to repeat a run.
    #[arg(long)]
    seed: Option<u64>,
}

pub fn fuzz(args: &FuzzArgs) -> anyhow::Result<()> {
    setup::setup(&setup::SetupArgs::default())?;
    harness(args.seconds, args.seed)
}

/// Builds and runs the harness for `seconds` (needs root).
pub fn harness(seconds: u64, seed: Option<u64>) -> anyhow::Result<()> {
    require_root("the fuzz harness")?;
    let mut cmd = test_binary("fuzz")?;
    cmd.args(["--seconds", &seconds.to_string()]);
    if let Some(seed) = seed {
        cmd.args(["--seed", &seed.to_string()]);
    }
    run(&mut cmd)
}
