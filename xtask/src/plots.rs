//! The plots of BENCHMARKS.md, drawn (SVG, plotters) from the Markdown tables of one bench run:
//! counting ns/packet against clients, the daemon's CPU and peak RSS against clients, and TCP
//! throughput of tunmeter, nftables and iptables against clients.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use plotters::prelude::*;

/// One line of a plot: its name and (clients, value) points.
type Series = (String, Vec<(f64, f64)>);

/// A plot: file name, title, y axis, lines, target line.
type Plot = (&'static str, &'static str, &'static str, Vec<Series>, Option<f64>);

/// The rows (cells, trimmed) of the first table after the heading that starts with `heading`.
fn table<'a>(report: &'a str, heading: &str) -> Vec<Vec<&'a str>> {
    let Some(at) = report.find(heading) else { return Vec::new() };
    report[at..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect()
}

/// The leading number of a cell ("77 (51)" -> 77, "14.5%" -> 14.5, "72.9 MiB" -> 72.9).
fn num(cell: &str) -> Option<f64> {
    let end = cell.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(cell.len());
    cell[..end].parse().ok()
}

/// The number in parentheses ("77 (51)" -> 51).
fn net(cell: &str) -> Option<f64> {
    num(cell.split_once('(')?.1)
}

fn counting(report: &str) -> Vec<Series> {
    let rows = table(report, "## Counting program");
    let col = |i: usize| rows.iter().filter_map(|r| Some((num(r[0])?, net(r.get(i)?)?))).collect();
    vec![("IPv4 client".into(), col(1)), ("IPv6 client".into(), col(2)), ("IPv4, L2".into(), col(3))]
}

fn daemon(report: &str) -> (Vec<Series>, Vec<Series>) {
    let rows = table(report, "## The daemon");
    let (mut cpu, mut rss) = (Vec::new(), Vec::new());
    for engine in ["SQLite", "PostgreSQL"] {
        let of = |i: usize| -> Vec<(f64, f64)> {
            rows.iter()
                .filter(|r| r.get(1) == Some(&engine))
                .filter_map(|r| Some((num(r[0]).filter(|n| *n > 0.0)?, num(r.get(i)?)?)))
                .collect()
        };
        cpu.push((engine.to_string(), of(2)));
        rss.push((engine.to_string(), of(4)));
    }
    (cpu, rss)
}

fn throughput(report: &str) -> Vec<Series> {
    let rows = table(report, "## Per-client counting");
    let mut out: Vec<Series> = Vec::new();
    for r in &rows {
        let (Some(n), Some(setup), Some(gbps)) = (num(r[0]), r.get(1), r.get(3).and_then(|c| num(c))) else { continue };
        match out.iter_mut().find(|(name, _)| name == setup) {
            Some((_, points)) => points.push((n, gbps)),
            None => out.push((setup.to_string(), vec![(n, gbps)])),
        }
    }
    out
}

/// 1000 -> "1k", 1000000 -> "1M".
fn short(x: f64) -> String {
    match x {
        x if x >= 1e6 => format!("{}M", (x / 1e6 * 10.0).round() / 10.0),
        x if x >= 1e3 => format!("{}k", (x / 1e3 * 10.0).round() / 10.0),
        x => format!("{x:.0}"),
    }
}

/// A line plot with a logarithmic client axis.
fn plot(path: &Path, title: &str, y_label: &str, series: &[Series], target: Option<f64>) -> Result<()> {
    let points = || series.iter().flat_map(|(_, p)| p.iter());
    let x_max = points().map(|p| p.0).fold(10.0f64, f64::max) * 2.0;
    let x_min = points().map(|p| p.0).fold(f64::MAX, f64::min).min(x_max) / 2.0;
    let y_max = points().map(|p| p.1).chain(target).fold(1.0f64, f64::max) * 1.15;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d((x_min..x_max).log_scale(), 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("clients")
        .y_desc(y_label)
        .x_labels(6)
        .light_line_style(WHITE)
        .x_label_formatter(&|x| short(*x))
        .draw()?;
    for (i, (name, p)) in series.iter().enumerate().filter(|(_, (_, p))| !p.is_empty()) {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(p.iter().map(|&xy| Circle::new(xy, 3, color.filled())))?;
    }
    if let Some(t) = target {
        chart
            .draw_series(LineSeries::new([(x_min, t), (x_max, t)], BLACK.stroke_width(1)))?
            .label("target")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Draw every plot whose figures the report has into `dir`; the Markdown that shows them.
pub fn draw(report: &str, dir: &Path, link_prefix: &str) -> Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (cpu, rss) = daemon(report);
    let plots: [Plot; 4] = [
        ("counting.svg", "Counting program, ns/packet (harness subtracted)", "ns/packet", counting(report), Some(40.0)),
        ("daemon-cpu.svg", "Daemon CPU, every client active", "% of one core", cpu, Some(10.0)),
        ("daemon-rss.svg", "Daemon peak RSS, every client active", "MiB", rss, Some(64.0)),
        ("throughput.svg", "TCP over veth, counting per client", "Gbit/s", throughput(report), None),
    ];
    let mut md = String::new();
    for (file, title, y, series, target) in plots {
        if series.iter().all(|(_, p)| p.is_empty()) {
            continue;
        }
        let path: PathBuf = dir.join(file);
        plot(&path, title, y, &series, target)?;
        md.push_str(&format!("![{title}]({link_prefix}{file})\n"));
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "## Counting program, x\ntext\n\n| clients | v4 | v6 | l2 |\n|---:|---:|---:|---:|\n\
        | 1 | 73 (47) | 74 (48) | 83 (57) |\n| 100000 | 77 (51) | 76 (50) | 85 (59) |\n\n\
        ## The daemon: y\n| clients | ledger | CPU | RSS | peak |\n|---|---|---|---|---|\n\
        | 0 | SQLite | 0.2% | 16 MiB | 16.3 MiB |\n| 100000 | SQLite | 14.5% | 69 MiB | 72.9 MiB |\n\n";

    #[test]
    fn tables_become_series() {
        let c = counting(REPORT);
        assert_eq!(c[0].1, vec![(1.0, 47.0), (100000.0, 51.0)]);
        assert_eq!(c[2].1, vec![(1.0, 57.0), (100000.0, 59.0)]);
        let (cpu, rss) = daemon(REPORT);
        assert_eq!(cpu[0].1, vec![(100000.0, 14.5)], "0 clients has no place on a log axis");
        assert_eq!(rss[0].1, vec![(100000.0, 72.9)]);
        assert!(cpu[1].1.is_empty() && throughput(REPORT).is_empty());
        assert_eq!(
            (short(100_000.0), short(2_500.0), short(1e6), short(7.0)),
            ("100k".into(), "2.5k".into(), "1M".into(), "7".into())
        );
    }

    #[test]
    fn plots_are_svg_files() {
        let dir = std::env::temp_dir().join(format!("xtask-plots-{}", std::process::id()));
        let md = draw(REPORT, &dir, "x/").unwrap();
        assert!(md.contains("(x/counting.svg)") && md.contains("(x/daemon-rss.svg)") && !md.contains("throughput"));
        let svg = std::fs::read_to_string(dir.join("counting.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("IPv4 client"), "{}", &svg[..200.min(svg.len())]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
