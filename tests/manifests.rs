//! The Kubernetes manifests in examples/kubernetes, as shipped.
//!
//! 1. Schemas: every YAML document in examples/kubernetes/*.yaml is checked
//!    by tests/validate_manifests.py against the strict Kubernetes OpenAPI
//!    schemas of every Kubernetes version the `kubernetes-validate` package
//!    (PyPI) ships. The schemas are files inside that package, so this needs
//!    no network; to make sure of it the validator runs under `unshare -n`,
//!    in a fresh network namespace with no interface up. Those schemas cover
//!    only the built-in API: cert-manager's Issuer and Certificate (CRDs) and
//!    kube-apiserver's EgressSelectorConfiguration (a config file, not an API
//!    object) are checked here instead, field by field, for what their
//!    consumers require (see `check_unschematized`).
//! 2. Flags: every flag a container passes to one of our binaries appears in
//!    that binary's `--help` (the long flags and the klog-compatible logging
//!    flags it lists) and is not among those it lists as refused. The binary
//!    is found from the image name, and `command`, when set, must be the
//!    path the image ships it at (Dockerfile.scratch: `/<binary>`).
//! 3. Fit: the pieces refer to each other correctly (probe ports and flags,
//!    mounted paths and Secrets, the webhook's Service and CA injection, the
//!    socket shared by the proxy-server and the EgressSelectorConfiguration,
//!    the agent's port and the server's) and keep the security choices the
//!    files explain.
//!
//! Needs APISERVER_PROXY_PYTHON (a venv with kubernetes-validate and pyyaml),
//! which `make integration` provides, and root for `unshare -n`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// Our binaries, by name, as `CARGO_BIN_EXE_*` builds them (debug).
const BINARIES: &[(&str, &str)] = &[
    (
        "apiserver-proxy-sidecar",
        env!("CARGO_BIN_EXE_apiserver-proxy-sidecar"),
    ),
    (
        "apiserver-proxy-pod-webhook",
        env!("CARGO_BIN_EXE_apiserver-proxy-pod-webhook"),
    ),
    ("proxy-server", env!("CARGO_BIN_EXE_proxy-server")),
    ("proxy-agent", env!("CARGO_BIN_EXE_proxy-agent")),
    ("proxy-test-client", env!("CARGO_BIN_EXE_proxy-test-client")),
    ("http-test-server", env!("CARGO_BIN_EXE_http-test-server")),
];

/// The files the README's install section walks through.
const EXPECTED_FILES: &[&str] = &[
    "sidecar.yaml",
    "webhook.yaml",
    "konnectivity-server.yaml",
    "konnectivity-agent.yaml",
    "egress-selector-configuration.yaml",
    "egress-selector-configuration-http-connect.yaml",
];

const INJECT_LABEL: &str = "apiserver-proxy.networking.gardener.cloud/inject";

fn manifest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kubernetes")
}

fn python() -> String {
    std::env::var("APISERVER_PROXY_PYTHON").expect(
        "APISERVER_PROXY_PYTHON is not set: run the suite with `make integration`, \
         which creates the venv with kubernetes-validate first",
    )
}

/// One YAML document and what the schemas said about it, per version.
struct Doc {
    file: String,
    index: u64,
    object: Value,
    schema: BTreeMap<String, String>,
}

