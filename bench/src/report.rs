//! `docs/benchmarks.md` and its plots, from the results of the runs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::Error;
use crate::e2e::E2eResults;
use crate::scale::ScaleResults;

/// `tripod-bench report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Results of `tripod-bench scale` (this run).
    #[arg(long, default_value = "docs/bench/scale.json")]
    pub scale: PathBuf,
    /// Results of an earlier `scale` run to compare with (before the
    /// optimisations).
    #[arg(long)]
    pub before: Option<PathBuf>,
    /// The run of the current controller that `--before` is compared with,
    /// at the same size (default: `--scale`). With a `--before` of another
    /// size, the plots and the per-request table leave it out.
    #[arg(long)]
    pub after: Option<PathBuf>,
    /// Results of `tripod-bench e2e`; its section says it did not run
    /// when the file is missing.
    #[arg(long, default_value = "docs/bench/e2e.json")]
    pub e2e: PathBuf,
    /// Hand-written analysis appended to the page.
    #[arg(long, default_value = "bench/analysis.md")]
    pub analysis: PathBuf,
    /// The page.
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub out: PathBuf,
    /// The font of the plots (TrueType).
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    pub font: PathBuf,
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| Error::Io(format!("{}: {e}", path.display())))
}

pub(crate) fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::Io(format!("plot: {e}"))
}

/// Writes the page and its plots (beside it, in `bench/`).
pub fn run(args: &ReportArgs) -> Result<(), Error> {
    let font = std::fs::read(&args.font).map_err(|e| {
        Error::Io(format!(
            "{} (apt-get install fonts-dejavu-core): {e}",
            args.font.display()
        ))
    })?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| Error::Io(format!("{} is not a TrueType font", args.font.display())))?;
    let scale: ScaleResults = read(&args.scale)?;
    let before: Option<ScaleResults> = args.before.as_deref().map(read).transpose()?;
    let after: Option<ScaleResults> = args.after.as_deref().map(read).transpose()?;
    let compared = after.as_ref().unwrap_or(&scale);
    // The plots and the request table set `before` beside this run only
    // when both are of one size.
    let beside = before.as_ref().filter(|b| b.tripod.n == scale.tripod.n);
    let dir = args
        .out
        .parent()
        .map(|d| d.join("bench"))
        .unwrap_or_else(|| PathBuf::from("bench"));
    std::fs::create_dir_all(&dir).map_err(|e| Error::Io(format!("{}: {e}", dir.display())))?;
    throughput_plot(&dir.join("throughput.png"), &scale, beside)?;
    latency_plot(&dir.join("latency.png"), &scale, beside)?;
    memory_plot(&dir.join("memory.png"), &scale, beside)?;
    let e2e: Option<E2eResults> = args.e2e.exists().then(|| read(&args.e2e)).transpose()?;
    if let Some(e) = &e2e {
        crate::e2e_report::plot(&dir.join("e2e.png"), e)?;
    }
    let analysis = std::fs::read_to_string(&args.analysis).unwrap_or_default();
    let mut page = page(
        &scale,
        before.as_ref().map(|b| (b, compared)),
        beside,
        &analysis,
    );
    let e2e_section = match &e2e {
        Some(e) => crate::e2e_report::section(e),
        None => format!(
            "## End-to-end overhead on the real node\n\nNot measured in this run ({} is missing): `tripod-bench e2e` needs root.\n\n",
            args.e2e.display()
        ),
    };
    // Before the hand-written analysis, which discusses every section.
    let at = if page.ends_with(&analysis) {
        page.len() - analysis.len()
    } else {
        page.len()
    };
    page.insert_str(at, &e2e_section);
    std::fs::write(&args.out, page).map_err(|e| Error::Io(format!("{}: {e}", args.out.display())))
}

pub(crate) fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

