//! The two plots, drawn with plotters' SVG backend (text stays `<text>`, so no font files are
//! needed): `latency.svg`, the latency percentiles per mode, and `scale.svg`, the proxies'
//! memory and CPU per node versus pods per node. Medians, with min–max whiskers.

use plotters::{coord::Shift, prelude::*};

use crate::{
    MODES, Mode,
    report::Results,
    scenarios::{LatencyRound, Measure, ScaleRound},
    statistics::Stat,
};

type Error = Box<dyn std::error::Error>;

/// One colour per mode, in [`MODES`] order.
const MODE_COLOURS: [RGBColor; 8] = [
    RGBColor(0x88, 0x88, 0x88),
    RGBColor(0xd9, 0x5f, 0x02),
    RGBColor(0x1b, 0x9e, 0x77),
    RGBColor(0xbb, 0xbb, 0xbb),
    RGBColor(0x66, 0xa6, 0x1e),
    RGBColor(0x75, 0x70, 0xb3),
    RGBColor(0xe7, 0x29, 0x8a),
    RGBColor(0xa6, 0x76, 0x1d),
];

const FONT: &str = "sans-serif";

/// Draws onto a `w`×`h` SVG and returns its text.
fn svg(
    (w, h): (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<(), Error>,
) -> Result<String, Error> {
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    Ok(text)
}

/// A value on an axis that reaches `top`: whole numbers, or two decimals on a short axis.
fn y_label(v: f64, top: f64) -> String {
    if top >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Grouped bars: one group per percentile, one bar per mode (median, min–max whisker); a mode
/// without numbers gets a "failed" mark in its place and in the legend.
pub fn latency(results: &Results) -> Result<String, Error> {
    let rounds = &results.runs.latency_http1_1000rps;
    let percentiles = LatencyRound::PERCENTILES;
    let data: Vec<Vec<Option<Stat>>> = MODES
        .iter()
        .map(|m| {
            percentiles
                .iter()
                .map(|(_, f)| rounds.stat(*m, |r| Some(f(r))).ok())
                .collect()
        })
        .collect();
    let top = data
        .iter()
        .flatten()
        .flatten()
        .map(|s| s.max)
        .fold(1.0f64, f64::max)
        * 1.1;
    // x in whole units (plotters labels an integer axis at chosen points): a bar slot is SLOT
    // wide, a group one slot per mode plus one; a bar fills 9/10 of its slot, half a slot in
    // from the group's edge.
    const SLOT: i32 = 20;
    let group = SLOT * (MODES.len() as i32 + 1);
    let groups = percentiles.len() as i32;
    let bar_x = |gi: usize, mi: usize| gi as i32 * group + SLOT * mi as i32 + SLOT / 2;
    let centres: Vec<i32> = (0..groups).map(|g| g * group + group / 2).collect();
    let label = |x: &i32| {
        usize::try_from(x / group)
            .ok()
            .and_then(|g| percentiles.get(g))
            .map(|(l, _)| l.to_string())
            .unwrap_or_default()
    };
    svg((760, 420), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "Latency at 1000 req/s, HTTP/1.1, 1 KB (median, min–max whiskers)",
                (FONT, 17),
            )
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(64)
            .build_cartesian_2d((0..groups * group).with_key_points(centres), 0.0..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&label)
            .y_desc("µs")
            .y_label_formatter(&|v| y_label(*v, top))
            .label_style((FONT, 14))
            .draw()?;
        for (mi, mode) in MODES.iter().enumerate() {
            let colour = MODE_COLOURS[mi];
            let bars: Vec<(usize, Stat)> = data[mi]
                .iter()
                .enumerate()
                .filter_map(|(gi, s)| Some((gi, (*s)?)))
                .collect();
            let failed = rounds.failure(*mode).is_some();
            chart
                .draw_series(bars.iter().map(|(gi, st)| {
                    let x = bar_x(*gi, mi);
                    Rectangle::new([(x, 0.0), (x + SLOT * 9 / 10, st.median)], colour.filled())
                }))?
                .label(format!(
                    "{}{}",
                    mode.name(),
                    if failed { " (failed)" } else { "" }
                ))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
                });
            chart.draw_series(bars.iter().map(|(gi, st)| {
                let cx = bar_x(*gi, mi) + SLOT * 9 / 20;
                PathElement::new(vec![(cx, st.min), (cx, st.max)], BLACK)
            }))?;
            let upright = (FONT, 12).into_font().transform(FontTransform::Rotate270);
            chart.draw_series(
                (0..percentiles.len())
                    .filter(|gi| data[mi][*gi].is_none())
                    .map(|gi| {
                        EmptyElement::at((bar_x(gi, mi) + SLOT * 3 / 10, 0.0))
                            + Text::new("failed", (0, -4), upright.clone())
                    }),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()?;
        Ok(())
    })
}

