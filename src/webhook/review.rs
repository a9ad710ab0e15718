//! The admission decision: an AdmissionReview in, the answering review out.
//!
//! Owns: which pods get `KUBERNETES_SERVICE_HOST`, the RFC 6902 patch that
//! adds it, and the shape of the answer (`admission.k8s.io/v1` or
//! `v1beta1`, echoing the request's version and uid).
//! Must not: do I/O, log, or touch any field it does not patch. The review
//! stays an untyped `serde_json::Value`, so fields this code does not know
//! (new pod fields, extensions) cannot be lost: the patch only adds.

use std::fmt;

use serde_json::Value;
#[cfg(test)]
use serde_json::json;

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
/// The common case is parsed into borrowed structs that skip every field
/// the decision does not need (few allocations); anything those structs
/// cannot take (odd types, duplicate keys) falls back to the untyped path,
/// [`review_value`], which gives the same answer or the precise error.
pub fn review(body: &[u8], fqdn: &str) -> Result<Answer, Error> {
    // JSON text is UTF-8; the borrowed parse does not check the parts it
    // skips, so check it here (the untyped path then gives the error).
    if let Ok(text) = std::str::from_utf8(body) {
        if let Ok(typed::Object(typed)) =
            serde_json::from_str::<typed::Object<typed::Review<'_>>>(text)
        {
            return review_typed(&typed, fqdn);
        }
    }
    let review: Value = serde_json::from_slice(body).map_err(Error::Json)?;
    review_value(&review, fqdn)
}

/// What the decision needs to know about one container's `env`.
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

/// A JSON string literal for `text`, escaped as needed.
fn json_string(text: &str) -> String {
    // Serialising a &str cannot fail.
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_string())
}

/// The patch under construction, as JSON text.
struct Patch {
    text: String,
    operations: usize,
    /// `{"name":"KUBERNETES_SERVICE_HOST","value":<fqdn>}`
    variable: String,
}

impl Patch {
    fn new(fqdn: &str) -> Patch {
        let variable = format!(
            "{{\"name\":\"{VARIABLE}\",\"value\":{}}}",
            json_string(fqdn)
        );
        Patch {
            text: String::new(),
            operations: 0,
            variable,
        }
    }

    /// Adds the operation container `i` of `kind` (`initContainers` or
    /// `containers`) needs, if any.
    fn container(&mut self, kind: &str, i: usize, env: Env) {
        let (suffix, value) = match env {
            Env::Missing => ("", format!("[{}]", self.variable)),
            Env::List { defined: false } => ("/-", self.variable.clone()),
            Env::List { defined: true } | Env::Malformed => return,
        };
        self.text.push(if self.operations == 0 { '[' } else { ',' });
        self.text.push_str(&format!(
            "{{\"op\":\"add\",\"path\":\"/spec/{kind}/{i}/env{suffix}\",\"value\":{value}}}"
        ));
        self.operations += 1;
    }
}

