//! The end-to-end section of `docs/benchmarks.md` and its plot.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::Error;
use crate::e2e::{DirectRun, E2eResults, PHASES, TripodRun};
use crate::report::plot_error;
use crate::report::verdict;
use crate::stats::summary;

fn median(v: &[f64]) -> f64 {
    summary(v).p50
}

fn totals(runs: &[TripodRun]) -> Vec<f64> {
    runs.iter().map(TripodRun::total).collect()
}

fn direct_totals(runs: &[DirectRun]) -> Vec<f64> {
    runs.iter().map(DirectRun::total).collect()
}

/// The median of each phase over `runs`.
fn phase_medians(runs: &[TripodRun]) -> Vec<f64> {
    (0..PHASES.len())
        .map(|i| {
            median(
                &runs
                    .iter()
                    .filter_map(|r| r.phases().get(i).copied())
                    .collect::<Vec<_>>(),
            )
        })
        .collect()
}

/// The run whose total is the median (the plot shows its phases, which
/// add up to its total).
fn median_run(runs: &[TripodRun]) -> Option<&TripodRun> {
    let m = median(&totals(runs));
    runs.iter().find(|r| r.total() == m)
}

fn spread(v: &[f64]) -> String {
    let s = summary(v);
    format!("{:.2} s ({:.2}–{:.2})", s.p50, s.min, s.max)
}

/// The figures the goals are about: hello overhead (s), jq ratio (also
/// with overlay storage), cached ÷ cold.
pub struct Figures {
    /// Median Tripod minus median direct buildah, hello.
    pub hello_overhead: Option<f64>,
    /// Median Tripod ÷ median direct buildah, jq.
    pub jq_ratio: Option<f64>,
    /// The same with CAP_SYS_ADMIN for buildd (overlay storage).
    pub jq_ratio_overlay: Option<f64>,
    /// Median cached ÷ median cold, jq with `spec.cache`.
    pub cache_ratio: Option<f64>,
}

/// Computes [`Figures`].
pub fn figures(e: &E2eResults) -> Figures {
    let case = |name: &str| e.cases.iter().find(|c| c.name == name);
    Figures {
        hello_overhead: case("hello")
            .map(|c| median(&totals(&c.tripod)) - median(&direct_totals(&c.direct))),
        jq_ratio: case("jq")
            .map(|c| median(&totals(&c.tripod)) / median(&direct_totals(&c.direct)).max(1e-9)),
        jq_ratio_overlay: case("jq")
            .filter(|c| !c.tripod_overlay.is_empty())
            .map(|c| {
                median(&totals(&c.tripod_overlay)) / median(&direct_totals(&c.direct)).max(1e-9)
            }),
        cache_ratio: (!e.cache_cold.is_empty())
            .then(|| median(&totals(&e.cache_warm)) / median(&totals(&e.cache_cold)).max(1e-9)),
    }
}

