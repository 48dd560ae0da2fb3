//! The Grafana dashboard (`deploy/grafana-dashboard.json`) against a real Prometheus
//! server: the server run in a lab namespace with a scrape config for the daemon, the
//! panels' queries with Grafana's variables filled in, and an SVG picture of panels drawn
//! from the server's data (Grafana cannot run here; `docs/dashboard.svg` is made so).
//!
//! Needs Debian's `prometheus` package (the server) and `curl`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use plotters::prelude::*;
use serde_json::Value;

use crate::{
    lab::{Background, Netns},
    node::poll,
};

/// The dashboard file.
pub fn dashboard_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana-dashboard.json")
}

/// One query of a panel, and how Grafana names its series (`{{label}}` templates).
#[derive(Clone, Debug)]
pub struct Target {
    pub expr: String,
    pub legend: String,
}

/// One panel of the dashboard.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    /// Grafana's unit id, e.g. `pps`, `Bps`, `percentunit`.
    pub unit: String,
    pub targets: Vec<Target>,
}

/// Every panel of the dashboard, in its order.
pub fn dashboard_panels() -> Result<Vec<Panel>> {
    let path = dashboard_path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let dashboard: Value = serde_json::from_str(&text)?;
    let panels = dashboard["panels"].as_array().context("no panels")?;
    panels
        .iter()
        .map(|panel| {
            let targets = panel["targets"]
                .as_array()
                .context("a panel without targets")?
                .iter()
                .map(|t| {
                    Ok(Target {
                        expr: t["expr"].as_str().context("a target without expr")?.into(),
                        legend: t["legendFormat"].as_str().unwrap_or_default().into(),
                    })
                })
                .collect::<Result<_>>()?;
            Ok(Panel {
                title: panel["title"].as_str().unwrap_or_default().into(),
                unit: panel["fieldConfig"]["defaults"]["unit"]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
                targets,
            })
        })
        .collect()
}

/// A panel's expression as Grafana sends it with node "All" selected: `$node` is the
/// variable's all-value `.*`, `$__rate_interval` a window that holds several scrapes.
pub fn concrete(expr: &str, rate_interval: &str) -> String {
    expr.replace("$__rate_interval", rate_interval)
        .replace("$node", ".*")
}

/// A Prometheus server in a namespace, scraping one target every second; its storage
/// and config live in a directory of its own, removed on drop.
pub struct Prometheus<'a> {
    netns: &'a Netns,
    listen: String,
    dir: PathBuf,
    _process: Background,
}

impl<'a> Prometheus<'a> {
    /// Starts the server on `listen` (e.g. `127.0.0.1:19090`) in `netns`, scraping
    /// `target` (`HOST:PORT`, path `/metrics`) as job `visibility`.
    pub fn start(netns: &'a Netns, listen: &str, target: &str) -> Result<Self> {
        let dir = PathBuf::from(format!("/tmp/vis-prometheus-{}", netns.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: visibility\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )?;
        let args = [
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={listen}"),
            "--log.level=warn".to_owned(),
        ];
        let process = netns.spawn_process("prometheus", &args)?;
        Ok(Self {
            netns,
            listen: listen.to_owned(),
            dir,
            _process: process,
        })
    }

    /// `GET /api/v1/<endpoint>` with `params` (URL-encoded by curl); returns `data`.
    fn api(&self, endpoint: &str, params: &[(&str, String)]) -> Result<Value> {
        let url = format!("http://{}/api/v1/{endpoint}", self.listen);
        let mut args: Vec<String> = ["--silent", "--show-error", "--max-time", "10", "-G"]
            .map(str::to_owned)
            .to_vec();
        for (key, value) in params {
            args.push("--data-urlencode".into());
            args.push(format!("{key}={value}"));
        }
        args.push(url);
        let text = self.netns.run("curl", &args)?;
        let answer: Value =
            serde_json::from_str(&text).with_context(|| format!("Prometheus said {text}"))?;
        ensure!(
            answer["status"] == "success",
            "{endpoint} {params:?}: {answer}"
        );
        Ok(answer["data"].clone())
    }

    /// The series an instant query returns.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let data = self.api("query", &[("query", expr.to_owned())])?;
        data["result"].as_array().cloned().context("no result")
    }

    /// The series a range query returns, `[start, end]` in Unix seconds, every `step`.
    pub fn query_range(&self, expr: &str, start: f64, end: f64, step: f64) -> Result<Vec<Value>> {
        let data = self.api(
            "query_range",
            &[
                ("query", expr.to_owned()),
                ("start", start.to_string()),
                ("end", end.to_string()),
                ("step", step.to_string()),
            ],
        )?;
        data["result"].as_array().cloned().context("no result")
    }

