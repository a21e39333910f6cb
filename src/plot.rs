//! `launch plot`: metrics against iteration as a PNG or SVG, one panel per metric, several
//! runs overlaid with a legend, and each restart (a new attempt in the same metrics file)
//! marked by a dashed line in the run's colour.

use std::path::{Path, PathBuf};

use mm_spec::metrics::{Metric, MetricsRecord};
use plotters::coord::Shift;
use plotters::prelude::*;

/// The embedded font every label is drawn with (no system fonts needed).
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// One run's points, as read from its metrics.jsonl.
pub struct Series {
    /// The legend's name: the run id, or the file's folder.
    pub name: String,
    /// The run folder, or the folder of the metrics file.
    pub dir: PathBuf,
    pub records: Vec<MetricsRecord>,
}

/// A series' lines: `(iteration, value)` points, drawn joined.
type Segments = Vec<Vec<(f64, f64)>>;

impl Series {
    /// `(iteration, value)` of `m`, finite values only, one line per attempt (a restart
    /// replays iterations from its checkpoint: its line starts over rather than joining),
    /// broken where the value is NaN or infinite (a gap, not a line across it); and the
    /// iterations of those non-finite values.
    fn segments(&self, m: &Metric) -> (Segments, Vec<u64>) {
        let (mut out, mut bad): (Segments, Vec<u64>) = (Vec::new(), Vec::new());
        let mut attempt = None;
        for r in &self.records {
            let value = (m.get)(&r.step);
            if attempt != Some(r.attempt) || value.is_some_and(|v| !v.is_finite()) {
                out.push(Vec::new());
                attempt = Some(r.attempt);
            }
            match (value, out.last_mut()) {
                (Some(v), Some(seg)) if v.is_finite() => seg.push((r.step.iteration as f64, v)),
                (Some(_), _) => bad.push(r.step.iteration),
                _ => {}
            }
        }
        (out, bad)
    }

    /// Iterations at which a new attempt starts (restarts and resumes into the same file).
    pub fn restarts(&self) -> Vec<f64> {
        self.records.windows(2).filter(|w| w[1].attempt != w[0].attempt).map(|w| w[1].step.iteration as f64).collect()
    }
}

/// The colour of series `i`: distinct, dark enough on white.
pub fn color(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(23, 190, 207),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
    ];
    COLORS[i % COLORS.len()]
}

pub const PANEL_SIZE: (u32, u32) = (1000, 360);

/// The picture formats [`draw`] writes, chosen by the file name's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Svg,
}

/// The format `out` names, or the error `--out` gets for another extension.
pub fn format_of(out: &Path) -> Result<Format, String> {
    match out.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => Ok(Format::Png),
        Some("svg") => Ok(Format::Svg),
        _ => Err(format!(
            "--out {}: expected a file name ending in .png or .svg (the format follows the extension)",
            out.display()
        )),
    }
}

/// Draws `metrics` of `runs` into `out` (`.png` or `.svg`), one panel per metric.
pub fn draw(runs: &[Series], metrics: &[&Metric], out: &Path) -> Result<(), String> {
    if metrics.is_empty() {
        return Err("no metric to plot".into());
    }
    // plotters reports a missing folder only as its backend's debug text.
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
        return Err(format!("cannot write {}: the folder {} does not exist", out.display(), dir.display()));
    }
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let size = (PANEL_SIZE.0, PANEL_SIZE.1 * metrics.len() as u32);
    let result = match format_of(out)? {
        Format::Png => panels(BitMapBackend::new(out, size).into_drawing_area(), runs, metrics),
        Format::Svg => panels(SVGBackend::new(out, size).into_drawing_area(), runs, metrics),
    };
    result.map_err(|e| format!("cannot draw {}: {e}", out.display()))
}

