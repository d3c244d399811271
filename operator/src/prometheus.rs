//! Asking Prometheus for the autoscaler: instant queries over http or https with the
//! credentials the operator's admin gives it (a URL's `user:password@`, a bearer token file,
//! a private CA), and the one value a query must give. Credentials never reach logs, errors
//! or status.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

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
    allowed
        .iter()
        .filter_map(|a| a.parse::<hyper::Uri>().ok())
        .any(|a| origin(&a).as_ref() == Some(&want) && crate::resources::path_under(u.path(), a.path()))
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

/// `Authorization` for the `user:password` of a URL, percent-decoded (`p%40ss` is `p@ss`).
fn basic_auth(userinfo: &str) -> String {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    format!(
        "Basic {}",
        BASE64.encode(format!("{}:{}", decode(user), decode(password)))
    )
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The operator's way to Prometheus: one client for every query (pooled connections, the
/// trusted roots) and where its bearer token is.
pub struct Prometheus {
    /// Or why there is none (an unreadable CA file), told with every query's error.
    http: Result<HttpsClient, String>,
    /// Read at every query: projected service-account tokens are rotated under us.
    bearer_token_file: Option<PathBuf>,
}

impl Prometheus {
    /// From `NEOX_PROMETHEUS_CA_FILE` (PEM certificates trusted besides the system's) and
    /// `NEOX_PROMETHEUS_BEARER_TOKEN_FILE`.
    pub fn from_env() -> Self {
        let path = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let p = Self::new(
            path("NEOX_PROMETHEUS_CA_FILE").as_deref(),
            path("NEOX_PROMETHEUS_BEARER_TOKEN_FILE"),
        );
        if let Err(e) = &p.http {
            tracing::error!("Prometheus client: {e}; autoscaled deployments will report it");
        }
        p
    }

    pub fn new(ca_file: Option<&Path>, bearer_token_file: Option<PathBuf>) -> Self {
        Self {
            http: https_client(ca_file),
            bearer_token_file,
        }
    }

    /// Runs an instant query; `None` when it returns no series. A `user:password@` in the URL
    /// is sent as basic auth; otherwise the bearer token, if there is one.
    pub async fn query(&self, base: &str, promql: &str) -> Result<Option<f64>, QueryError> {
        let url = format!("{}/api/v1/query?query={}", base.trim_end_matches('/'), encode(promql));
        let err = |m: String| QueryError::Http {
            url: redact(base),
            message: m,
        };
        let uri: hyper::Uri = url.parse().map_err(|e| err(format!("bad URL: {e}")))?;
        let userinfo = uri
            .authority()
            .and_then(|a| a.as_str().rsplit_once('@'))
            .map(|(u, _)| u);
        let auth = match (userinfo, &self.bearer_token_file) {
            (Some(user), _) => Some(basic_auth(user)),
            (None, Some(file)) => Some(bearer(file).map_err(err)?),
            (None, None) => None,
        };
        let mut req = hyper::Request::get(&uri);
        if let Some(auth) = auth {
            req = req.header(hyper::header::AUTHORIZATION, auth);
        }
        let req = req.body(Empty::new()).map_err(|e| err(format!("bad URL: {e}")))?;
        let client = self.http.as_ref().map_err(|e| err(e.clone()))?;
        // One deadline for the answer and its body: a Prometheus (or proxy) that stalls
        // mid-body must not hold the reconcile.
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), async {
            let resp = client.request(req).await.map_err(|e| err(error_chain(&e)))?;
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
}

/// An error with its causes: hyper's own says only "client error (Connect)", the certificate
/// problem is further down.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// `Authorization` with the token the file holds now.
fn bearer(file: &Path) -> Result<String, String> {
    let token =
        std::fs::read_to_string(file).map_err(|e| format!("reading the bearer token file {}: {e}", file.display()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("the bearer token file {} is empty", file.display()));
    }
    Ok(format!("Bearer {token}"))
}

/// http and https alike; https trusts the system's roots and the CA file's certificates.
fn https_client(ca_file: Option<&Path>) -> Result<HttpsClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(file) = ca_file {
        let ca = |m: String| format!("NEOX_PROMETHEUS_CA_FILE {}: {m}", file.display());
        let pem = std::fs::read(file).map_err(|e| ca(e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ca(format!("not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(ca("holds no PEM certificate".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| ca(e.to_string()))?;
        }
    }
    if roots.is_empty() {
        // Plain http still works; https answers that no certificate is trusted.
        tracing::warn!("no root certificates for https to Prometheus: {:?}", native.errors);
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
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

#[cfg(test)]
mod tests {
    use super::*;

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
