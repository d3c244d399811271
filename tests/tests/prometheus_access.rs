//! How the operator reaches a secured Prometheus: a real Prometheus serving https under a
//! private CA (trusted only through the CA file), and the bearer token read from its file at
//! every query (rotated tokens are picked up) as a server on the other end receives it.
//! Skipped with a printed reason when Prometheus or openssl is missing, except under CI.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use neox_operator::prometheus::Prometheus;
use neox_tests::{free_port, Killed};

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd).arg(arg).output().is_ok_and(|o| o.status.success())
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate it signs for 127.0.0.1.
fn private_ca(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=neox-test-ca",
            ],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            &["req"][..],
            &ec,
            &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

#[test]
fn a_prometheus_behind_a_private_ca_is_reached_with_the_ca_file_and_refused_without() {
    if !have("prometheus", "--version") || !have("openssl", "version") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install prometheus and openssl (see .ci/run)"
        );
        eprintln!("SKIPPED: prometheus or openssl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    private_ca(d);
    std::fs::write(d.join("prometheus.yml"), "global:\n  scrape_interval: 1m\n").unwrap();
    std::fs::write(
        d.join("web.yml"),
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            d.join("server.crt").display(),
            d.join("server.key").display()
        ),
    )
    .unwrap();
    let port = free_port();
    let _prom = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", d.join("prometheus.yml").display()))
            .arg(format!("--web.config.file={}", d.join("web.yml").display()))
            .arg(format!("--storage.tsdb.path={}", d.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("https://127.0.0.1:{port}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let trusting = Prometheus::new(Some(&d.join("ca.crt")), None);
    let t0 = Instant::now();
    let value = loop {
        match rt.block_on(trusting.query(&url, "vector(3)")) {
            Ok(v) => break v,
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(30), "never answered over https: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(value, Some(3.0));

    // The system's roots alone do not know the private CA: refused, and the error says why.
    let e = rt
        .block_on(Prometheus::new(None, None).query(&url, "vector(3)"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("certificate") && e.contains("UnknownIssuer"), "{e}");
    assert!(e.contains(&url), "{e}");
    // A CA file that is not one names itself in every query's error.
    std::fs::write(d.join("empty.pem"), "not a certificate\n").unwrap();
    for bad in [d.join("missing.pem"), d.join("empty.pem")] {
        let e = rt
            .block_on(Prometheus::new(Some(&bad), None).query(&url, "vector(3)"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("NEOX_PROMETHEUS_CA_FILE") && e.contains(&*bad.to_string_lossy()),
            "{e}"
        );
    }
}

/// A server answering every query with one sample, noting each request's Authorization.
fn recording_server() -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut auth = None;
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("authorization") {
                        auth = Some(value.trim().to_owned());
                    }
                }
                line.clear();
            }
            log.lock().unwrap().push(auth);
            let body =
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[0,"1"]}]}}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, seen)
}

#[test]
fn the_bearer_token_is_read_from_its_file_at_every_query_and_never_shown() {
    let (url, seen) = recording_server();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "first-token\n").unwrap();
    let prom = Prometheus::new(None, Some(token.clone()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(prom.query(&url, "up")).unwrap(), Some(1.0));
    // The kubelet rotates a projected token by replacing the file.
    std::fs::write(&token, "second-token").unwrap();
    assert_eq!(rt.block_on(prom.query(&url, "up")).unwrap(), Some(1.0));
    // A URL's own user:password wins (it names that server's credentials).
    let with_user = url.replace("http://", "http://neox:pw@");
    assert_eq!(rt.block_on(prom.query(&with_user, "up")).unwrap(), Some(1.0));
    // No token, no request: the error names the file, not the token.
    std::fs::remove_file(&token).unwrap();
    let e = rt.block_on(prom.query(&url, "up")).unwrap_err().to_string();
    assert!(
        e.contains("bearer token file") && e.contains(&*token.to_string_lossy()),
        "{e}"
    );
    // Without a token file nothing is sent.
    assert_eq!(
        rt.block_on(Prometheus::new(None, None).query(&url, "up")).unwrap(),
        Some(1.0)
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            Some("Bearer first-token".to_owned()),
            Some("Bearer second-token".to_owned()),
            Some("Basic bmVveDpwdw==".to_owned()),
            None,
        ]
    );
}
