//! The admission decision: an AdmissionReview in, the answering review out.
//!
//! Owns: which pods get `KUBERNETES_SERVICE_HOST`, the RFC 6902 patch that
//! adds it, and the shape of the answer (`admission.k8s.io/v1` or
//! `v1beta1`, echoing the request's version and uid).
//! Must not: do I/O, log, or touch any field it does not patch. The review
//! is only read, never written back (the fast path scans the body with
//! `webhook::scan`, the reference reads an untyped `serde_json::Value`),
//! so fields this code does not know (new pod fields, extensions) cannot
//! be lost: the patch only adds.
//!
//! Two paths, one decision: [`review`] scans the body once and reads the
//! few fields it needs in place; [`review_value`] is the reference, and
//! [`review`] hands it every body the scan is unsure of. Both feed the same
//! `Patch` and `answer` code, so their answers are the same bytes (the
//! tests and fuzz/fuzz_targets/review.rs check it).

use std::fmt;

use serde_json::Value;
#[cfg(test)]
use serde_json::json;

use super::scan::{Scan, Scanner, Unsure};

/// The variable the webhook sets.
pub const VARIABLE: &str = "KUBERNETES_SERVICE_HOST";

/// The AdmissionReview versions this webhook speaks.
pub const API_VERSIONS: &[&str] = &["admission.k8s.io/v1", "admission.k8s.io/v1beta1"];

/// Why a request body is not a review we can answer (HTTP 400).
#[derive(Debug)]
pub enum Error {
    Json(serde_json::Error),
    NotAnObject,
    ApiVersion(String),
    Kind(String),
    MissingRequest,
    MissingUid,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Json(err) => write!(f, "malformed JSON: {err}"),
            Error::NotAnObject => f.write_str("the body is not a JSON object"),
            Error::ApiVersion(v) => write!(
                f,
                "unsupported apiVersion {v:?} (expected {})",
                API_VERSIONS.join(" or ")
            ),
            Error::Kind(k) => write!(f, "unsupported kind {k:?} (expected AdmissionReview)"),
            Error::MissingRequest => f.write_str("the review has no request"),
            Error::MissingUid => f.write_str("the review's request has no uid"),
        }
    }
}

impl std::error::Error for Error {}

/// The answer to one review, as the JSON text to send (written directly,
/// without building a `Value`: allocation is the main cost under load).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The complete AdmissionReview to send back.
    pub body: String,
    /// The RFC 6902 patch (before base64); empty when nothing changes.
    pub patch: String,
    /// How many operations (containers given the variable) the patch has.
    pub operations: usize,
}

impl Answer {
    /// The answer parsed back into a `Value` (for tests and tools).
    pub fn review(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The patch operations parsed back; empty when nothing changes.
    pub fn patch_ops(&self) -> Vec<Value> {
        serde_json::from_str(&self.patch).unwrap_or_default()
    }
}

/// Answers the review in `body` (JSON bytes) for the given FQDN.
///
/// The common case is read by one strict pass of `webhook::scan` that
/// validates the whole body and borrows the few fields the decision needs
/// (no `Value` is built). Whatever that pass is unsure of (invalid
/// JSON, odd types, duplicate keys, escapes in a field it reads) goes to
/// the untyped path, [`review_value`], which gives the same answer or the
/// precise error.
pub fn review(body: &[u8], fqdn: &str) -> Result<Answer, Error> {
    // The scan checks JSON syntax, not UTF-8; JSON text must be UTF-8.
    if let Ok(text) = std::str::from_utf8(body) {
        if let Ok(scanned) = scan_review(text) {
            return review_scanned(&scanned, fqdn);
        }
    }
    let review: Value = serde_json::from_slice(body).map_err(Error::Json)?;
    review_value(&review, fqdn)
}

/// What the decision needs to know about one container's `env`.
#[derive(Clone, Copy)]
enum Env {
    /// Absent or null.
    Missing,
    /// A list; whether one entry is named [`VARIABLE`].
    List { defined: bool },
    /// Anything else: the API server rejects such a pod anyway.
    Malformed,
}

/// Whether the request is a CREATE or UPDATE of a Pod itself (not of a
/// subresource such as `pods/status` or `pods/ephemeralcontainers`).
fn wants_patch(operation: &str, group: &str, kind: &str, sub_resource: &str) -> bool {
    matches!(operation, "CREATE" | "UPDATE")
        && kind == "Pod"
        && group.is_empty()
        && sub_resource.is_empty()
}

/// Appends `text` as a JSON string literal, escaped as serde_json
/// escapes it (quotes, backslashes and control characters; nothing else).
fn push_json_string(out: &mut String, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(text);
        out.push('"');
    } else {
        // Serialising a &str cannot fail.
        out.push_str(&serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_string()));
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut String, mut n: usize) {
    // A usize has at most 20 decimal digits.
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
}

/// The patch under construction, as JSON text (written piece by piece:
/// `format!` and its temporaries were most of the patch's cost).
struct Patch {
    text: String,
    operations: usize,
    /// `{"name":"KUBERNETES_SERVICE_HOST","value":<fqdn>}`
    variable: String,
}

impl Patch {
    fn new(fqdn: &str) -> Patch {
        let mut variable = String::with_capacity(48 + fqdn.len());
        variable.push_str("{\"name\":\"");
        variable.push_str(VARIABLE);
        variable.push_str("\",\"value\":");
        push_json_string(&mut variable, fqdn);
        variable.push('}');
        Patch {
            text: String::new(),
            operations: 0,
            variable,
        }
    }

