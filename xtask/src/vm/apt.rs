//! A private apt configuration under `target/vm/apt` that finds and downloads Debian
//! kernel packages from the host's own mirror, leaving the host's apt state untouched.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::run::{display, output, run};

/// apt with its own sources, lists and caches under one directory: the host's sources,
/// lists and package state stay untouched. Updated at most once per run.
pub(super) struct PrivateApt {
    pub(super) dir: PathBuf,
    pub(super) updated: bool,
}

impl PrivateApt {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            updated: false,
        }
    }

    pub(super) fn options(&self) -> Vec<String> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        vec![
            "-o".into(),
            format!("Dir::Etc::SourceList={}", d("sources.list")),
            "-o".into(),
            format!("Dir::Etc::SourceParts={}", d("sources.list.d")),
            "-o".into(),
            format!("Dir::State::Lists={}", d("lists")),
            "-o".into(),
            format!("Dir::Cache={}", d("cache")),
            "-o".into(),
            format!("Dir::Cache::Archives={}", d("cache/archives")),
            "-o".into(),
            "Dir::Cache::pkgcache=".into(),
            "-o".into(),
            "Dir::Cache::srcpkgcache=".into(),
            // Downloads land in our own directories: no need to drop to the _apt user.
            "-o".into(),
            "APT::Sandbox::User=root".into(),
            "-o".into(),
            "Debug::NoLocking=true".into(),
            "-q".into(),
        ]
    }

    pub(super) fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(self.options());
        cmd
    }

    /// Writes the private sources (Debian's archive as the host's sources name it, plus
    /// bookworm-backports) and runs `apt-get update` with them.
    pub(super) fn update(&mut self) -> anyhow::Result<()> {
        if self.updated {
            return Ok(());
        }
        for sub in ["sources.list.d", "lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        let mirrors = host_debian_mirrors()?;
        let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
        let options = if keyring.exists() {
            format!("[signed-by={}] ", keyring.display())
        } else {
            String::new()
        };
        let mut sources = String::from(
            "# Written by cargo xtask vm-test: kernel packages only, never installed.\n",
        );
        for suite in ["bookworm", "bookworm-updates", "bookworm-backports"] {
            writeln!(sources, "deb {options}{} {suite} main", mirrors.archive)?;
        }
        if let Some(security) = &mirrors.security {
            writeln!(sources, "deb {options}{security} bookworm-security main")?;
        }
        fs::write(self.dir.join("sources.list"), &sources)?;
        println!(
            "vm-test: private apt sources ({}), from the host's mirror {}{}:",
            self.dir.join("sources.list").display(),
            mirrors.archive,
            if mirrors.host_has_backports {
                " (the host lists bookworm-backports too)"
            } else {
                " (the host's sources have no bookworm-backports)"
            }
        );
        print!("{sources}");
        run(self.command("apt-get").arg("update"))?;
        self.updated = true;
        Ok(())
    }

    /// The real package behind `linux-image-cloud-amd64` of `suite`.
    pub(super) fn resolve_kernel_package(&self, suite: &str) -> anyhow::Result<String> {
        let mut cmd = self.command("apt-cache");
        cmd.arg("depends");
        // bookworm-backports has a lower priority: the plain name is bookworm's.
        if suite.ends_with("-backports") {
            cmd.arg(format!("linux-image-cloud-amd64/{suite}"));
        } else {
            cmd.arg("linux-image-cloud-amd64");
        }
        let out = output(&mut cmd)?;
        out.lines()
            .filter_map(|line| line.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|name| name.starts_with("linux-image-"))
            .map(str::to_owned)
            .with_context(|| format!("{}: no linux-image dependency in:\n{out}", display(&cmd)))
    }
}

pub(super) struct Mirrors {
    /// Debian's archive (the URI of the host's `bookworm` entry).
    pub(super) archive: String,
    pub(super) security: Option<String>,
    pub(super) host_has_backports: bool,
}

/// One `deb` entry of the host's apt sources.
pub(super) struct SourceEntry {
    pub(super) uri: String,
    pub(super) suites: Vec<String>,
}

