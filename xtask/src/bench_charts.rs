//! PNG charts of a bench run, for BENCHMARKS.md: `datapath.png` (ns per packet over the empty
//! program, median and p99, with the targets) and `rate.png` (Mpps against the ceiling).
//! Text uses an embedded DejaVu Sans, so rendering needs no font from the system.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::{
    coord::{CoordTranslate, Shift},
    prelude::*,
    style::{FontStyle, register_font},
};

use crate::{
    bench::DataPath,
    bench_rate::{GOAL, Rates},
};

pub const FONT: &str = "sans-serif";
const MEDIAN: RGBColor = RGBColor(0x2b, 0x6c, 0xb0);
const P99: RGBColor = RGBColor(0x9e, 0xc5, 0xe8);
const TARGET: RGBColor = RGBColor(0xc0, 0x39, 0x2b);
const CEILING: RGBColor = RGBColor(0x7f, 0x8c, 0x8d);

/// Makes the embedded font the one `FONT` names; every chart calls it first.
pub fn register() -> Result<()> {
    // Registering twice is harmless; the font lives as long as the program.
    register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("the embedded DejaVu Sans font did not parse"))
}

/// `datapath.png` in `dir`.
pub fn render_datapath(dp: &DataPath, dir: &Path) -> Result<()> {
    render(dir, "datapath.png", &|area: &Area| datapath(area, dp))
}

/// `rate.png` in `dir`.
pub fn render_rate(rates: &Rates, dir: &Path) -> Result<()> {
    render(dir, "rate.png", &|area: &Area| rate(area, rates))
}

fn render(dir: &Path, name: &str, draw: &dyn Fn(&Area) -> Result<()>) -> Result<()> {
    register()?;
    let path = dir.join(name);
    let area = BitMapBackend::new(&path, (1000, 620)).into_drawing_area();
    area.fill(&WHITE).map_err(plot_err)?;
    draw(&area)?;
    area.present().map_err(plot_err)?;
    eprintln!("wrote {}", path.canonicalize()?.display());
    Ok(())
}

pub type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// The legend of a chart's labelled series, boxed, at `position`.
pub fn legend<'a, 'b: 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, CT>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()
        .map_err(plot_err)
}

/// The label of a segmented axis: one name per segment, at its centre.
pub fn segment_name(names: &[&str], v: &SegmentValue<u32>) -> String {
    match v {
        SegmentValue::CenterOf(i) => names.get(*i as usize).unwrap_or(&"").to_string(),
        _ => String::new(),
    }
}

pub fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

/// Horizontal bars, one row per path: median over the floor (dark), p99 over the floor
/// (light), the target as a red tick.
fn datapath(area: &Area, dp: &DataPath) -> Result<()> {
    let n = dp.rows.len() as u32;
    let max = dp
        .rows
        .iter()
        .map(|r| r.net.p99.max(r.target_ns.unwrap_or(0)))
        .max()
        .unwrap_or(1);
    let x_max = (max as f64 * 1.1).ceil() as u64;
    let names: Vec<&str> = dp.rows.iter().map(|r| r.name).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "ns per packet over the empty XDP program (floor {} ns median)",
                dp.floor.median
            ),
            (FONT, 22),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(170)
        .build_cartesian_2d(0u64..x_max, (0..n - 1).into_segmented())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("ns over the floor (BPF_PROG_TEST_RUN, one call per sample)")
        .y_label_formatter(&|v| segment_name(&names, v))
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(plot_err)?;

    let row_px = (area.dim_in_pixel().1 as i32 - 100) / n.max(1) as i32;
    let half = row_px / 2;
    let bar = |i: u32, value: u64, color: RGBColor, top: bool| {
        let mut r = Rectangle::new(
            [
                (0, SegmentValue::Exact(i)),
                (value, SegmentValue::Exact(i + 1)),
            ],
            color.filled(),
        );
        // The segment's first value is at the bottom: the median takes the upper half.
        if top {
            r.set_margin(4, half as u32, 0, 0);
        } else {
            r.set_margin(half as u32, 4, 0, 0);
        }
        r
    };
    chart
        .draw_series(
            dp.rows
                .iter()
                .enumerate()
                .map(|(i, r)| bar(i as u32, r.net.median, MEDIAN, true)),
        )
        .map_err(plot_err)?
        .label("median")
        .legend(|(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], MEDIAN.filled()));
    chart
        .draw_series(
            dp.rows
                .iter()
                .enumerate()
                .map(|(i, r)| bar(i as u32, r.net.p99, P99, false)),
        )
        .map_err(plot_err)?
        .label("p99")
        .legend(|(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], P99.filled()));
    chart
        .draw_series(dp.rows.iter().enumerate().filter_map(|(i, r)| {
            let t = r.target_ns?;
            Some(PathElement::new(
                vec![
                    (t, SegmentValue::Exact(i as u32)),
                    (t, SegmentValue::Exact(i as u32 + 1)),
                ],
                TARGET.stroke_width(3),
            ))
        }))
        .map_err(plot_err)?
        .label("target (median)")
        .legend(|(x, y)| {
            PathElement::new(vec![(x + 8, y - 7), (x + 8, y + 7)], TARGET.stroke_width(3))
        });
    chart
        .draw_series(dp.rows.iter().enumerate().map(|(i, r)| {
            Text::new(
                format!("{} / {}", r.net.median, r.net.p99),
                (r.net.p99, SegmentValue::CenterOf(i as u32)),
                (FONT, 13).into_font(),
            )
        }))
        .map_err(plot_err)?;
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    Ok(())
}

