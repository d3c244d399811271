//! Operator metrics (Prometheus text on `/metrics`).

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounter,
    pub errors: IntCounter,
    pub duration: Histogram,
    pub groups_desired: IntGaugeVec,
    pub groups_ready: IntGaugeVec,
    pub leader: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let m = Self {
            registry: Registry::new(),
            reconciles: IntCounter::new("neox_operator_reconciles_total", "Reconciliations run")?,
            errors: IntCounter::new("neox_operator_reconcile_errors_total", "Reconciliations that failed")?,
            duration: Histogram::with_opts(
                HistogramOpts::new(
                    "neox_operator_reconcile_duration_seconds",
                    "Time one reconciliation took",
                )
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            )?,
            groups_desired: IntGaugeVec::new(
                Opts::new(
                    "neox_operator_groups_desired",
                    "Worker groups a NeoXDeployment asks for",
                ),
                &["namespace", "name"],
            )?,
            groups_ready: IntGaugeVec::new(
                Opts::new("neox_operator_groups_ready", "Worker groups whose every rank is ready"),
                &["namespace", "name"],
            )?,
            leader: IntGauge::new("neox_operator_leader", "1 while this replica holds the leader lease")?,
        };
        m.registry.register(Box::new(m.reconciles.clone()))?;
        m.registry.register(Box::new(m.errors.clone()))?;
        m.registry.register(Box::new(m.duration.clone()))?;
        m.registry.register(Box::new(m.groups_desired.clone()))?;
        m.registry.register(Box::new(m.groups_ready.clone()))?;
        m.registry.register(Box::new(m.leader.clone()))?;
        Ok(m)
    }

    pub fn observe_reconcile(&self, took: Duration, failed: bool) {
        self.reconciles.inc();
        if failed {
            self.errors.inc();
        }
        self.duration.observe(took.as_secs_f64());
    }

    pub fn set_groups(&self, ns: &str, name: &str, desired: i32, ready: i32) {
        self.groups_desired.with_label_values(&[ns, name]).set(desired as i64);
        self.groups_ready.with_label_values(&[ns, name]).set(ready as i64);
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut s) {
            tracing::error!("encoding metrics: {e}");
        }
        s
    }
}
