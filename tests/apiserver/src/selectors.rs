//! Label and field selectors, with the syntax and semantics of `k8s.io/apimachinery`.
//!
//! Label selectors: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`, `k>1`,
//! `k<1`, comma-separated (all must hold). Field selectors: `path=v`, `path==v`, `path!=v`,
//! comma-separated; `metadata.name`, `metadata.namespace` and the kind's
//! [`ResourceDef::selectable_fields`] are accepted, anything else is a 400 like upstream.

use serde_json::Value;

use crate::resources::ResourceDef;
use crate::status::ApiError;

/// A parsed label selector plus field selector; an empty one matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelOp {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    Gt(i64),
    Lt(i64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct LabelReq {
    key: String,
    op: LabelOp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FieldReq {
    path: String,
    value: String,
    negate: bool,
}

impl Selector {
    /// Parses the `labelSelector` and `fieldSelector` query parameters for kind `def`.
    pub fn parse(
        label_selector: Option<&str>,
        field_selector: Option<&str>,
        def: &ResourceDef,
    ) -> Result<Self, ApiError> {
        let labels = match label_selector {
            Some(s) => parse_labels(s)
                .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?,
            None => Vec::new(),
        };
        let fields = match field_selector {
            Some(s) => parse_fields(s, def)?,
            None => Vec::new(),
        };
        Ok(Self { labels, fields })
    }

    /// Whether `obj` is selected.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).map(label_value);
        let labels_ok = self.labels.iter().all(|req| match &req.op {
            LabelOp::In(vals) => label(&req.key).is_some_and(|v| vals.contains(&v)),
            LabelOp::NotIn(vals) => label(&req.key).is_none_or(|v| !vals.contains(&v)),
            LabelOp::Exists => label(&req.key).is_some(),
            LabelOp::DoesNotExist => label(&req.key).is_none(),
            LabelOp::Gt(n) => label(&req.key)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v > *n),
            LabelOp::Lt(n) => label(&req.key)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v < *n),
        });
        labels_ok
            && self
                .fields
                .iter()
                .all(|req| (field_value(obj, &req.path) == req.value) != req.negate)
    }
}

fn label_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The string form of a selectable field, as upstream's field sets render it.
fn field_value(obj: &Value, path: &str) -> String {
    let pointer: String = path.split('.').map(|seg| format!("/{seg}")).collect();
    match obj.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Null) | None => match path {
            // Upstream renders these booleans with FormatBool, so a missing one is "false".
            "spec.hostNetwork" | "spec.unschedulable" => "false".to_owned(),
            _ => String::new(),
        },
        Some(other) => other.to_string(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    Comma,
    Open,
    Close,
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '!' => {
                chars.next();
                if chars.peek() == Some(&'=') {
                    chars.next();
                    out.push(Tok::NotEq);
                } else {
                    out.push(Tok::Not);
                }
            }
            '=' => {
                chars.next();
                if chars.peek() == Some(&'=') {
                    chars.next();
                    out.push(Tok::DoubleEq);
                } else {
                    out.push(Tok::Eq);
                }
            }
            '>' => {
                chars.next();
                out.push(Tok::Gt);
            }
            '<' => {
                chars.next();
                out.push(Tok::Lt);
            }
            ',' => {
                chars.next();
                out.push(Tok::Comma);
            }
            '(' => {
                chars.next();
                out.push(Tok::Open);
            }
            ')' => {
                chars.next();
                out.push(Tok::Close);
            }
            _ => {
                let mut ident = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || "!=<>,()".contains(c) {
                        break;
                    }
                    ident.push(c);
                    chars.next();
                }
                out.push(Tok::Ident(ident));
            }
        }
    }
    Ok(out)
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn parse_labels(s: &str) -> Result<Vec<LabelReq>, String> {
    let toks = lex(s)?;
    let mut it = toks.into_iter().peekable();
    let mut reqs = Vec::new();
    if it.peek().is_none() {
        return Ok(reqs);
    }
    loop {
        let key_of = |t: Option<Tok>| match t {
            Some(Tok::Ident(k)) if valid_key(&k) => Ok(k),
            other => Err(format!("expected a label key, found {other:?}")),
        };
        let req = match it.next() {
            Some(Tok::Not) => LabelReq {
                key: key_of(it.next())?,
                op: LabelOp::DoesNotExist,
            },
            t => {
                let key = key_of(t)?;
                let op = match it.peek().cloned() {
                    None | Some(Tok::Comma) => LabelOp::Exists,
                    Some(Tok::Eq | Tok::DoubleEq | Tok::NotEq) => {
                        let negate = it.next() == Some(Tok::NotEq);
                        let value = match it.peek() {
                            Some(Tok::Ident(_)) => match it.next() {
                                Some(Tok::Ident(v)) => v,
                                _ => String::new(),
                            },
                            None | Some(Tok::Comma) => String::new(),
                            Some(other) => {
                                return Err(format!("expected a value, found {other:?}"))
                            }
                        };
                        if !valid_value(&value) {
                            return Err(format!("invalid label value {value:?}"));
                        }
                        if negate {
                            LabelOp::NotIn(vec![value])
                        } else {
                            LabelOp::In(vec![value])
                        }
                    }
                    Some(Tok::Gt | Tok::Lt) => {
                        let gt = it.next() == Some(Tok::Gt);
                        let n = match it.next() {
                            Some(Tok::Ident(v)) => v
                                .parse::<i64>()
                                .map_err(|_| format!("{v:?} is not an integer"))?,
                            other => return Err(format!("expected an integer, found {other:?}")),
                        };
                        if gt {
                            LabelOp::Gt(n)
                        } else {
                            LabelOp::Lt(n)
                        }
                    }
                    Some(Tok::Ident(word)) if word == "in" || word == "notin" => {
                        it.next();
                        if it.next() != Some(Tok::Open) {
                            return Err("expected '(' after set operator".to_owned());
                        }
                        let mut values = Vec::new();
                        let mut expect_value = true;
                        loop {
                            match it.next() {
                                Some(Tok::Close) => {
                                    if expect_value && !values.is_empty() {
                                        values.push(String::new());
                                    }
                                    break;
                                }
                                Some(Tok::Comma) => {
                                    if expect_value {
                                        values.push(String::new());
                                    }
                                    expect_value = true;
                                }
                                Some(Tok::Ident(v)) if expect_value && valid_value(&v) => {
                                    values.push(v);
                                    expect_value = false;
                                }
                                other => return Err(format!("unexpected {other:?} in value set")),
                            }
                        }
                        if values.is_empty() {
                            return Err(
                                "for 'in', 'notin' operators, values set can't be empty".to_owned()
                            );
                        }
                        if word == "in" {
                            LabelOp::In(values)
                        } else {
                            LabelOp::NotIn(values)
                        }
                    }
                    Some(other) => return Err(format!("unexpected {other:?} after key")),
                };
                LabelReq { key, op }
            }
        };
        reqs.push(req);
        match it.next() {
            None => return Ok(reqs),
            Some(Tok::Comma) => {}
            Some(other) => return Err(format!("expected ',' found {other:?}")),
        }
    }
}

