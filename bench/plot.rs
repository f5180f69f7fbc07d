//! Draws a run's `--summary` as two PNG plots for the benchmark report: deliveries per second
//! over time (the summary's `timeline`) and the push-latency distribution
//! (`push_latency_histogram`).
//!
//! ```text
//! cargo bench --bench plot -- SUMMARY.json FONT.ttf OUT_PREFIX "TITLE"
//! ```
//! writes `OUT_PREFIX-timeline.png` and `OUT_PREFIX-latency.png`. Text needs a TrueType font
//! (bench/run installs DejaVu Sans); none is committed.

use std::error::Error;

use fanout::metrics::Summary;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const SIZE: (u32, u32) = (900, 420);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.is_empty() {
        // `cargo test --all-targets` runs every bench target without arguments.
        eprintln!("plot: nothing to draw (usage: plot SUMMARY.json FONT.ttf OUT_PREFIX TITLE)");
        return Ok(());
    }
    let [summary, font, prefix, title] = args.as_slice() else {
        return Err("usage: plot SUMMARY.json FONT.ttf OUT_PREFIX TITLE".into());
    };
    let text = std::fs::read_to_string(summary).map_err(|e| format!("{summary}: {e}"))?;
    let summary: Summary = serde_json::from_str(&text).map_err(|e| format!("{summary}: {e}"))?;
    let bytes = std::fs::read(font).map_err(|e| format!("{font}: {e}"))?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| format!("{font}: not a TrueType font"))?;
    timeline(&summary, &format!("{prefix}-timeline.png"), title)?;
    latency(&summary, &format!("{prefix}-latency.png"), title)?;
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
