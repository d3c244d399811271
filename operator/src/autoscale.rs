//! Scaling groups from Prometheus, the way the HorizontalPodAutoscaler scales pods: a ratio
//! against a target with a tolerance band, stabilization windows, and min/max bounds.

use crate::crd::{AutoscalingSpec, NeoXDeployment, Recommendation, ScalingMetric};
use kube::ResourceExt;

/// The PromQL giving the metric to hold at `target`, and whether it is a sum over groups
/// (to be divided by the number of groups).
pub fn query_for(d: &NeoXDeployment, a: &AutoscalingSpec) -> (String, bool) {
    if let Some(q) = &a.query {
        return (q.clone(), false);
    }
    let sel = format!(
        r#"namespace="{}",pod=~"{}-[0-9]+-0""#,
        d.namespace().unwrap_or_default(),
        d.name_any()
    );
    let in_flight = format!("(sum(neox_requests_running{{{sel}}}) + sum(neox_requests_waiting{{{sel}}}))");
    match a.metric.unwrap_or(ScalingMetric::Concurrency) {
        ScalingMetric::Concurrency => (in_flight, true),
        ScalingMetric::QueueDepth => (format!("sum(neox_requests_waiting{{{sel}}})"), true),
        // With no first token in the window the quantile is NaN. Nothing in flight then reads
        // as 0 seconds, so an idle deployment scales in; requests in flight that got no first
        // token (a jam, or deadlines passing in the queue) give no sample, and the groups hold.
        ScalingMetric::TtftP90 => (
            format!(
                "histogram_quantile(0.9, sum by (le) (rate(neox_time_to_first_token_seconds_bucket{{{sel}}}[2m]))) >= 0 \
                 or on() {in_flight} == 0"
            ),
            false,
        ),
    }
}

/// HPA's rule: `ceil(current × value / target)` unless within `tolerance` of the target.
pub fn recommend(current: i32, value: f64, a: &AutoscalingSpec) -> i32 {
    let ratio = value / a.target;
    let raw = if current == 0 {
        // From zero there is no per-group average: any load asks for one group.
        i32::from(value > 0.0)
    } else if (ratio - 1.0).abs() <= a.tolerance {
        current
    } else {
        (current as f64 * ratio).ceil() as i32
    };
    raw.clamp(a.min_replicas, a.max_replicas)
}

/// Applies the stabilization windows to a fresh recommendation; returns the replicas to
/// scale to and the recommendations to keep.
pub fn stabilize(
    current: i32,
    fresh: i32,
    history: &[Recommendation],
    now: i64,
    a: &AutoscalingSpec,
) -> (i32, Vec<Recommendation>) {
    let keep_for = i64::from(a.scale_up_stabilization_seconds.max(a.scale_down_stabilization_seconds));
    // One recommendation a second at most: the newest look stands for its second.
    let mut recs: Vec<Recommendation> = history
        .iter()
        .filter(|r| now - r.time <= keep_for && r.time != now)
        .cloned()
        .collect();
    recs.push(Recommendation {
        time: now,
        replicas: fresh,
    });
    let within = |secs: i32| {
        recs.iter()
            .filter(move |r| now - r.time <= i64::from(secs))
            .map(|r| r.replicas)
    };
    let desired = if fresh > current {
        within(a.scale_up_stabilization_seconds)
            .min()
            .unwrap_or(fresh)
            .max(current)
    } else if fresh < current {
        within(a.scale_down_stabilization_seconds)
            .max()
            .unwrap_or(fresh)
            .min(current)
    } else {
        current
    };
    (
        desired
            .min(scale_up_limit(current))
            .clamp(a.min_replicas, a.max_replicas),
        recs,
    )
}

/// Whether scaling out further waits for the groups already asked for to be ready. A signal
/// that is not divided by groups (TTFT, a custom query) stays high while new groups load
/// (minutes, for a 20B), and every look would multiply the groups again; a per-group average
/// of a total (concurrency, queue depth) asks for the same total each time, and does not.
pub fn waits_for_ready(per_group: bool, current: i32, ready: i32, desired: i32) -> bool {
    !per_group && desired > current && ready < current
}