/// Reads the host's apt sources (one-line `.list` and deb822 `.sources`) to find the
/// Debian mirror this machine uses.
pub(super) fn host_debian_mirrors() -> anyhow::Result<Mirrors> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut parts: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        parts.sort();
        files.extend(parts);
    }
    let mut entries = Vec::new();
    for file in &files {
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(parse_deb822(&text)),
            Some("list") => entries.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    let with_suite = |suite: &str| {
        entries
            .iter()
            .find(|e| e.suites.iter().any(|s| s == suite))
            .map(|e| e.uri.trim_end_matches('/').to_owned())
    };
    let archive = with_suite("bookworm")
        .or_else(|| {
            entries
                .iter()
                .map(|e| e.uri.trim_end_matches('/'))
                .find(|uri| uri.ends_with("/debian"))
                .map(str::to_owned)
        })
        .with_context(|| {
            format!(
                "no Debian archive in the host's apt sources ({}): vm-test takes its mirror from there",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let security = with_suite("bookworm-security").or_else(|| {
        entries
            .iter()
            .map(|e| e.uri.trim_end_matches('/'))
            .find(|uri| uri.ends_with("/debian-security"))
            .map(str::to_owned)
    });
    Ok(Mirrors {
        archive,
        security,
        host_has_backports: with_suite("bookworm-backports").is_some(),
    })
}

pub(super) fn parse_one_line(text: &str) -> Vec<SourceEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let rest = line.strip_prefix("deb ")?.trim_start();
            // Options in brackets come first.
            let rest = match rest.strip_prefix('[') {
                Some(options) => options.split_once(']')?.1.trim_start(),
                None => rest,
            };
            let mut words = rest.split_whitespace();
            let uri = words.next()?.to_owned();
            let suite = words.next()?.to_owned();
            Some(SourceEntry {
                uri,
                suites: vec![suite],
            })
        })
        .collect()
}

pub(super) fn parse_deb822(text: &str) -> Vec<SourceEntry> {
    let mut entries = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: BTreeMap<String, String> = BTreeMap::new();
        let mut last: Option<String> = None;
        for line in stanza.lines() {
            if line.trim_start().starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                // A continuation line (for example an inline Signed-By key).
                if let Some(key) = &last {
                    fields.entry(key.clone()).or_default().push_str(line);
                }
                continue;
            }
            if let Some((key, value)) = line.split_once(':') {
                let key = key.trim().to_ascii_lowercase();
                fields.insert(key.clone(), value.trim().to_owned());
                last = Some(key);
            }
        }
        let field = |k: &str| fields.get(k).map(String::as_str).unwrap_or_default();
        if !field("types").split_whitespace().any(|t| t == "deb")
            || field("enabled").eq_ignore_ascii_case("no")
        {
            continue;
        }
        let suites: Vec<String> = field("suites")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        for uri in field("uris").split_whitespace() {
            entries.push(SourceEntry {
                uri: uri.to_owned(),
                suites: suites.clone(),
            });
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_sources() {
        let entries = parse_one_line(
            "# comment\ndeb [signed-by=/k.gpg arch=amd64] http://m.example/debian bookworm main\n\
             deb-src http://m.example/debian bookworm main\n\
             deb http://s.example/debian-security bookworm-security main # trailing\n",
        );
        let got: Vec<(&str, &str)> = entries
            .iter()
            .map(|e| (e.uri.as_str(), e.suites[0].as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("http://m.example/debian", "bookworm"),
                ("http://s.example/debian-security", "bookworm-security")
            ]
        );
    }

    #[test]
    fn deb822_sources() {
        let entries = parse_deb822(
            "Types: deb\n# http://old.example/archive\nURIs: http://m.example/debian\n\
             Suites: bookworm bookworm-updates\nComponents: main\n\n\
             Types: deb\nURIs: http://x.example/\nSuites: y\nEnabled: no\n\n\
             Types: deb-src\nURIs: http://src.example/\nSuites: bookworm\n",
        );
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].uri, "http://m.example/debian");
        assert_eq!(entries[0].suites, ["bookworm", "bookworm-updates"]);
    }
}