impl Doc {
    fn kind(&self) -> &str {
        self.object["kind"].as_str().unwrap_or("")
    }
    fn api_version(&self) -> &str {
        self.object["apiVersion"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or("")
    }
    fn namespace(&self) -> &str {
        self.object["metadata"]["namespace"].as_str().unwrap_or("")
    }
    fn describe(&self) -> String {
        format!(
            "{} #{} ({} {})",
            self.file,
            self.index,
            self.kind(),
            self.name()
        )
    }
    /// The pod spec of a Pod or of a workload's template.
    fn pod_spec(&self) -> Option<&Value> {
        match self.kind() {
            "Pod" => self.object.get("spec"),
            "Deployment" | "DaemonSet" | "StatefulSet" | "Job" | "ReplicaSet" => {
                self.object.pointer("/spec/template/spec")
            }
            _ => None,
        }
    }
}

/// Runs the validator over `files` in a network namespace without network.
fn validate(files: &[PathBuf]) -> (Vec<String>, Vec<Doc>) {
    let out = Command::new("unshare")
        .arg("--net")
        .arg(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/validate_manifests.py"))
        .args(files)
        .output()
        .expect("run unshare (util-linux)");
    assert!(
        out.status.success(),
        "validate_manifests.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("validator prints JSON");
    let versions: Vec<String> = report["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v.as_str().expect("version string").to_string())
        .collect();
    let docs = report["documents"]
        .as_array()
        .expect("documents")
        .iter()
        .map(|d| Doc {
            file: Path::new(d["file"].as_str().expect("file"))
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            index: d["index"].as_u64().expect("index"),
            object: d["object"].clone(),
            schema: d["schema"]
                .as_object()
                .expect("schema results")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect(),
        })
        .collect();
    (versions, docs)
}

/// examples/kubernetes/*.yaml, validated once for all tests in this file.
fn manifests() -> &'static (Vec<String>, Vec<Doc>) {
    static MANIFESTS: OnceLock<(Vec<String>, Vec<Doc>)> = OnceLock::new();
    MANIFESTS.get_or_init(|| {
        let mut files: Vec<PathBuf> = std::fs::read_dir(manifest_dir())
            .expect("examples/kubernetes")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        validate(&files)
    })
}

fn docs() -> &'static [Doc] {
    &manifests().1
}

fn find(file: &str, kind: &str) -> &'static Doc {
    let mut found = docs().iter().filter(|d| d.file == file && d.kind() == kind);
    let doc = found
        .next()
        .unwrap_or_else(|| panic!("{file} has no {kind}"));
    assert!(found.next().is_none(), "{file} has more than one {kind}");
    doc
}

/// A JSON pointer that must resolve.
fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("{pointer} missing in {value}"))
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    at(value, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string in {value}"))
}

fn items<'a>(value: &'a Value, pointer: &str) -> &'a [Value] {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn strings(value: &Value, pointer: &str) -> Vec<String> {
    items(value, pointer)
        .iter()
        .map(|v| v.as_str().expect("string item").to_string())
        .collect()
}

/// Every container and init container of a pod spec.
fn containers(spec: &Value) -> Vec<&Value> {
    items(spec, "/initContainers")
        .iter()
        .chain(items(spec, "/containers"))
        .collect()
}

fn container<'a>(spec: &'a Value, name: &str) -> &'a Value {
    containers(spec)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// Our binary in a container: the last path segment of the image's
/// repository (registry.example.com/apiserver-proxy/proxy-server:0.1.0).
fn binary_of(container: &Value) -> &str {
    let image = text(container, "/image");
    let repository = image.split('@').next().unwrap();
    let last = repository.rsplit('/').next().unwrap();
    last.split(':').next().unwrap()
}

/// The flags a container passes: `command[1..]` (when set) and `args`, as
/// (flag with its dashes, value) pairs. The manifests write every flag as
/// `--name=value` or a bare boolean `--name`, so each item stands alone.
fn flags_of(container: &Value) -> Vec<(String, Option<String>)> {
    let command = strings(container, "/command");
    let args = strings(container, "/args");
    command
        .iter()
        .skip(1)
        .chain(args.iter())
        .map(|arg| {
            assert!(
                arg.starts_with('-'),
                "{arg:?} in {} is not a --flag or --flag=value item",
                container["name"]
            );
            match arg.split_once('=') {
                Some((name, value)) => (name.to_string(), Some(value.to_string())),
                None => (arg.clone(), None),
            }
        })
        .collect()
}

fn flag<'a>(flags: &'a [(String, Option<String>)], name: &str) -> Option<&'a str> {
    flags
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_deref().unwrap_or("true"))
}

fn required_flag(container: &Value, name: &str) -> String {
    let flags = flags_of(container);
    flag(&flags, name)
        .unwrap_or_else(|| panic!("{} has no {name}", container["name"]))
        .to_string()
}

