//! Scaling groups from Prometheus, the way the HorizontalPodAutoscaler scales pods: a ratio
//! against a target with a tolerance band, stabilization windows, and min/max bounds.

use std::sync::OnceLock;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::crd::{AutoscalingSpec, NeoXDeployment, Recommendation, ScalingMetric};
use kube::ResourceExt;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("no Prometheus URL (set autoscaling.prometheusUrl or the operator's NEOX_PROMETHEUS_URL)")]
    NoUrl,
    #[error("Prometheus at {url}: {message}")]
    Http { url: String, message: String },
    #[error("Prometheus answered {0}")]
    Answer(String),
    #[error(
        "autoscaling.prometheusUrl {0} is not a Prometheus this operator may ask (its NEOX_PROMETHEUS_ALLOWED_URLS; Helm: prometheus.allowedUrls)"
    )]
    NotAllowed(String),
    #[error(
        "autoscaling.query is off in this operator (NEOX_PROMETHEUS_CUSTOM_QUERIES; Helm: prometheus.customQueries): use autoscaling.metric, or ask the operator's admin"
    )]
    QueryNotAllowed,
}

/// Whether `url` is under one of the `allowed` URLs: the same scheme, host and port, and a path
/// at or below the allowed one. A NeoXDeployment's `prometheusUrl` is a URL the operator
/// fetches from inside the cluster, so whoever may create one could otherwise make it send
/// requests to any internal address.
pub fn url_allowed(url: &str, allowed: &[String]) -> bool {
    let Ok(u) = url.parse::<hyper::Uri>() else {
        return false;
    };
    let origin = |x: &hyper::Uri| {
        let scheme = x.scheme_str()?.to_ascii_lowercase();
        let port = x.port_u16().or(match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        })?;
        Some((scheme, x.host()?.to_ascii_lowercase(), port))
    };
    let Some(want) = origin(&u) else { return false };
    allowed.iter().filter_map(|a| a.parse::<hyper::Uri>().ok()).any(|a| {
        let base = a.path().trim_end_matches('/');
        let rest = u.path().strip_prefix(base);
        origin(&a).as_ref() == Some(&want) && rest.is_some_and(|r| r.is_empty() || r.starts_with('/'))
    })
}

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

/// What a query parameter keeps as is: RFC 3986's unreserved characters.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn encode(q: &str) -> String {
    percent_encoding::utf8_percent_encode(q, QUERY_VALUE).to_string()
}

/// The URL with any `user:password@` taken out, for logs, errors and status.
pub fn redact(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}{}", &url[..start], &url[start + at + 1..]),
        None => url.to_owned(),
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// `Authorization` for the `user:password` of a URL, percent-decoded (`p%40ss` is `p@ss`).
fn basic_auth(userinfo: &str) -> String {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    format!(
        "Basic {}",
        BASE64.encode(format!("{}:{}", decode(user), decode(password)))
    )
}

/// One client for every query (it holds the system's root certificates and pooled
/// connections); http and https alike.
fn client() -> Result<&'static HttpsClient, String> {
    static CLIENT: OnceLock<Result<HttpsClient, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_native_roots()
                .map_err(|e| format!("no root certificates for https: {e}"))?
                .https_or_http()
                .enable_http1()
                .build();
            Ok(Client::builder(TokioExecutor::new()).build(https))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Runs an instant query; `None` when it returns no series. A `user:password@` in the URL is
/// sent as basic auth and never shown.
pub async fn query(base: &str, promql: &str) -> Result<Option<f64>, QueryError> {
    let url = format!("{}/api/v1/query?query={}", base.trim_end_matches('/'), encode(promql));
    let err = |m: String| QueryError::Http {
        url: redact(base),
        message: m,
    };
    let uri: hyper::Uri = url.parse().map_err(|e| err(format!("bad URL: {e}")))?;
    let mut req = hyper::Request::get(&uri);
    if let Some(user) = uri
        .authority()
        .and_then(|a| a.as_str().rsplit_once('@'))
        .map(|(u, _)| u)
    {
        req = req.header(hyper::header::AUTHORIZATION, basic_auth(user));
    }
    let req = req.body(Empty::new()).map_err(|e| err(format!("bad URL: {e}")))?;
    let client = client().map_err(err)?;
    // One deadline for the answer and its body: a Prometheus (or proxy) that stalls mid-body
    // must not hold the reconcile.
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), async {
        let resp = client.request(req).await.map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| err(e.to_string()))?;
        Ok::<_, QueryError>((status, body.to_bytes()))
    })
    .await
    .map_err(|_| err("timed out".into()))??;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| err(format!("{status}: {e}")))?;
    if v["status"] != "success" {
        return Err(QueryError::Answer(v["error"].as_str().unwrap_or("an error").to_owned()));
    }
    read_value(&v["data"])
}