    /// Adds the operation container `i` of `kind` (`initContainers` or
    /// `containers`) needs, if any.
    fn container(&mut self, kind: &str, i: usize, env: Env) {
        // A missing `env` is set to a list of one; a list gets an append.
        let append = match env {
            Env::Missing => false,
            Env::List { defined: false } => true,
            Env::List { defined: true } | Env::Malformed => return,
        };
        if self.operations == 0 {
            // Room for a few operations: one allocation for most pods.
            self.text.reserve(4 * (64 + self.variable.len()));
            self.text.push('[');
        } else {
            self.text.push(',');
        }
        self.text.push_str("{\"op\":\"add\",\"path\":\"/spec/");
        self.text.push_str(kind);
        self.text.push('/');
        push_decimal(&mut self.text, i);
        self.text.push_str(if append {
            "/env/-\",\"value\":"
        } else {
            "/env\",\"value\":["
        });
        self.text.push_str(&self.variable);
        if !append {
            self.text.push(']');
        }
        self.text.push('}');
        self.operations += 1;
    }
}

fn answer(api_version: &str, uid: &str, mut patch: Patch) -> Answer {
    let mut body = String::with_capacity(192 + patch.text.len() * 4 / 3);
    body.push_str("{\"apiVersion\":");
    push_json_string(&mut body, api_version);
    body.push_str(",\"kind\":\"AdmissionReview\",\"response\":{\"uid\":");
    push_json_string(&mut body, uid);
    body.push_str(",\"allowed\":true");
    if patch.operations > 0 {
        patch.text.push(']');
        body.push_str(",\"patchType\":\"JSONPatch\",\"patch\":\"");
        body.push_str(&base64(patch.text.as_bytes()));
        body.push('"');
    }
    body.push_str("}}");
    Answer {
        body,
        patch: patch.text,
        operations: patch.operations,
    }
}

fn check_envelope<'a>(api_version: Option<&'a str>, kind: Option<&str>) -> Result<&'a str, Error> {
    let api_version = api_version.unwrap_or("");
    if !API_VERSIONS.contains(&api_version) {
        return Err(Error::ApiVersion(api_version.to_string()));
    }
    let kind = kind.unwrap_or("");
    if kind != "AdmissionReview" {
        return Err(Error::Kind(kind.to_string()));
    }
    Ok(api_version)
}

fn text(value: Option<&Value>) -> Option<&str> {
    value.and_then(Value::as_str)
}

/// [`review`] for an already parsed review: the reference implementation,
/// lenient about any shape JSON allows.
pub fn review_value(review: &Value, fqdn: &str) -> Result<Answer, Error> {
    let review = review.as_object().ok_or(Error::NotAnObject)?;
    let api_version = check_envelope(text(review.get("apiVersion")), text(review.get("kind")))?;
    let request = match review.get("request") {
        Some(Value::Object(request)) => request,
        _ => return Err(Error::MissingRequest),
    };
    let uid = text(request.get("uid")).ok_or(Error::MissingUid)?;
    let kind = request.get("kind");
    let mut patch = Patch::new(fqdn);
    if wants_patch(
        text(request.get("operation")).unwrap_or(""),
        text(kind.and_then(|k| k.get("group"))).unwrap_or(""),
        text(kind.and_then(|k| k.get("kind"))).unwrap_or(""),
        text(request.get("subResource")).unwrap_or(""),
    ) {
        if let Some(pod) = request.get("object") {
            pod_patch(pod, &mut patch);
        }
    }
    Ok(answer(api_version, uid, patch))
}

/// Adds the operations that give every init container and container of
/// `pod` the variable, init containers first. Containers that already
/// define it (by `value` or `valueFrom`) are left alone, as is anything
/// malformed.
fn pod_patch(pod: &Value, patch: &mut Patch) {
    for kind in ["initContainers", "containers"] {
        let Some(containers) = pod
            .get("spec")
            .and_then(|spec| spec.get(kind))
            .and_then(Value::as_array)
        else {
            continue;
        };
        for (i, container) in containers.iter().enumerate() {
            let Some(container) = container.as_object() else {
                continue;
            };
            let env = match container.get("env") {
                None | Some(Value::Null) => Env::Missing,
                Some(Value::Array(env)) => Env::List {
                    defined: env
                        .iter()
                        .any(|var| var.get("name").and_then(Value::as_str) == Some(VARIABLE)),
                },
                Some(_) => Env::Malformed,
            };
            patch.container(kind, i, env);
        }
    }
}

/// What the fast path found in a review: the fields the decision reads,
/// borrowed from the body. A field that was absent or `null` is `None`
/// (the reference treats both alike).
struct Scanned<'a> {
    api_version: Option<&'a str>,
    kind: Option<&'a str>,
    request: Option<ScannedRequest<'a>>,
}

struct ScannedRequest<'a> {
    uid: Option<&'a str>,
    /// `kind.group` and `kind.kind`.
    group: Option<&'a str>,
    kind: Option<&'a str>,
    operation: Option<&'a str>,
    sub_resource: Option<&'a str>,
    /// `object.spec.initContainers` and `object.spec.containers`.
    init_containers: Containers,
    containers: Containers,
}

/// Containers one list may have on the fast path; a longer list goes to
/// the reference (the bound keeps the scan free of allocation).
const MAX_CONTAINERS: usize = 64;

/// The `env` of each container of one list, in order.
#[derive(Clone, Copy)]
struct Containers {
    envs: [Env; MAX_CONTAINERS],
    len: usize,
}

impl Containers {
    const NONE: Containers = Containers {
        envs: [Env::Missing; MAX_CONTAINERS],
        len: 0,
    };

    fn envs(&self) -> &[Env] {
        self.envs.get(..self.len).unwrap_or_default()
    }
}

/// Keeps the first value of a key and refuses a second: serde_json's
/// `Value` keeps the last one, so a repeated key the decision reads goes
/// to the reference.
fn first<T>(slot: &mut Option<T>, value: T) -> Scan<()> {
    if slot.is_some() {
        return Err(Unsure);
    }
    *slot = Some(value);
    Ok(())
}

