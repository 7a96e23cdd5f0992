//! The latency chart: small multiples, one panel per scenario, latency against the
//! percentile, ours and the baseline in the same two colours on every panel, the
//! legend above the data and the targets drawn or stated. Hand-written SVG.
//!
//! Over 600 lines, and one concept: the scales, the legend and the targets are parts
//! of one panel's drawing, and each reads the layout constants the others do.

use std::fmt::Write as _;

use super::{fmt_num, Check, Report, Row};

/// Whose line a contender is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The library under test (`FlagCache…` contenders).
    Ours,
    /// What it is measured against: a raw client or the bare library underneath.
    Baseline,
    /// Anything else: a floor, the store alone, one of several mechanisms.
    Other,
}

/// The role of a contender, from its name.
pub fn role(contender: &str) -> Role {
    let name = contender.to_lowercase();
    if name.contains("flagcache") {
        Role::Ours
    } else if name.starts_with("raw ") || name.starts_with("bare ") {
        Role::Baseline
    } else {
        Role::Other
    }
}

const OURS: &str = "#d55e00";
const BASELINE: &str = "#0072b2";
/// Other contenders: muted colours, then the same colours dashed.
const MUTED: [&str; 4] = ["#8c8c8c", "#9a7fb5", "#7fa37f", "#b59a62"];
/// Solid, dashed, dotted: the second and third contender of one role.
const DASHES: [&str; 3] = ["", "7 4", "2 3"];
const TARGET: &str = "#222222";

const COLUMNS: usize = 2;
const MARGIN: f64 = 12.0;
const PANEL_W: f64 = 590.0;
const GAP: f64 = 14.0;
const TOP: f64 = 62.0;
/// Plot area inside a panel, below its header.
const AXIS_LEFT: f64 = 74.0;
const AXIS_RIGHT: f64 = 14.0;
const PLOT_H: f64 = 190.0;
const AXIS_BOTTOM: f64 = 42.0;
const LINE: f64 = 15.0;
/// Approximate advance of one character at font size 11 (sans-serif).
const CHAR_W: f64 = 6.1;

/// The x axis: percentiles on a "nines" scale, the maximum at the right end.
const X_MAX: f64 = 5.0;
const X_TICKS: [(f64, &str); 7] = [
    (0.0, "0"),
    (50.0, "50"),
    (90.0, "90"),
    (99.0, "99"),
    (99.9, "99.9"),
    (99.99, "99.99"),
    (100.0, "max"),
];

fn nines(p: f64) -> f64 {
    -(1.0 - (p / 100.0).min(0.99999)).log10()
}

/// Text escaped for XML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Lower-case alphanumeric words.
fn tokens(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// A contender's line: its colour, dash pattern and width.
struct Style {
    color: &'static str,
    dash: &'static str,
    width: f64,
}

/// The styles of a panel's rows, in order: the n-th contender of a role gets that
/// role's n-th dash pattern; other contenders take the muted colours in turn.
fn styles(rows: &[&Row]) -> Vec<Style> {
    let (mut ours, mut base, mut other) = (0, 0, 0);
    rows.iter()
        .map(|r| {
            let next = |n: &mut usize| {
                *n += 1;
                *n - 1
            };
            match role(&r.contender) {
                Role::Ours => Style {
                    color: OURS,
                    dash: DASHES[next(&mut ours) % DASHES.len()],
                    width: 2.5,
                },
                Role::Baseline => Style {
                    color: BASELINE,
                    dash: DASHES[next(&mut base) % DASHES.len()],
                    width: 2.5,
                },
                Role::Other => {
                    let n = next(&mut other);
                    Style {
                        color: MUTED[n % MUTED.len()],
                        dash: DASHES[(n / MUTED.len()) % DASHES.len()],
                        width: 1.6,
                    }
                }
            }
        })
        .collect()
}

/// A bound on one latency figure of the panel's rows, drawn as a horizontal line.
struct Bound {
    stat: &'static str,
    us: f64,
    contenders: Vec<String>,
}

/// One scenario's panel: its rows with samples, the bounds it draws and the
/// targets it states in words.
struct Panel<'a> {
    scenario: &'a str,
    rows: Vec<&'a Row>,
    bounds: Vec<Bound>,
    stated: Vec<String>,
}