/// The one value of a query's `data`: a scalar, or a vector of one series. None for no
/// series or a value that is not a number (NaN, ±Inf); an error for several series, since
/// which of them (one per group?) is meant cannot be known.
pub fn read_value(data: &serde_json::Value) -> Result<Option<f64>, QueryError> {
    let sample = match data["resultType"].as_str() {
        Some("scalar") => data["result"].clone(),
        Some("vector") => {
            let series = data["result"].as_array().map_or(&[][..], Vec::as_slice);
            match series {
                [] => return Ok(None),
                [one] => one["value"].clone(),
                many => {
                    return Err(QueryError::Answer(format!(
                        "{} series where one value was expected: aggregate them (sum, avg, max)",
                        many.len()
                    )))
                }
            }
        }
        other => {
            return Err(QueryError::Answer(format!(
                "a {} result where a scalar or an instant vector was expected",
                other.unwrap_or("missing")
            )))
        }
    };
    match sample[1].as_str().and_then(|s| s.parse::<f64>().ok()) {
        Some(x) if x.is_finite() => Ok(Some(x)),
        Some(_) => Ok(None),
        None => Err(QueryError::Answer(format!("an unreadable sample: {sample}"))),
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
    fn a_query_gives_one_value_or_none() {
        let read = |v: serde_json::Value| read_value(&v);
        let vector = |values: &[&str]| {
            let result: Vec<_> = values
                .iter()
                .map(|x| serde_json::json!({"metric": {}, "value": [1.0, x]}))
                .collect();
            serde_json::json!({"resultType": "vector", "result": result})
        };
        assert_eq!(read(vector(&["2.5"])).unwrap(), Some(2.5));
        assert_eq!(read(vector(&[])).unwrap(), None);
        assert_eq!(read(vector(&["NaN"])).unwrap(), None);
        assert_eq!(read(vector(&["+Inf"])).unwrap(), None);
        assert_eq!(
            read(serde_json::json!({"resultType": "scalar", "result": [1.0, "3"]})).unwrap(),
            Some(3.0)
        );
        // One series per group: which one is meant is unknowable.
        let many = read(vector(&["1", "2"])).unwrap_err().to_string();
        assert!(many.contains("2 series"), "{many}");
        let matrix = read(serde_json::json!({"resultType": "matrix", "result": []})).unwrap_err();
        assert!(matrix.to_string().contains("matrix"), "{matrix}");
        assert!(read(vector(&["lots"])).is_err());
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

    #[test]
    fn basic_auth_decodes_the_url_escapes() {
        // base64("neox:p@ss:w")
        assert_eq!(basic_auth("neox:p%40ss%3Aw"), "Basic bmVveDpwQHNzOnc=");
        assert_eq!(basic_auth("token"), format!("Basic {}", BASE64.encode("token:")));
    }

    #[test]
    fn credentials_never_show() {
        assert_eq!(redact("https://u:p@prom:9090/x?a=b@c"), "https://prom:9090/x?a=b@c");
        assert_eq!(redact("http://prom:9090"), "http://prom:9090");
        assert_eq!(redact("http://a@b@prom"), "http://prom");
        assert_eq!(redact("no-scheme"), "no-scheme");
    }

    #[test]
    fn only_allowed_prometheus_urls_pass() {
        let allowed = vec![
            "http://prometheus.monitoring:9090".to_owned(),
            "https://thanos.example/prom/".to_owned(),
        ];
        for ok in [
            "http://prometheus.monitoring:9090",
            "http://PROMETHEUS.monitoring:9090/",
            "http://user:pw@prometheus.monitoring:9090",
            "https://thanos.example/prom",
            "https://thanos.example:443/prom/tenant-a",
        ] {
            assert!(url_allowed(ok, &allowed), "{ok}");
        }
        for refused in [
            "http://prometheus.monitoring:9091",
            "https://prometheus.monitoring:9090",
            "http://prometheus.monitoring.evil:9090",
            "http://169.254.169.254/latest/meta-data",
            "https://thanos.example/prometheus",
            "https://thanos.example/",
            "not a url",
        ] {
            assert!(!url_allowed(refused, &allowed), "{refused}");
        }
        assert!(!url_allowed("http://prometheus.monitoring:9090", &[]));
    }

    #[test]
    fn promql_is_url_encoded() {
        assert_eq!(encode("sum(a{b=\"c\"})"), "sum%28a%7Bb%3D%22c%22%7D%29");
    }
}