/// Splits on `sep` not preceded by a backslash, unescaping `\\`, `\,` and `\=`.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                if let Some(last) = parts.last_mut() {
                    last.push('\\');
                    last.push(next);
                }
            }
        } else if c == sep {
            parts.push(String::new());
        } else if let Some(last) = parts.last_mut() {
            last.push(c);
        }
    }
    parts
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn parse_fields(s: &str, def: &ResourceDef) -> Result<Vec<FieldReq>, ApiError> {
    let mut reqs = Vec::new();
    if s.trim().is_empty() {
        return Ok(reqs);
    }
    for part in split_unescaped(s, ',') {
        let (path, value, negate) = if let Some((k, v)) = part.split_once("!=") {
            (k, v, true)
        } else if let Some((k, v)) = part.split_once("==") {
            (k, v, false)
        } else if let Some((k, v)) = part.split_once('=') {
            (k, v, false)
        } else {
            return Err(ApiError::bad_request(format!(
                "invalid field selector: {part:?}: no operator (=, ==, !=)"
            )));
        };
        let path = unescape(path.trim());
        let supported = path == "metadata.name"
            || path == "metadata.namespace"
            || def.selectable_fields.contains(&path);
        if !supported {
            return Err(ApiError::bad_request(format!(
                "\"{path}\" is not a known field selector: only \"metadata.name\", \"metadata.namespace\"{}",
                def.selectable_fields
                    .iter()
                    .map(|f| format!(", \"{f}\""))
                    .collect::<String>()
            )));
        }
        reqs.push(FieldReq {
            path,
            value: unescape(value.trim()),
            negate,
        });
    }
    Ok(reqs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels},
               "spec": {"nodeName": "node-a"}})
    }

    fn sel(l: &str) -> Selector {
        let def = crate::resources::default_resources().remove(0);
        Selector::parse(Some(l), None, &def).unwrap()
    }

    #[test]
    fn label_operators() {
        let p = pod(json!({"app": "web", "tier": "fe", "n": "5"}));
        assert!(sel("app=web").matches(&p));
        assert!(sel("app==web").matches(&p));
        assert!(!sel("app!=web").matches(&p));
        assert!(sel("missing!=x").matches(&p));
        assert!(sel("app in (web, db)").matches(&p));
        assert!(!sel("app notin (web,db)").matches(&p));
        assert!(sel("missing notin (web)").matches(&p));
        assert!(sel("app").matches(&p));
        assert!(!sel("!app").matches(&p));
        assert!(sel("!missing").matches(&p));
        assert!(sel("app=web,tier=fe").matches(&p));
        assert!(!sel("app=web,tier=be").matches(&p));
        assert!(sel("n>4,n<6").matches(&p));
        assert!(!sel("n>5").matches(&p));
        assert!(sel("").matches(&p));
        assert!(sel("example.com/role=x").matches(&pod(json!({"example.com/role": "x"}))));
        assert!(sel("app=").matches(&pod(json!({"app": ""}))));
    }

    #[test]
    fn bad_label_selectors_are_errors() {
        let def = crate::resources::default_resources().remove(0);
        for bad in [
            "app in web",
            "=x",
            "app in ()",
            "app=a b",
            "a,,b",
            "app in (a",
            "n>x",
        ] {
            let err = Selector::parse(Some(bad), None, &def).unwrap_err();
            assert_eq!(err.code, 400, "{bad}");
        }
    }

    #[test]
    fn field_selectors() {
        let def = crate::resources::default_resources().remove(0);
        let p = pod(json!({}));
        let f = |s: &str| Selector::parse(None, Some(s), &def).unwrap();
        assert!(f("metadata.name=p").matches(&p));
        assert!(f("metadata.namespace==ns,spec.nodeName=node-a").matches(&p));
        assert!(!f("spec.nodeName!=node-a").matches(&p));
        assert!(f("spec.hostNetwork=false").matches(&p));
        assert!(f("status.podIP=").matches(&p));
        assert_eq!(
            Selector::parse(None, Some("spec.bogus=x"), &def)
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(
            Selector::parse(None, Some("nooperator"), &def)
                .unwrap_err()
                .code,
            400
        );
    }
}
