//! The fast reader against serde-saphyr: where it reads a chunk, serde-saphyr reads the same
//! values; where serde-saphyr refuses a chunk, it declines.

use super::*;
use crate::manifests::yaml_general;

/// Checks the one rule and returns the fast reader's answer.
fn agree(chunk: &str) -> Option<Vec<Value>> {
    let fast = parse_chunk(chunk);
    if let Some(f) = &fast {
        match yaml_general(chunk) {
            Ok(g) => assert_eq!(f, &g, "the readers differ on {chunk:?}"),
            Err(e) => panic!("read {chunk:?}, which serde-saphyr refuses: {e}"),
        }
    }
    fast
}

fn reads(chunk: &str) -> Value {
    match agree(chunk) {
        Some(mut docs) if docs.len() == 1 => docs.pop().unwrap(),
        other => panic!("expected one document from {chunk:?}, got {other:?}"),
    }
}

fn declines(chunk: &str) {
    assert_eq!(agree(chunk), None, "should decline {chunk:?}");
}

const KUBECTL_POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"v1","kind":"Pod","metadata":{"annotations":{},"labels":{"app":"web"},"name":"web-1","namespace":"shop"}}
  creationTimestamp: "2026-11-30T09:12:44Z"
  generateName: web-5d9c7b8f4-
  labels:
    app: web
    pod-template-hash: 5d9c7b8f4
    tier: "007"
  managedFields:
  - apiVersion: v1
    fieldsType: FieldsV1
    fieldsV1:
      f:metadata:
        f:labels:
          f:app: {}
    manager: kubectl
    operation: Update
  name: web-1
  namespace: shop
  ownerReferences:
  - apiVersion: apps/v1
    blockOwnerDeletion: true
    controller: true
    kind: ReplicaSet
    name: web-5d9c7b8f4
    uid: 3f1c0e9a-6b2d-4c8e-9a71-0d5e2b7c4f10
  resourceVersion: "48213"
  uid: 9b2e4d61-0c3a-47f5-8e19-6a2d5c0b7e33
spec:
  containers:
  - image: registry.example/web:1.25.3
    imagePullPolicy: IfNotPresent
    name: web
    ports:
    - containerPort: 8080
      name: http
      protocol: TCP
    resources: {}
    terminationMessagePath: /dev/termination-log
  dnsPolicy: ClusterFirst
  nodeName: n1
  tolerations:
  - effect: NoExecute
    key: node.kubernetes.io/not-ready
    operator: Exists
    tolerationSeconds: 300
status:
  conditions:
  - lastProbeTime: null
    lastTransitionTime: "2026-11-30T09:12:44Z"
    status: "True"
    type: Ready
  hostIP: 10.0.0.11
  phase: Running
  podIP: 10.244.1.5
  podIPs:
  - ip: 10.244.1.5
  - ip: fd00:10:244:1::5
  qosClass: BestEffort
"#;