/// The flags a binary's `--help` lists, split into accepted and refused.
struct HelpFlags {
    accepted: BTreeSet<String>,
    refused: BTreeSet<String>,
    /// The logging section's flags, which take `_` and `-` alike.
    logging: BTreeSet<String>,
}

impl HelpFlags {
    fn of(program: &str) -> Self {
        let out = common::run(program, &["--help"]);
        assert!(out.status.success(), "{program} --help failed");
        Self::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// The help's "Not supported ..." paragraph (up to the line ending its
    /// sentence) lists refused flags; every other `-x`/`--name` token is an
    /// accepted flag.
    fn parse(help: &str) -> Self {
        let mut accepted = BTreeSet::new();
        let mut refused = BTreeSet::new();
        let mut logging = BTreeSet::new();
        let mut in_refused = false;
        let mut in_logging = false;
        for line in help.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with("Not supported") {
                in_refused = true;
            }
            if trimmed.starts_with("Logging") {
                in_logging = true;
            }
            for name in flag_tokens(line) {
                if in_refused {
                    refused.insert(name);
                } else {
                    if in_logging {
                        logging.insert(name.clone());
                    }
                    accepted.insert(name);
                }
            }
            if in_refused && trimmed.ends_with('.') {
                in_refused = false;
            }
        }
        HelpFlags {
            accepted,
            refused,
            logging,
        }
    }

    fn accepts(&self, flag: &str) -> bool {
        if self.refused.contains(flag) {
            return false;
        }
        if self.accepted.contains(flag) {
            return true;
        }
        // klog's flags are spelt with underscores; the help says dashes work too.
        let (dashes, name) = flag.split_at(flag.len() - flag.trim_start_matches('-').len());
        let swapped = |from, to| format!("{dashes}{}", name.replace(from, to));
        self.logging.contains(&swapped('-', "_")) || self.logging.contains(&swapped('_', "-"))
    }
}

/// `-v` and `--name` tokens in a help line (ignoring `[=BOOL]`, values and
/// punctuation around them).
fn flag_tokens(line: &str) -> Vec<String> {
    line.split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == '"')
        .filter_map(|word| {
            let token: String = word
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            let name = token.trim_start_matches('-');
            let dashes = token.len() - name.len();
            let valid = match dashes {
                1 => name.len() == 1 && name.chars().all(|c| c.is_ascii_alphabetic()),
                2 => name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric()),
                _ => false,
            };
            valid.then_some(token)
        })
        .collect()
}

fn help_of(binary: &str) -> &'static HelpFlags {
    static HELP: OnceLock<BTreeMap<&'static str, HelpFlags>> = OnceLock::new();
    let all = HELP.get_or_init(|| {
        BINARIES
            .iter()
            .map(|(name, path)| (*name, HelpFlags::of(path)))
            .collect()
    });
    all.get(binary)
        .unwrap_or_else(|| panic!("{binary} is not one of our binaries"))
}

// --- 1. schemas ---------------------------------------------------------------

#[test]
fn every_document_validates_for_every_kubernetes_version_offline() {
    let (versions, docs) = manifests();
    assert!(
        versions.len() >= 5,
        "kubernetes-validate ships too few versions: {versions:?}"
    );
    let files: BTreeSet<&str> = docs.iter().map(|d| d.file.as_str()).collect();
    for expected in EXPECTED_FILES {
        assert!(files.contains(expected), "{expected} is missing: {files:?}");
    }
    let mut unschematized = BTreeSet::new();
    for doc in docs {
        let results: BTreeSet<&str> = doc.schema.values().map(String::as_str).collect();
        if results == BTreeSet::from(["valid"]) {
            assert_eq!(doc.schema.len(), versions.len(), "{}", doc.describe());
            continue;
        }
        if results == BTreeSet::from(["no schema"]) {
            check_unschematized(doc);
            unschematized.insert((doc.api_version().to_string(), doc.kind().to_string()));
            continue;
        }
        let failures: Vec<String> = doc
            .schema
            .iter()
            .filter(|(_, r)| *r != "valid")
            .map(|(v, r)| format!("  {v}: {r}"))
            .collect();
        panic!("{} is not valid:\n{}", doc.describe(), failures.join("\n"));
    }
    // The built-in kinds were validated, not skipped: only these lack schemas.
    let expected: BTreeSet<(String, String)> = [
        ("cert-manager.io/v1", "Issuer"),
        ("cert-manager.io/v1", "Certificate"),
        ("apiserver.k8s.io/v1beta1", "EgressSelectorConfiguration"),
    ]
    .iter()
    .map(|(a, k)| (a.to_string(), k.to_string()))
    .collect();
    assert_eq!(unschematized, expected);
}

