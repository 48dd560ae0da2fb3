//! The README's performance section, between its two markers.

use std::{fs, path::Path};

use anyhow::Context as _;

pub(super) const README_START: &str = "<!-- bench:start -->";
pub(super) const README_END: &str = "<!-- bench:end -->";

/// Replaces what lies between the README's markers with `section`; creates the README
/// with just the markers when there is none. Nothing outside the markers changes.
pub(super) fn update_readme(path: &Path, section: &str) -> anyhow::Result<()> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            format!("{README_START}\n{README_END}\n")
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let updated = replace_marked(&text, section).with_context(|| {
        format!(
            "{}: add the lines {README_START} and {README_END} where the performance table goes",
            path.display()
        )
    })?;
    fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

pub(super) fn replace_marked(text: &str, section: &str) -> anyhow::Result<String> {
    let start = text
        .find(README_START)
        .with_context(|| format!("no {README_START}"))?;
    let after_start = start + README_START.len();
    let end = after_start
        + text[after_start..]
            .find(README_END)
            .with_context(|| format!("no {README_END} after {README_START}"))?;
    Ok(format!(
        "{}\n{}\n{}",
        &text[..after_start],
        section.trim_end_matches('\n'),
        &text[end..]
    ))
}
