//! `apiserver-proxy-pod-webhook` end to end: the real binary on 127.0.0.1
//! with a free port, driven by curl, openssl s_client, a rustls client and
//! Python's `jsonpatch` (an independent RFC 6902 implementation).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use apiserver_proxy::{tls, webhook::review};
use serde_json::{Value, json};

use common::{ChildGuard, poll};

const FQDN: &str = "foo.bar.";
const BIN: &str = env!("CARGO_BIN_EXE_apiserver-proxy-pod-webhook");
const VARIABLE: &str = "KUBERNETES_SERVICE_HOST";

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(common::unique("webhook-test-"));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// A cert dir with the default names (tls.crt, tls.key) and the CA.
    fn with_certs(cert: &str, key: &str) -> Self {
        let dir = TempDir::new();
        fs::copy(data(cert), dir.path().join("tls.crt")).unwrap();
        fs::copy(data(key), dir.path().join("tls.key")).unwrap();
        fs::copy(data("ca.crt"), dir.path().join("ca.crt")).unwrap();
        dir
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The running binary; killed on drop. Its stderr is collected by a
/// thread that ends when the process does.
struct Webhook {
    child: ChildGuard,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Webhook {
    fn start(cert_dir: &Path, extra: &[&str]) -> Webhook {
        let mut cmd = Command::new(BIN);
        cmd.args(["--apiserver-fqdn", FQDN, "--cert-dir"])
            .arg(cert_dir)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(extra)
            .env("RUST_LOG", "apiserver_proxy=debug");
        let (child, log, reader) = common::spawn_logged(&mut cmd);
        let mut webhook = Webhook {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
            reader: Some(reader),
        };
        webhook.addr = poll("the startup line", Duration::from_secs(30), || {
            let log = webhook.log.lock().unwrap();
            let start = log.find("listening on https://")? + "listening on https://".len();
            log[start..].split_whitespace().next()?.parse().ok()
        });
        webhook
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// curl with the test CA, resolving localhost to the listener.
    fn curl(&self, args: &[&str]) -> std::process::Output {
        let resolve = format!("localhost:{}:127.0.0.1", self.addr.port());
        let mut all = vec![
            "--silent",
            "--show-error",
            "--max-time",
            "20",
            "--resolve",
            &resolve,
        ];
        let ca = data("ca.crt");
        all.extend(["--cacert", ca.to_str().unwrap()]);
        all.extend(args);
        common::run("curl", &all)
    }

    /// Status code and body of one curl request.
    fn request(&self, args: &[&str]) -> (u16, String) {
        let mut all = vec!["--output", "-", "--write-out", "\n%{http_code}"];
        all.extend(args);
        let out = self.curl(&all);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    fn post_review(&self, body: &[u8]) -> Value {
        let file = TempDir::new();
        let path = file.path().join("review.json");
        fs::write(&path, body).unwrap();
        let at = format!("@{}", path.display());
        let url = self.url("/webhook/pod-apiserver-env");
        let (code, text) = self.request(&[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &at,
            &url,
        ]);
        assert_eq!(code, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    fn assert_healthy(&self) {
        let (code, body) = self.request(&[&self.url("/healthz")]);
        assert_eq!((code, body.as_str()), (200, "ok"), "log:\n{}", self.log());
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn metric(&self, line_start: &str) -> f64 {
        let (_, text) = self.request(&[&self.url("/metrics")]);
        text.lines()
            .find_map(|l| {
                l.strip_prefix(line_start)
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// Sends SIGTERM and returns the exit status and the log.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        self.child.signal("TERM");
        let out = self.child.wait_output(Duration::from_secs(30));
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        (out.status, self.log())
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

// --- a small TLS client -----------------------------------------------------

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_connect(addr: SocketAddr, identity: Option<(&str, &str)>) -> std::io::Result<TlsStream> {
    let identity = identity.map(|(c, k)| (data(c), data(k)));
    let config = tls::client_config(
        &data("ca.crt"),
        identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        vec![b"http/1.1".to_vec()],
    )
    .unwrap();
    let server_name = "localhost".try_into().unwrap();
    let conn = rustls::ClientConnection::new(config, server_name).unwrap();
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut stream = rustls::StreamOwned::new(conn, sock);
    // Finish the handshake now, so that refusals show here.
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// Reads one response (head and Content-Length body); status and text.
fn read_response(stream: &mut impl Read) -> std::io::Result<(u16, String)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                return Ok((status, text));
            }
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, text));
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn get(stream: &mut TlsStream, path: &str) -> std::io::Result<(u16, String)> {
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())?;
    stream.flush()?;
    read_response(stream)
}

/// Whether the server closed `stream` (EOF or reset) within `deadline`.
fn closed_within(stream: &mut impl Read, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    let mut buf = [0u8; 1024];
    while Instant::now() < end {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

/// The serial of the certificate a new TLS connection sees (openssl s_client).
fn served_serial(addr: SocketAddr) -> String {
    let connect = addr.to_string();
    let out = Command::new("bash")
        .args([
            "-c",
            "openssl s_client -connect \"$1\" -servername localhost </dev/null 2>/dev/null \
             | openssl x509 -noout -serial",
            "-",
            &connect,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// --- tests -------------------------------------------------------------------

#[test]
fn upstream_readme_example_gives_the_expected_patch() {
    let certs = TempDir::with_certs("server.crt", "server.key");
    let webhook = Webhook::start(certs.path(), &[]);
    let script = format!(
        "set -o pipefail; curl -k -XPOST --silent -H 'Content-Type: application/json' \
         -d @{} -H 'Accept: application/json' https://127.0.0.1:{}/webhook/pod-apiserver-env \
         | jq -r '.response.patch' | base64 -d | jq -c .",
        data("admission.json").display(),
        webhook.addr.port()
    );
    let patch = common::run_ok("bash", &["-c", &script]);
    let var = json!({"name": VARIABLE, "value": FQDN});
    let expected = json!([
        {"op": "add", "path": "/spec/initContainers/0/env", "value": [var]},
        {"op": "add", "path": "/spec/containers/0/env", "value": [var]},
    ]);
    assert_eq!(serde_json::from_str::<Value>(&patch).unwrap(), expected);
    // The answer echoes the version and uid; v1beta1 answers in v1beta1.
    let answer = webhook.post_review(&fs::read(data("admission.json")).unwrap());
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(
        answer["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let answer = webhook.post_review(&fs::read(data("admission-v1beta1.json")).unwrap());
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1beta1");
    assert_eq!(answer["response"]["uid"], "v1beta1-0001");
    for (file, uid) in [
        ("deployment.json", "deployment-0001"),
        ("delete.json", "delete-0001"),
    ] {
        let answer = webhook.post_review(&fs::read(data(file)).unwrap());
        assert_eq!(
            answer["response"],
            json!({"uid": uid, "allowed": true}),
            "{file}"
        );
    }
    assert_eq!(
        webhook.metric("apiserver_proxy_webhook_patches_total "),
        3.0
    );
    let (status, log) = webhook.terminate();
    assert!(status.success(), "{log}");
}

fn python() -> String {
    std::env::var("APISERVER_PROXY_PYTHON").unwrap_or_else(|_| {
        panic!(
            "APISERVER_PROXY_PYTHON is not set: run `make venv` and set \
             APISERVER_PROXY_PYTHON=$PWD/.venv/bin/python (`make integration` does both)"
        )
    })
}

/// Applies `patch` to `doc` with Python's jsonpatch.
fn apply_with_jsonpatch(doc: &Value, patch: &Value) -> Value {
    let script = "import json, sys, jsonpatch\n\
                  d = json.load(sys.stdin)\n\
                  print(json.dumps(jsonpatch.JsonPatch(d['patch']).apply(d['doc'])))\n";
    let mut child = Command::new(python())
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the venv's python");
    let input = json!({"doc": doc, "patch": patch}).to_string();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "jsonpatch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What the pod must look like after the patch: each container without the
/// variable gains it at the end of its env; nothing else changes.
fn expected_pod(pod: &Value) -> Value {
    let mut expected = pod.clone();
    for kind in ["initContainers", "containers"] {
        let Some(containers) = expected
            .pointer_mut(&format!("/spec/{kind}"))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for container in containers {
            let Some(container) = container.as_object_mut() else {
                continue;
            };
            let var = json!({"name": VARIABLE, "value": FQDN});
            match container.get_mut("env") {
                Some(Value::Array(env)) => {
                    if !env.iter().any(|v| v["name"] == VARIABLE) {
                        env.push(var);
                    }
                }
                None | Some(Value::Null) => {
                    container.insert("env".into(), json!([var]));
                }
                Some(_) => {}
            }
        }
    }
    expected
}

fn decode_base64(text: &str) -> Vec<u8> {
    let out = Command::new("bash")
        .args(["-c", "printf %s \"$1\" | base64 -d", "-", text])
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

fn check_with_jsonpatch(review_doc: &Value, answer: &Value) {
    let pod = &review_doc["request"]["object"];
    let patched = match answer["response"].get("patch").and_then(Value::as_str) {
        Some(patch) => {
            assert_eq!(answer["response"]["patchType"], "JSONPatch");
            let ops: Value = serde_json::from_slice(&decode_base64(patch)).unwrap();
            apply_with_jsonpatch(pod, &ops)
        }
        None => pod.clone(),
    };
    let is_pod_change = review_doc["request"]["kind"]["kind"] == "Pod"
        && matches!(
            review_doc["request"]["operation"].as_str(),
            Some("CREATE" | "UPDATE")
        );
    if is_pod_change && pod.is_object() {
        assert_eq!(patched, expected_pod(pod), "review {review_doc}");
        for kind in ["initContainers", "containers"] {
            for c in patched["spec"][kind].as_array().into_iter().flatten() {
                let count = c["env"]
                    .as_array()
                    .map_or(0, |e| e.iter().filter(|v| v["name"] == VARIABLE).count());
                assert_eq!(count, 1, "{c}");
            }
        }
    } else {
        assert_eq!(&patched, pod, "non-pod changes must not be patched");
    }
}

fn pod_review(api_version: &str, uid: &str, pod: Value) -> Value {
    json!({
        "apiVersion": api_version, "kind": "AdmissionReview",
        "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "operation": "CREATE", "object": pod}
    })
}

#[test]
fn patches_apply_cleanly_with_python_jsonpatch() {
    let mut reviews: Vec<Value> = [
        "admission.json",
        "admission-v1beta1.json",
        "pod-4k.json",
        "deployment.json",
        "delete.json",
    ]
    .iter()
    .map(|f| serde_json::from_slice(&fs::read(data(f)).unwrap()).unwrap())
    .collect();
    let var_from =
        json!({"name": VARIABLE, "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}});
    let pods = [
        json!({"spec": {"containers": [{"name": "a"}]}}),
        json!({"spec": {"containers": [{"name": "a", "env": null}, {"name": "b", "env": []}]}}),
        json!({"metadata": {"x": [1, {"y": "~/"}]}, "spec": {"containers": [
            {"name": "a", "env": [{"name": "A", "value": "1"}, {"name": "B", "valueFrom": {"x": 1}}], "future": {"z": true}},
            {"name": "b", "env": [var_from]}]}, "status": {"phase": "Pending"}}),
        json!({"spec": {"initContainers": [{"name": "i1"}, {"name": "i2", "env": [{"name": "Q"}]}], "containers": [{"name": "c"}]}}),
        json!({"spec": {"containers": []}}),
    ];
    for (i, pod) in pods.into_iter().enumerate() {
        reviews.push(pod_review(
            "admission.k8s.io/v1",
            &format!("u{i}"),
            pod.clone(),
        ));
        reviews.push(pod_review(
            "admission.k8s.io/v1beta1",
            &format!("b{i}"),
            pod,
        ));
    }
    // The pure function, for every review.
    for doc in &reviews {
        let answer = review::review(doc.to_string().as_bytes(), FQDN).unwrap();
        let review = answer.review();
        assert_eq!(review["apiVersion"], doc["apiVersion"]);
        assert_eq!(review["response"]["uid"], doc["request"]["uid"]);
        check_with_jsonpatch(doc, &review);
    }
    // And the real binary over HTTPS, for the sample files.
    let certs = TempDir::with_certs("server.crt", "server.key");
    let webhook = Webhook::start(certs.path(), &[]);
    for doc in &reviews[..5] {
        let answer = webhook.post_review(doc.to_string().as_bytes());
        check_with_jsonpatch(doc, &answer);
    }
}

#[test]
fn every_key_format_serves() {
    for (cert, key) in [
        ("server.crt", "server-pkcs1.key"),
        ("server.crt", "server.key"),
        ("server-ec.crt", "server-ec.key"),
    ] {
        let certs = TempDir::with_certs(cert, key);
        let webhook = Webhook::start(certs.path(), &[]);
        webhook.assert_healthy();
        // TLS 1.2 and 1.3 both work.
        for version in ["--tlsv1.2 --tls-max 1.2", "--tlsv1.3"] {
            let args: Vec<&str> = version.split(' ').collect();
            let mut all = args.clone();
            let url = webhook.url("/healthz");
            all.push(&url);
            let (code, _) = webhook.request(&all);
            assert_eq!(code, 200, "{key} {version}");
        }
    }
}

#[test]
fn mtls_refuses_clients_without_a_trusted_certificate() {
    let certs = TempDir::with_certs("server.crt", "server.key");
    let webhook = Webhook::start(certs.path(), &["--client-ca-name", "ca.crt"]);
    let url = webhook.url("/healthz");
    let without = webhook.curl(&[&url]);
    assert!(
        !without.status.success(),
        "a client without a certificate was accepted"
    );
    let (cert, key) = (data("client.crt"), data("client.key"));
    let (code, body) = webhook.request(&[
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        &url,
    ]);
    assert_eq!((code, body.as_str()), (200, "ok"));
    let (cert, key) = (data("stranger.crt"), data("stranger.key"));
    let stranger = webhook.curl(&[
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        &url,
    ]);
    assert!(
        !stranger.status.success(),
        "a client signed by another CA was accepted"
    );
    // Our own client as well.
    assert!(
        tls_connect(webhook.addr, None)
            .and_then(|mut s| get(&mut s, "/healthz"))
            .is_err()
    );
    let mut ok = tls_connect(webhook.addr, Some(("client.crt", "client.key"))).unwrap();
    assert_eq!(get(&mut ok, "/healthz").unwrap().0, 200);
}

/// Lays out a cert dir as a mounted Kubernetes secret does:
/// tls.crt -> ..data/tls.crt, ..data -> ..<version>/.
fn secret_version(dir: &Path, version: &str, cert: &str, key: &str) {
    let versioned = dir.join(version);
    fs::create_dir_all(&versioned).unwrap();
    fs::copy(data(cert), versioned.join("tls.crt")).unwrap();
    fs::copy(data(key), versioned.join("tls.key")).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    fs::rename(&tmp, dir.join("..data")).unwrap(); // atomic swap
    for name in ["tls.crt", "tls.key"] {
        if fs::symlink_metadata(dir.join(name)).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
    }
}

#[test]
fn certificates_reload_on_a_secret_symlink_swap_without_dropping_connections() {
    let dir = TempDir::new();
    secret_version(
        dir.path(),
        "..2026_01_01_00_00_00.1",
        "server.crt",
        "server.key",
    );
    let webhook = Webhook::start(dir.path(), &[]);
    assert_eq!(served_serial(webhook.addr), "serial=1001");
    let mut established = tls_connect(webhook.addr, None).unwrap();
    assert_eq!(get(&mut established, "/healthz").unwrap().0, 200);

    secret_version(
        dir.path(),
        "..2026_02_01_00_00_00.2",
        "server-rotated.crt",
        "server-rotated.key",
    );
    poll("the rotated certificate", Duration::from_secs(20), || {
        (served_serial(webhook.addr) == "serial=1003").then_some(())
    });
    // The keep-alive connection from before the swap still works.
    assert_eq!(get(&mut established, "/healthz").unwrap().0, 200);
    assert_eq!(get(&mut established, "/readyz").unwrap().0, 200);
    assert_eq!(
        webhook.metric("apiserver_proxy_webhook_certificate_reloads_total{result=\"success\"}"),
        1.0
    );
    let (status, log) = webhook.terminate();
    assert!(status.success());
    assert!(log.contains("reloaded certificate"), "{log}");
}

#[test]
fn certificates_reload_on_rewrite_and_a_bad_pair_keeps_the_old_one() {
    let certs = TempDir::with_certs("server.crt", "server.key");
    let webhook = Webhook::start(certs.path(), &[]);
    let mut established = tls_connect(webhook.addr, None).unwrap();
    assert_eq!(get(&mut established, "/healthz").unwrap().0, 200);

    // A broken certificate: the old pair stays in use.
    fs::write(certs.path().join("tls.crt"), "not a certificate\n").unwrap();
    poll("the failed reload", Duration::from_secs(20), || {
        assert_eq!(served_serial(webhook.addr), "serial=1001");
        let failures =
            webhook.metric("apiserver_proxy_webhook_certificate_reloads_total{result=\"failure\"}");
        (failures >= 1.0).then_some(())
    });
    // The log line travels through a pipe and a reader thread: poll for it.
    poll("the log line", Duration::from_secs(20), || {
        webhook
            .log()
            .contains("keeping the previous certificate")
            .then_some(())
    });

    // Rewritten in place (cert first, then key, as a copy would): the
    // half-done state is refused, the complete one loaded.
    fs::copy(data("server-rotated.crt"), certs.path().join("tls.crt")).unwrap();
    let _ = served_serial(webhook.addr);
    fs::copy(data("server-rotated.key"), certs.path().join("tls.key")).unwrap();
    poll("the rewritten certificate", Duration::from_secs(20), || {
        (served_serial(webhook.addr) == "serial=1003").then_some(())
    });
    assert_eq!(get(&mut established, "/healthz").unwrap().0, 200);
    webhook.assert_healthy();
}

#[test]
fn hostile_input_gets_its_status_and_the_server_keeps_answering() {
    let certs = TempDir::with_certs("server.crt", "server.key");
    let webhook = Webhook::start(certs.path(), &["--header-timeout", "1s"]);
    let review_url = webhook.url("/webhook/pod-apiserver-env");
    let admission = data("admission.json");
    let at_admission = format!("@{}", admission.display());
    let json = "Content-Type: application/json";
    let nope_url = webhook.url("/nope");

    let big = TempDir::new();
    let big_file = big.path().join("big.json");
    fs::write(&big_file, vec![b' '; 3 * 1024 * 1024 + 1]).unwrap();
    let at_big = format!("@{}", big_file.display());
    let cases: Vec<(u16, Vec<&str>)> = vec![
        (413, vec!["-H", json, "--data-binary", &at_big, &review_url]),
        (
            413,
            vec![
                "-H",
                json,
                "-H",
                "Expect:",
                "--data-binary",
                &at_big,
                &review_url,
            ],
        ),
        (
            415,
            vec![
                "-H",
                "Content-Type: text/plain",
                "--data-binary",
                &at_admission,
                &review_url,
            ],
        ),
        (415, vec!["--data-binary", &at_admission, &review_url]),
        (
            200,
            vec![
                "-H",
                "Content-Type: application/json; charset=utf-8",
                "--data-binary",
                &at_admission,
                &review_url,
            ],
        ),
        (405, vec![&review_url]),
        (
            405,
            vec![
                "-X",
                "PUT",
                "-H",
                json,
                "--data-binary",
                &at_admission,
                &review_url,
            ],
        ),
        (405, vec!["-X", "DELETE", &review_url]),
        (
            404,
            vec!["-H", json, "--data-binary", &at_admission, &nope_url],
        ),
        (
            400,
            vec!["-H", json, "--data-binary", "{\"apiVersion\":", &review_url],
        ),
        (
            400,
            vec![
                "-H",
                json,
                "--data-binary",
                "{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}",
                &review_url,
            ],
        ),
        (
            400,
            vec!["-H", json, "--data-binary", "[1,2,3]", &review_url],
        ),
        (
            400,
            vec!["-H", json, "--data-binary", "\u{1}\u{2}", &review_url],
        ),
    ];
    for (expected, args) in cases {
        let (code, body) = webhook.request(&args);
        assert_eq!(code, expected, "{args:?}: {body}");
        if expected == 400 {
            let reason: Value =
                serde_json::from_str(&body).unwrap_or_else(|_| panic!("JSON reason: {body}"));
            assert!(reason["error"].is_string(), "{body}");
        }
        webhook.assert_healthy();
    }

    // Headers: too many, too large.
    let many: Vec<String> = (0..101).map(|i| format!("X-H{i}: v")).collect();
    let mut args: Vec<&str> = many.iter().flat_map(|h| ["-H", h.as_str()]).collect();
    let healthz = webhook.url("/healthz");
    args.push(&healthz);
    assert_eq!(webhook.request(&args).0, 431);
    let huge = format!("X-Big: {}", "a".repeat(70 * 1024));
    assert_eq!(webhook.request(&["-H", &huge, &healthz]).0, 431);

    // Slowloris: a head that never completes gets 408 and a close.
    let mut slow = tls_connect(webhook.addr, None).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        .unwrap();
    slow.flush().unwrap();
    let started = Instant::now();
    let (code, _) = read_response(&mut slow).unwrap();
    assert_eq!(code, 408);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(closed_within(&mut slow, Duration::from_secs(10)));
    // A TCP connection that never starts TLS is closed too.
    let mut silent = TcpStream::connect(webhook.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(10)));
    // Plain HTTP and garbage on the TLS port.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"\x16\x03\x01\xff\xff",
        b"\0\0\0\0\0\0\0\0",
    ] {
        let mut s = TcpStream::connect(webhook.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let _ = s.write_all(junk);
        assert!(closed_within(&mut s, Duration::from_secs(10)));
    }
    // Random bytes after a good handshake.
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..30 {
        let mut s = tls_connect(webhook.addr, None).unwrap();
        let junk: Vec<u8> = (0..512)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect();
        let _ = s.write_all(&junk);
        let _ = s.write_all(b"\r\n\r\n");
        let _ = s.flush();
        let _ = read_response(&mut s);
    }
    webhook.assert_healthy();
    let (status, log) = webhook.terminate();
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn connections_beyond_the_cap_are_refused_and_slots_come_back() {
    let certs = TempDir::with_certs("server.crt", "server.key");
    let webhook = Webhook::start(certs.path(), &["--max-connections", "3"]);
    let mut held: Vec<TlsStream> = (0..3)
        .map(|_| {
            let mut s = tls_connect(webhook.addr, None).unwrap();
            assert_eq!(get(&mut s, "/healthz").unwrap().0, 200);
            s
        })
        .collect();
    // Refused with a 503 after the handshake (or closed, past the few
    // refusal threads).
    let fourth = tls_connect(webhook.addr, None).and_then(|mut s| get(&mut s, "/healthz"));
    assert!(
        matches!(&fourth, Ok((503, _)) | Err(_)),
        "a fourth connection was served: {fourth:?}"
    );
    for s in &mut held {
        assert_eq!(get(s, "/healthz").unwrap().0, 200);
    }
    drop(held.pop());
    poll("a freed slot", Duration::from_secs(20), || {
        tls_connect(webhook.addr, None)
            .and_then(|mut s| get(&mut s, "/healthz"))
            .ok()
    });
    poll(
        "the refusal in the metrics",
        Duration::from_secs(20),
        || {
            let refused = webhook
                .metric("apiserver_proxy_webhook_requests_total{path=\"none\",code=\"503\"}");
            (refused >= 1.0).then_some(())
        },
    );
}

#[test]
fn sigterm_finishes_requests_in_flight_then_exits_0() {
    let certs = TempDir::with_certs("server.crt", "server.key");
    let webhook = Webhook::start(certs.path(), &[]);
    let body = fs::read(data("admission.json")).unwrap();
    let mut idle = tls_connect(webhook.addr, None).unwrap();
    assert_eq!(get(&mut idle, "/healthz").unwrap().0, 200);
    let mut in_flight = tls_connect(webhook.addr, None).unwrap();
    let head = format!(
        "POST /webhook/pod-apiserver-env HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    in_flight.write_all(head.as_bytes()).unwrap();
    in_flight.write_all(&body[..100]).unwrap();
    in_flight.flush().unwrap();
    // Wait until the server has the head (the debug log shows nothing per
    // head, so wait for the request to be visibly pending: a second
    // connection's request completes, proving the server is live).
    webhook.assert_healthy();
    webhook.child.signal("TERM");
    poll("the shutdown to start", Duration::from_secs(20), || {
        webhook.log().contains("received SIGTERM").then_some(())
    });
    // The idle keep-alive connection is closed.
    assert!(closed_within(&mut idle, Duration::from_secs(20)));
    in_flight.write_all(&body[100..]).unwrap();
    in_flight.flush().unwrap();
    let (code, text) = read_response(&mut in_flight).unwrap();
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("Connection: close"), "{text}");
    assert!(text.contains("JSONPatch"), "{text}");
    let (status, log) = webhook.terminate_after_signal();
    assert_eq!(status.code(), Some(0), "{log}");
}

impl Webhook {
    fn terminate_after_signal(mut self) -> (std::process::ExitStatus, String) {
        let out = self.child.wait_output(Duration::from_secs(30));
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        (out.status, self.log())
    }
}

#[test]
fn help_and_bad_flags() {
    let out = common::run(BIN, &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Usage:"));
    for flag in [
        "--apiserver-fqdn",
        "--cert-dir",
        "--cert-name",
        "--key-name",
        "--client-ca-name",
        "--host",
        "--port",
        "-v",
    ] {
        assert!(help.contains(flag), "--help does not list {flag}");
    }
    let dir = data("");
    let dir = dir.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "--apiserver-fqdn is required"),
        (
            vec!["--apiserver-fqdn", "foo.bar."],
            "--cert-dir is required",
        ),
        (
            vec!["--apiserver-fqdn", "foo_bar", "--cert-dir", dir],
            "invalid value \"foo_bar\" for --apiserver-fqdn",
        ),
        (
            vec!["--apiserver-fqdn", "foo.bar.", "--cert-dir", "/nonexistent"],
            "reading certificate /nonexistent/tls.crt",
        ),
        (
            vec![
                "--apiserver-fqdn",
                "foo.bar.",
                "--cert-dir",
                dir,
                "--cert-name",
                "server.crt",
                "--key-name",
                "server-ec.key",
            ],
            "do not form a usable pair",
        ),
        (
            vec![
                "--apiserver-fqdn",
                "foo.bar.",
                "--cert-dir",
                dir,
                "--cert-name",
                "ca.key",
                "--key-name",
                "server.key",
            ],
            "reading certificate",
        ),
        (
            vec![
                "--apiserver-fqdn",
                "foo.bar.",
                "--cert-dir",
                dir,
                "--cert-name",
                "server.crt",
                "--key-name",
                "server.key",
                "--port",
                "x",
            ],
            "--port",
        ),
        (
            vec!["--apiserver-fqdn", "foo.bar.", "--bogus"],
            "unknown flag --bogus",
        ),
    ];
    for (args, expected) in cases {
        let out = common::run(BIN, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("Run '")).collect();
        assert_eq!(
            errors.len(),
            1,
            "{args:?}: one error line expected: {stderr}"
        );
        assert!(errors[0].contains(expected), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}