/// The validator refuses what it should: a misspelt field, a value of the
/// wrong type, a missing required field.
#[test]
fn the_validator_catches_broken_manifests() {
    let dir = std::env::temp_dir().join(common::unique("manifests-"));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveOnDrop(dir.clone());
    let sidecar = std::fs::read_to_string(manifest_dir().join("sidecar.yaml")).unwrap();
    let cases = [
        (
            "typo.yaml",
            sidecar.replacen("readOnlyRootFilesystem", "readOnlyRootFileSystem", 1),
            "readOnlyRootFileSystem",
        ),
        (
            "type.yaml",
            sidecar.replacen("periodSeconds: 20", "periodSeconds: twenty", 1),
            "periodSeconds",
        ),
        (
            "missing.yaml",
            sidecar.replacen("- name: sidecar\n", "- \n", 1),
            "name",
        ),
    ];
    let mut files = Vec::new();
    for (name, content, _) in &cases {
        assert_ne!(content, &sidecar, "{name}: the edit did not apply");
        std::fs::write(dir.join(name), content).unwrap();
        files.push(dir.join(name));
    }
    let (versions, docs) = validate(&files);
    assert_eq!(docs.len(), cases.len());
    for ((name, _, needle), doc) in cases.iter().zip(docs) {
        let latest = &doc.schema[versions.last().unwrap()];
        assert!(
            latest.starts_with("invalid") && latest.contains(needle),
            "{name}: {latest}"
        );
    }
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the schemas do not cover, checked for what its consumer requires:
/// cert-manager's CRD validation for Issuer and Certificate, and
/// kube-apiserver's loader for EgressSelectorConfiguration
/// (k8s.io/apiserver/pkg/apis/apiserver/validation: a known selection name,
/// a known protocol, exactly one transport, GRPC only over a Unix socket).
fn check_unschematized(doc: &Doc) {
    let o = &doc.object;
    let what = doc.describe();
    match (doc.api_version(), doc.kind()) {
        ("cert-manager.io/v1", "Issuer") => {
            assert!(
                !doc.name().is_empty() && !doc.namespace().is_empty(),
                "{what}"
            );
            let spec = at(o, "/spec").as_object().expect("spec");
            let types = ["selfSigned", "ca", "acme", "vault", "venafi"];
            let set: Vec<&String> = spec
                .keys()
                .filter(|k| types.contains(&k.as_str()))
                .collect();
            assert_eq!(set.len(), 1, "{what}: exactly one issuer type");
            if let Some(ca) = spec.get("ca") {
                assert!(ca["secretName"].is_string(), "{what}: ca.secretName");
            }
        }
        ("cert-manager.io/v1", "Certificate") => {
            assert!(
                !doc.name().is_empty() && !doc.namespace().is_empty(),
                "{what}"
            );
            assert!(!text(o, "/spec/secretName").is_empty(), "{what}");
            let kind = o
                .pointer("/spec/issuerRef/kind")
                .and_then(Value::as_str)
                .unwrap_or("Issuer");
            let issuer = text(o, "/spec/issuerRef/name");
            assert!(["Issuer", "ClusterIssuer"].contains(&kind), "{what}");
            if kind == "Issuer" {
                assert!(
                    docs().iter().any(|d| d.kind() == "Issuer"
                        && d.name() == issuer
                        && d.namespace() == doc.namespace()),
                    "{what}: issuer {issuer} is not defined in {}",
                    doc.namespace()
                );
            }
            let dns = strings(o, "/spec/dnsNames");
            assert!(!dns.is_empty(), "{what}: dnsNames");
            if let Some(algorithm) = o.pointer("/spec/privateKey/algorithm") {
                // Key forms the webhook reads (cert-manager's Ed25519 is not one).
                assert!(
                    algorithm == "RSA" || algorithm == "ECDSA",
                    "{what}: {algorithm}"
                );
            }
        }
        ("apiserver.k8s.io/v1beta1", "EgressSelectorConfiguration") => {
            let keys: BTreeSet<&str> = o.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            assert_eq!(
                keys,
                BTreeSet::from(["apiVersion", "kind", "egressSelections"]),
                "{what}: unknown top-level fields"
            );
            let selections = items(o, "/egressSelections");
            assert!(!selections.is_empty(), "{what}");
            let mut names = BTreeSet::new();
            for selection in selections {
                let name = text(selection, "/name");
                assert!(
                    ["cluster", "controlplane", "etcd"].contains(&name),
                    "{what}: selection {name}"
                );
                assert!(names.insert(name), "{what}: {name} twice");
                let protocol = text(selection, "/connection/proxyProtocol");
                assert!(
                    ["GRPC", "HTTPConnect", "Direct"].contains(&protocol),
                    "{what}: proxyProtocol {protocol}"
                );
                if protocol == "Direct" {
                    continue;
                }
                let transport = at(selection, "/connection/transport")
                    .as_object()
                    .expect("transport");
                assert_eq!(transport.len(), 1, "{what}: exactly one of uds, tcp");
                match transport.iter().next().unwrap() {
                    (kind, uds) if kind == "uds" => {
                        let path = text(uds, "/udsName");
                        assert!(path.starts_with('/'), "{what}: udsName {path}");
                    }
                    (kind, tcp) if kind == "tcp" => {
                        assert_ne!(protocol, "GRPC", "{what}: GRPC needs uds");
                        assert!(text(tcp, "/url").starts_with("https://"), "{what}");
                    }
                    (kind, _) => panic!("{what}: transport {kind}"),
                }
            }
        }
        _ => panic!(
            "{what}: no schema for {} {} and no check here",
            doc.api_version(),
            doc.kind()
        ),
    }
}

// --- 2. flags -----------------------------------------------------------------

/// The help parser itself: refused flags are told from accepted ones, and
/// the klog flags are known in both spellings.
#[test]
fn help_parsing_tells_accepted_from_refused_flags() {
    let server = help_of("proxy-server");
    for refused in [
        "--agent-namespace",
        "--agent-service-account",
        "--authentication-audience",
        "--kubeconfig",
        "--enable-lease-controller",
    ] {
        assert!(!server.accepts(refused), "proxy-server accepts {refused}");
    }
    for accepted in [
        "--uds-name",
        "--mode",
        "--cluster-ca-cert",
        "--kubeconfig-qps",
        "--logtostderr",
        "--log_dir",
        "--log-dir",
        "--v",
        "-v",
    ] {
        assert!(server.accepts(accepted), "proxy-server refuses {accepted}");
    }
    let agent = help_of("proxy-agent");
    assert!(agent.accepts("--kubeconfig"), "accepted by the agent");
    assert!(!agent.accepts("--count-server-leases"));
    assert!(!agent.accepts("--no-such-flag"));
    let sidecar = help_of("apiserver-proxy-sidecar");
    assert!(sidecar.accepts("--daemon") && sidecar.accepts("--health-port"));
    assert!(!sidecar.accepts("--uds-name"));
}

#[test]
fn every_flag_in_the_manifests_is_one_the_binary_accepts() {
    let mut checked = BTreeSet::new();
    for doc in docs() {
        let Some(spec) = doc.pod_spec() else {
            continue;
        };
        for container in containers(spec) {
            let what = format!("{} container {}", doc.describe(), container["name"]);
            let binary = binary_of(container);
            let help = help_of(binary);
            let command = strings(container, "/command");
            if let Some(first) = command.first() {
                assert_eq!(
                    first,
                    &format!("/{binary}"),
                    "{what}: the image ships {binary} at /{binary}"
                );
            }
            let flags = flags_of(container);
            assert!(!flags.is_empty(), "{what}: no flags");
            for (name, _) in &flags {
                assert!(
                    help.accepts(name),
                    "{what}: {binary} does not accept {name}"
                );
            }
            // $(VAR) in an argument is expanded by the kubelet only when the
            // container defines VAR; otherwise it stays literal.
            let env: BTreeSet<&str> = items(container, "/env")
                .iter()
                .map(|e| e["name"].as_str().unwrap())
                .collect();
            for (name, value) in &flags {
                let mut rest = value.as_deref().unwrap_or("");
                while let Some(start) = rest.find("$(") {
                    let end = rest[start..].find(')').expect("closing )") + start;
                    let var = &rest[start + 2..end];
                    assert!(env.contains(var), "{what}: {name} uses undefined $({var})");
                    rest = &rest[end..];
                }
            }
            checked.insert(binary.to_string());
        }
    }
    let expected: BTreeSet<String> = [
        "apiserver-proxy-sidecar",
        "apiserver-proxy-pod-webhook",
        "proxy-server",
        "proxy-agent",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(checked, expected, "binaries with manifests");
}

// --- 3. fit -------------------------------------------------------------------

fn security_context(container: &Value) -> &Value {
    at(container, "/securityContext")
}

/// Hardening every container keeps: no privilege escalation, a read-only
/// root, every capability dropped (then at most `added` given back).
fn assert_hardened(what: &str, container: &Value, added: &[&str]) {
    let sc = security_context(container);
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(strings(sc, "/capabilities/drop"), ["ALL"], "{what}");
    assert_eq!(strings(sc, "/capabilities/add"), added, "{what}");
}

/// The pod runs as the image's non-root user 65532.
fn assert_non_root(what: &str, spec: &Value) {
    let sc = at(spec, "/securityContext");
    assert_eq!(sc["runAsNonRoot"], true, "{what}");
    assert_eq!(sc["runAsUser"], 65532, "{what}");
    for c in containers(spec) {
        assert!(c.pointer("/securityContext/runAsUser").is_none(), "{what}");
    }
}

fn probe_port(container: &Value, probe: &str, path: &str) -> u64 {
    let get = at(container, &format!("/{probe}/httpGet"));
    assert_eq!(text(get, "/path"), path, "{probe}");
    get["port"].as_u64().expect("numeric probe port")
}

/// The volume mounted at the directory holding `path`, and its definition.
fn volume_for<'a>(spec: &'a Value, container: &Value, path: &str) -> &'a Value {
    let mount = items(container, "/volumeMounts")
        .iter()
        .filter(|m| {
            let dir = text(m, "/mountPath");
            path == dir || path.starts_with(&format!("{dir}/"))
        })
        .max_by_key(|m| text(m, "/mountPath").len())
        .unwrap_or_else(|| panic!("{path} is on no mounted volume"));
    let name = text(mount, "/name");
    items(spec, "/volumes")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("volume {name} is not defined"))
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .expect("matchLabels")
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn sidecar_pins_addresses_with_only_net_admin() {
    let ds = find("sidecar.yaml", "DaemonSet");
    let spec = ds.pod_spec().unwrap();
    assert_eq!(ds.namespace(), "kube-system");
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert!(
        items(spec, "/tolerations")
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "tolerates every taint"
    );
    let init = items(spec, "/initContainers");
    assert_eq!(init.len(), 1);
    assert_eq!(required_flag(&init[0], "--daemon"), "false");
    let main = container(spec, "sidecar");
    assert_ne!(flag(&flags_of(main), "--daemon"), Some("false"));
    // The same addresses in both.
    for name in [
        "--ip-address",
        "--kubernetes-service-ip-address",
        "--interface",
    ] {
        assert_eq!(required_flag(&init[0], name), required_flag(main, name));
    }
    let health: u64 = required_flag(main, "--health-port").parse().unwrap();
    assert_eq!(probe_port(main, "livenessProbe", "/healthz"), health);
    // A scratch image has no iptables binary.
    assert!(flag(&flags_of(main), "--setup-iptables").is_none());
    for c in containers(spec) {
        assert_hardened("sidecar", c, &["NET_ADMIN"]);
        assert_eq!(security_context(c)["runAsUser"], 0, "see the comment");
    }
    assert!(labels_match(
        at(&ds.object, "/spec/selector/matchLabels"),
        at(&ds.object, "/spec/template/metadata/labels")
    ));
}

