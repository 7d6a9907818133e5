//! `${params.NAME}` references: how a trial's hyperparameters reach its command, its environment
//! and its builtin settings. A reference names one parameter; a reference without its closing
//! `}` is plain text, and so is a reference to a name the trial has no value for when text is
//! substituted. Callers that must not pass such a reference on unreplaced (an argument, an
//! environment variable, a builtin setting of an inactive conditional parameter) drop it with
//! [`refers_to_missing`].
//!
//! This module knows strings, JSON trees and parameter values only: the spec and the builtin
//! trial kind both build on it, and it depends on neither.

use crate::space::{self, Params};
use serde_json::Value;

const OPEN: &str = "${params.";

/// The parameter names `s` refers to, in order, repeats included.
pub fn refs(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find(OPEN) {
        let after = &rest[i + OPEN.len()..];
        match after.find('}') {
            Some(j) => {
                out.push(after[..j].to_string());
                rest = &after[j + 1..];
            }
            None => break,
        }
    }
    out
}

/// Whether `s` refers to a parameter that `params` lacks.
pub fn refers_to_missing(s: &str, params: &Params) -> bool {
    refs(s).iter().any(|n| !params.contains_key(n))
}

/// Replaces each `${params.NAME}` in `s` with the trial's value, rendered as text; a reference
/// to a parameter `params` lacks, or one never closed, is left as written.
pub fn substitute(s: &str, params: &Params) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(OPEN) {
        out.push_str(&rest[..i]);
        let after = &rest[i + OPEN.len()..];
        match after.find('}') {
            Some(j) => {
                let name = &after[..j];
                match params.get(name) {
                    Some(v) => out.push_str(&space::render_value(v)),
                    None => out.push_str(&rest[i..i + OPEN.len() + j + 1]),
                }
                rest = &after[j + 1..];
            }
            None => {
                out.push_str(&rest[i..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Replaces `${params.NAME}` throughout a YAML/JSON tree. A string that is exactly one reference
/// takes the parameter's value with its type (`lr: ${params.lr}` becomes a number), so settings
/// keep the types their schema asks for; other strings have their references replaced as text.
/// A mapping field whose string refers to a parameter the trial lacks (an inactive conditional
/// one) is left out, so the setting takes its default.
pub fn substitute_tree(v: &Value, params: &Params) -> Value {
    match v {
        Value::String(s) => {
            if let Some(name) = s.strip_prefix(OPEN).and_then(|r| r.strip_suffix('}'))
                && !name.contains('}')
                && let Some(value) = params.get(name)
            {
                return value.clone();
            }
            Value::String(substitute(s, params))
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| substitute_tree(x, params)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, x)| !x.as_str().is_some_and(|s| refers_to_missing(s, params)))
                .map(|(k, x)| (k.clone(), substitute_tree(x, params)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Every string in the tree, with the dotted path it sits at (`trial.builtin.model.kind`,
/// `trial.builtin.betas[0]`), so a reference check can name where a bad reference is.
pub fn strings(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::String(s) => out.push((path.to_string(), s.clone())),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                strings(x, &format!("{path}[{i}]"), out);
            }
        }
        Value::Object(m) => {
            for (k, x) in m {
                strings(x, &format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(pairs: &[(&str, Value)]) -> Params {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn refs_are_named_in_order_and_unclosed_ones_ignored() {
        assert_eq!(
            refs("--lr=${params.lr} ${params.b}${params.lr} ${params.open"),
            vec!["lr", "b", "lr"]
        );
        assert!(refs("no references, $params.x, {params.y}").is_empty());
    }

    #[test]
    fn substitute_leaves_unknown_and_unclosed_refs() {
        let p = params(&[("a", json!(1.5))]);
        assert_eq!(
            substitute("x${params.a}y${params.b}z${params.", &p),
            "x1.5y${params.b}z${params."
        );
    }

    #[test]
    fn substitute_renders_each_type_as_text() {
        let p = params(&[("n", json!(3)), ("opt", json!("sgd")), ("on", json!(true))]);
        assert_eq!(substitute("${params.n}-${params.opt}-${params.on}", &p), "3-sgd-true");
    }

    #[test]
    fn missing_references_are_detected() {
        let p = params(&[("a", json!(1))]);
        assert!(!refers_to_missing("${params.a} and plain", &p));
        assert!(refers_to_missing("${params.a}${params.b}", &p));
        assert!(!refers_to_missing("${params.b", &p), "an unclosed reference is text");
    }

    #[test]
    fn whole_references_keep_their_type() {
        let p = params(&[("lr", json!(0.01)), ("opt", json!("sgd"))]);
        let tree = json!({"lr": "${params.lr}", "optimizer": "${params.opt}", "name": "run-${params.lr}", "n": [1, "${params.lr}"]});
        assert_eq!(
            substitute_tree(&tree, &p),
            json!({"lr": 0.01, "optimizer": "sgd", "name": "run-0.01", "n": [1, 0.01]})
        );
    }

    #[test]
    fn a_field_of_an_inactive_parameter_is_left_out() {
        let tree = json!({"optimizer": "${params.optimizer}", "momentum": "${params.momentum}", "lr": 0.1});
        let p = params(&[("optimizer", json!("adam"))]);
        assert_eq!(substitute_tree(&tree, &p), json!({"optimizer": "adam", "lr": 0.1}));
    }

    #[test]
    fn strings_carry_their_paths() {
        let mut out = Vec::new();
        strings(&json!({"a": {"b": ["x", 1, "y"]}, "c": "z"}), "root", &mut out);
        assert_eq!(
            out,
            vec![
                ("root.a.b[0]".to_string(), "x".to_string()),
                ("root.a.b[2]".to_string(), "y".to_string()),
                ("root.c".to_string(), "z".to_string()),
            ]
        );
    }
}
