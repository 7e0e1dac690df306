//! Prometheus metrics (design §7). Every label has a bounded set of values:
//! `os` ∈ linux|windows|darwin, `result` ∈ succeeded|failed|cancelled,
//! `phase` ∈ Online|Offline|Draining.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Errors registering or encoding metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The prometheus crate refused a metric or failed to encode.
    #[error("metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
    /// The encoded text was not UTF-8.
    #[error("metrics are not UTF-8: {0}")]
    Utf8(#[from] std::string::FromUtf8Error),
}

/// The controller's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Platform builds finished, by OS and result.
    pub builds_total: IntCounterVec,
    /// Duration of finished platform builds, by OS.
    pub build_duration: HistogramVec,
    /// Platforms waiting for an executor, by OS.
    pub queue_depth: IntGaugeVec,
    /// Duration of one reconcile.
    pub reconcile_duration: Histogram,
    /// Reconciles that ended in an error.
    pub reconcile_errors: IntCounter,
    /// BuildRunners by phase.
    pub runners: IntGaugeVec,
    /// 1 while this replica leads, else 0.
    pub leader: IntGauge,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let builds_total = IntCounterVec::new(
            Opts::new(
                "tripod_builds_total",
                "Platform builds finished, by OS and result.",
            ),
            &["os", "result"],
        )?;
        let build_duration = HistogramVec::new(
            HistogramOpts::new(
                "tripod_build_duration_seconds",
                "Time from the start of a build to the end of a platform, by OS.",
            )
            .buckets(vec![
                5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
            ]),
            &["os"],
        )?;
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "tripod_queue_depth",
                "Platforms waiting for an executor, by OS.",
            ),
            &["os"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "tripod_reconcile_duration_seconds",
                "Duration of one reconcile.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        let reconcile_errors = IntCounter::new(
            "tripod_reconcile_errors_total",
            "Reconciles that ended in an error.",
        )?;
        let runners = IntGaugeVec::new(
            Opts::new("tripod_runners", "BuildRunners by phase."),
            &["phase"],
        )?;
        let leader = IntGauge::new(
            "tripod_leader",
            "Whether this replica holds the leader Lease (1) or stands by (0).",
        )?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(builds_total.clone()))?;
        registry.register(Box::new(build_duration.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(runners.clone()))?;
        for os in ["linux", "windows", "darwin"] {
            queue_depth.with_label_values(&[os]).set(0);
        }
        for phase in ["Online", "Offline", "Draining"] {
            runners.with_label_values(&[phase]).set(0);
        }
        Ok(Self {
            registry,
            builds_total,
            build_duration,
            queue_depth,
            leader,
            reconcile_duration,
            reconcile_errors,
            runners,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8(buf)?)
    }
}