#[test]
fn webhook_is_registered_reachable_and_opt_out() {
    let deployment = find("webhook.yaml", "Deployment");
    let service = find("webhook.yaml", "Service");
    let certificate = find("webhook.yaml", "Certificate");
    let config = find("webhook.yaml", "MutatingWebhookConfiguration");
    let spec = deployment.pod_spec().unwrap();
    let webhook = container(spec, "webhook");
    assert_non_root("webhook", spec);
    assert_hardened("webhook", webhook, &[]);

    let hooks = items(&config.object, "/webhooks");
    assert_eq!(hooks.len(), 1);
    let hook = &hooks[0];
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["timeoutSeconds"], 2);
    assert_eq!(strings(hook, "/admissionReviewVersions"), ["v1", "v1beta1"]);
    let rules = items(hook, "/rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(strings(&rules[0], "/operations"), ["CREATE"]);
    assert_eq!(strings(&rules[0], "/resources"), ["pods"]);
    assert_eq!(strings(&rules[0], "/apiGroups"), [""]);
    for selector in ["/namespaceSelector", "/objectSelector"] {
        let expressions = items(hook, &format!("{selector}/matchExpressions"));
        assert_eq!(expressions.len(), 1, "{selector}");
        assert_eq!(expressions[0]["key"], INJECT_LABEL, "{selector}");
        assert_eq!(expressions[0]["operator"], "NotIn", "{selector}");
        assert_eq!(
            strings(&expressions[0], "/values"),
            ["disable"],
            "{selector}"
        );
    }

    // clientConfig -> Service -> container port -> --port, probes.
    let target = at(hook, "/clientConfig/service");
    assert_eq!(text(target, "/path"), "/webhook/pod-apiserver-env");
    assert_eq!(text(target, "/name"), service.name());
    assert_eq!(text(target, "/namespace"), service.namespace());
    let port = target.get("port").and_then(Value::as_u64).unwrap_or(443);
    let service_port = items(&service.object, "/spec/ports")
        .iter()
        .find(|p| p["port"] == port)
        .unwrap_or_else(|| panic!("the Service has no port {port}"));
    let listen: u64 = required_flag(webhook, "--port").parse().unwrap();
    let container_port = items(webhook, "/ports")
        .iter()
        .find(|p| {
            p["name"] == service_port["targetPort"]
                || p["containerPort"] == service_port["targetPort"]
        })
        .expect("the Service's targetPort is a container port");
    assert_eq!(container_port["containerPort"], listen);
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(probe_port(webhook, probe, path), listen);
        assert_eq!(text(webhook, &format!("/{probe}/httpGet/scheme")), "HTTPS");
    }
    assert!(labels_match(
        at(&service.object, "/spec/selector"),
        at(&deployment.object, "/spec/template/metadata/labels")
    ));
    assert!(labels_match(
        at(&deployment.object, "/spec/selector/matchLabels"),
        at(&deployment.object, "/spec/template/metadata/labels")
    ));

    // The certificate: written to the Secret mounted at --cert-dir, named for
    // the Service, and injected as the CA bundle.
    let cert_dir = required_flag(webhook, "--cert-dir");
    let volume = volume_for(spec, webhook, &format!("{cert_dir}/tls.crt"));
    assert_eq!(
        text(volume, "/secret/secretName"),
        text(&certificate.object, "/spec/secretName")
    );
    let dns = strings(&certificate.object, "/spec/dnsNames");
    let service_dns = format!("{}.{}.svc", service.name(), service.namespace());
    assert!(dns.contains(&service_dns), "{dns:?} lacks {service_dns}");
    assert_eq!(
        text(
            &config.object,
            "/metadata/annotations/cert-manager.io~1inject-ca-from"
        ),
        format!("{}/{}", certificate.namespace(), certificate.name())
    );
}