    /// Waits until the server has scraped the target `scrapes` times, successfully.
    pub fn wait_for_scrapes(&self, scrapes: u32, timeout: Duration) -> Result<()> {
        poll(timeout, "Prometheus scrapes of the daemon", || {
            let Ok(result) = self.query("count_over_time(up{job=\"visibility\"}[5m])") else {
                return Ok(None); // still starting
            };
            let count = result
                .first()
                .and_then(|s| s["value"][1].as_str())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            let up = self
                .query("up{job=\"visibility\"}")?
                .first()
                .and_then(|s| s["value"][1].as_str().map(str::to_owned));
            if count >= f64::from(scrapes) && up.as_deref() != Some("1") {
                bail!("the daemon's endpoint is down: up = {up:?}");
            }
            Ok((count >= f64::from(scrapes)).then_some(()))
        })
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One line of a picture: its legend and its (seconds since start, value) points.
#[derive(Clone, Debug)]
pub struct Line {
    pub legend: String,
    pub points: Vec<(f64, f64)>,
}

/// Grafana's legend: `{{label}}` replaced by the series' label values.
pub fn legend(template: &str, metric: &Value) -> String {
    let mut text = template.to_owned();
    if let Some(labels) = metric.as_object() {
        for (name, value) in labels {
            text = text.replace(&format!("{{{{{name}}}}}"), value.as_str().unwrap_or(""));
        }
    }
    text
}

/// The lines of a panel over `[start, end]`, from range queries.
pub fn panel_lines(
    prometheus: &Prometheus,
    panel: &Panel,
    rate_interval: &str,
    (start, end, step): (f64, f64, f64),
) -> Result<Vec<Line>> {
    let mut lines = Vec::new();
    for target in &panel.targets {
        let expr = concrete(&target.expr, rate_interval);
        for series in prometheus.query_range(&expr, start, end, step)? {
            let points = series["values"]
                .as_array()
                .context("no values")?
                .iter()
                .filter_map(|pair| {
                    let t = pair[0].as_f64()?;
                    let v = pair[1].as_str()?.parse::<f64>().ok()?;
                    Some((t - start, v))
                })
                .collect();
            lines.push(Line {
                legend: legend(&target.legend, &series["metric"]),
                points,
            });
        }
    }
    lines.sort_by(|a, b| a.legend.cmp(&b.legend));
    Ok(lines)
}

/// Draws panels, two per row, into an SVG file.
pub fn render_svg(path: &Path, panels: &[(Panel, Vec<Line>)], seconds: f64) -> Result<()> {
    const WIDTH: u32 = 1200;
    const ROW: u32 = 340;
    let rows = panels.len().div_ceil(2) as u32;
    let root = SVGBackend::new(path, (WIDTH, ROW * rows)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let areas = root.split_evenly((rows as usize, 2));
    for ((panel, lines), area) in panels.iter().zip(areas) {
        let top = lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1))
            .fold(0.0_f64, f64::max);
        let top = if top > 0.0 { top * 1.15 } else { 1.0 };
        let mut chart = ChartBuilder::on(&area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..seconds, 0.0..top)
            .map_err(drawing)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_desc(unit_name(&panel.unit))
            .y_label_formatter(&|v| short_number(*v))
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(drawing)?;
        // Like Grafana's legend option "hide series with only zeros", unless all are.
        let nonzero: Vec<&Line> = lines
            .iter()
            .filter(|l| l.points.iter().any(|p| p.1 != 0.0))
            .collect();
        let shown = if nonzero.is_empty() {
            lines.iter().collect()
        } else {
            nonzero
        };
        for (i, line) in shown.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    line.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(drawing)?
                .label(line.legend.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        if !lines.is_empty() {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 12))
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(drawing)?;
        }
    }
    root.present().map_err(drawing)?;
    Ok(())
}

fn drawing<E: std::fmt::Debug>(error: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the dashboard picture: {error:?}")
}

/// Grafana's unit ids, spelled out for an axis.
fn unit_name(unit: &str) -> &str {
    match unit {
        "pps" => "packets/s",
        "Bps" => "bytes/s",
        "percentunit" => "fraction",
        _ => "",
    }
}

/// 1234567 → `1.2M`, 0.00125 → `0.00125`, as dashboards print axis values.
fn short_number(value: f64) -> String {
    let (scaled, suffix) = [(1e9, "G"), (1e6, "M"), (1e3, "k")]
        .iter()
        .find(|(scale, _)| value.abs() >= *scale)
        .map_or((value, ""), |(scale, suffix)| (value / scale, *suffix));
    // Three significant digits, without trailing zeros.
    let decimals = if scaled == 0.0 {
        0
    } else {
        (2 - scaled.abs().log10().floor() as i32).max(0) as usize
    };
    let text = format!("{scaled:.decimals$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    format!("{text}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_filled_as_grafana_does() {
        assert_eq!(
            concrete("rate(x{instance=~\"$node\"}[$__rate_interval])", "30s"),
            "rate(x{instance=~\".*\"}[30s])"
        );
    }

    #[test]
    fn legends_take_label_values() {
        let metric = serde_json::json!({"verdict": "pass_exempt", "instance": "n:1"});
        assert_eq!(
            legend("{{verdict}} on {{instance}}", &metric),
            "pass_exempt on n:1"
        );
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(short_number(1_500_000.0), "1.5M");
        assert_eq!(short_number(2000.0), "2k");
        assert_eq!(short_number(0.25), "0.25");
        assert_eq!(short_number(0.001_25), "0.00125");
        assert_eq!(short_number(350.0), "350");
        assert_eq!(short_number(0.0), "0");
    }
}
