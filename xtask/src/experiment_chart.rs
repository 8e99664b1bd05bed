//! The experiments' charts, drawn like the bench's (bench_charts.rs: plotters, embedded font):
//! `timeline.png` (answers per second per real and failures per second against time, the
//! events marked, latency percentiles beneath) and, for `spread`, `shares.png`.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use crate::{
    bench_charts::{Area, FONT, legend, plot_err, register, segment_name},
    experiment_rows::{Kind, Row, percentile},
};

const PALETTE: [RGBColor; 6] = [
    RGBColor(0x2b, 0x6c, 0xb0),
    RGBColor(0x27, 0xae, 0x60),
    RGBColor(0xe6, 0x7e, 0x22),
    RGBColor(0x8e, 0x44, 0xad),
    RGBColor(0x16, 0xa0, 0x85),
    RGBColor(0x7f, 0x8c, 0x8d),
];
/// One line of the rates chart: its legend, colour and (time, per second) points.
type Series = (String, RGBColor, Vec<(f64, f64)>);

const FAILURES: RGBColor = RGBColor(0xc0, 0x39, 0x2b);
const EVENT: RGBColor = RGBColor(0x55, 0x55, 0x55);

pub fn timeline(path: &Path, title: &str, rows: &[Row], reals: &[String]) -> Result<()> {
    register()?;
    let area = BitMapBackend::new(path, (1200, 760)).into_drawing_area();
    area.fill(&WHITE).map_err(plot_err)?;
    let (top, bottom) = area.split_vertically(500);
    let requests: Vec<&Row> = rows.iter().filter(|r| r.kind != Kind::Event).collect();
    let events: Vec<&Row> = rows.iter().filter(|r| r.kind == Kind::Event).collect();
    let span = rows.iter().map(|r| r.end()).fold(1.0, f64::max).ceil();
    let bin = if span <= 15.0 { 0.5 } else { 1.0 };
    let bins = (span / bin).ceil() as usize;
    let index = |t: f64| ((t / bin).floor().max(0.0) as usize).min(bins - 1);
    let per_second = |pick: &dyn Fn(&Row) -> bool| -> Vec<(f64, f64)> {
        let mut counts = vec![0usize; bins];
        for r in requests.iter().filter(|r| pick(r)) {
            counts[index(r.end())] += 1;
        }
        counts
            .iter()
            .enumerate()
            .map(|(i, &n)| ((i as f64 + 0.5) * bin, n as f64 / bin))
            .collect()
    };
    let mut series: Vec<Series> = reals
        .iter()
        .enumerate()
        .map(|(i, real)| {
            (
                format!("answers/s from {real}"),
                PALETTE[i % PALETTE.len()],
                per_second(&|r: &Row| r.ok && r.real == *real),
            )
        })
        .collect();
    series.push((
        "failures/s".to_string(),
        FAILURES,
        per_second(&|r: &Row| !r.ok),
    ));
    let y_max = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.35;
    draw_rates(&top, title, span, bin, y_max, &series, &events)?;
    draw_latency(&bottom, span, bin, &requests, &events)?;
    area.present().map_err(plot_err)?;
    Ok(())
}