/// Whether `check` is about `scenario`, and how closely: the check must begin with
/// the scenario's first words; the score counts the scenario's words it contains.
fn affinity(scenario: &str, check: &Check) -> Option<usize> {
    let head = scenario.split(',').next().unwrap_or(scenario);
    let family: Vec<String> = tokens(head).into_iter().take(2).collect();
    let words = tokens(&check.target);
    if family.is_empty() || !words.starts_with(&family) {
        return None;
    }
    let mut own = tokens(scenario);
    own.sort();
    own.dedup();
    Some(own.iter().filter(|w| words.contains(w)).count())
}

/// The figure of `rows` that `check` measures, when it is a latency of one of them:
/// the one the target names when several are equal (few samples).
fn measured_figure(check: &Check, rows: &[&Row]) -> Option<(&'static str, String)> {
    let scale = match check.unit.as_str() {
        "µs" => 1.0,
        "ms" => 1_000.0,
        _ => return None,
    };
    let us = check.measured * scale;
    let close = |v: f64| (v - us).abs() <= 1e-6 * us.abs().max(1e-3);
    let named = tokens(&check.target);
    rows.iter().find_map(|r| {
        let l = &r.latency;
        let equal: Vec<&'static str> = [("max", l.max_us), ("p99", l.p99_us), ("p50", l.p50_us)]
            .into_iter()
            .filter(|&(_, v)| close(v))
            .map(|(stat, _)| stat)
            .collect();
        let stat = equal
            .iter()
            .find(|s| named.iter().any(|w| w == *s))
            .or(equal.first())?;
        Some((*stat, r.contender.clone()))
    })
}

fn stated(c: &Check) -> String {
    let unit = if c.unit == "×" {
        "×".to_string()
    } else {
        format!(" {}", c.unit)
    };
    format!(
        "target: {} {} {}{unit} (measured {}{unit}, {})",
        c.target,
        if c.at_least { "≥" } else { "≤" },
        fmt_num(c.bound),
        fmt_num(c.measured),
        if c.met { "met" } else { "missed" }
    )
}

fn panels(report: &Report) -> (Vec<Panel<'_>>, Vec<&str>) {
    let mut order: Vec<&str> = Vec::new();
    for r in &report.rows {
        if !order.contains(&r.scenario.as_str()) {
            order.push(&r.scenario);
        }
    }
    let (mut drawn, mut empty) = (Vec::new(), Vec::new());
    for scenario in order {
        let rows: Vec<&Row> = report
            .rows
            .iter()
            .filter(|r| r.scenario == scenario && r.latency.count > 0)
            .collect();
        if rows.is_empty() {
            empty.push(scenario);
        } else {
            drawn.push(Panel {
                scenario,
                rows,
                bounds: Vec::new(),
                stated: Vec::new(),
            });
        }
    }
    // Targets on speed: ratios and latencies (counts are not drawn).
    let speed = |c: &&Check| !c.correctness && ["×", "µs", "ms"].contains(&c.unit.as_str());
    for check in report.checks.iter().filter(speed) {
        let scores: Vec<Option<usize>> =
            drawn.iter().map(|p| affinity(p.scenario, check)).collect();
        let Some(best) = scores.iter().flatten().max().copied() else {
            continue;
        };
        for (panel, score) in drawn.iter_mut().zip(scores) {
            if score != Some(best) {
                continue;
            }
            match measured_figure(check, &panel.rows).filter(|_| !check.at_least) {
                Some((stat, contender)) => {
                    let us = check.bound * if check.unit == "ms" { 1_000.0 } else { 1.0 };
                    match panel
                        .bounds
                        .iter_mut()
                        .find(|b| b.stat == stat && b.us == us)
                    {
                        Some(b) => b.contenders.push(contender),
                        None => panel.bounds.push(Bound {
                            stat,
                            us,
                            contenders: vec![contender],
                        }),
                    }
                }
                None => panel.stated.push(stated(check)),
            }
        }
    }
    (drawn, empty)
}

