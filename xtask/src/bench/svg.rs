//! The comparison as an SVG chart: grouped bars per figure, each normalised to off.

use std::fmt::Write as _;

use super::{
    figures::{FIGURES, MODES, format_value},
    report::Report,
};

/// Grouped bars per figure, each normalised to off.
pub(super) fn chart(report: &Report) -> String {
    const WIDTH: f64 = 760.0;
    const HEIGHT: f64 = 440.0;
    const LEFT: f64 = 60.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 78.0;
    const BOTTOM: f64 = 70.0;
    const COLOURS: [&str; 3] = ["#9e9e9e", "#e8a33d", "#3d7be8"];
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let normalised: Vec<[f64; 3]> = (0..FIGURES.len())
        .map(|f| [0, 1, 2].map(|m| report.ratio(m, 0, f)))
        .collect();
    let top_value = normalised
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .fold(1.2f64, f64::max);
    let y_max = (top_value * 1.1 / 0.2).ceil() * 0.2;
    let y = |v: f64| TOP + plot_h - (v / y_max) * plot_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">Same-node Pod-to-Pod: netd and visibility relative to off (plain routing)</text>"#
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="40" fill="#444">{}</text>"##,
        escape(&format!(
            "Linux {}, {}; client CPU {}, server CPU {}; medians of {} round(s); {}",
            report.kernel,
            report.cpus,
            report.client_cpu,
            report.server_cpu,
            report.rounds,
            report.date.get(..10).unwrap_or(&report.date)
        ))
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="56" fill="#444">Throughput: higher is better. Latency: lower is better. Dashed: visibility's target.</text>"##
    );
    // Grid and axis.
    let mut tick = 0.0;
    while tick <= y_max + 1e-9 {
        let ty = y(tick);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="{}" stroke-width="1"/>"##,
            WIDTH - RIGHT,
            if (tick - 1.0).abs() < 1e-9 {
                "#555"
            } else {
                "#e4e4e4"
            }
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{tick:.1}×</text>"#,
            LEFT - 6.0,
            ty + 4.0
        );
        tick += 0.2;
    }
    let group_w = plot_w / FIGURES.len() as f64;
    let bar_w = group_w * 0.22;
    for (f, figure) in FIGURES.iter().enumerate() {
        let gx = LEFT + group_w * f as f64 + (group_w - 3.0 * bar_w) / 2.0;
        for (m, colour) in COLOURS.iter().enumerate() {
            let v = normalised[f][m];
            if !v.is_finite() {
                continue;
            }
            let x = gx + bar_w * m as f64;
            let (y0, y1) = (y(v), y(0.0));
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y0:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{} {}: {:.3}× off ({})</title></rect>"#,
                bar_w - 3.0,
                (y1 - y0).max(0.0),
                MODES[m],
                figure.label,
                v,
                format_value(figure.key, report.median(m, f))
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{v:.2}</text>"#,
                x + (bar_w - 3.0) / 2.0,
                y0 - 4.0
            );
            if m == 2
                && let Some(target) = figure.target
            {
                let ty = y(target);
                let _ = writeln!(
                    s,
                    r##"<line x1="{:.1}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#c62828" stroke-width="2" stroke-dasharray="4 3"/>"##,
                    x - 4.0,
                    x + bar_w + 1.0
                );
            }
        }
        let cx = LEFT + group_w * (f as f64 + 0.5);
        let _ = writeln!(
            s,
            r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text>"#,
            TOP + plot_h + 18.0,
            escape(figure.label)
        );
        let _ = writeln!(
            s,
            r##"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" fill="#444">off = {}</text>"##,
            TOP + plot_h + 34.0,
            format_value(figure.key, report.median(0, f))
        );
    }
    // Legend.
    let mut lx = LEFT;
    let ly = HEIGHT - 16.0;
    for (m, colour) in COLOURS.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{colour}"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 10.0,
            lx + 16.0,
            MODES[m]
        );
        lx += 110.0;
    }
    s.push_str("</svg>\n");
    s
}

pub(super) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
