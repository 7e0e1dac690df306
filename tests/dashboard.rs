//! The Grafana dashboard in the chart only queries metrics the controller exports.

use std::collections::BTreeSet;

#[test]
fn dashboard_queries_use_exported_metric_names() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("charts/tripod/dashboards/tripod.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard"))
            .expect("dashboard JSON");
    let metrics = tripod::metrics::Metrics::new().expect("metrics");
    // Make every labelled series appear in the exposition.
    metrics
        .builds_total
        .with_label_values(&["linux", "succeeded"])
        .inc();
    metrics
        .build_duration
        .with_label_values(&["linux"])
        .observe(1.0);
    let exposition = metrics.encode().expect("encode");
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();

    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(i) = rest.find("tripod_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                used.insert(name);
            }
        }
    }
    assert!(!used.is_empty());
    let unknown: Vec<&String> = used.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries unknown metrics {unknown:?}; exported: {exported:?}"
    );
    // And every metric of design §7 has a panel.
    for family in [
        "tripod_builds_total",
        "tripod_build_duration_seconds_bucket",
        "tripod_queue_depth",
        "tripod_reconcile_duration_seconds_bucket",
        "tripod_reconcile_errors_total",
        "tripod_runners",
    ] {
        assert!(used.contains(family), "no panel for {family}");
    }
}
