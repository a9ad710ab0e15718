//! Arbitrary bytes as an AdmissionReview body through the webhook's
//! decision (`webhook::review::review`: the single-pass scan with its
//! untyped fallback).
//!
//! Checks: a body serde_json refuses is never answered (the scan is as
//! strict as serde_json, nesting limit included); the fast path answers
//! exactly as the untyped reference (`review_value`) does; an answer is a
//! well-formed AdmissionReview echoing the request's version and uid; its
//! base64 patch is the RFC 6902 patch it reports, made of `add` operations
//! that apply to the request's pod; and the patched pod needs no further
//! patch (idempotence), with every container it touched carrying the
//! variable.
#![no_main]

use apiserver_proxy::webhook::review::{self, VARIABLE};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const FQDN: &str = "kubernetes.default.svc.cluster.local.";

fuzz_target!(|data: &[u8]| {
    let result = review::review(data, FQDN);
    let parsed: Value = match serde_json::from_slice(data) {
        Ok(v) => v,
        Err(err) => {
            if let Ok(answer) = &result {
                panic!("invalid JSON answered: {err}; {answer:?}");
            }
            return;
        }
    };
    let reference = review::review_value(&parsed, FQDN);
    match (&result, &reference) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "fast path and reference disagree"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("fast path {result:?}, reference {reference:?}"),
    }
    let Ok(answer) = reference else { return };
    check_answer(&parsed, &answer);
});

fn check_answer(review: &Value, answer: &review::Answer) {
    let body: Value = serde_json::from_str(&answer.body).expect("the answer is JSON");
    assert_eq!(body["apiVersion"], review["apiVersion"]);
    assert_eq!(body["kind"], "AdmissionReview");
    let response = &body["response"];
    assert_eq!(response["uid"], review["request"]["uid"]);
    assert_eq!(response["allowed"], true);
    if answer.operations == 0 {
        assert!(answer.patch.is_empty());
        assert!(response.get("patch").is_none() && response.get("patchType").is_none());
        return;
    }
    assert_eq!(response["patchType"], "JSONPatch");
    assert_eq!(
        response["patch"].as_str(),
        Some(review::base64(answer.patch.as_bytes()).as_str())
    );
    let ops: Vec<Value> = serde_json::from_str(&answer.patch).expect("the patch is JSON");
    assert_eq!(ops.len(), answer.operations);

    let mut patched = review.clone();
    let pod = patched["request"]
        .get_mut("object")
        .expect("a patch implies a pod");
    for op in &ops {
        let obj = op.as_object().expect("an operation is an object");
        assert_eq!(obj.len(), 3, "op, path, value: {op}");
        assert_eq!(obj["op"], "add");
        let path = obj["path"].as_str().expect("a string path");
        add(pod, path, obj["value"].clone())
            .unwrap_or_else(|why| panic!("{op} does not apply: {why}"));
    }
    let again = review::review_value(&patched, FQDN).expect("the patched review is answered");
    assert_eq!(again.operations, 0, "patch not idempotent: {}", again.patch);
    for (list, rest) in ops
        .iter()
        .filter_map(|op| op["path"].as_str())
        .filter_map(|p| p.strip_prefix("/spec/"))
        .filter_map(|p| p.split_once('/'))
    {
        let index: usize = rest.split('/').next().unwrap().parse().unwrap();
        let env = &pod_of(&patched)["spec"][list][index]["env"];
        let defined = env
            .as_array()
            .expect("env is a list")
            .iter()
            .filter(|v| v["name"] == VARIABLE)
            .any(|v| v["value"] == FQDN);
        assert!(defined, "{list}[{index}] lacks the variable");
    }
}

fn pod_of(review: &Value) -> &Value {
    &review["request"]["object"]
}

/// RFC 6902 `add` at an RFC 6901 pointer: the parent must exist; an object
/// member is set (or replaced); an array index may be `-` (append) or at
/// most the length.
fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let tokens: Vec<String> = path
        .strip_prefix('/')
        .ok_or("the path does not start with /")?
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    let (last, parents) = tokens.split_last().expect("split gives one token at least");
    let mut at = doc;
    for token in parents {
        at = match at {
            Value::Object(map) => map.get_mut(token).ok_or(format!("no member {token}"))?,
            Value::Array(list) => {
                let i: usize = token.parse().map_err(|_| format!("bad index {token}"))?;
                list.get_mut(i).ok_or(format!("no element {i}"))?
            }
            _ => return Err(format!("{token} inside a scalar")),
        };
    }
    match at {
        Value::Object(map) => {
            map.insert(last.clone(), value);
        }
        Value::Array(list) if last == "-" => list.push(value),
        Value::Array(list) => {
            let i: usize = last.parse().map_err(|_| format!("bad index {last}"))?;
            if i > list.len() {
                return Err(format!("index {i} past the end"));
            }
            list.insert(i, value);
        }
        _ => return Err(format!("{last} inside a scalar")),
    }
    Ok(())
}