fn answer(api_version: &str, uid: &str, mut patch: Patch) -> Answer {
    let mut body = String::with_capacity(192 + patch.text.len() * 4 / 3);
    body.push_str("{\"apiVersion\":");
    body.push_str(&json_string(api_version));
    body.push_str(",\"kind\":\"AdmissionReview\",\"response\":{\"uid\":");
    body.push_str(&json_string(uid));
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

fn review_typed(review: &typed::Review<'_>, fqdn: &str) -> Result<Answer, Error> {
    let api_version = check_envelope(review.api_version.as_deref(), review.kind.as_deref())?;
    let request = review.request.as_deref().ok_or(Error::MissingRequest)?;
    let uid = request.uid.as_deref().ok_or(Error::MissingUid)?;
    let kind = request.kind.as_deref();
    let mut patch = Patch::new(fqdn);
    if wants_patch(
        request.operation.as_deref().unwrap_or(""),
        kind.and_then(|k| k.group.as_deref()).unwrap_or(""),
        kind.and_then(|k| k.kind.as_deref()).unwrap_or(""),
        request.sub_resource.as_deref().unwrap_or(""),
    ) {
        let spec = request
            .object
            .as_deref()
            .and_then(|pod| pod.spec.as_deref());
        for (kind, containers) in [
            (
                "initContainers",
                spec.and_then(|s| s.init_containers.as_ref()),
            ),
            ("containers", spec.and_then(|s| s.containers.as_ref())),
        ] {
            for (i, container) in containers.into_iter().flatten().enumerate() {
                let env = match &container.env {
                    None => Env::Missing,
                    Some(env) => Env::List {
                        defined: env.iter().any(|var| var.name.as_deref() == Some(VARIABLE)),
                    },
                };
                patch.container(kind, i, env);
            }
        }
    }
    Ok(answer(api_version, uid, patch))
}

/// Borrowed views of the few fields the decision reads. Unknown fields are
/// skipped without being stored; any type surprise is a parse error, which
/// sends the review down the untyped path instead. Every struct is read
/// through [`Object`]: serde's derive also accepts a JSON array for a
/// struct (fields by position), which the untyped path rightly refuses.
mod typed {
    use std::borrow::Cow;
    use std::fmt;
    use std::marker::PhantomData;
    use std::ops::Deref;

    use serde::de::value::MapAccessDeserializer;
    use serde::de::{MapAccess, Visitor};
    use serde::{Deserialize, Deserializer};

    /// `T` from a JSON object only.
    pub struct Object<T>(pub T);

    impl<T> Deref for Object<T> {
        type Target = T;
        fn deref(&self) -> &T {
            &self.0
        }
    }

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Only<T>(PhantomData<T>);
            impl<'de, T: Deserialize<'de>> Visitor<'de> for Only<T> {
                type Value = T;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                    T::deserialize(MapAccessDeserializer::new(map))
                }
            }
            deserializer.deserialize_map(Only(PhantomData)).map(Object)
        }
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Review<'a> {
        #[serde(borrow)]
        pub api_version: Option<Cow<'a, str>>,
        #[serde(borrow)]
        pub kind: Option<Cow<'a, str>>,
        #[serde(borrow)]
        pub request: Option<Object<Request<'a>>>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Request<'a> {
        #[serde(borrow)]
        pub uid: Option<Cow<'a, str>>,
        #[serde(borrow)]
        pub kind: Option<Object<GroupKind<'a>>>,
        #[serde(borrow)]
        pub operation: Option<Cow<'a, str>>,
        #[serde(borrow)]
        pub sub_resource: Option<Cow<'a, str>>,
        #[serde(borrow)]
        pub object: Option<Object<Pod<'a>>>,
    }

    #[derive(Deserialize)]
    pub struct GroupKind<'a> {
        #[serde(borrow)]
        pub group: Option<Cow<'a, str>>,
        #[serde(borrow)]
        pub kind: Option<Cow<'a, str>>,
    }

    #[derive(Deserialize)]
    pub struct Pod<'a> {
        #[serde(borrow)]
        pub spec: Option<Object<Spec<'a>>>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Spec<'a> {
        #[serde(borrow)]
        pub init_containers: Option<Vec<Object<Container<'a>>>>,
        #[serde(borrow)]
        pub containers: Option<Vec<Object<Container<'a>>>>,
    }

    #[derive(Deserialize)]
    pub struct Container<'a> {
        #[serde(borrow)]
        pub env: Option<Vec<Object<EnvVar<'a>>>>,
    }

    #[derive(Deserialize)]
    pub struct EnvVar<'a> {
        #[serde(borrow)]
        pub name: Option<Cow<'a, str>>,
    }
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

    /// The typed fast path and the untyped reference agree on every input
    /// the other tests use, and on inputs only the reference can take.
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
        // Escaped strings cannot be borrowed; they are still read right.
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

    /// Found by fuzz/fuzz_targets/review.rs: the borrowed parse skipped
    /// invalid UTF-8 inside a field it does not read and answered a body
    /// the untyped path calls malformed.
    #[test]
    fn invalid_utf8_is_malformed_on_both_paths() {
        let body = include_bytes!("../../tests/data/delete.json");
        let text = std::str::from_utf8(body).unwrap();
        let at = text.find("initContainers").unwrap();
        let mut bad = body.to_vec();
        bad[at] = 0x9e;
        assert!(matches!(review(&bad, FQDN), Err(Error::Json(_))));
    }

    /// serde's derive takes a JSON array for a struct (fields by position);
    /// the fast path must refuse that shape as the untyped path does, at
    /// every level, and never patch a container that is not an object.
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
}
