//! The alerting rules shipped in `deploy/monitoring/`: promtool accepts them, their unit tests
//! (`neox-alerts.test.yaml`: input series and the alerts they must and must not fire) pass, and
//! every metric they use is one the worker or the operator really exports.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

fn monitoring_dir() -> PathBuf {
    neox_tests::repo_root().join("deploy/monitoring")
}

fn promtool(args: &[&str]) -> Option<(bool, String)> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(monitoring_dir())
        .output()
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let Some((ok, out)) = promtool(&["check", "rules", "neox-alerts.yaml"]) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install promtool (see .ci/run)"
        );
        eprintln!("SKIPPED: promtool is not installed (apt-get install prometheus)");
        return;
    };
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(&["test", "rules", "neox-alerts.test.yaml"]).unwrap();
    assert!(ok, "promtool test rules:\n{out}");
}

#[test]
fn alert_rules_only_use_metrics_that_exist() {
    let rules = std::fs::read_to_string(monitoring_dir().join("neox-alerts.yaml")).unwrap();
    let used: BTreeSet<&str> = rules
        .match_indices("neox_")
        .map(|(at, _)| {
            let rest = &rules[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    assert!(used.len() >= 7, "{used:?}");
    let worker = neox_worker::metrics::Metrics::new().unwrap().render();
    let operator = neox_operator::metrics::Metrics::new().unwrap();
    operator.set_groups("ns", "name", 1, 1, true);
    operator.group_restarted("ns", "name");
    operator.observe_reconcile("ns", "name", std::time::Duration::ZERO, Some("Forbidden"));
    operator.autoscaled("ns", "name", None, 2.0, 1);
    let exported = format!("{worker}{}", operator.render());
    for name in used {
        assert!(
            exported.lines().any(|l| l.starts_with(name)),
            "the alert rules use {name}, which neither the worker nor the operator exports"
        );
    }
}
