//! Draws a run's `--summary` as two PNG plots for the benchmark report: deliveries per second
//! over time (the summary's `timeline`) and the push-latency distribution
//! (`push_latency_histogram`).
//!
//! ```text
//! cargo bench --bench plot -- SUMMARY.json FONT.ttf OUT_PREFIX "TITLE"
//! ```
//! writes `OUT_PREFIX-timeline.png` and `OUT_PREFIX-latency.png`.
//!
//! ```text
//! cargo bench --bench plot -- --scale SCALE.json FONT.ttf OUT.png "TITLE"
//! ```
//! draws the `scale` case's curve — users/s against workers beside N × the single-threaded
//! ceiling loop and N loops run at once — from `{"workers": [..], "users_per_s": [..],
//! "loop_users_per_s": x, "loops_at_once": [..]}` (the last optional).
//!
//! Text needs a TrueType font (bench/run installs DejaVu Sans); none is committed.

use std::error::Error;

use fanout::metrics::Summary;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const SIZE: (u32, u32) = (900, 420);
const USAGE: &str = "usage: plot SUMMARY.json FONT.ttf OUT_PREFIX TITLE | plot --scale SCALE.json FONT.ttf OUT.png TITLE";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.is_empty() {
        // `cargo test --all-targets` runs every bench target without arguments.
        eprintln!("plot: nothing to draw ({USAGE})");
        return Ok(());
    }
    if let [flag, input, font, out, title] = args.as_slice() {
        if flag == "--scale" {
            let text = std::fs::read_to_string(input).map_err(|e| format!("{input}: {e}"))?;
            let curve: Scale = serde_json::from_str(&text).map_err(|e| format!("{input}: {e}"))?;
            use_font(font)?;
            return scale(&curve, out, title);
        }
    }
    let [summary, font, prefix, title] = args.as_slice() else {
        return Err(USAGE.into());
    };
    let text = std::fs::read_to_string(summary).map_err(|e| format!("{summary}: {e}"))?;
    let summary: Summary = serde_json::from_str(&text).map_err(|e| format!("{summary}: {e}"))?;
    use_font(font)?;
    timeline(&summary, &format!("{prefix}-timeline.png"), title)?;
    latency(&summary, &format!("{prefix}-latency.png"), title)?;
    Ok(())
}

/// Registers the TrueType font at `path` as the plots' "sans-serif".
fn use_font(path: &str) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| format!("{path}: not a TrueType font"))?;
    Ok(())
}

/// The `scale` case's measurements, as bench/run writes them.
#[derive(serde::Deserialize)]
struct Scale {
    /// Worker counts, ascending.
    workers: Vec<u32>,
    /// The engine's users/s at each worker count (median of the runs).
    users_per_s: Vec<f64>,
    /// The single-threaded ceiling loop's users/s, measured in the same run.
    loop_users_per_s: f64,
    /// N ceiling loops started at once, their users/s summed, at each worker count N (what N
    /// CPUs of the machine did together in the same run); absent in older files.
    #[serde(default)]
    loops_at_once: Vec<f64>,
}

/// Users/s against workers, beside N × the ceiling loop (what N perfectly scaling cores
/// would do) and, where measured, N loops run at once (what N cores did).
fn scale(curve: &Scale, path: &str, title: &str) -> Result<()> {
    let n = curve.workers.len();
    let loops = curve.loops_at_once.len();
    if n == 0 || curve.users_per_s.len() != n || (loops != 0 && loops != n) {
        return Err(format!(
            "{path}: workers, users_per_s and loops_at_once differ in length or are empty"
        )
        .into());
    }
    let x_max = f64::from(*curve.workers.iter().max().unwrap_or(&1));
    let ideal = |n: f64| n * curve.loop_users_per_s;
    let y_max = (curve.users_per_s.iter().chain(&curve.loops_at_once))
        .copied()
        .fold(ideal(x_max), f64::max)
        * 1.1;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title}: users/s by workers"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..x_max + 0.5, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("workers (fanout run -w N)")
        .y_desc("users/s")
        // Whole worker counts only: a narrow axis (2 cores) gets ticks at halves.
        .x_label_formatter(&|v| match v.fract() == 0.0 {
            true => format!("{v:.0}"),
            false => String::new(),
        })
        .y_label_formatter(&|v| format!("{:.1}M", v / 1e6))
        .draw()?;
    let red = RED.stroke_width(2);
    chart
        .draw_series(DashedLineSeries::new(
            [(1.0, ideal(1.0)), (x_max, ideal(x_max))],
            8,
            6,
            red,
        ))?
        .label(format!(
            "N × single-threaded loop ({:.1}M users/s each)",
            curve.loop_users_per_s / 1e6
        ))
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], red));
    let at = |values: &[f64]| -> Vec<(f64, f64)> {
        (curve.workers.iter().map(|&n| f64::from(n)))
            .zip(values.iter().copied())
            .collect()
    };
    if !curve.loops_at_once.is_empty() {
        let green = GREEN.stroke_width(2);
        chart
            .draw_series(LineSeries::new(at(&curve.loops_at_once), green).point_size(3))?
            .label("N loops run at once, their rates summed")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], green));
    }
    let points = at(&curve.users_per_s);
    let blue = BLUE.stroke_width(2);
    chart
        .draw_series(LineSeries::new(points, blue).point_size(4))?
        .label("fanout run -w N")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], blue));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Deliveries per second in each interval of the run.
fn timeline(summary: &Summary, path: &str, title: &str) -> Result<()> {
    let t = &summary.timeline;
    let step = t.interval_ms.max(1) as f64 / 1000.0;
    let points: Vec<(f64, f64)> = t
        .delivered
        .iter()
        .enumerate()
        .map(|(i, &n)| ((i as f64 + 1.0) * step, n as f64 / step))
        .collect();
    let x_max = points.last().map_or(1.0, |p| p.0).max(step);
    let y_max = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title}: deliveries/s over time"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc(format!(
            "seconds since start ({} ms intervals)",
            t.interval_ms
        ))
        .y_desc("deliveries/s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    chart.draw_series(LineSeries::new(points, &BLUE))?;
    root.present()?;
    Ok(())
}

/// The share of pushes in each latency bucket (eight per doubling).
fn latency(summary: &Summary, path: &str, title: &str) -> Result<()> {
    let h = &summary.push_latency_histogram;
    let total: u64 = h.count.iter().sum::<u64>().max(1);
    let first = h.count.iter().position(|&c| c > 0).unwrap_or(0);
    // A segmented range a..b has a segment for each of a..=b.
    let shown = first..h.count.len().saturating_sub(1).max(first);
    let label = |i: usize| {
        let Some(&ms) = h.upper_ms.get(i) else {
            return String::new();
        };
        match ms {
            _ if ms < 1.0 => format!("{:.0}µs", ms * 1000.0),
            _ if ms < 10.0 => format!("{ms:.1}ms"),
            _ => format!("{ms:.0}ms"),
        }
    };
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let p = &summary.push_latency_ms;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{title}: push latency (p50 {:.2} ms, p99 {:.2} ms)",
                p.p50, p.p99
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(shown.into_segmented(), 0.0..100.0)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("push latency bucket (upper bound)")
        .y_desc("% of pushes")
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => label(*i),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(
        Histogram::vertical(&chart)
            .style(BLUE.filled())
            .margin(2)
            .data((first..h.count.len()).map(|i| (i, h.count[i] as f64 * 100.0 / total as f64))),
    )?;
    root.present()?;
    Ok(())
}