/// Scans a whole review. Every field read must have the type the
/// decision expects (or be `null`); anything else is [`Unsure`], as is
/// anything the scanner itself is unsure of.
fn scan_review(text: &str) -> Scan<Scanned<'_>> {
    let mut scanner = Scanner::new(text);
    let (mut api_version, mut kind, mut request) = (None, None, None);
    scanner.object(|s, key| match key {
        "apiVersion" => first(&mut api_version, s.nullable(Scanner::text)?),
        "kind" => first(&mut kind, s.nullable(Scanner::text)?),
        "request" => first(&mut request, s.nullable(scan_request)?),
        _ => s.skip(),
    })?;
    scanner.finish()?;
    Ok(Scanned {
        api_version: api_version.flatten(),
        kind: kind.flatten(),
        request: request.flatten(),
    })
}

fn scan_request<'a>(scanner: &mut Scanner<'a>) -> Scan<ScannedRequest<'a>> {
    let (mut uid, mut group_kind, mut operation, mut sub_resource, mut pod) =
        (None, None, None, None, None);
    scanner.object(|s, key| match key {
        "uid" => first(&mut uid, s.nullable(Scanner::text)?),
        "kind" => first(&mut group_kind, s.nullable(scan_group_kind)?),
        "operation" => first(&mut operation, s.nullable(Scanner::text)?),
        "subResource" => first(&mut sub_resource, s.nullable(Scanner::text)?),
        "object" => first(&mut pod, s.nullable(scan_pod)?),
        _ => s.skip(),
    })?;
    let (group, kind) = group_kind.flatten().unwrap_or_default();
    let (init_containers, containers) = pod
        .flatten()
        .unwrap_or((Containers::NONE, Containers::NONE));
    Ok(ScannedRequest {
        uid: uid.flatten(),
        group,
        kind,
        operation: operation.flatten(),
        sub_resource: sub_resource.flatten(),
        init_containers,
        containers,
    })
}

/// `request.kind`: its group and kind.
fn scan_group_kind<'a>(scanner: &mut Scanner<'a>) -> Scan<(Option<&'a str>, Option<&'a str>)> {
    let (mut group, mut kind) = (None, None);
    scanner.object(|s, key| match key {
        "group" => first(&mut group, s.nullable(Scanner::text)?),
        "kind" => first(&mut kind, s.nullable(Scanner::text)?),
        _ => s.skip(),
    })?;
    Ok((group.flatten(), kind.flatten()))
}

/// `request.object`: the init containers and containers of its spec.
fn scan_pod(scanner: &mut Scanner<'_>) -> Scan<(Containers, Containers)> {
    let mut spec = None;
    scanner.object(|s, key| match key {
        "spec" => first(&mut spec, s.nullable(scan_spec)?),
        _ => s.skip(),
    })?;
    Ok(spec
        .flatten()
        .unwrap_or((Containers::NONE, Containers::NONE)))
}

fn scan_spec(scanner: &mut Scanner<'_>) -> Scan<(Containers, Containers)> {
    let (mut init_containers, mut containers) = (None, None);
    scanner.object(|s, key| match key {
        "initContainers" => first(&mut init_containers, s.nullable(scan_containers)?),
        "containers" => first(&mut containers, s.nullable(scan_containers)?),
        _ => s.skip(),
    })?;
    Ok((
        init_containers.flatten().unwrap_or(Containers::NONE),
        containers.flatten().unwrap_or(Containers::NONE),
    ))
}

/// A list of containers, each an object.
fn scan_containers(scanner: &mut Scanner<'_>) -> Scan<Containers> {
    let mut list = Containers::NONE;
    scanner.array(|s, i| {
        let env = scan_container(s)?;
        *list.envs.get_mut(i).ok_or(Unsure)? = env;
        list.len = i + 1;
        Ok(())
    })?;
    Ok(list)
}

/// A container's `env`: absent, `null`, or a list of objects.
fn scan_container(scanner: &mut Scanner<'_>) -> Scan<Env> {
    let mut env = None;
    scanner.object(|s, key| match key {
        "env" => first(&mut env, s.nullable(scan_env)?),
        _ => s.skip(),
    })?;
    Ok(match env.flatten() {
        None => Env::Missing,
        Some(defined) => Env::List { defined },
    })
}

/// Whether one entry of an `env` list is named [`VARIABLE`].
fn scan_env(scanner: &mut Scanner<'_>) -> Scan<bool> {
    let mut defined = false;
    scanner.array(|s, _| {
        let mut name = None;
        s.object(|s, key| match key {
            "name" => first(&mut name, s.nullable(Scanner::text)?),
            _ => s.skip(),
        })?;
        defined |= name.flatten() == Some(VARIABLE);
        Ok(())
    })?;
    Ok(defined)
}

/// [`review_value`] for a scanned review (the same decisions, in the same
/// order, so the same answer or error).
fn review_scanned(review: &Scanned<'_>, fqdn: &str) -> Result<Answer, Error> {
    let api_version = check_envelope(review.api_version, review.kind)?;
    let request = review.request.as_ref().ok_or(Error::MissingRequest)?;
    let uid = request.uid.ok_or(Error::MissingUid)?;
    let mut patch = Patch::new(fqdn);
    if wants_patch(
        request.operation.unwrap_or(""),
        request.group.unwrap_or(""),
        request.kind.unwrap_or(""),
        request.sub_resource.unwrap_or(""),
    ) {
        for (kind, containers) in [
            ("initContainers", &request.init_containers),
            ("containers", &request.containers),
        ] {
            for (i, &env) in containers.envs().iter().enumerate() {
                patch.container(kind, i, env);
            }
        }
    }
    Ok(answer(api_version, uid, patch))
}

