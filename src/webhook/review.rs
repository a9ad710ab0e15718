//! The admission decision: an AdmissionReview in, the answering review out.
//!
//! Owns: which pods get `KUBERNETES_SERVICE_HOST`, the RFC 6902 patch that
//! adds it, and the shape of the answer (`admission.k8s.io/v1` or
//! `v1beta1`, echoing the request's version and uid).
//! Must not: do I/O, log, or touch any field it does not patch. The review
//! stays an untyped `serde_json::Value`, so fields this code does not know
//! (new pod fields, extensions) cannot be lost: the patch only adds.

use std::fmt;

use serde_json::{Map, Value, json};

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

/// The answer to one review.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The complete AdmissionReview to send back.
    pub review: Value,
    /// The patch operations, empty when nothing changes.
    pub patch: Vec<Value>,
}

/// Answers the review in `body` (JSON bytes) for the given FQDN.
pub fn review(body: &[u8], fqdn: &str) -> Result<Answer, Error> {
    let review: Value = serde_json::from_slice(body).map_err(Error::Json)?;
    review_value(&review, fqdn)
}

/// [`review`] for an already parsed review.
pub fn review_value(review: &Value, fqdn: &str) -> Result<Answer, Error> {
    let review = review.as_object().ok_or(Error::NotAnObject)?;
    let api_version = review
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !API_VERSIONS.contains(&api_version) {
        return Err(Error::ApiVersion(api_version.to_string()));
    }
    let kind = review.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind != "AdmissionReview" {
        return Err(Error::Kind(kind.to_string()));
    }
    let request = match review.get("request") {
        Some(Value::Object(request)) => request,
        _ => return Err(Error::MissingRequest),
    };
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or(Error::MissingUid)?;
    let patch = if wants_patch(request) {
        request
            .get("object")
            .map(|pod| pod_patch(pod, fqdn))
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut response = Map::new();
    response.insert("uid".into(), Value::String(uid.to_string()));
    response.insert("allowed".into(), Value::Bool(true));
    if !patch.is_empty() {
        // Serialising a Value built from JSON values cannot fail.
        let bytes = serde_json::to_vec(&patch).unwrap_or_default();
        response.insert("patchType".into(), Value::String("JSONPatch".into()));
        response.insert("patch".into(), Value::String(base64(&bytes)));
    }
    let answer = json!({
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "response": Value::Object(response),
    });
    Ok(Answer {
        review: answer,
        patch,
    })
}

/// CREATE or UPDATE of a Pod itself (not a subresource such as
/// `pods/status` or `pods/ephemeralcontainers`).
fn wants_patch(request: &Map<String, Value>) -> bool {
    let operation = request
        .get("operation")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = request.get("kind");
    let is_pod = kind.and_then(|k| k.get("kind")).and_then(Value::as_str) == Some("Pod")
        && kind
            .and_then(|k| k.get("group"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty();
    let sub_resource = request
        .get("subResource")
        .and_then(Value::as_str)
        .unwrap_or("");
    matches!(operation, "CREATE" | "UPDATE") && is_pod && sub_resource.is_empty()
}

/// The operations that give every init container and container of `pod`
/// the variable, init containers first. Containers that already define it
/// (by `value` or `valueFrom`) are left alone, as is anything malformed.
pub fn pod_patch(pod: &Value, fqdn: &str) -> Vec<Value> {
    let mut ops = Vec::new();
    for kind in ["initContainers", "containers"] {
        let Some(containers) = pod
            .pointer(&format!("/spec/{kind}"))
            .and_then(Value::as_array)
        else {
            continue;
        };
        for (i, container) in containers.iter().enumerate() {
            let Some(container) = container.as_object() else {
                continue;
            };
            let variable = json!({ "name": VARIABLE, "value": fqdn });
            match container.get("env") {
                None | Some(Value::Null) => ops.push(json!({
                    "op": "add",
                    "path": format!("/spec/{kind}/{i}/env"),
                    "value": [variable],
                })),
                Some(Value::Array(env)) => {
                    let defined = env
                        .iter()
                        .any(|var| var.get("name").and_then(Value::as_str) == Some(VARIABLE));
                    if !defined {
                        ops.push(json!({
                            "op": "add",
                            "path": format!("/spec/{kind}/{i}/env/-"),
                            "value": variable,
                        }));
                    }
                }
                // Not a list: the API server rejects such a pod anyway.
                Some(_) => {}
            }
        }
    }
    ops
}

/// Standard base64 with padding (RFC 4648), as Kubernetes expects `patch`.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
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
        assert_eq!(Value::Array(answer.patch.clone()), ops);
        let response = &answer.review["response"];
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
        assert_eq!(answer.review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer.review["kind"], "AdmissionReview");
        assert_eq!(
            answer.review["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(
            Value::Array(answer.patch),
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
            answer.review,
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                   "response": {"uid": "u-1", "allowed": true}})
        );
    }

    #[test]
    fn v1beta1_in_v1beta1_out() {
        let pod = json!({"spec": {"containers": [{"name": "a"}]}});
        let answer = answer(&review_of("admission.k8s.io/v1beta1", "CREATE", pod));
        assert_eq!(answer.review["apiVersion"], "admission.k8s.io/v1beta1");
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