/// The most groups one look may scale to: HPA's default scale-up policy (the larger of 4 more
/// and twice as many per period), so a spike in the metric cannot jump to `maxReplicas` at
/// once: groups take minutes to load, and the next look sees whether more are needed.
pub fn scale_up_limit(current: i32) -> i32 {
    current.saturating_add(4).max(current.saturating_mul(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AutoscalingSpec {
        serde_json::from_value(serde_json::json!({"minReplicas": 1, "maxReplicas": 8, "target": 4.0})).unwrap()
    }

    #[test]
    fn ratio_tolerance_and_bounds() {
        let a = spec();
        assert_eq!(recommend(2, 8.0, &a), 4); // twice the target per group: twice the groups
        assert_eq!(recommend(2, 4.3, &a), 2); // within 10%
        assert_eq!(recommend(2, 0.0, &a), 1); // min
        assert_eq!(recommend(4, 100.0, &a), 8); // max
        assert_eq!(recommend(0, 3.0, &a), 1);
    }

    #[test]
    fn windows_hold_back_flapping() {
        let mut a = spec();
        a.scale_down_stabilization_seconds = 300;
        a.scale_up_stabilization_seconds = 60;
        // Load dropped a minute after asking for 6: stay at 6 for the down window.
        let hist = vec![Recommendation {
            time: 1000,
            replicas: 6,
        }];
        assert_eq!(stabilize(6, 2, &hist, 1060, &a).0, 6);
        assert_eq!(stabilize(6, 2, &hist, 1400, &a).0, 2);
        // Up: the lowest recommendation of the last 60 s.
        let hist = vec![Recommendation {
            time: 1000,
            replicas: 3,
        }];
        assert_eq!(stabilize(2, 5, &hist, 1030, &a).0, 3);
        assert_eq!(stabilize(2, 5, &hist, 1100, &a).0, 5);
        // History older than both windows is dropped.
        let (_, kept) = stabilize(2, 2, &[Recommendation { time: 0, replicas: 9 }], 1000, &a);
        assert_eq!(
            kept,
            vec![Recommendation {
                time: 1000,
                replicas: 2
            }]
        );
    }

    #[test]
    fn one_look_scales_out_at_most_to_twice_or_four_more() {
        let mut a = spec();
        a.max_replicas = 100;
        assert_eq!(stabilize(1, 50, &[], 1000, &a).0, 5);
        assert_eq!(stabilize(8, 50, &[], 1000, &a).0, 16);
        assert_eq!(stabilize(8, 10, &[], 1000, &a).0, 10);
        // Scale-in is not limited: the down window holds it instead.
        assert_eq!(stabilize(16, 1, &[], 1000, &a).0, 1);
        assert_eq!(scale_up_limit(0), 4);
        assert_eq!(scale_up_limit(i32::MAX), i32::MAX);
    }

    #[test]
    fn latency_signals_scale_out_again_only_once_the_new_groups_serve() {
        // TTFT (not per group) high while 2 of 4 groups load: hold.
        assert!(waits_for_ready(false, 4, 2, 8));
        assert!(!waits_for_ready(false, 4, 4, 8));
        // Scaling in never waits; neither do averages of a total.
        assert!(!waits_for_ready(false, 4, 2, 3));
        assert!(!waits_for_ready(true, 4, 2, 8));
    }

    #[test]
    fn a_second_keeps_one_recommendation() {
        let a = spec();
        let hist = vec![
            Recommendation { time: 990, replicas: 3 },
            Recommendation {
                time: 1000,
                replicas: 4,
            },
        ];
        let (_, kept) = stabilize(3, 5, &hist, 1000, &a);
        assert_eq!(
            kept,
            vec![
                Recommendation { time: 990, replicas: 3 },
                Recommendation {
                    time: 1000,
                    replicas: 5
                }
            ]
        );
    }
}
