//! The differential fuzz harness (see `visibility_tests::fuzz`): the host's parser and
//! verdict against the kernel's programs on the same frames. Run it with
//! `cargo xtask fuzz --seconds N` (needs root).
//!
//! Usage: `fuzz [--seconds N] [--seed S] [--corpus DIR]`. Exits 1 when host and kernel
//! disagreed or an invariant broke; the failing cases are in the corpus directory.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use visibility_tests::fuzz::{FuzzOptions, fuzz};

/// The committed corpus, next to the tests.
const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus");

fn options() -> Result<FuzzOptions> {
    let mut options = FuzzOptions {
        duration: Duration::from_secs(60),
        seed: None,
        corpus: PathBuf::from(CORPUS),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => options.duration = Duration::from_secs(value()?.parse()?),
            "--seed" => options.seed = Some(value()?.parse()?),
            "--corpus" => options.corpus = PathBuf::from(value()?),
            other => bail!(
                "unknown argument {other:?}; usage: fuzz [--seconds N] [--seed S] [--corpus DIR]"
            ),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    match options().and_then(|options| fuzz(&options)) {
        Ok(summary) if summary.findings.is_empty() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fuzz: {e:#}");
            ExitCode::from(2)
        }
    }
}
