//! Operator metrics (Prometheus text on `/metrics`).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounter,
    /// By deployment and reason: the API server's (`Forbidden`, `Invalid`, `Conflict`, ...) or
    /// ours (`Unreachable`, `NameTaken`, `NoNamespace`).
    pub errors: IntCounterVec,
    pub duration: Histogram,
    pub groups_desired: IntGaugeVec,
    pub groups_ready: IntGaugeVec,
    pub group_restarts: IntCounterVec,
    pub spec_invalid: IntGaugeVec,
    pub leader: IntGauge,
    /// The autoscaler's last look: the value it compared with the target (per group where the
    /// signal is divided by groups), the target, and the groups it settled on.
    pub autoscaler_value: GaugeVec,
    pub autoscaler_target: GaugeVec,
    pub autoscaler_desired: IntGaugeVec,
    /// 1 while the autoscaler's last look read no value (Prometheus unreachable or refused, no
    /// samples): the groups hold, whatever the load.
    pub autoscaler_value_missing: IntGaugeVec,
    /// The (namespace, name) pairs the per-deployment series are labelled with, so the series
    /// of a deleted NeoXDeployment can be dropped.
    labelled: Arc<Mutex<BTreeSet<(String, String)>>>,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let m = Self {
            registry: Registry::new(),
            reconciles: IntCounter::new("neox_operator_reconciles_total", "Reconciliations run")?,
            errors: IntCounterVec::new(
                Opts::new("neox_operator_reconcile_errors_total", "Reconciliations that failed"),
                &["namespace", "name", "reason"],
            )?,
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
            group_restarts: IntCounterVec::new(
                Opts::new(
                    "neox_operator_group_restarts_total",
                    "Times a group's ranks were all replaced because one failed",
                ),
                &["namespace", "name"],
            )?,
            spec_invalid: IntGaugeVec::new(
                Opts::new(
                    "neox_operator_spec_invalid",
                    "1 while a NeoXDeployment's spec is held as invalid (its groups keep their template)",
                ),
                &["namespace", "name"],
            )?,
            leader: IntGauge::new("neox_operator_leader", "1 while this replica holds the leader lease")?,
            autoscaler_value: GaugeVec::new(
                Opts::new(
                    "neox_operator_autoscaler_value",
                    "The value the autoscaler last compared with its target (per group for concurrency and queueDepth)",
                ),
                &["namespace", "name"],
            )?,
            autoscaler_target: GaugeVec::new(
                Opts::new("neox_operator_autoscaler_target", "The autoscaler's target value"),
                &["namespace", "name"],
            )?,
            autoscaler_desired: IntGaugeVec::new(
                Opts::new(
                    "neox_operator_autoscaler_desired_groups",
                    "The groups the autoscaler last settled on",
                ),
                &["namespace", "name"],
            )?,
            autoscaler_value_missing: IntGaugeVec::new(
                Opts::new(
                    "neox_operator_autoscaler_value_missing",
                    "1 while the autoscaler's last look read no value (the groups hold)",
                ),
                &["namespace", "name"],
            )?,
            labelled: Arc::default(),
        };
        m.registry.register(Box::new(m.reconciles.clone()))?;
        m.registry.register(Box::new(m.errors.clone()))?;
        m.registry.register(Box::new(m.duration.clone()))?;
        m.registry.register(Box::new(m.groups_desired.clone()))?;
        m.registry.register(Box::new(m.groups_ready.clone()))?;
        m.registry.register(Box::new(m.group_restarts.clone()))?;
        m.registry.register(Box::new(m.spec_invalid.clone()))?;
        m.registry.register(Box::new(m.leader.clone()))?;
        m.registry.register(Box::new(m.autoscaler_value.clone()))?;
        m.registry.register(Box::new(m.autoscaler_target.clone()))?;
        m.registry.register(Box::new(m.autoscaler_desired.clone()))?;
        m.registry.register(Box::new(m.autoscaler_value_missing.clone()))?;
        Ok(m)
    }

    /// A reconcile of `ns/name` that took `took`, and why it failed if it did.
    pub fn observe_reconcile(&self, ns: &str, name: &str, took: Duration, failed: Option<&str>) {
        self.reconciles.inc();
        if let Some(reason) = failed {
            self.remember(ns, name);
            self.errors.with_label_values(&[ns, name, reason]).inc();
        }
        self.duration.observe(took.as_secs_f64());
    }

    /// An autoscaler look: the value it read (none: it could not), its target, and the groups
    /// it settled on.
    pub fn autoscaled(&self, ns: &str, name: &str, value: Option<f64>, target: f64, desired: i32) {
        self.remember(ns, name);
        let labels = [ns, name];
        match value {
            Some(v) => self.autoscaler_value.with_label_values(&labels).set(v),
            // A stale value would read as the load now.
            None => drop(self.autoscaler_value.remove_label_values(&labels)),
        }
        self.autoscaler_value_missing
            .with_label_values(&labels)
            .set(i64::from(value.is_none()));
        self.autoscaler_target.with_label_values(&labels).set(target);
        self.autoscaler_desired
            .with_label_values(&labels)
            .set(i64::from(desired));
    }

    /// A deployment no longer autoscaled leaves no autoscaler series.
    pub fn not_autoscaled(&self, ns: &str, name: &str) {
        let labels = [ns, name];
        let _ = self.autoscaler_value.remove_label_values(&labels);
        let _ = self.autoscaler_value_missing.remove_label_values(&labels);
        let _ = self.autoscaler_target.remove_label_values(&labels);
        let _ = self.autoscaler_desired.remove_label_values(&labels);
    }

    /// What a pass saw of a deployment: the groups it asks for, those ready, and whether its
    /// spec is held as invalid.
    pub fn set_groups(&self, ns: &str, name: &str, desired: i32, ready: i32, invalid: bool) {
        self.remember(ns, name);
        self.spec_invalid.with_label_values(&[ns, name]).set(i64::from(invalid));
        // The restart counter exists from 0, so the first restart counts in `increase()`.
        self.group_restarts.with_label_values(&[ns, name]);
        self.groups_desired.with_label_values(&[ns, name]).set(desired as i64);
        self.groups_ready.with_label_values(&[ns, name]).set(ready as i64);
    }

    pub fn group_restarted(&self, ns: &str, name: &str) {
        self.remember(ns, name);
        self.group_restarts.with_label_values(&[ns, name]).inc();
    }

    fn remember(&self, ns: &str, name: &str) {
        if let Ok(mut l) = self.labelled.lock() {
            l.insert((ns.to_owned(), name.to_owned()));
        }
    }

    /// Drops the series of NeoXDeployments that no longer exist (`live` holds those that do):
    /// a deleted deployment must not go on reading as degraded.
    pub fn forget_all_but(&self, live: &BTreeSet<(String, String)>) {
        let Ok(mut labelled) = self.labelled.lock() else { return };
        labelled.retain(|(ns, name)| {
            if live.contains(&(ns.clone(), name.clone())) {
                return true;
            }
            let labels = [ns.as_str(), name.as_str()];
            let _ = self.groups_desired.remove_label_values(&labels);
            let _ = self.groups_ready.remove_label_values(&labels);
            let _ = self.group_restarts.remove_label_values(&labels);
            let _ = self.spec_invalid.remove_label_values(&labels);
            self.not_autoscaled(ns, name);
            // One series per reason: find them by their deployment labels.
            for family in self.errors.collect() {
                for m in family.get_metric() {
                    let label = |k: &str| m.get_label().iter().find(|l| l.name() == k).map(|l| l.value());
                    if label("namespace") == Some(ns) && label("name") == Some(name) {
                        if let Some(reason) = label("reason") {
                            let _ = self.errors.remove_label_values(&[ns, name, reason]);
                        }
                    }
                }
            }
            false
        });
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut s) {
            tracing::error!("encoding metrics: {e}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_deployment_leaves_no_series() {
        let m = Metrics::new().unwrap();
        m.set_groups("prod", "chat", 2, 1, false);
        m.set_groups("prod", "code", 1, 1, false);
        // From 0, so Prometheus' increase() counts the first restart.
        assert!(m
            .render()
            .contains(r#"neox_operator_group_restarts_total{name="chat",namespace="prod"} 0"#));
        m.group_restarted("prod", "chat");
        m.observe_reconcile("prod", "chat", Duration::from_millis(5), Some("Forbidden"));
        m.observe_reconcile("prod", "chat", Duration::from_millis(5), Some("Conflict"));
        m.autoscaled("prod", "chat", Some(1.5), 2.0, 3);
        assert!(m
            .render()
            .contains(r#"neox_operator_reconcile_errors_total{name="chat",namespace="prod",reason="Forbidden"} 1"#));
        let live = BTreeSet::from([("prod".to_owned(), "code".to_owned())]);
        m.forget_all_but(&live);
        let text = m.render();
        assert!(!text.contains(r#"name="chat""#), "{text}");
        assert!(
            text.contains(r#"neox_operator_groups_ready{name="code",namespace="prod"} 1"#),
            "{text}"
        );
        // Seen again later (re-created): reported again.
        m.set_groups("prod", "chat", 1, 0, true);
        assert!(m
            .render()
            .contains(r#"neox_operator_groups_desired{name="chat",namespace="prod"} 1"#));
    }
}