/// The modes the scale scenario compares, with their colours and legend labels.
const SCALE_MODES: [(Mode, RGBColor, &str); 2] = [
    (
        Mode::Node,
        RGBColor(0x1b, 0x9e, 0x77),
        "node (1 daemon per node)",
    ),
    (
        Mode::Sidecar,
        RGBColor(0xd9, 0x5f, 0x02),
        "sidecars (sum per node)",
    ),
];

/// One panel of the scale plot: its title and its measures, the first solid, the next dashed.
struct Panel {
    title: &'static str,
    measures: &'static [Measure<ScaleRound>],
}

const PANELS: [Panel; 2] = [
    Panel {
        title: "memory, MiB: PSS (solid), PSS + BPF maps (dashed)",
        measures: &[|r| r.per_node_pss_mib, |r| r.per_node_total_mib],
    },
    Panel {
        title: "CPU seconds per minute",
        measures: &[|r| r.per_node_cpu_s_per_min],
    },
];

/// A line's points: (pods per node, statistics), where measured.
type Points = Vec<(i32, Stat)>;

/// Two panels side by side, memory and CPU per node against pods per node, one line per mode.
pub fn scale(results: &Results) -> Result<String, Error> {
    let pods: Vec<usize> = results.scale.iter().map(|p| p.pods_per_node).collect();
    let at = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let max_pods = at(pods.iter().copied().max().unwrap_or(1).max(1));
    let ticks: Vec<i32> = pods.iter().map(|n| at(*n)).collect();
    svg((860, 400), |root| {
        let root = root.titled(
            "Proxies per node versus pods per node (median, min–max)",
            (FONT, 17),
        )?;
        for (pi, (area, panel)) in root.split_evenly((1, 2)).iter().zip(&PANELS).enumerate() {
            // Each mode's colour, label and points, one line per measure.
            let lines: Vec<(RGBColor, &str, Vec<Points>)> = SCALE_MODES
                .iter()
                .map(|(mode, colour, label)| {
                    let per_measure = panel
                        .measures
                        .iter()
                        .map(|f| {
                            pods.iter()
                                .filter_map(|n| {
                                    Some((at(*n), results.scale_stat(*n, *mode, *f).ok()?))
                                })
                                .collect()
                        })
                        .collect();
                    (*colour, *label, per_measure)
                })
                .collect();
            let top = lines
                .iter()
                .flat_map(|(_, _, m)| m.iter().flatten())
                .map(|(_, st)| st.max * 1.1)
                .fold(0.0f64, f64::max);
            let top = if top > 0.0 { top } else { 1.0 };
            let mut chart = ChartBuilder::on(area)
                .caption(panel.title, (FONT, 14))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(52)
                .build_cartesian_2d(
                    (0..max_pods + max_pods / 20 + 1).with_key_points(ticks.clone()),
                    0.0..top,
                )?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_desc("pods per node")
                .y_label_formatter(&|v| y_label(*v, top))
                .label_style((FONT, 13))
                .draw()?;
            for (colour, label, per_measure) in &lines {
                let colour = *colour;
                for (ki, pts) in per_measure.iter().enumerate() {
                    let line = pts.iter().map(|(n, st)| (*n, st.median));
                    let style = colour.stroke_width(2);
                    if ki == 0 {
                        let series = chart.draw_series(LineSeries::new(line, style))?;
                        if pi == 0 {
                            series.label(*label).legend(move |(x, y)| {
                                PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                            });
                        }
                    } else {
                        chart.draw_series(DashedLineSeries::new(line, 6, 4, style))?;
                    }
                    chart.draw_series(
                        pts.iter()
                            .map(|(n, st)| Circle::new((*n, st.median), 3, colour.filled())),
                    )?;
                    chart.draw_series(pts.iter().map(|(n, st)| {
                        PathElement::new(vec![(*n, st.min), (*n, st.max)], colour)
                    }))?;
                }
            }
            if pi == 0 {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperLeft)
                    .label_font((FONT, 14))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.3))
                    .draw()?;
            }
        }
        Ok(())
    })
}