/// The page's section.
pub fn section(e: &E2eResults) -> String {
    let mut p = String::new();
    let f = figures(e);
    let _ = writeln!(
        p,
        "## End-to-end overhead on the real node\n\n\
         The `tripod dev` environment (the real kubelet with containerd and runc, the registry) \
         with two controllers, each for a namespace of its own, and the same contexts built \
         several ways, alternating, {} runs each (`{}`, {}; host {}): through Tripod (an \
         ImageBuild, its build Pod running the buildd image the Dockerfile makes, buildah with \
         vfs storage and chroot isolation inside it, the push, the controller's check of the \
         pushed image against the registry, the status), and with buildah directly on the host, \
         `bud` then `push`, from an empty image store each run as a build Pod starts from one: \
         with buildah's defaults (overlay storage, OCI isolation; the OCI runtime is the node's \
         runc), and with the flags buildd passes (`--storage-driver vfs \
         --isolation chroot`). The jq build also goes through Tripod a third way: the second \
         controller gives buildd CAP_SYS_ADMIN (`--buildd-security-context`, its namespace at \
         the Pod Security level `privileged`), so buildd's storage probe mounts overlay and \
         uses it; each run is checked in buildd's log to have used the storage driver of its \
         way. Tripod's time is from sending the create to the bench's watch seeing \
         `Succeeded`. The Debian build installs jq from a flat apt repository of this \
         machine's bookworm packages served on the node address (`testenv/jq-repo.sh`), for \
         every way: build Pods cannot reach the internet.\n",
        e.runs, e.label, e.machine.tripod, e.buildah
    );
    let _ = writeln!(
        p,
        "| goal | target | measured | verdict |\n|---|---|---|---|"
    );
    if let Some(o) = f.hello_overhead {
        let _ = writeln!(
            p,
            "| hello: Tripod's median − direct buildah's median | ≤ 1.0 s | {o:.2} s | {} |",
            verdict(o <= 1.0)
        );
    }
    if let Some(r) = f.jq_ratio {
        let _ = writeln!(
            p,
            "| jq: Tripod's median ÷ direct buildah's median | ≤ 1.10 | {r:.2} | {} |",
            verdict(r <= 1.10)
        );
    }
    if let Some(r) = f.jq_ratio_overlay {
        let _ = writeln!(
            p,
            "| jq, buildd with CAP_SYS_ADMIN (overlay): Tripod's median ÷ direct buildah's median \
             | ≤ 1.10 | {r:.2} | {} |",
            verdict(r <= 1.10)
        );
    }
    if let Some(r) = f.cache_ratio {
        let _ = writeln!(
            p,
            "| jq with `spec.cache`: from the cache ÷ cold | ≤ 0.3 | {r:.2} | {} |",
            verdict(r <= 0.3)
        );
    }
    let _ = writeln!(
        p,
        "\nMedian (min–max) seconds:\n\n\
         | build | through Tripod | buildah, defaults | buildah, buildd's flags |\n|---|---|---|---|"
    );
    for c in &e.cases {
        let _ = writeln!(
            p,
            "| {} — {} | {} | {} | {} |",
            c.name,
            c.description,
            spread(&totals(&c.tripod)),
            spread(&direct_totals(&c.direct)),
            spread(&direct_totals(&c.direct_buildd_flags)),
        );
        if !c.tripod_overlay.is_empty() {
            let _ = writeln!(
                p,
                "| {}, buildd with CAP_SYS_ADMIN (overlay storage) | {} | | |",
                c.name,
                spread(&totals(&c.tripod_overlay)),
            );
        }
    }
    if !e.cache_cold.is_empty() {
        let _ = writeln!(
            p,
            "| jq, `spec.cache` cold (an empty cache repository) | {} | | |\n\
             | jq, `spec.cache` from the cache | {} | | |",
            spread(&totals(&e.cache_cold)),
            spread(&totals(&e.cache_warm)),
        );
    }
    let _ = writeln!(
        p,
        "\nWhere Tripod's time goes: the median of each phase, in seconds (medians of phases \
         need not add up to the median total; the plot shows the run whose total is the \
         median). The marks come from the bench's watches (Pod created, status), the \
         controller's log (agent connected, outcome received, outcome recorded) and the agent's \
         container log with the runtime's timestamps (its first line, `agent started`; \
         buildah's `STEP 1/` starts the build and buildd's `pushing` ends it). \"push\" \
         includes buildd reading the image's size; with `spec.cache`, \"build\" includes \
         writing the cache.\n"
    );
    let mut header = "| phase |".to_string();
    let mut rule = "|---|".to_string();
    let mut columns: Vec<(String, Vec<f64>)> = e
        .cases
        .iter()
        .map(|c| (c.name.clone(), phase_medians(&c.tripod)))
        .collect();
    for c in e.cases.iter().filter(|c| !c.tripod_overlay.is_empty()) {
        columns.push((
            format!("{}, overlay", c.name),
            phase_medians(&c.tripod_overlay),
        ));
    }
    if !e.cache_cold.is_empty() {
        columns.push(("jq, cache cold".into(), phase_medians(&e.cache_cold)));
        columns.push(("jq, from the cache".into(), phase_medians(&e.cache_warm)));
    }
    for (name, _) in &columns {
        header.push_str(&format!(" {name} |"));
        rule.push_str("---|");
    }
    let _ = writeln!(p, "{header}\n{rule}");
    for (i, (_, label)) in PHASES.iter().enumerate() {
        let mut row = format!("| {label} |");
        for (_, m) in &columns {
            row.push_str(&format!(" {:.2} |", m.get(i).copied().unwrap_or(0.0)));
        }
        let _ = writeln!(p, "{row}");
    }
    let mut direct_row = "| buildah directly: bud + push (defaults) |".to_string();
    for c in &e.cases {
        let b = median(&c.direct.iter().map(|r| r.build).collect::<Vec<_>>());
        let u = median(&c.direct.iter().map(|r| r.push).collect::<Vec<_>>());
        direct_row.push_str(&format!(" {b:.2} + {u:.2} |"));
    }
    let _ = writeln!(p, "{direct_row}");
    let _ = writeln!(
        p,
        "\n![Phases of a build through Tripod next to buildah directly](bench/e2e.png)\n"
    );
    if !e.failures.is_empty() {
        let _ = writeln!(p, "Runs that failed and are left out of the figures:\n");
        for f in &e.failures {
            let _ = writeln!(p, "- {}", f.replace('\n', " "));
        }
        p.push('\n');
    }
    p
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// One bar: its label and its segments (name, seconds, color index).
type Bar = (String, Vec<(String, f64, usize)>);

/// Horizontal stacked bars of the median phases, hello on top, the Debian
/// builds below (their scales differ tenfold).
pub fn plot(path: &Path, e: &E2eResults) -> Result<(), Error> {
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (top, bottom) = root.split_vertically(260);
    let tripod_bar = |label: String, runs: &[TripodRun]| -> Bar {
        let segs = median_run(runs)
            .map(TripodRun::phases)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, s)| (PHASES[i].1.to_string(), s, i))
            .collect();
        (label, segs)
    };
    let direct_bar = |label: String, runs: &[DirectRun]| -> Bar {
        let b = median(&runs.iter().map(|r| r.build).collect::<Vec<_>>());
        let u = median(&runs.iter().map(|r| r.push).collect::<Vec<_>>());
        (
            label,
            vec![("build".to_string(), b, 4), ("push".to_string(), u, 5)],
        )
    };
    let mut panels: Vec<(String, Vec<Bar>)> = Vec::new();
    for c in &e.cases {
        panels.push((
            format!("{} (median seconds)", c.name),
            vec![
                tripod_bar("Tripod".into(), &c.tripod),
                direct_bar("buildah, defaults".into(), &c.direct),
                direct_bar("buildah, vfs+chroot".into(), &c.direct_buildd_flags),
            ],
        ));
    }
    if let Some(c) = e.cases.get(1).filter(|c| !c.tripod_overlay.is_empty())
        && let Some((_, bars)) = panels.get_mut(1)
    {
        bars.insert(1, tripod_bar("Tripod, overlay".into(), &c.tripod_overlay));
    }
    if !e.cache_cold.is_empty()
        && let Some((_, bars)) = panels.get_mut(1)
    {
        bars.push(tripod_bar("Tripod, cache cold".into(), &e.cache_cold));
        bars.push(tripod_bar("Tripod, from cache".into(), &e.cache_warm));
    }
    for (area, (title, bars)) in [top, bottom].iter().zip(panels.iter()) {
        draw_bars(area, title, bars)?;
    }
    root.present().map_err(plot_error)
}

fn draw_bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    bars: &[Bar],
) -> Result<(), Error> {
    let max_x = bars
        .iter()
        .map(|(_, s)| s.iter().map(|(_, v, _)| v).sum::<f64>())
        .fold(0.1, f64::max);
    let n = bars.len();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(170)
        // Room on the right for the legend.
        .build_cartesian_2d(0.0..max_x * 1.45, (0..n).into_segmented())
        .map_err(|e| plot_error(e.to_string()))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map(|b| b.0.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| plot_error(e.to_string()))?;
    let mut labelled = [false; 8];
    for (i, (_, segs)) in bars.iter().enumerate() {
        let mut x = 0.0;
        for (name, secs, color) in segs {
            let c = COLORS[*color % COLORS.len()];
            let rect = Rectangle::new(
                [
                    (x, SegmentValue::Exact(i)),
                    (x + secs, SegmentValue::Exact(i + 1)),
                ],
                c.filled(),
            );
            let series = chart
                .draw_series([rect])
                .map_err(|e| plot_error(e.to_string()))?;
            if !labelled[*color % 8] {
                labelled[*color % 8] = true;
                series.label(name.clone()).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled())
                });
            }
            x += secs;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| plot_error(e.to_string()))?;
    Ok(())
}