fn page(
    s: &ScaleResults,
    compare: Option<(&ScaleResults, &ScaleResults)>,
    before: Option<&ScaleResults>,
    analysis: &str,
) -> String {
    let mut p = String::new();
    let m = &s.machine;
    let _ = writeln!(
        p,
        "# Benchmarks\n\nWritten by `bench/run.sh` (`tripod-bench`) from its last run; do not edit \
         by hand. Every figure is measured in one run on one machine, and every ratio compares two \
         things measured side by side in that run.\n\n\
         **Machine:** {} cores, {:.1} GiB; Kubernetes {} (kube-apiserver, etcd, kube-scheduler, \
         kube-controller-manager built from their modules), kwok for {} simulated linux/amd64 \
         nodes; Tripod {}; run {} (`{}`).\n",
        m.cores, m.memory_gib, m.kubernetes, s.nodes, m.tripod, m.date, s.label
    );
    let writes_steady = s.steady.writes_without_leases();
    let mut rows = vec![
        (
            "Throughput: build Pods bound per second ÷ bare Pods bound per second".to_string(),
            "≥ 0.8".to_string(),
            format!(
                "{:.2} ({:.1}/s ÷ {:.1}/s, N = {})",
                s.throughput_ratio, s.tripod.rate, s.bare.rate, s.tripod.n
            ),
            Some(s.throughput_ratio >= 0.8),
        ),
        (
            format!(
                "Latency, ImageBuild create → build Pod, at {}/s",
                s.latency_rate
            ),
            "p99 ≤ 250 ms".to_string(),
            format!(
                "p50 {:.0} ms, p99 {:.0} ms ({} builds)",
                s.latency.p50, s.latency.p99, s.latency.n
            ),
            Some(s.latency.p99 <= 250.0),
        ),
        (
            "API writes per successful single-platform build (Lease renewals apart)".to_string(),
            "≤ 6".to_string(),
            format!("{:.3} ({} builds)", s.writes_per_build, s.succeeded),
            Some(s.writes_per_build <= 6.0),
        ),
        (
            format!(
                "Writes in {} s of steady state, {} finished builds present",
                s.steady_seconds, s.steady_builds
            ),
            "0".to_string(),
            format!(
                "{writes_steady} (and {} Lease renewals)",
                s.steady.lease_writes()
            ),
            Some(writes_steady == 0),
        ),
        (
            format!(
                "Controller RSS, {} ImageBuilds and {} Pods in the store",
                s.memory_builds, s.memory_pods
            ),
            "≤ 64 MiB".to_string(),
            format!("{:.1} MiB", s.rss_mib),
            Some(s.rss_mib <= 64.0),
        ),
    ];
    let (relist_got, relist_met) = match s.relist_peak() {
        Some(peak) => (
            format!("{:.2} ({peak:.1} MiB)", s.relist_ratio),
            Some(s.relist_ratio <= 2.0),
        ),
        None => (
            "the ImageBuild and Pod watches resumed without listing again: no re-list to \
             measure in this run"
                .to_string(),
            None,
        ),
    };
    rows.push((
        "Peak RSS across a forced re-list ÷ steady RSS".to_string(),
        "≤ 2".to_string(),
        relist_got,
        relist_met,
    ));
    if let Some(fresh) = s.ttl_fresh_rss_mib {
        rows.push((
            format!(
                "Controller RSS, {} ImageBuilds and none of their Pods (deleted, as after \
                 `ttlSecondsAfterFinished`), a controller started on them",
                s.memory_builds
            ),
            "≤ 64 MiB".to_string(),
            format!("{fresh:.1} MiB"),
            Some(fresh <= 64.0),
        ));
    }
    let _ = writeln!(
        p,
        "## Against the goals\n\n| figure | goal | measured | |\n|---|---|---|---|"
    );
    for (what, goal, got, met) in &rows {
        let shown = met.map_or("not measured", verdict);
        let _ = writeln!(p, "| {what} | {goal} | {got} | {shown} |");
    }
    if let Some((b, s)) = compare {
        let _ = writeln!(
            p,
            "\n## Before and after the optimisations\n\n`{}` is the controller before them, \
             measured with the same bench ({}, {}, N = {}, {} builds for memory), next to `{}` \
             ({}, {}, N = {}, {} builds for memory).\n\n\
             | figure | {} | {} |\n|---|---|---|",
            b.label,
            b.machine.date,
            b.machine.tripod,
            b.tripod.n,
            b.memory_builds,
            s.label,
            s.machine.date,
            s.machine.tripod,
            s.tripod.n,
            s.memory_builds,
            b.label,
            s.label
        );
        let pairs = [
            (
                "throughput ratio".to_string(),
                format!("{:.2}", b.throughput_ratio),
                format!("{:.2}", s.throughput_ratio),
            ),
            (
                "latency p50 / p99 (ms)".into(),
                format!("{:.0} / {:.0}", b.latency.p50, b.latency.p99),
                format!("{:.0} / {:.0}", s.latency.p50, s.latency.p99),
            ),
            (
                "writes per build".into(),
                format!("{:.2}", b.writes_per_build),
                format!("{:.2}", s.writes_per_build),
            ),
            (
                "Pod LISTs per build".into(),
                format!(
                    "{:.2}",
                    b.requests.reads_of("list pods") as f64 / b.succeeded.max(1) as f64
                ),
                format!(
                    "{:.2}",
                    s.requests.reads_of("list pods") as f64 / s.succeeded.max(1) as f64
                ),
            ),
            (
                "writes in steady state (Leases apart)".into(),
                b.steady.writes_without_leases().to_string(),
                s.steady.writes_without_leases().to_string(),
            ),
            (
                "writes during a forced re-list (Leases apart)".into(),
                b.relist.writes_without_leases().to_string(),
                s.relist.writes_without_leases().to_string(),
            ),
            (
                "RSS (MiB), builds in store".into(),
                format!("{:.1}, {}", b.rss_mib, b.memory_builds),
                format!("{:.1}, {}", s.rss_mib, s.memory_builds),
            ),
            (
                "re-list peak (MiB)".into(),
                b.relist_peak().map_or("—".into(), |m| format!("{m:.1}")),
                s.relist_peak().map_or("—".into(), |m| format!("{m:.1}")),
            ),
        ];
        for (what, x, y) in pairs {
            let _ = writeln!(p, "| {what} | {x} | {y} |");
        }
    }
    let _ = writeln!(
        p,
        "\n## Throughput\n\n{} ImageBuilds (single platform, inline source) created {} at a \
         time, as fast as the API server takes them; next to them, in the same run, {} bare \
         Pods (copies of a build Pod Tripod made, without owner or Tripod's labels) created the \
         same way. Each curve counts the Pods seen bound (`spec.nodeName`) by a watch. The \
         agents are held back until every build Pod is bound: the bare Pods have no work after \
         binding either.\n\n![Pods bound over time](bench/throughput.png)\n",
        s.tripod.n, s.concurrency, s.bare.n
    );
    let _ = writeln!(
        p,
        "CPU seconds per process (user + system), bare Pods until bound, and ImageBuilds from \
         the first create until every build had Succeeded (agents and registry included):\n\n\
         | process | bare Pods | ImageBuilds |\n|---|---|---|"
    );
    for (k, v) in &s.tripod_cpu {
        let _ = writeln!(
            p,
            "| {k} | {:.2} | {v:.2} |",
            s.bare_cpu.get(k).copied().unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        p,
        "\nSeconds kube-apiserver spent on each kind of request over the ImageBuilds' span \
         (`apiserver_request_duration_seconds_sum`, waiting included):\n\n| request | seconds |\n|---|---|"
    );
    for (k, v) in &s.apiserver_seconds {
        let _ = writeln!(p, "| {k} | {v:.1} |");
    }
    let _ = writeln!(
        p,
        "\n## Latency\n\nImageBuilds created at {}/s (each create on its own timer tick); the time \
         from sending the create to a watch seeing its build Pod. Agents are held back meanwhile \
         (their pushes would stand in for machines elsewhere).\n\n\
         | p50 | p90 | p99 | max |\n|---|---|---|---|\n| {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |\n\n\
         ![Latency distribution](bench/latency.png)\n",
        s.latency_rate, s.latency.p50, s.latency.p90, s.latency.p99, s.latency.max
    );
    let _ = writeln!(
        p,
        "## API requests per build\n\nCounted from kube-apiserver's audit log: every request \
         made as the controller's user (`CN=tripod-controller`, a client certificate of its \
         own), from the first create until every build had Succeeded, divided by the {} builds \
         that succeeded. Cross-check from `apiserver_request_total` over the same span: {}.\n\n\
         | request | {} |{}\n|---|---|{}",
        s.succeeded,
        s.metric_writes
            .iter()
            .map(|(k, v)| format!("`{k}` {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        s.label,
        before
            .map(|b| format!(" {} |", b.label))
            .unwrap_or_default(),
        if before.is_some() { "---|" } else { "" }
    );
    let mut keys: Vec<&String> = s
        .requests
        .writes
        .keys()
        .chain(s.requests.reads.keys())
        .collect();
    if let Some(b) = before {
        keys.extend(b.requests.writes.keys().chain(b.requests.reads.keys()));
    }
    keys.sort();
    keys.dedup();
    let per = |r: &ScaleResults, k: &str| {
        let n = r
            .requests
            .writes
            .get(k)
            .or(r.requests.reads.get(k))
            .copied()
            .unwrap_or(0);
        format!("{:.2}", n as f64 / r.succeeded.max(1) as f64)
    };
    for k in keys {
        let _ = writeln!(
            p,
            "| `{k}` | {} |{}",
            per(s, k),
            before
                .map(|b| format!(" {} |", per(b, k)))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        p,
        "\nIn {} s of steady state with {} finished builds: writes {}, reads {}.\n",
        s.steady_seconds,
        s.steady_builds,
        fmt_map(&s.steady.writes),
        fmt_map(&s.steady.reads)
    );
    let _ = writeln!(
        p,
        "## Memory\n\nThe controller's RSS (`VmRSS`) as builds were added, each batch finished \
         before the next; then the median of 20 samples with {} ImageBuilds and {} Pods. Then a \
         forced re-list: kube-apiserver killed, etcd's revision moved on by two writes and \
         compacted there while it is down, and the API server started again, so that no watch \
         can resume and each lists again (the audit log is checked for the controller's LISTs \
         of ImageBuilds and Pods); the peak is `VmHWM`, reset before. Writes during the \
         re-list: {}.\n",
        s.memory_builds,
        s.memory_pods,
        fmt_map(&s.relist.writes)
    );
    if !s.relisted() {
        let _ = writeln!(
            p,
            "**In this run the ImageBuild and Pod watches resumed without listing again** \
             (the controller's reads across it: {}), so the peak ({:.1} MiB) measures no \
             re-list and is not a figure against the goal.\n",
            fmt_map(&s.relist.reads),
            s.relist_peak_mib
        );
    }
    if let (Some(same), Some(fresh)) = (s.ttl_rss_mib, s.ttl_fresh_rss_mib) {
        let _ = writeln!(
            p,
            "Then the bench deleted the build Pods, as `ttlSecondsAfterFinished` does once it \
             has passed (setting it on the finished builds would start new builds: any change \
             of the spec does). The controller's RSS was then {same:.1} MiB (the same process, \
             with what its allocator kept), and {fresh:.1} MiB for a controller started on the \
             {} ImageBuilds alone.\n",
            s.memory_builds
        );
    }
    p.push_str("![RSS by ImageBuilds in the store](bench/memory.png)\n\n");
    p.push_str(analysis);
    p
}

fn fmt_map(m: &std::collections::BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("`{k}` {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

const SIZE: (u32, u32) = (900, 500);

fn throughput_plot(
    path: &Path,
    s: &ScaleResults,
    before: Option<&ScaleResults>,
) -> Result<(), Error> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut series: Vec<(String, &Vec<f64>, RGBColor)> = vec![
        ("bare Pods".into(), &s.bare.bound_at, BLACK),
        (
            format!("ImageBuilds ({})", s.label),
            &s.tripod.bound_at,
            BLUE,
        ),
    ];
    if let Some(b) = before {
        series.push((
            format!("ImageBuilds ({})", b.label),
            &b.tripod.bound_at,
            RED,
        ));
    }
    let max_t = series
        .iter()
        .filter_map(|(_, v, _)| v.last().copied())
        .fold(0.1, f64::max);
    let max_n = series.iter().map(|(_, v, _)| v.len()).max().unwrap_or(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption("Pods bound since the first create", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_t * 1.05, 0.0..max_n * 1.05)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("Pods bound")
        .draw()
        .map_err(plot_error)?;
    for (name, v, color) in series {
        chart
            .draw_series(LineSeries::new(
                v.iter().enumerate().map(|(i, t)| (*t, (i + 1) as f64)),
                color.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(plot_error)
}

fn latency_plot(path: &Path, s: &ScaleResults, before: Option<&ScaleResults>) -> Result<(), Error> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut series: Vec<(String, Vec<f64>, RGBColor)> =
        vec![(s.label.clone(), sorted(&s.latency_ms), BLUE)];
    if let Some(b) = before {
        series.push((b.label.clone(), sorted(&b.latency_ms), RED));
    }
    let max_ms = series
        .iter()
        .filter_map(|(_, v, _)| v.last().copied())
        .fold(1.0, f64::max)
        .max(250.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "ImageBuild create → build Pod: cumulative share",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1.0..max_ms * 1.2).log_scale(), 0.0..1.0)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds (log scale)")
        .y_desc("share of builds")
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(LineSeries::new(
            vec![(250.0, 0.0), (250.0, 1.0)],
            BLACK.mix(0.5).stroke_width(1),
        ))
        .map_err(plot_error)?
        .label("goal: p99 ≤ 250 ms")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    for (name, v, color) in series {
        let n = v.len().max(1) as f64;
        chart
            .draw_series(LineSeries::new(
                v.iter()
                    .enumerate()
                    .map(|(i, ms)| (ms.max(1.0), (i + 1) as f64 / n)),
                color.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(plot_error)
}

/// A run's RSS curve, its re-list peak, its colour.
type MemorySeries<'a> = (String, &'a Vec<(usize, f64)>, Option<f64>, RGBColor);

fn memory_plot(path: &Path, s: &ScaleResults, before: Option<&ScaleResults>) -> Result<(), Error> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut series: Vec<MemorySeries<'_>> =
        vec![(s.label.clone(), &s.rss_curve, s.relist_peak(), BLUE)];
    if let Some(b) = before {
        series.push((b.label.clone(), &b.rss_curve, b.relist_peak(), RED));
    }
    let max_x = series
        .iter()
        .flat_map(|(_, v, _, _)| v.iter().map(|(n, _)| *n as f64))
        .fold(1.0, f64::max);
    let max_y = series
        .iter()
        .flat_map(|(_, v, peak, _)| v.iter().map(|(_, m)| *m).chain(*peak))
        .fold(64.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Controller RSS by ImageBuilds in the store",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x * 1.05, 0.0..max_y * 1.15)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("ImageBuilds (finished, with their Pods)")
        .y_desc("MiB")
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, 64.0), (max_x * 1.05, 64.0)],
            BLACK.mix(0.5).stroke_width(1),
        ))
        .map_err(plot_error)?
        .label("goal: 64 MiB")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    for (name, v, peak, color) in series {
        chart
            .draw_series(LineSeries::new(
                v.iter().map(|(n, m)| (*n as f64, *m)),
                color.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(format!("{name}: RSS"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        if let (Some((n, _)), Some(peak)) = (v.last(), peak) {
            chart
                .draw_series([Circle::new((*n as f64, peak), 6, color.filled())])
                .map_err(plot_error)?
                .label(format!("{name}: peak across a re-list"))
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
        }
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(plot_error)
}

/// Draws a chart's legend (the series' labels) in the same style everywhere.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<(), Error> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(position)
        .draw()
        .map_err(plot_error)
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}
