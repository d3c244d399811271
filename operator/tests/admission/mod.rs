//! What an API server would say about a NeoXDeployment: the shipped CRD's structural
//! schema (types, required, ranges, patterns, enums) and its CEL rules.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The repository root: from the directory cargo runs the test in (it sets the variable at run
/// time too), else the one it was compiled in. A target directory shared between clones can
/// hold a binary compiled in another clone, whose compile-time path may be gone.
pub fn root() -> PathBuf {
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_owned(), PathBuf::from);
    crate_dir.join("..")
}

pub fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The openAPIV3Schema of the shipped CRD.
pub fn schema() -> Value {
    let crd: Value = serde_yaml::from_str(&read("deploy/crd.yaml")).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The structural checks an API server makes (types, required, ranges, patterns, enums).
fn structural(s: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    if v.is_null() {
        if s["nullable"] != Value::Bool(true) {
            errs.push(format!("{path}: null"));
        }
        return;
    }
    if s["x-kubernetes-int-or-string"] == Value::Bool(true)
        || s["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true)
    {
        return;
    }
    let ok = match s["type"].as_str() {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !ok {
        errs.push(format!("{path}: expected {}", s["type"]));
        return;
    }
    if let (Some(min), Some(x)) = (s["minimum"].as_f64(), v.as_f64()) {
        if x < min {
            errs.push(format!("{path}: {x} < minimum {min}"));
        }
    }
    if let (Some(max), Some(x)) = (s["maximum"].as_f64(), v.as_f64()) {
        if x > max {
            errs.push(format!("{path}: {x} > maximum {max}"));
        }
    }
    if let (Some(p), Some(x)) = (s["pattern"].as_str(), v.as_str()) {
        if !regex::Regex::new(p).unwrap().is_match(x) {
            errs.push(format!("{path}: {x:?} does not match {p}"));
        }
    }
    let len = v.as_str().map(|x| x.chars().count());
    if let (Some(min), Some(n)) = (s["minLength"].as_u64(), len) {
        if (n as u64) < min {
            errs.push(format!("{path}: shorter than minLength {min}"));
        }
    }
    if let (Some(max), Some(n)) = (s["maxLength"].as_u64(), len) {
        if n as u64 > max {
            errs.push(format!("{path}: longer than maxLength {max}"));
        }
    }
    if let (Some(min), Some(items)) = (s["minItems"].as_u64(), v.as_array()) {
        if (items.len() as u64) < min {
            errs.push(format!("{path}: fewer than minItems {min}"));
        }
    }
    if let (Some(max), Some(obj)) = (s["maxProperties"].as_u64(), v.as_object()) {
        if obj.len() as u64 > max {
            errs.push(format!("{path}: more than maxProperties {max}"));
        }
    }
    if let Some(e) = s["enum"].as_array() {
        if !e.contains(v) {
            errs.push(format!("{path}: {v} not in {e:?}"));
        }
    }
    if let Some(obj) = v.as_object() {
        for r in s["required"].as_array().into_iter().flatten() {
            if !obj.contains_key(r.as_str().unwrap_or_default()) {
                errs.push(format!("{path}: missing required {r}"));
            }
        }
        for (k, x) in obj {
            if let Some(ps) = s["properties"].get(k) {
                structural(ps, x, &format!("{path}.{k}"), errs);
            } else if s["additionalProperties"].is_object() {
                structural(&s["additionalProperties"], x, &format!("{path}.{k}"), errs);
            } else if !path.is_empty() && s["properties"].is_object() {
                errs.push(format!("{path}: unknown field {k}"));
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            structural(items, x, &format!("{path}[{i}]"), errs);
        }
    }
}

/// Every error the API server would give for `obj` (schema, then CEL rules).
pub fn admission_errors(obj: &Value) -> Vec<String> {
    let s = schema();
    let mut errs = Vec::new();
    structural(&s["properties"]["spec"], &obj["spec"], ".spec", &mut errs);
    if let Err(e) = kube::core::cel::Validator::new().validate(&s, obj, None) {
        errs.push(e.to_string());
    }
    errs
}

/// Every error the API server would give for the defaults inside the schema itself: it checks
/// each `default` against its own schema (types, ranges, CEL) when the CRD is created, and
/// refuses the whole CRD for one bad default.
pub fn default_errors() -> Vec<String> {
    fn walk(s: &Value, path: &str, errs: &mut Vec<String>) {
        if let Some(d) = s.get("default") {
            structural(s, d, &format!("{path} default"), errs);
            if let Err(e) = kube::core::cel::Validator::new().validate(s, d, None) {
                errs.push(format!("{path} default: {e}"));
            }
        }
        for (k, p) in s["properties"].as_object().into_iter().flatten() {
            walk(p, &format!("{path}.{k}"), errs);
        }
        for key in ["items", "additionalProperties"] {
            if let Some(sub) = s.get(key).filter(|v| v.is_object()) {
                walk(sub, &format!("{path}[{key}]"), errs);
            }
        }
    }
    let mut errs = Vec::new();
    walk(&schema(), "", &mut errs);
    errs
}