/// A legend entry's width: the line sample, a gap and the text.
fn entry_w(text: &str) -> f64 {
    30.0 + text.chars().count() as f64 * CHAR_W + 14.0
}

/// The legend laid out in lines no wider than `width`: each entry's row index.
fn legend_lines(rows: &[&Row], width: f64) -> Vec<Vec<usize>> {
    let mut lines: Vec<Vec<usize>> = Vec::new();
    let mut x = width;
    for (i, r) in rows.iter().enumerate() {
        let w = entry_w(&r.contender);
        match lines.last_mut() {
            Some(line) if x + w <= width => line.push(i),
            _ => {
                lines.push(vec![i]);
                x = 0.0;
            }
        }
        x += w;
    }
    lines
}

/// Text wrapped at word boundaries to lines of at most `chars` characters.
fn wrap(text: &str, chars: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split(' ') {
        match lines.last_mut() {
            Some(l) if l.chars().count() + 1 + word.chars().count() <= chars => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// The y axis of a panel: log or linear over the values it shows.
struct YAxis {
    log: bool,
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl YAxis {
    /// A log scale when the values span more than 20×, else linear from zero with a
    /// little room above the largest value.
    fn new(values: impl Iterator<Item = f64>) -> Self {
        let (mut min, mut max) = (f64::INFINITY, 0.0_f64);
        for v in values.filter(|v| *v > 0.0 && v.is_finite()) {
            min = min.min(v);
            max = max.max(v);
        }
        if max <= 0.0 {
            (min, max) = (1.0, 1.0);
        }
        if max / min > 20.0 {
            let (a, b) = (min.log10().floor() as i32, max.log10().ceil() as i32);
            let steps: &[f64] = if b - a <= 2 { &[1.0, 2.0, 5.0] } else { &[1.0] };
            let ticks = (a..=b)
                .flat_map(|e| steps.iter().map(move |s| s * 10f64.powi(e)))
                .filter(|t| *t <= 10f64.powi(b) * 1.000_001)
                .collect();
            YAxis {
                log: true,
                lo: 10f64.powi(a),
                hi: 10f64.powi(b),
                ticks,
            }
        } else {
            // Headroom, so a line at the maximum stays off the frame.
            let max = max * 1.06;
            let raw = max / 5.0;
            let mag = 10f64.powf(raw.log10().floor());
            let step = [1.0, 2.0, 2.5, 5.0, 10.0]
                .into_iter()
                .map(|s| s * mag)
                .find(|s| *s >= raw)
                .unwrap_or(10.0 * mag);
            let n = (max / step).ceil().max(1.0) as usize;
            YAxis {
                log: false,
                lo: 0.0,
                hi: step * n as f64,
                ticks: (0..=n).map(|i| step * i as f64).collect(),
            }
        }
    }

    /// The fraction of the axis height at `us`, 0 at the bottom.
    fn frac(&self, us: f64) -> f64 {
        if self.log {
            let v = us.max(self.lo);
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (us - self.lo) / (self.hi - self.lo)
        }
    }
}

/// A tick label with its unit ("0", "250 ns", "2.5 µs", "10 ms", "1.5 s").
fn tick_label(us: f64) -> String {
    let trim = |v: f64| {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    if us == 0.0 {
        "0".to_string()
    } else if us >= 1e6 {
        format!("{} s", trim(us / 1e6))
    } else if us >= 1e3 {
        format!("{} ms", trim(us / 1e3))
    } else if us >= 1.0 {
        format!("{} µs", trim(us))
    } else {
        format!("{} ns", trim(us * 1e3))
    }
}

fn dash_attr(dash: &str) -> String {
    if dash.is_empty() {
        String::new()
    } else {
        format!(r#" stroke-dasharray="{dash}""#)
    }
}

/// One panel's SVG at `(x0, y0)`, `height` tall.
fn draw_panel(out: &mut String, p: &Panel<'_>, x0: f64, y0: f64, height: f64) {
    let styles = styles(&p.rows);
    let _ = write!(
        out,
        r##"<g class="panel" transform="translate({x0:.1},{y0:.1})"><rect width="{PANEL_W}" height="{height:.1}" fill="#ffffff" stroke="#cccccc"/>"##
    );
    let _ = write!(
        out,
        r#"<text x="10" y="18" font-size="13" font-weight="bold">{}</text>"#,
        esc(p.scenario)
    );
    let mut y = 18.0;
    let text_chars = ((PANEL_W - 20.0) / CHAR_W) as usize;
    for line in p.stated.iter().flat_map(|s| wrap(s, text_chars)) {
        y += LINE;
        let _ = write!(
            out,
            r##"<text class="target" x="10" y="{y:.1}" font-size="11" fill="{TARGET}">{}</text>"##,
            esc(&line)
        );
    }
    for line in legend_lines(&p.rows, PANEL_W - 20.0) {
        y += LINE + 1.0;
        let mut x = 10.0;
        for i in line {
            let (r, s) = (p.rows[i], &styles[i]);
            let _ = write!(
                out,
                r#"<g class="legend"><line x1="{x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="{}"{}/><text x="{:.1}" y="{y:.1}" font-size="11">{}</text></g>"#,
                y - 4.0,
                x + 24.0,
                y - 4.0,
                s.color,
                s.width,
                dash_attr(s.dash),
                x + 30.0,
                esc(&r.contender)
            );
            x += entry_w(&r.contender);
        }
    }
    let top = y + 12.0;
    let (left, w) = (AXIS_LEFT, PANEL_W - AXIS_LEFT - AXIS_RIGHT);
    let axis = YAxis::new(
        p.rows
            .iter()
            .flat_map(|r| r.latency.curve.iter().map(|c| c.1))
            .chain(p.bounds.iter().map(|b| b.us)),
    );
    let px = |pct: f64| left + nines(pct) / X_MAX * w;
    let py = |us: f64| top + PLOT_H * (1.0 - axis.frac(us));
    // Grid and ticks.
    for &t in &axis.ticks {
        let _ = write!(
            out,
            r##"<line x1="{left:.1}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#e6e6e6"/><text x="{2:.1}" y="{3:.1}" font-size="10" text-anchor="end">{4}</text>"##,
            py(t),
            left + w,
            left - 5.0,
            py(t) + 3.5,
            esc(&tick_label(t))
        );
    }
    for (pct, label) in X_TICKS {
        let _ = write!(
            out,
            r##"<line x1="{0:.1}" y1="{top:.1}" x2="{0:.1}" y2="{1:.1}" stroke="#e6e6e6"/><text x="{0:.1}" y="{2:.1}" font-size="10" text-anchor="middle">{label}</text>"##,
            px(pct),
            top + PLOT_H,
            top + PLOT_H + 14.0
        );
    }
    let _ = write!(
        out,
        r##"<rect x="{left:.1}" y="{top:.1}" width="{w:.1}" height="{PLOT_H}" fill="none" stroke="#888888"/><text x="{0:.1}" y="{1:.1}" font-size="11" text-anchor="middle">percentile (nines scale)</text><text transform="translate(14,{2:.1}) rotate(-90)" font-size="11" text-anchor="middle">latency{3}</text>"##,
        left + w / 2.0,
        top + PLOT_H + 32.0,
        top + PLOT_H / 2.0,
        if axis.log { ", log scale" } else { "" }
    );
    // Target lines, the data over them, then the targets' labels over both.
    for b in &p.bounds {
        let _ = write!(
            out,
            r#"<line class="bound" x1="{left:.1}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="{TARGET}" stroke-width="1.2" stroke-dasharray="9 3 2 3"/>"#,
            py(b.us),
            left + w,
        );
    }
    for (r, s) in p.rows.iter().zip(&styles) {
        let points: Vec<String> = r
            .latency
            .curve
            .iter()
            .map(|&(pct, us)| format!("{:.1},{:.1}", px(pct), py(us)))
            .collect();
        let _ = write!(
            out,
            r#"<polyline class="series" fill="none" stroke="{}" stroke-width="{}"{} points="{}"><title>{}</title></polyline>"#,
            s.color,
            s.width,
            dash_attr(s.dash),
            points.join(" "),
            esc(&r.contender)
        );
    }
    for b in &p.bounds {
        let whose = if b.contenders.len() == p.rows.len() {
            String::new()
        } else {
            format!(" ({})", b.contenders.join(", "))
        };
        let label = format!("target: {} ≤ {}{whose}", b.stat, tick_label(b.us));
        let y = py(b.us);
        // Above the line, or below it when the line runs along the top.
        let base = if y - top < 14.0 { y + 12.0 } else { y - 4.0 };
        let _ = write!(
            out,
            r##"<rect x="{0:.1}" y="{1:.1}" width="{2:.1}" height="11" fill="#ffffff" fill-opacity="0.85"/><text x="{3:.1}" y="{base:.1}" font-size="10" fill="{TARGET}">{4}</text>"##,
            left + 2.0,
            base - 9.0,
            label.chars().count() as f64 * CHAR_W * 10.0 / 11.0 + 4.0,
            left + 4.0,
            esc(&label)
        );
    }
    out.push_str("</g>\n");
}

/// The header height of a panel: title, stated targets and legend lines.
fn header(p: &Panel<'_>) -> f64 {
    let text_chars = ((PANEL_W - 20.0) / CHAR_W) as usize;
    let stated = p
        .stated
        .iter()
        .map(|s| wrap(s, text_chars).len())
        .sum::<usize>();
    18.0 + LINE * stated as f64
        + (LINE + 1.0) * legend_lines(&p.rows, PANEL_W - 20.0).len() as f64
        + 12.0
}

/// The whole chart as an SVG document.
pub fn svg(report: &Report) -> String {
    let (panels, empty) = panels(report);
    let heights: Vec<f64> = panels
        .chunks(COLUMNS)
        .map(|row| {
            row.iter()
                .map(|p| header(p) + PLOT_H + AXIS_BOTTOM)
                .fold(0.0, f64::max)
        })
        .collect();
    let width = MARGIN * 2.0 + PANEL_W * COLUMNS as f64 + GAP * (COLUMNS - 1) as f64;
    let footer = if empty.is_empty() { 0.0 } else { 22.0 };
    let height = TOP + heights.iter().map(|h| h + GAP).sum::<f64>() + footer + MARGIN;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif"><rect width="100%" height="100%" fill="#f7f7f7"/>"##
    );
    let _ = write!(
        out,
        r#"<text x="{MARGIN}" y="24" font-size="17" font-weight="bold">flagcache-bench: latency by percentile, one panel per scenario{}</text>"#,
        if report.quick {
            esc(" (quick run: the figures mean nothing)")
        } else {
            String::new()
        }
    );
    let key = |x: f64, color: &str, width: f64, dash: &str, text: &str| {
        format!(
            r#"<line x1="{x:.1}" y1="42" x2="{:.1}" y2="42" stroke="{color}" stroke-width="{width}"{}/><text x="{:.1}" y="46" font-size="12">{}</text>"#,
            x + 26.0,
            dash_attr(dash),
            x + 32.0,
            esc(text)
        )
    };
    out.push_str(r#"<g class="key">"#);
    out.push_str(&key(MARGIN, OURS, 2.5, "", "FlagCache (ours)"));
    out.push_str(&key(
        MARGIN + 150.0,
        BASELINE,
        2.5,
        "",
        "baseline: the raw client or bare library",
    ));
    out.push_str(&key(MARGIN + 450.0, MUTED[0], 1.6, "", "other contenders"));
    out.push_str(&key(
        MARGIN + 610.0,
        TARGET,
        1.2,
        "9 3 2 3",
        "target (a bound on a latency)",
    ));
    out.push_str("</g>\n");
    let mut y = TOP;
    for (row, h) in panels.chunks(COLUMNS).zip(&heights) {
        for (i, p) in row.iter().enumerate() {
            draw_panel(&mut out, p, MARGIN + i as f64 * (PANEL_W + GAP), y, *h);
        }
        y += h + GAP;
    }
    if !empty.is_empty() {
        let _ = write!(
            out,
            r#"<text x="{MARGIN}" y="{:.1}" font-size="11">Not drawn (no latency samples): {}</text>"#,
            y + 8.0,
            esc(&empty.join("; "))
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests;