#[test]
fn reads_what_kubectl_prints() {
    let v = reads(KUBECTL_POD);
    assert_eq!(v["status"]["podIP"], "10.244.1.5");
    assert_eq!(
        v["metadata"]["managedFields"][0]["fieldsV1"]["f:metadata"]["f:labels"]["f:app"],
        Value::Object(Map::new())
    );
    assert_eq!(v["metadata"]["labels"]["tier"], "007");
    assert_eq!(
        v["spec"]["containers"][0]["ports"][0]["containerPort"],
        8080
    );
    assert_eq!(v["status"]["conditions"][0]["lastProbeTime"], Value::Null);
    let applied = v["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
        .as_str()
        .unwrap();
    assert!(applied.starts_with("{\"apiVersion\"") && applied.ends_with("}}\n"));
    // The same with a document marker, a comment and an end marker.
    reads(&format!("# dump\n---\n{KUBECTL_POD}...\n# end\n"));
}

#[test]
fn reads_the_synthetic_dumps_without_declining() {
    let state = crate::synthetic::build_cluster().state;
    let dumps = crate::synthetic::dumps(&state);
    for (what, text) in [("multi", &dumps.multi_yaml), ("list", &dumps.yaml_list)] {
        let mut docs = 0;
        for (line, chunk) in crate::manifests::yaml_chunks(text) {
            let fast = parse_chunk(chunk)
                .unwrap_or_else(|| panic!("{what}: declined the chunk at line {line}"));
            assert_eq!(fast, yaml_general(chunk).unwrap(), "{what}: line {line}");
            docs += fast.len();
        }
        assert!(docs > 0, "{what}: no documents");
    }
}

#[test]
fn scalars_are_typed_as_serde_saphyr_types_them() {
    let cases: &[(&str, Value)] = &[
        ("a", Value::from("a")),
        ("null", Value::Null),
        ("~", Value::Null),
        ("", Value::Null),
        ("True", Value::Bool(true)),
        ("FALSE", Value::Bool(false)),
        ("yes", Value::from("yes")),
        ("on", Value::from("on")),
        ("y", Value::from("y")),
        ("0", Value::from(0)),
        ("-0", Value::from(0)),
        ("42", Value::from(42)),
        ("-42", Value::from(-42)),
        ("18446744073709551615", Value::from(u64::MAX)),
        ("007", Value::from("007")),
        ("10.244.1.5", Value::from("10.244.1.5")),
        ("1Gi", Value::from("1Gi")),
        ("500m", Value::from("500m")),
        ("a b  c", Value::from("a b  c")),
        ("a :b", Value::from("a :b")),
        ("http://x:80/y", Value::from("http://x:80/y")),
        ("/healthz", Value::from("/healthz")),
        ("x # comment", Value::from("x")),
        ("'it''s'", Value::from("it's")),
        ("\"tab\\there \\u00e9\"", Value::from("tab\there é")),
        ("\"\"", Value::from("")),
        ("{}", Value::Object(Map::new())),
        ("[]", Value::Array(Vec::new())),
    ];
    for (text, want) in cases {
        let v = reads(&format!("k: {text}\n"));
        assert_eq!(&v["k"], want, "k: {text}");
    }
    // Typed by serde-saphyr itself (agree() checks the values).
    for text in [
        "1.5",
        "1e3",
        "0x1f",
        "0o17",
        "1_000",
        "inf",
        "NaN",
        "12:30",
        "1.2.3.",
        "9b2e4d61-0c3a",
        "2026-11-30",
        "99999999999999999999",
    ] {
        agree(&format!("k: {text}\n"));
    }
}

#[test]
fn declines_what_it_does_not_read_with_certainty() {
    for chunk in [
        "a: &x 1\nb: *x\n",
        "a: !!str 1\n",
        "a: [1, 2]\n",
        "a: {b: 1}\n",
        "? a\n: b\n",
        "a: >\n  folded\n",
        "a: plain\n  continued\n",
        "a: \"open\n  quote\"\n",
        "a:\tb\n",
        "a: b\r\n",
        "a: 1\na: 2\n",
        "1: one\n",
        "true: yes\n",
        "%YAML 1.2\n---\na: 1\n",
        "- - nested\n",
        "a: -\n",
        "a: @x\n",
        "just a scalar\n",
        "a: 1",
        "a: |\n\n  leading blank\n",
    ] {
        declines(chunk);
    }
    let deep = (0..40).fold(String::new(), |s, i| format!("{s}{}k{i}:\n", " ".repeat(i)));
    declines(&deep);
}

/// Characters YAML does not print, or treats as breaks or marks, anywhere in a chunk — also
/// inside a literal block (found by the fuzzer: U+0099 in a last-applied annotation, which
/// serde-saphyr refuses).
#[test]
fn declines_unprintable_and_special_characters_outside_ascii() {
    for c in [
        '\u{80}', '\u{85}', '\u{99}', '\u{9f}', '\u{2028}', '\u{2029}', '\u{feff}', '\u{fffe}',
        '\u{ffff}',
    ] {
        declines(&format!("a: x{c}y\n"));
        declines(&format!("a: |\n  x{c}y\n"));
        declines(&format!("a: \"x{c}y\"\n"));
    }
    declines(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  annotations:\n    \
         kubectl.kubernetes.io/last-applied-configuration: |\n     \
         \u{784}\u{75e}piVersion\":ce8-4-9rsion: \"48213\"est\u{99}fort\n",
    );
    // Printable non-ASCII is read (quoted and in blocks; plain scalars are ASCII only).
    let text = "x\u{a0}\u{e9}\u{1f600}y";
    assert_eq!(
        reads(&format!("a: \"{text}\"\n"))["a"],
        Value::String(text.into())
    );
    assert_eq!(
        reads(&format!("a: |\n  {text}\n"))["a"],
        Value::String(format!("{text}\n"))
    );
}

#[test]
fn block_structure() {
    let v = reads("a:\n- x\n- y: 1\n  z: 2\nb:\n  c:\n  - 3\n  d: |-\n    l1\n\n      l2\n");
    assert_eq!(v["a"][1]["z"], 2);
    assert_eq!(v["b"]["c"][0], 3);
    assert_eq!(v["b"]["d"], "l1\n\n  l2");
    let v = reads("- a\n-\n  b: 1\n- 'c'\n");
    assert_eq!(v[1]["b"], 1);
    assert_eq!(reads("a:\n  # only a comment\nb: 1\n")["a"], Value::Null);
    assert_eq!(agree("# nothing\n"), yaml_general("# nothing\n").ok());
}

/// xorshift64*: the same cases on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

const KEYS: &[&str] = &[
    "a",
    "b",
    "name",
    "app.kubernetes.io/name",
    "'q'",
    "\"d k\"",
    "a",
    "x-y_z",
    "0",
    "true",
    "on",
    "k:",
    "- k",
    "a b",
];
const SCALARS: &[&str] = &[
    "",
    "x",
    "null",
    "Null",
    "~",
    "true",
    "False",
    "yes",
    "No",
    "0",
    "-0",
    "12",
    "-12",
    "007",
    "-007",
    "0.5",
    ".5",
    "1.",
    "1.2.3",
    "10.0.0.1",
    "1e3",
    "1E-3",
    "0x1F",
    "0o17",
    "0b11",
    "1_0",
    "+1",
    "inf",
    ".inf",
    "-.inf",
    "NaN",
    ".nan",
    "12:30",
    "2026-12-04",
    "1Gi",
    "a b",
    "a  #c",
    "a#b",
    "a: b",
    "a:",
    "http://h:1/p",
    "/p",
    "'s'",
    "'it''s'",
    "'a' b",
    "\"e\\n\"",
    "\"\\x41\\u00e9\\U0001F600\"",
    "\"\\N\"",
    "\"bad",
    "{}",
    "[]",
    "[a]",
    "{a: 1}",
    "&a x",
    "*a",
    "!t x",
    "|",
    "|-",
    ">",
    "- x",
    "-",
    "@x",
    "`x",
    "%x",
    "?",
    "? x",
    "x ",
    "9999999999999999999999",
    "-9223372036854775808",
    "-9223372036854775809",
    "é",
    "\"é\"",
    "#c",
    "3f1c0e9a-6b2d",
];

/// A random block document over tricky keys and scalars, indents and markers.
fn random_doc(rng: &mut Rng) -> String {
    let mut out = String::new();
    if rng.next().is_multiple_of(8) {
        out.push_str(rng.pick(&["---\n", "# c\n---\n", "--- x\n", "\n"]));
    }
    let lines = 1 + rng.next() % 12;
    let mut indent = 0usize;
    for _ in 0..lines {
        match rng.next() % 10 {
            0 => indent += 2,
            1 => indent = indent.saturating_sub(2),
            2 => indent = 0,
            3 if rng.next().is_multiple_of(4) => indent += 1,
            _ => {}
        }
        out.push_str(&" ".repeat(indent));
        match rng.next() % 9 {
            0..=3 => {
                let (k, v) = (rng.pick(KEYS), rng.pick(SCALARS));
                out.push_str(&format!("{k}: {v}"));
            }
            4 => out.push_str(&format!("{}:", rng.pick(KEYS))),
            5 => out.push_str(&format!("- {}", rng.pick(SCALARS))),
            6 => out.push_str(&format!("- {}: {}", rng.pick(KEYS), rng.pick(SCALARS))),
            7 => out.push_str(rng.pick(&["-", "# note", "", "...", "  block text", "l2"])),
            _ => out.push_str(rng.pick(SCALARS)),
        }
        out.push('\n');
    }
    if rng.next().is_multiple_of(16) {
        out.pop();
    }
    out
}

/// Scalars that are valid wherever a value goes; they still differ in type.
const VALUES: &[&str] = &[
    "x",
    "null",
    "~",
    "true",
    "False",
    "yes",
    "0",
    "-0",
    "12",
    "-12",
    "007",
    "0.5",
    "1e3",
    "0x1F",
    "1_0",
    "inf",
    ".inf",
    "12:30",
    "2026-12-04",
    "10.0.0.1",
    "1.2.3",
    "1Gi",
    "a b",
    "a  # c",
    "http://h:1/p",
    "/p",
    "'s'",
    "'it''s'",
    "\"e\\n\"",
    "\"\\u00e9\"",
    "{}",
    "[]",
    "3f1c0e9a-6b2d",
    "9999999999999999999999",
    "é",
    "a :b",
    "(x)",
    "a=b,c",
];
const NAMES: &[&str] = &[
    "a",
    "b",
    "c",
    "name",
    "app.kubernetes.io/name",
    "'q k'",
    "\"d\"",
    "x-y_z",
];

/// A random well-formed block document (mappings, sequences in both styles, literal blocks).
fn structured(rng: &mut Rng, indent: usize, depth: u32, out: &mut String) {
    let pad = " ".repeat(indent);
    let entries = 1 + rng.next() % 4;
    let as_seq = rng.next().is_multiple_of(3);
    let mut used = Vec::new();
    for _ in 0..entries {
        if as_seq {
            out.push_str(&pad);
            out.push('-');
            match rng.next() % 4 {
                0 if depth < 5 => {
                    out.push('\n');
                    structured(rng, indent + 2, depth + 1, out);
                }
                1 if depth < 5 => {
                    // The compact form: `- key: value` and its siblings two columns in.
                    let mut inner = String::new();
                    structured(rng, indent + 2, depth + 1, &mut inner);
                    out.push(' ');
                    out.push_str(inner.trim_start_matches(' '));
                }
                _ => {
                    out.push(' ');
                    out.push_str(rng.pick(VALUES));
                    out.push('\n');
                }
            }
            continue;
        }
        let key = rng.pick(NAMES);
        if used.contains(&key) {
            continue;
        }
        used.push(key);
        out.push_str(&format!("{pad}{key}:"));
        match rng.next() % 6 {
            0 | 1 if depth < 5 => {
                out.push('\n');
                // Nested two in, or a sequence at the key's own indent.
                let same = rng.next().is_multiple_of(2);
                let mut inner = String::new();
                structured(rng, indent + 2, depth + 1, &mut inner);
                if same && inner.trim_start().starts_with('-') {
                    for l in inner.lines() {
                        out.push_str(l.strip_prefix("  ").unwrap_or(l));
                        out.push('\n');
                    }
                } else {
                    out.push_str(&inner);
                }
            }
            2 => {
                out.push_str(rng.pick(&[" |\n", " |-\n"]));
                for _ in 0..1 + rng.next() % 3 {
                    let more = " ".repeat((rng.next() % 3) as usize);
                    out.push_str(&format!("{pad}  {more}{}\n", rng.pick(VALUES)));
                }
                if rng.next().is_multiple_of(2) {
                    out.push('\n');
                }
            }
            3 => out.push_str(" # comment\n"),
            _ => {
                out.push(' ');
                out.push_str(rng.pick(VALUES));
                out.push('\n');
            }
        }
    }
}

#[test]
fn random_documents_are_read_as_serde_saphyr_reads_them_or_declined() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut read, mut declined) = (0, 0);
    for i in 0..20_000 {
        let doc = if i % 2 == 0 {
            random_doc(&mut rng)
        } else {
            let mut d = String::new();
            structured(&mut rng, 0, 0, &mut d);
            d
        };
        match agree(&doc) {
            Some(_) => read += 1,
            None => declined += 1,
        }
    }
    eprintln!("random documents: {read} read, {declined} declined");
    // Not a toy: most well-formed documents are read, not declined.
    assert!(read > 5_000, "read {read}, declined {declined}");
}