fn draw_rates(
    area: &Area,
    title: &str,
    span: f64,
    bin: f64,
    y_max: f64,
    series: &[Series],
    events: &[&Row],
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..span, 0f64..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(format!(
            "seconds (answers counted in {bin} s bins, by answer time)"
        ))
        .y_desc("per second")
        .light_line_style(WHITE)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 14))
        .draw()
        .map_err(plot_err)?;
    for (name, color, points) in series {
        chart
            .draw_series([PathElement::new(points.clone(), color.stroke_width(2))])
            .map_err(plot_err)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    // Events: a vertical line each, labels staggered so neighbours do not overlap.
    for (i, e) in events.iter().enumerate() {
        chart
            .draw_series([PathElement::new(
                vec![(e.time, 0.0), (e.time, y_max)],
                EVENT.stroke_width(1),
            )])
            .map_err(plot_err)?;
        let y = y_max * (0.97 - 0.055 * (i % 5) as f64);
        chart
            .draw_series([Text::new(
                format!("{:.1} s {}", e.time, e.detail),
                (e.time + span * 0.004, y),
                (FONT, 12).into_font().color(&EVENT),
            )])
            .map_err(plot_err)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    Ok(())
}

/// p50, p90 and p99 of the answered requests' latency per bin (by send time), log scale.
fn draw_latency(
    area: &Area,
    span: f64,
    bin: f64,
    requests: &[&Row],
    events: &[&Row],
) -> Result<()> {
    let bins = (span / bin).ceil() as usize;
    let mut per_bin: Vec<Vec<f64>> = vec![Vec::new(); bins];
    for r in requests.iter().filter(|r| r.ok) {
        let i = ((r.time / bin).floor().max(0.0) as usize).min(bins - 1);
        per_bin[i].push(r.latency_ms.unwrap_or(0.0).max(0.1));
    }
    for b in &mut per_bin {
        b.sort_by(f64::total_cmp);
    }
    let max = per_bin
        .iter()
        .filter_map(|b| b.last())
        .fold(1.0f64, |m, &v| m.max(v))
        * 2.0;
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..span, (0.1f64..max).log_scale())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds (latency of answered requests, by send time)")
        .y_desc("latency ms")
        .light_line_style(WHITE)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 14))
        .draw()
        .map_err(plot_err)?;
    for e in events {
        chart
            .draw_series([PathElement::new(
                vec![(e.time, 0.1), (e.time, max)],
                EVENT.stroke_width(1),
            )])
            .map_err(plot_err)?;
    }
    for (p, color) in [(50.0, PALETTE[0]), (90.0, PALETTE[2]), (99.0, FAILURES)] {
        let points: Vec<(f64, f64)> = per_bin
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.is_empty())
            .map(|(i, b)| ((i as f64 + 0.5) * bin, percentile(b, p)))
            .collect();
        chart
            .draw_series([PathElement::new(points, color.stroke_width(2))])
            .map_err(plot_err)?
            .label(format!("p{p}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    Ok(())
}

/// Bars: each real's share of the answers beside its share of the weights.
pub fn shares(path: &Path, title: &str, shares: &[(String, f64, f64)]) -> Result<()> {
    register()?;
    let area = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    area.fill(&WHITE).map_err(plot_err)?;
    let n = shares.len() as u32;
    let max = shares.iter().map(|s| s.1.max(s.2)).fold(0.0, f64::max) * 1.3;
    let names: Vec<&str> = shares.iter().map(|s| s.0.as_str()).collect();
    let mut chart = ChartBuilder::on(&area)
        .caption(format!("{title}: shares of new connections"), (FONT, 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n - 1).into_segmented(), 0f64..max * 100.0)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("% of answers")
        .light_line_style(WHITE)
        .x_label_formatter(&|v| segment_name(&names, v))
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(plot_err)?;
    // Two bars a segment: measured in its left half, the weights' share in its right half.
    let half = (area.dim_in_pixel().0 as i32 - 90) / n.max(1) as i32 / 2;
    let (outer, inner) = ((half / 5) as u32, 4u32);
    for (which, color, label) in [(0, PALETTE[0], "measured"), (1, PALETTE[5], "weights")] {
        chart
            .draw_series(shares.iter().enumerate().map(|(i, s)| {
                let v = if which == 0 { s.1 } else { s.2 } * 100.0;
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i as u32), 0.0),
                        (SegmentValue::Exact(i as u32 + 1), v),
                    ],
                    color.filled(),
                );
                if which == 0 {
                    bar.set_margin(0, 0, outer, half as u32 + inner);
                } else {
                    bar.set_margin(0, 0, half as u32 + inner, outer);
                }
                bar
            }))
            .map_err(plot_err)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    area.present().map_err(plot_err)?;
    Ok(())
}