/// Standard base64 with padding (RFC 4648), as Kubernetes expects `patch`.
/// Whole 3-byte groups go out 4 bytes at a time (one char per push cost a
/// twentieth of a review's CPU).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextet = |n: u32, shift: u32| ALPHABET[((n >> shift) & 63) as usize];
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    let mut groups = data.chunks_exact(3);
    for g in &mut groups {
        let n = (u32::from(g[0]) << 16) | (u32::from(g[1]) << 8) | u32::from(g[2]);
        out.extend_from_slice(&[sextet(n, 18), sextet(n, 12), sextet(n, 6), sextet(n, 0)]);
    }
    match *groups.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.extend_from_slice(&[sextet(n, 18), sextet(n, 12), b'=', b'=']);
        }
        [a, b] => {
            let n = (u32::from(a) << 16) | (u32::from(b) << 8);
            out.extend_from_slice(&[sextet(n, 18), sextet(n, 12), sextet(n, 6), b'=']);
        }
        _ => {}
    }
    // Only ASCII from the alphabet and '=': always valid UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FQDN: &str = "foo.bar.";

    fn review_of(api_version: &str, operation: &str, object: Value) -> Value {
        json!({
            "apiVersion": api_version,
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": operation,
                "object": object,
            }
        })
    }

    fn answer(review: &Value) -> Answer {
        review_value(review, FQDN).unwrap()
    }

    fn var() -> Value {
        json!({"name": VARIABLE, "value": FQDN})
    }

    /// Decodes the patch from the answer and checks it equals `ops`.
    fn assert_patch(answer: &Answer, ops: Value) {
        assert_eq!(Value::Array(answer.patch_ops()), ops);
        let review = answer.review();
        let response = &review["response"];
        if answer.patch.is_empty() {
            assert!(response.get("patch").is_none() && response.get("patchType").is_none());
        } else {
            assert_eq!(response["patchType"], "JSONPatch");
            let encoded = base64(&serde_json::to_vec(&ops).unwrap());
            assert_eq!(response["patch"], Value::String(encoded));
        }
        assert_eq!(response["allowed"], true);
        assert_eq!(response["uid"], "u-1");
    }

    #[test]
    fn upstream_example() {
        let body = include_bytes!("../../tests/data/admission.json");
        let answer = review(body, FQDN).unwrap();
        assert_eq!(answer.review()["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer.review()["kind"], "AdmissionReview");
        assert_eq!(
            answer.review()["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(
            Value::Array(answer.patch_ops()),
            json!([
                {"op": "add", "path": "/spec/initContainers/0/env", "value": [var()]},
                {"op": "add", "path": "/spec/containers/0/env", "value": [var()]},
            ])
        );
    }

    #[test]
    fn pod_without_init_containers() {
        let pod = json!({"spec": {"containers": [{"name": "a"}, {"name": "b", "env": null}]}});
        let answer = answer(&review_of("admission.k8s.io/v1", "CREATE", pod));
        assert_patch(
            &answer,
            json!([
                {"op": "add", "path": "/spec/containers/0/env", "value": [var()]},
                {"op": "add", "path": "/spec/containers/1/env", "value": [var()]},
            ]),
        );
    }

    #[test]
    fn containers_with_other_env_get_an_append() {
        let pod = json!({"spec": {
            "initContainers": [{"name": "i", "env": [{"name": "A", "value": "1"}]}],
            "containers": [{"name": "a", "env": []}, {"name": "b", "env": [{"name": "B", "value": "2"}, {"name": "C"}]}],
        }});
        let answer = answer(&review_of("admission.k8s.io/v1", "UPDATE", pod));
        assert_patch(
            &answer,
            json!([
                {"op": "add", "path": "/spec/initContainers/0/env/-", "value": var()},
                {"op": "add", "path": "/spec/containers/0/env/-", "value": var()},
                {"op": "add", "path": "/spec/containers/1/env/-", "value": var()},
            ]),
        );
    }

    #[test]
    fn containers_that_define_the_variable_are_untouched() {
        let pod = json!({"spec": {"containers": [
            {"name": "v", "env": [{"name": VARIABLE, "value": "other"}]},
            {"name": "f", "env": [{"name": "X", "value": "1"}, {"name": VARIABLE, "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}]},
        ]}});
        let answer = answer(&review_of("admission.k8s.io/v1", "CREATE", pod));
        assert_patch(&answer, json!([]));
        assert_eq!(
            answer.review(),
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                   "response": {"uid": "u-1", "allowed": true}})
        );
    }

    #[test]
    fn v1beta1_in_v1beta1_out() {
        let pod = json!({"spec": {"containers": [{"name": "a"}]}});
        let answer = answer(&review_of("admission.k8s.io/v1beta1", "CREATE", pod));
        assert_eq!(answer.review()["apiVersion"], "admission.k8s.io/v1beta1");
        assert_patch(
            &answer,
            json!([{"op": "add", "path": "/spec/containers/0/env", "value": [var()]}]),
        );
    }

    #[test]
    fn unknown_fields_do_not_matter_and_are_not_patched() {
        let pod = json!({"spec": {"futureField": {"x": 1}, "containers": [
            {"name": "a", "futureContainerField": [1, 2], "env": [{"name": "A", "value": "1", "future": true}]},
        ]}, "extra": "kept"});
        let answer = answer(&review_of("admission.k8s.io/v1", "CREATE", pod));
        assert_patch(
            &answer,
            json!([{"op": "add", "path": "/spec/containers/0/env/-", "value": var()}]),
        );
    }

    #[test]
    fn non_pods_deletes_and_subresources_are_allowed_unchanged() {
        let pod = json!({"spec": {"containers": [{"name": "a"}]}});
        for op in ["DELETE", "CONNECT"] {
            let answer = answer(&review_of("admission.k8s.io/v1", op, pod.clone()));
            assert_patch(&answer, json!([]));
        }
        let mut deployment = review_of("admission.k8s.io/v1", "CREATE", pod.clone());
        deployment["request"]["kind"] =
            json!({"group": "apps", "version": "v1", "kind": "Deployment"});
        assert_patch(&answer(&deployment), json!([]));
        let mut other_group = review_of("admission.k8s.io/v1", "CREATE", pod.clone());
        other_group["request"]["kind"]["group"] = json!("example.com");
        assert_patch(&answer(&other_group), json!([]));
        let mut status = review_of("admission.k8s.io/v1", "UPDATE", pod.clone());
        status["request"]["subResource"] = json!("status");
        assert_patch(&answer(&status), json!([]));
        let mut no_object = review_of("admission.k8s.io/v1", "CREATE", pod);
        no_object["request"]
            .as_object_mut()
            .unwrap()
            .remove("object");
        assert_patch(&answer(&no_object), json!([]));
    }

    #[test]
    fn malformed_containers_are_skipped() {
        let pod = json!({"spec": {"initContainers": "nope", "containers": [7, {"name": "a", "env": "x"}, {"name": "b"}]}});
        let answer = answer(&review_of("admission.k8s.io/v1", "CREATE", pod));
        assert_patch(
            &answer,
            json!([{"op": "add", "path": "/spec/containers/2/env", "value": [var()]}]),
        );
        let empty = json!({"spec": {}});
        assert_patch(
            &review_value(&review_of("admission.k8s.io/v1", "CREATE", empty), FQDN).unwrap(),
            json!([]),
        );
    }

    #[test]
    fn bad_reviews_are_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"{", "malformed JSON"),
            (b"[]", "not a JSON object"),
            (b"{\"apiVersion\":\"admission.k8s.io/v2\",\"kind\":\"AdmissionReview\"}", "unsupported apiVersion"),
            (b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"Pod\"}", "unsupported kind"),
            (b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}", "no request"),
            (b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\",\"request\":null}", "no request"),
            (b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\",\"request\":{}}", "no uid"),
        ];
        for (body, expected) in cases {
            let err = review(body, FQDN).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
        // Deep nesting is an error, not a stack overflow.
        let deep = "[".repeat(100_000);
        assert!(review(deep.as_bytes(), FQDN).is_err());
    }

    /// The scanned fast path and the untyped reference agree on every
    /// input the other tests use, and on inputs only the reference can take.
    #[test]
    fn fast_path_agrees_with_the_reference() {
        let pod = json!({"spec": {"containers": [{"name": "a", "env": [{"name": VARIABLE}]}, {"name": "b"}]}});
        let inputs: Vec<Value> = vec![
            serde_json::from_slice(include_bytes!("../../tests/data/admission.json")).unwrap(),
            serde_json::from_slice(include_bytes!("../../tests/data/pod-4k.json")).unwrap(),
            serde_json::from_slice(include_bytes!("../../tests/data/delete.json")).unwrap(),
            review_of("admission.k8s.io/v1beta1", "CREATE", pod.clone()),
            review_of(
                "admission.k8s.io/v1",
                "UPDATE",
                json!({"spec": {"initContainers": [{"env": null}], "containers": null}}),
            ),
            review_of(
                "admission.k8s.io/v1",
                "CREATE",
                json!({"spec": {"containers": [7, {"env": "x"}, {"env": [{"name": 3}]}, {}]}}),
            ),
            review_of("admission.k8s.io/v1", "CREATE", json!("not a pod")),
            review_of("admission.k8s.io/v1", "CREATE", json!({"spec": null})),
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 5}}),
            json!({"apiVersion": 1, "kind": "AdmissionReview"}),
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "x", "kind": {"group": 1, "kind": "Pod"}, "operation": "CREATE", "object": pod}}),
        ];
        for input in inputs {
            let body = input.to_string();
            let fast = review(body.as_bytes(), FQDN).map_err(|e| e.to_string());
            let reference = review_value(&input, FQDN).map_err(|e| e.to_string());
            assert_eq!(fast, reference, "{body}");
        }
        // The scan does not decode escapes; the reference reads them right.
        let body = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u\"\u00e9","kind":{"group":"","kind":"Pod"},"operation":"CREATE","object":{"spec":{"containers":[{"env":[{"name":"KUBERNETES_\u0053ERVICE_HOST"}]},{"env":[]}]}}}}"#;
        let fast = review(body.as_bytes(), FQDN).unwrap();
        let reference = review_value(&serde_json::from_str(body).unwrap(), FQDN).unwrap();
        assert_eq!(fast, reference);
        assert_eq!(fast.review()["response"]["uid"], "u\"\u{e9}");
        assert_eq!(fast.operations, 1);
        // A duplicate key is taken by the reference (last one wins).
        let body = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","kind":"AdmissionReview","request":{"uid":"d"}}"#;
        assert_eq!(review(body, FQDN).unwrap().review()["response"]["uid"], "d");
    }

    /// Mangled reviews (bytes flipped, cut, spliced) never panic, and the
    /// fast path and the reference agree on every one.
    #[test]
    fn mangled_reviews_never_panic() {
        let original = include_bytes!("../../tests/data/pod-4k.json");
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let specials = b"{}[]\",:0-ne\\ ";
        for _ in 0..3000 {
            let mut body = original.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % body.len().max(1);
                match next() % 4 {
                    0 => body[at] = specials[(next() as usize) % specials.len()],
                    1 => body.truncate(at),
                    2 => {
                        let from = (next() as usize) % original.len();
                        body.splice(at..at, original[from..].iter().take(40).copied());
                    }
                    _ => {
                        if at < body.len() {
                            body.remove(at);
                        }
                    }
                }
            }
            let fast = review(&body, FQDN).map_err(|e| e.to_string());
            if let Ok(value) = serde_json::from_slice::<Value>(&body) {
                let reference = review_value(&value, FQDN).map_err(|e| e.to_string());
                assert_eq!(fast, reference, "{}", String::from_utf8_lossy(&body));
            }
        }
    }

    /// Found by fuzz/fuzz_targets/review.rs (when the fast path was a
    /// borrowed serde parse): a parse that skipped invalid UTF-8 inside a
    /// field it does not read answered a body the untyped path calls
    /// malformed. The scan does not check UTF-8 either; `review` does.
    #[test]
    fn invalid_utf8_is_malformed_on_both_paths() {
        let body = include_bytes!("../../tests/data/delete.json");
        let text = std::str::from_utf8(body).unwrap();
        let at = text.find("initContainers").unwrap();
        let mut bad = body.to_vec();
        bad[at] = 0x9e;
        assert!(matches!(review(&bad, FQDN), Err(Error::Json(_))));
    }

    /// An array is not an object at any level (serde's derive, the fast
    /// path before the scan, took one for a struct, fields by position):
    /// the fast path refuses that shape as the untyped path does, and never
    /// patches a container that is not an object.
    #[test]
    fn arrays_are_not_objects() {
        let top = br#"["admission.k8s.io/v1", "AdmissionReview", {"uid": "u"}]"#;
        assert!(matches!(review(top, FQDN), Err(Error::NotAnObject)));
        let request = br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": ["u", {"group": "", "kind": "Pod"}, "CREATE", "", {"spec": {"containers": [{}]}}]}"#;
        assert!(matches!(review(request, FQDN), Err(Error::MissingRequest)));
        let container = br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"group": "", "kind": "Pod"}, "operation": "CREATE",
            "object": {"spec": {"containers": [[null], {}], "initContainers": [{"env": [["x"]]}]}}}}"#;
        let answer = review(container, FQDN).unwrap();
        let reference: Value = serde_json::from_slice(container).unwrap();
        assert_eq!(answer, review_value(&reference, FQDN).unwrap());
        assert_eq!(answer.operations, 2);
        assert_patch_paths(
            &answer,
            &["/spec/initContainers/0/env/-", "/spec/containers/1/env"],
        );
    }

    fn assert_patch_paths(answer: &Answer, paths: &[&str]) {
        let got: Vec<String> = answer
            .patch_ops()
            .iter()
            .map(|op| op["path"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, paths);
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
    }

    /// What `review` gives for `body`, what the reference gives (serde_json
    /// and `review_value`), and whether the scan answered by itself.
    fn both_paths(body: &[u8]) -> (Result<Answer, String>, Result<Answer, String>, bool) {
        let fast = review(body, FQDN).map_err(|e| e.to_string());
        let reference = serde_json::from_slice::<Value>(body)
            .map_err(Error::Json)
            .and_then(|value| review_value(&value, FQDN))
            .map_err(|e| e.to_string());
        let scanned = std::str::from_utf8(body).is_ok_and(|text| scan_review(text).is_ok());
        (fast, reference, scanned)
    }

    /// Checks that `body` gets the reference's answer (or error), and that
    /// the scan answered it by itself exactly when `scanned` says.
    fn check(body: &str, scanned: bool) {
        let (fast, reference, did_scan) = both_paths(body.as_bytes());
        assert_eq!(fast, reference, "{body}");
        assert_eq!(did_scan, scanned, "scanned? {body}");
    }

    /// A v1 CREATE review of a pod whose spec is `spec` (JSON text), with
    /// `extra` (JSON members, may be empty) at the start of the request.
    fn pod_review(extra: &str, spec: &str) -> String {
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{{extra}"uid":"u-1","kind":{{"group":"","version":"v1","kind":"Pod"}},"operation":"CREATE","object":{{"metadata":{{"name":"p"}},"spec":{spec}}}}}}}"#
        )
    }

    /// Reviews the scan answers itself: the shapes real reviews take, and
    /// everything JSON allows in the parts the decision does not read.
    #[test]
    fn scan_answers_common_shapes() {
        for data in [
            "admission.json",
            "admission-v1beta1.json",
            "pod-4k.json",
            "delete.json",
        ] {
            let path = format!("{}/tests/data/{data}", env!("CARGO_MANIFEST_DIR"));
            let body = std::fs::read_to_string(&path).unwrap();
            check(&body, true);
            // Whitespace everywhere JSON allows it.
            let value: Value = serde_json::from_str(&body).unwrap();
            check(&serde_json::to_string_pretty(&value).unwrap(), true);
            let spaced = serde_json::to_string_pretty(&value)
                .unwrap()
                .replace("\n", "\r\n\t")
                .replace(": ", " \n: \t");
            check(&format!(" \t\r\n{spaced} \r\n\t "), true);
        }
        let skipped = [
            // Escapes (all of them, and a surrogate pair) in strings and
            // keys the decision does not read.
            r#""s":"\"\\\/\b\f\n\r\t\u00e9\uD83D\uDE00\u0000\u001f","#,
            r#""userInfo":{"k\u0069nd":"not the kind","\"":{"\u0000":[]}},"#,
            // Every kind of value, empty containers, nesting.
            r#""n":[0,-0,1.5,-12.25,0.000,123456789012345678901234567890,true,false,null,{},[],[[]],{"a":{"b":[{}]}}],"#,
            r#""raw":"é ü ✓ 😀 \u007f","#,
        ];
        for extra in skipped {
            check(&pod_review(extra, r#"{"containers":[{"name":"a"}]}"#), true);
        }
        let long_integer = format!(r#""big":{},"#, "9".repeat(300));
        check(&pod_review(&long_integer, "{}"), true);
        let specs = [
            "{}",
            "null",
            r#"{"containers":[]}"#,
            r#"{"containers":null,"initContainers":null}"#,
            r#"{"containers":[{}],"initContainers":[{"env":null}]}"#,
            r#"{"containers":[{"env":[]},{"env":[{}]},{"env":[{"name":null}]}]}"#,
            r#"{"containers":[{"env":[{"name":"A","value":"1"},{"name":"KUBERNETES_SERVICE_HOST"}]}]}"#,
            r#"{"containers":[{"env":[{"name":"KUBERNETES_SERVICE_HOST_X"},{"name":"kubernetes_service_host"}]}]}"#,
            r#"{"initContainers":[{"env":[]}],"containers":[{},{"env":null}]}"#,
            // containers before initContainers: the patch still lists the
            // init containers first.
            r#"{"containers":[{}],"initContainers":[{}]}"#,
        ];
        for spec in specs {
            check(&pod_review("", spec), true);
        }
        // null wherever the decision reads a field.
        for body in [
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":null}"#,
            r#"{"apiVersion":null,"kind":"AdmissionReview"}"#,
            r#"{"apiVersion":"admission.k8s.io/v1","kind":null}"#,
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":null}}"#,
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":null,"operation":null,"subResource":null,"object":null}}"#,
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":null,"kind":null},"operation":"CREATE","object":{"spec":{"containers":[{}]}}}}"#,
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","operation":"CREATE","subResource":"status","kind":{"group":"","kind":"Pod"},"object":{"spec":{"containers":[{}]}}}}"#,
        ] {
            check(body, true);
        }
    }

    /// Whatever the scan is unsure of goes to the reference, which gives
    /// the same answer or error it gives for any body.
    #[test]
    fn scan_leaves_the_unsure_to_the_reference() {
        let envelope = |members: &str| {
            format!(r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview",{members}}}"#)
        };
        let request = |members: &str| envelope(&format!(r#""request":{{"uid":"u",{members}}}"#));
        let pod = r#""kind":{"group":"","kind":"Pod"},"operation":"CREATE""#;
        let mut bodies = vec![
            // Duplicate keys the decision reads (serde_json keeps the last).
            r#"{"apiVersion":"admission.k8s.io/v1","apiVersion":"admission.k8s.io/v2","kind":"AdmissionReview"}"#.to_string(),
            envelope(r#""kind":"AdmissionReview""#),
            envelope(r#""request":{"uid":"a"},"request":{"uid":"b"}"#),
            request(r#""uid":"again""#),
            request(r#""kind":{"group":"","kind":"Pod","kind":"Deployment"},"operation":"CREATE""#),
            request(r#""kind":{"group":"","group":"apps","kind":"Pod"},"operation":"CREATE""#),
            request(&format!(r#"{pod},"operation":"DELETE""#)),
            request(&format!(r#"{pod},"subResource":"","subResource":"status""#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"containers":[{{}}]}}}},"object":null"#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"containers":[{{}}]}},"spec":{{}}}}"#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"containers":[{{}}],"containers":[]}}}}"#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"initContainers":[],"initContainers":[{{}}]}}}}"#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"containers":[{{"env":[],"env":null}}]}}}}"#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"containers":[{{"env":[{{"name":"KUBERNETES_SERVICE_HOST","name":"X"}}]}}]}}}}"#)),
            // Types the decision does not expect.
            r#"{"apiVersion":1,"kind":"AdmissionReview"}"#.to_string(),
            r#"{"apiVersion":"admission.k8s.io/v1","kind":["AdmissionReview"]}"#.to_string(),
            envelope(r#""request":"r""#),
            envelope(r#""request":[{"uid":"u"}]"#),
            envelope(r#""request":{"uid":5}"#),
            request(r#""kind":"Pod","operation":"CREATE""#),
            request(r#""kind":{"group":1,"kind":"Pod"},"operation":"CREATE""#),
            request(r#""kind":{"group":"","kind":"Pod"},"operation":true"#),
            request(&format!(r#"{pod},"subResource":{{}}"#)),
            request(&format!(r#"{pod},"object":"not a pod""#)),
            request(&format!(r#"{pod},"object":{{"spec":7}}"#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"containers":{{}}}}}}"#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"initContainers":"nope","containers":[{{}}]}}}}"#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"containers":[7,{{}}]}}}}"#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"containers":[[],{{}}]}}}}"#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"containers":[{{"env":"x"}},{{}}]}}}}"#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"containers":[{{"env":{{}}}},{{}}]}}}}"#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"containers":[{{"env":[7]}},{{}}]}}}}"#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"containers":[{{"env":[{{"name":1}}]}}]}}}}"#)),
            request(&format!(r#"{pod},"object":{{"spec":{{"containers":[{{"env":[{{"name":["KUBERNETES_SERVICE_HOST"]}}]}}]}}}}"#)),
            // Escapes in strings and keys the decision reads.
            envelope(r#""request":{"uid":"u\u0031"}"#),
            request(r#""kind":{"group":"","kind":"P\u006fd"},"operation":"CREATE""#),
            request(&format!(r#"{pod},"object":{{"spec":{{"containers":[{{"env":[{{"name":"KUBERNETES_\u0053ERVICE_HOST"}}]}}]}}}}"#)),
            r#"{"apiVersion":"admission.k8s.io/v1","\u006bind":"AdmissionReview"}"#.to_string(),
            request(&format!(r#"{pod},"object":{{"spec":{{"c\u006fntainers":[{{}}]}}}}"#)),
            request(r#""\u006bind":{"group":"","kind":"Pod"},"operation":"CREATE""#),
            // Numbers serde_json might call out of range.
            request(r#""n":1e400"#),
            request(r#""n":1e5"#),
            request(r#""n":-2.5E-3"#),
            request(&format!(r#""n":{}"#, "9".repeat(301))),
            request(&format!(r#""n":{}"#, "9".repeat(400))),
        ];
        // More containers than the scan keeps.
        let many = vec!["{}"; MAX_CONTAINERS + 1].join(",");
        bodies.push(request(&format!(
            r#"{pod},"object":{{"spec":{{"containers":[{many}]}}}}"#
        )));
        // Top-level values that are not objects.
        bodies.extend(["[]", "null", "\"review\"", "7"].map(String::from));
        for body in &bodies {
            check(body, false);
        }
        let exactly = vec!["{}"; MAX_CONTAINERS].join(",");
        check(
            &request(&format!(
                r#"{pod},"object":{{"spec":{{"containers":[{exactly}]}}}}"#
            )),
            true,
        );
    }

    /// Invalid JSON of every kind is never answered: the scan is unsure,
    /// and the reference reports the error.
    #[test]
    fn invalid_json_is_malformed() {
        let in_skipped = [
            "\"a\u{1}b\"",
            "\"tab\there\"",
            "\"line\nbreak\"",
            r#""\x""#,
            r#""\'""#,
            r#""\u12G4""#,
            r#""\u12""#,
            r#""\uD800""#,
            r#""\uDC00""#,
            r#""\uD800\u0041""#,
            r#""\uD800\uD800""#,
            r#""\uD800x""#,
            r#""\uD800\n""#,
            r#""unclosed"#,
            "'single'",
            "01",
            "-01",
            "-",
            "1.",
            ".5",
            "+1",
            "1e",
            "1e+",
            "0x10",
            "NaN",
            "Infinity",
            "tru",
            "nul",
            "True",
            "nulll",
            "[1,]",
            "[,1]",
            "[1 2]",
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"{"a":1 "b":2}"#,
            r#"{a:1}"#,
            r#"{"a"}"#,
            "[1}",
            r#"{"a":1]"#,
            "[",
            "/* comment */ 1",
        ];
        let mut bodies: Vec<String> = in_skipped
            .iter()
            .map(|value| pod_review(&format!(r#""x":{value},"#), "{}"))
            .collect();
        let valid = pod_review("", r#"{"containers":[{}]}"#);
        bodies.extend([
            String::new(),
            " ".to_string(),
            format!("\u{feff}{valid}"),
            format!("{valid} x"),
            format!("{valid}{valid}"),
            format!("{valid},"),
            valid[..valid.len() - 1].to_string(),
            format!("{valid}}}"),
            // Non-whitespace control characters between tokens.
            valid.replacen(',', ",\u{b}", 1),
            valid.replacen(':', "\u{c}:", 1),
        ]);
        for body in &bodies {
            assert!(
                serde_json::from_str::<Value>(body).is_err(),
                "serde_json takes {body}"
            );
            assert!(
                matches!(review(body.as_bytes(), FQDN), Err(Error::Json(_))),
                "answered: {body}"
            );
        }
    }

    /// The scan takes the nesting serde_json takes (127 levels) and no
    /// more; deeper bodies are malformed on both paths.
    #[test]
    fn nesting_limit_is_serde_jsons() {
        // The review itself is one level; its request two.
        for (open, close) in [("[", "]"), (r#"{"a":"#, "}")] {
            let nested = |levels: usize| {
                pod_review(
                    &format!(
                        r#""deep":{}0{},"#,
                        open.repeat(levels),
                        close.repeat(levels)
                    ),
                    "{}",
                )
            };
            check(&nested(super::super::scan::MAX_DEPTH - 2), true);
            let too_deep = nested(super::super::scan::MAX_DEPTH - 1);
            let err = serde_json::from_str::<Value>(&too_deep).unwrap_err();
            assert!(err.to_string().contains("recursion limit"), "{err}");
            assert!(matches!(
                review(too_deep.as_bytes(), FQDN),
                Err(Error::Json(_))
            ));
        }
    }

    /// The answer's exact bytes (as before the scan replaced the serde
    /// parse, and the patch was written without `format!`).
    #[test]
    fn answer_bytes_are_stable() {
        let body = include_bytes!("../../tests/data/admission.json");
        assert_eq!(
            review(body, FQDN).unwrap().body,
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"705ab4f5-6393-11e8-b7cc-42010a800002","allowed":true,"patchType":"JSONPatch","patch":"W3sib3AiOiJhZGQiLCJwYXRoIjoiL3NwZWMvaW5pdENvbnRhaW5lcnMvMC9lbnYiLCJ2YWx1ZSI6W3sibmFtZSI6IktVQkVSTkVURVNfU0VSVklDRV9IT1NUIiwidmFsdWUiOiJmb28uYmFyLiJ9XX0seyJvcCI6ImFkZCIsInBhdGgiOiIvc3BlYy9jb250YWluZXJzLzAvZW52IiwidmFsdWUiOlt7Im5hbWUiOiJLVUJFUk5FVEVTX1NFUlZJQ0VfSE9TVCIsInZhbHVlIjoiZm9vLmJhci4ifV19XQ=="}}"#
        );
        let body = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u\"\\\u0001\u00e9/","kind":{"group":"","kind":"Pod"},"operation":"CREATE","object":{"spec":{"containers":[{}]}}}}"#;
        let answer = review(body, "a\"b").unwrap();
        assert_eq!(
            answer.body,
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"u\"\\\u0001é/","allowed":true,"patchType":"JSONPatch","patch":"W3sib3AiOiJhZGQiLCJwYXRoIjoiL3NwZWMvY29udGFpbmVycy8wL2VudiIsInZhbHVlIjpbeyJuYW1lIjoiS1VCRVJORVRFU19TRVJWSUNFX0hPU1QiLCJ2YWx1ZSI6ImFcImIifV19XQ=="}}"#
        );
        assert_eq!(
            answer.patch,
            r#"[{"op":"add","path":"/spec/containers/0/env","value":[{"name":"KUBERNETES_SERVICE_HOST","value":"a\"b"}]}]"#
        );
        let many = format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u","kind":{{"group":"","kind":"Pod"}},"operation":"CREATE","object":{{"spec":{{"containers":[{}]}}}}}}}}"#,
            [r#"{"env":[]}"#; 12].join(",")
        );
        let answer = review(many.as_bytes(), FQDN).unwrap();
        assert!(
            answer
                .patch
                .contains(r#""path":"/spec/containers/11/env/-","value":{"name""#)
        );
        assert!(
            answer
                .patch
                .contains(r#""path":"/spec/containers/0/env/-""#)
        );
    }
}
