//! Cases as text, for the corpus: the settings a case runs with, one line per step
//! (`program ifindex ingress hex`), and saving a failing case under its hash.

use std::{
    fmt::Write as _,
    fs,
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail, ensure};
use rand::{Rng, rngs::SmallRng};
use visibility::datapath::ProgramKind;

use super::facts::{Iface, Step};

/// The settings a case runs with: visibility on, a gateway per family, the exempt
/// ranges. Most cases run with all of them; a case file says otherwise in a line
/// `config enabled=0 gateway_v4=1 gateway_v6=1 exemptions=1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub enabled: bool,
    pub gateway_v4: bool,
    pub gateway_v6: bool,
    pub exemptions: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enabled: true,
            gateway_v4: true,
            gateway_v6: true,
            exemptions: true,
        }
    }
}

impl Config {
    fn fields(&self) -> [(&'static str, bool); 4] {
        [
            ("enabled", self.enabled),
            ("gateway_v4", self.gateway_v4),
            ("gateway_v6", self.gateway_v6),
            ("exemptions", self.exemptions),
        ]
    }

    pub(super) fn text(&self) -> String {
        let fields: Vec<String> = self
            .fields()
            .iter()
            .map(|(name, on)| format!("{name}={}", u8::from(*on)))
            .collect();
        format!("config {}", fields.join(" "))
    }

    pub(super) fn parse(fields: &[&str]) -> Result<Self> {
        let mut config = Self::default();
        for field in fields {
            let (name, value) = field
                .split_once('=')
                .with_context(|| format!("{field:?} is not name=0|1"))?;
            let on = match value {
                "0" => false,
                "1" => true,
                _ => bail!("{field:?} is not name=0|1"),
            };
            match name {
                "enabled" => config.enabled = on,
                "gateway_v4" => config.gateway_v4 = on,
                "gateway_v6" => config.gateway_v6 = on,
                "exemptions" => config.exemptions = on,
                _ => bail!("no setting {name:?}"),
            }
        }
        Ok(config)
    }

    pub(super) fn random(rng: &mut SmallRng) -> Self {
        Self {
            enabled: rng.random_bool(0.7),
            gateway_v4: rng.random_bool(0.7),
            gateway_v6: rng.random_bool(0.7),
            exemptions: rng.random_bool(0.5),
        }
    }
}

pub(super) fn program_of(name: &str) -> Option<ProgramKind> {
    ProgramKind::ALL.into_iter().find(|p| p.name() == name)
}

/// A case as text: a comment, the settings when they are not the default, then one
/// line per step, `program ifindex ingress hex`.
pub(super) fn case_text(config: Config, steps: &[Step], comment: &str) -> String {
    let mut text = String::new();
    for line in comment.lines() {
        let _ = writeln!(text, "# {line}");
    }
    if config != Config::default() {
        let _ = writeln!(text, "{}", config.text());
    }
    for step in steps {
        let _ = writeln!(
            text,
            "{} {} {} {}",
            step.program.name(),
            step.ifindex.name(),
            step.ingress.name(),
            hex(&step.frame)
        );
    }
    text
}

pub(super) fn parse_case(text: &str) -> Result<(Config, Vec<Step>)> {
    let mut steps = Vec::new();
    let mut config = Config::default();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("config ") {
            config = Config::parse(&rest.split_whitespace().collect::<Vec<_>>())?;
            continue;
        }
        let mut fields = line.split_whitespace();
        let mut next = || {
            fields
                .next()
                .with_context(|| format!("short line {line:?}"))
        };
        let program = next()?;
        let program = program_of(program).with_context(|| format!("no program {program}"))?;
        let ifindex = next()?;
        let ifindex = Iface::parse(ifindex).with_context(|| format!("no interface {ifindex}"))?;
        let ingress = next()?;
        let ingress = Iface::parse(ingress).with_context(|| format!("no interface {ingress}"))?;
        let frame = unhex(fields.next().unwrap_or(""))?;
        steps.push(Step {
            program,
            ifindex,
            ingress,
            frame,
        });
    }
    Ok((config, steps))
}

pub(super) fn save_case(
    dir: &Path,
    config: Config,
    steps: &[Step],
    comment: &str,
) -> Result<PathBuf> {
    let body = case_text(config, steps, "");
    let mut hasher = std::hash::DefaultHasher::new();
    body.hash(&mut hasher);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{:016x}.case", hasher.finish()));
    fs::write(&path, case_text(config, steps, comment))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub(super) fn unhex(text: &str) -> Result<Vec<u8>> {
    ensure!(text.len().is_multiple_of(2), "odd number of hex digits");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).context("not hex"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_read_back_as_written() {
        let steps = vec![
            Step {
                program: ProgramKind::PodIngress,
                ifindex: Iface::Veth(0),
                ingress: Iface::Veth(0),
                frame: vec![1, 2, 0xff],
            },
            Step {
                program: ProgramKind::UplinkIngress,
                ifindex: Iface::Uplink,
                ingress: Iface::Lo,
                frame: Vec::new(),
            },
        ];
        let config = Config {
            gateway_v6: false,
            ..Config::default()
        };
        let text = case_text(config, &steps, "a\nb");
        assert_eq!(parse_case(&text).unwrap(), (config, steps));
    }
}