#[test]
fn konnectivity_server_agent_and_egress_selector_agree() {
    let pod = find("konnectivity-server.yaml", "Pod");
    let spec = pod.pod_spec().unwrap();
    let server = container(spec, "konnectivity-server");
    assert_hardened("proxy-server", server, &[]);
    assert_eq!(spec["hostNetwork"], true);

    // The socket: the server's --uds-name, on a host directory, named in
    // both EgressSelectorConfigurations with the protocol of --mode.
    let uds = required_flag(server, "--uds-name");
    assert_eq!(required_flag(server, "--server-port"), "0");
    let volume = volume_for(spec, server, &uds);
    assert!(
        volume.get("hostPath").is_some(),
        "the socket is on the host"
    );
    let mode = required_flag(server, "--mode");
    for (file, protocol) in [
        ("egress-selector-configuration.yaml", "GRPC"),
        (
            "egress-selector-configuration-http-connect.yaml",
            "HTTPConnect",
        ),
    ] {
        let egress = find(file, "EgressSelectorConfiguration");
        let cluster = items(&egress.object, "/egressSelections")
            .iter()
            .find(|s| s["name"] == "cluster")
            .expect("a cluster selection");
        assert_eq!(
            text(cluster, "/connection/proxyProtocol"),
            protocol,
            "{file}"
        );
        assert_eq!(
            text(cluster, "/connection/transport/uds/udsName"),
            uds,
            "{file}"
        );
    }
    assert_eq!(mode, "grpc", "as shipped, with the GRPC file");

    // Agents authenticate with certificates (token flags are refused).
    for name in ["--cluster-cert", "--cluster-key", "--cluster-ca-cert"] {
        let path = required_flag(server, name);
        assert!(volume_for(spec, server, &path).get("hostPath").is_some());
    }
    let health: u64 = required_flag(server, "--health-port").parse().unwrap();
    assert_eq!(probe_port(server, "livenessProbe", "/healthz"), health);
    assert_eq!(probe_port(server, "readinessProbe", "/readyz"), health);

    // The agent dials the server's agent port with its certificate Secret.
    let ds = find("konnectivity-agent.yaml", "DaemonSet");
    let account = find("konnectivity-agent.yaml", "ServiceAccount");
    let agent_spec = ds.pod_spec().unwrap();
    let agent = container(agent_spec, "konnectivity-agent");
    assert_non_root("proxy-agent", agent_spec);
    assert_hardened("proxy-agent", agent, &[]);
    assert_eq!(text(agent_spec, "/serviceAccountName"), account.name());
    assert_eq!(
        required_flag(agent, "--proxy-server-port"),
        required_flag(server, "--agent-port")
    );
    let mut secrets = BTreeSet::new();
    for name in ["--ca-cert", "--agent-cert", "--agent-key"] {
        let path = required_flag(agent, name);
        secrets
            .insert(text(volume_for(agent_spec, agent, &path), "/secret/secretName").to_string());
    }
    assert_eq!(secrets.len(), 1, "one Secret holds the agent's files");
    let health: u64 = required_flag(agent, "--health-server-port")
        .parse()
        .unwrap();
    assert_eq!(probe_port(agent, "livenessProbe", "/healthz"), health);
    assert_eq!(probe_port(agent, "readinessProbe", "/readyz"), health);
    assert!(!required_flag(agent, "--agent-identifiers").is_empty());
    assert!(labels_match(
        at(&ds.object, "/spec/selector/matchLabels"),
        at(&ds.object, "/spec/template/metadata/labels")
    ));
}