/// Horizontal bars of Mpps: the ceiling (grey) and the balancer's paths, with their share of
/// the ceiling, and the goal as a red line.
fn rate(area: &Area, rates: &Rates) -> Result<()> {
    let n = rates.rows.len() as u32;
    let ceiling = rates.rows.first().map_or(1.0, |r| r.mpps);
    let max = rates
        .rows
        .iter()
        .flat_map(|r| r.rounds.iter().copied().chain([r.mpps]))
        .fold(0.0, f64::max);
    let names: Vec<&str> = rates.rows.iter().map(|r| r.name).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(
            "forwarding rate on one core, veth pair, one flow and 100,000 (_100k)",
            (FONT, 22),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(200)
        .build_cartesian_2d(0f64..max * 1.75, (0..n - 1).into_segmented())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("Mpps, kernel time (bar: median of the rounds; dots: each round)")
        .y_label_formatter(&|v| segment_name(&names, v))
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(rates.rows.iter().enumerate().map(|(i, r)| {
            let color = if i == 0 { CEILING } else { MEDIAN };
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i as u32)),
                    (r.mpps, SegmentValue::Exact(i as u32 + 1)),
                ],
                color.filled(),
            );
            bar.set_margin(12, 12, 0, 0);
            bar
        }))
        .map_err(plot_err)?;
    chart
        .draw_series(rates.rows.iter().enumerate().flat_map(|(i, r)| {
            r.rounds.iter().map(move |&x| {
                Circle::new((x, SegmentValue::CenterOf(i as u32)), 4, BLACK.filled())
            })
        }))
        .map_err(plot_err)?;
    chart
        .draw_series(rates.rows.iter().enumerate().map(|(i, r)| {
            let label = match (i, r.hit_ratio) {
                (0, _) => format!("{:.2} Mpps (ceiling)", r.mpps),
                (_, Some(hits)) if r.name.ends_with("_100k") => format!(
                    "{:.2} Mpps = {:.2} of ceiling, {hits:.3} hit",
                    r.mpps, r.ratio
                ),
                _ => format!("{:.2} Mpps = {:.2} of ceiling", r.mpps, r.ratio),
            };
            Text::new(
                label,
                (max * 1.04, SegmentValue::CenterOf(i as u32)),
                (FONT, 14).into_font(),
            )
        }))
        .map_err(plot_err)?;
    chart
        .draw_series([PathElement::new(
            vec![
                (ceiling * GOAL, SegmentValue::Exact(0)),
                (ceiling * GOAL, SegmentValue::Exact(n)),
            ],
            TARGET.stroke_width(2),
        )])
        .map_err(plot_err)?
        .label(format!("goal: {GOAL} of the ceiling"))
        .legend(|(x, y)| {
            PathElement::new(vec![(x + 8, y - 7), (x + 8, y + 7)], TARGET.stroke_width(2))
        });
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    Ok(())
}