fn panels<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, runs: &[Series], metrics: &[&Metric]) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    for (area, m) in root.split_evenly((metrics.len(), 1)).iter().zip(metrics) {
        panel(area, runs, m).map_err(err)?;
    }
    root.present().map_err(err)
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    runs: &[Series],
    m: &Metric,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (lines, bad): (Vec<Segments>, Vec<Vec<u64>>) = runs.iter().map(|r| r.segments(m)).unzip();
    let all = lines.iter().flatten().flatten();
    // The iterations of non-finite values count for the x range: a run that ends in NaN
    // shows the gap at its end.
    let bad: std::collections::BTreeSet<u64> = bad.into_iter().flatten().collect();
    let xs = all.clone().map(|p| p.0).chain(bad.iter().map(|&i| i as f64));
    let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let (y0, y1) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (x0, x1) = if x0.is_finite() { (x0, x1.max(x0 + 1.0)) } else { (0.0, 1.0) };
    let (y0, y1) = if y0.is_finite() { (y0, y1) } else { (0.0, 1.0) };
    let pad = if y1 > y0 { 0.05 * (y1 - y0) } else { 0.5 * y0.abs().max(1e-12) };
    let (y0, y1) = (y0 - pad, y1 + pad);

    let empty = lines.iter().flatten().all(Vec::is_empty);
    let caption = if empty {
        format!("{}: no values in {}", m.label, if runs.len() == 1 { "this run" } else { "these runs" })
    } else {
        format!("{} against iteration", m.label)
    };
    let caption = match (bad.first(), bad.last()) {
        (Some(i), Some(j)) if i == j => format!("{caption} (not finite at iteration {i}: a gap)"),
        (Some(i), Some(j)) => format!("{caption} (not finite at {} iterations in {i}-{j}: gaps)", bad.len()),
        _ => caption,
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let ticks = ((x1 - x0) as usize + 1).clamp(2, 12);
    chart
        .configure_mesh()
        .x_labels(ticks)
        .x_desc("iteration")
        .y_desc(m.label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| short(*y))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (i, (run, segments)) in runs.iter().zip(&lines).enumerate() {
        let c = color(i);
        for x in run.restarts().into_iter().filter(|x| (x0..=x1).contains(x)) {
            chart.draw_series(DashedLineSeries::new([(x, y0), (x, y1)], 6, 4, c.mix(0.6).stroke_width(1)))?;
        }
        for (k, seg) in segments.iter().enumerate() {
            // Points too: a run or attempt that logged once has no line to draw.
            let drawn = chart.draw_series(LineSeries::new(seg.iter().copied(), c.stroke_width(2)).point_size(2))?;
            if k == 0 {
                drawn
                    .label(run.name.clone())
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

/// An axis number in at most about six characters.
fn short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Reads each run (a run id, a run folder or a metrics.jsonl file) into a series.
pub fn load_runs(log_dir: &Path, runs: &[String]) -> Result<Vec<Series>, String> {
    let picks: Vec<Option<&str>> =
        if runs.is_empty() { vec![None] } else { runs.iter().map(|r| Some(r.as_str())).collect() };
    picks
        .into_iter()
        .map(|r| {
            let path: PathBuf = crate::metrics::resolve_with_metrics(log_dir, r)?;
            let (file, records) = crate::metrics::load(&path)?;
            if records.is_empty() {
                return Err(format!("{} has no logged iteration yet", file.display()));
            }
            let dir = match file.parent() {
                _ if path.is_dir() => path.clone(),
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            // `.` has no name of its own: the legend shows the folder's.
            let named = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
            let name = named
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| dir.display().to_string());
            Ok(Series { name, dir, records })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_numbers_are_short() {
        assert_eq!(short(2.5), "2.5");
        assert_eq!(short(4910.6), "4911");
        assert_eq!(short(1e-5), "1.0e-5");
        assert_eq!(short(0.0), "0");
    }

    #[test]
    fn a_nan_breaks_the_line_and_is_counted() {
        let rec = |attempt, iteration, loss| MetricsRecord {
            attempt,
            time: 0.0,
            step: mm_spec::Progress { iteration, loss, ..Default::default() },
        };
        let records = vec![rec(0, 1, 3.0), rec(0, 2, 2.0), rec(0, 3, f64::NAN), rec(0, 4, 1.5), rec(1, 3, 2.5)];
        let s = Series { name: "r".into(), dir: PathBuf::from("r"), records };
        let (segments, bad) = s.segments(mm_spec::metrics::metric("loss").unwrap());
        assert_eq!(segments, [vec![(1.0, 3.0), (2.0, 2.0)], vec![(4.0, 1.5)], vec![(3.0, 2.5)]]);
        assert_eq!(bad, [3]);
        // A metric the records do not carry is neither drawn nor counted as not finite.
        let (segments, bad) = s.segments(mm_spec::metrics::metric("mfu").unwrap());
        assert!(segments.iter().all(Vec::is_empty) && bad.is_empty());
    }

    #[test]
    fn an_unknown_extension_is_refused_before_drawing() {
        let loss = [mm_spec::metrics::metric("loss").unwrap()];
        let err = draw(&[], &loss, Path::new("x.jpg")).unwrap_err();
        assert!(err.contains("ending in .png or .svg"), "{err}");
        let err = draw(&[], &loss, Path::new("/nonexistent-folder/x.png")).unwrap_err();
        assert_eq!(err, "cannot write /nonexistent-folder/x.png: the folder /nonexistent-folder does not exist");
    }
}
