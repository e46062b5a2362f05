//! Imports run one way: leaves ← engine ← host. Lists every `crate::` edge between the
//! crate's top-level modules (from the source text) and fails on an edge that points up a
//! layer or closes a cycle, unless it is one of the few known ones still to be taken apart,
//! which are listed here so the list can only shrink.
//!
//! - leaves (know nothing of the proxy): wire, platform, error, config, secret, clock,
//!   metrics, logging, private, status;
//! - engine (the proxy itself): proxy, auth, upstream (with the body type), tls, server;
//! - host (puts it together and around it): cli, gateway, admin, sandbox.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const LEAVES: &[&str] = &[
    "wire", "platform", "error", "config", "secret", "clock", "metrics", "logging", "private",
    "status",
];
const ENGINE: &[&str] = &[
    "proxy", "auth", "upstream", "tls", "server", "relay", "limits",
];
const HOST: &[&str] = &["cli", "gateway", "admin", "sandbox"];

/// Edges that break the rule today, each to be removed when it is fixed (fixing one without
/// removing it here fails the test too). None left.
const KNOWN: &[(&str, &str)] = &[];

fn layer(module: &str) -> usize {
    if LEAVES.contains(&module) {
        0
    } else if ENGINE.contains(&module) {
        1
    } else if HOST.contains(&module) {
        2
    } else {
        panic!("module {module:?} is in no layer: add it to tests/layers.rs")
    }
}

/// The code of a Rust file without its `//` comments (doc links are not imports).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules `text` names after `crate::`, grouped imports included.
fn named(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Every name at the group's own depth starts a piece; nested groups
            // (`a::{b, c}`) are inside `a`'s piece.
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        out.insert(ident(&group[j..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

fn edges() -> BTreeMap<(String, String), Vec<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().with_extension("");
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        for to in named(&code(&std::fs::read_to_string(&f).unwrap())) {
            if to != module {
                out.entry((module.clone(), to))
                    .or_default()
                    .push(rel.display().to_string());
            }
        }
    }
    out
}

/// Whether `to` reaches `from` through `edges` (so `from -> to` closes a cycle).
fn reaches(edges: &BTreeSet<(String, String)>, to: &str, from: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut todo = vec![to.to_owned()];
    while let Some(m) = todo.pop() {
        if m == from {
            return true;
        }
        if seen.insert(m.clone()) {
            todo.extend(
                edges
                    .iter()
                    .filter(|(a, _)| *a == m)
                    .map(|(_, b)| b.clone()),
            );
        }
    }
    false
}

#[test]
fn imports_point_down_the_layers_and_never_in_a_circle() {
    let all = edges();
    let set: BTreeSet<(String, String)> = all.keys().cloned().collect();
    let mut bad = Vec::new();
    for ((from, to), files) in &all {
        let up = layer(to) > layer(from);
        let circle = reaches(&set, to, from);
        let known = KNOWN.contains(&(from.as_str(), to.as_str()));
        if (up || circle) && !known {
            bad.push(format!(
                "{from} -> {to} ({}) in {}",
                if up { "points up" } else { "closes a cycle" },
                files.join(", ")
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "imports against the layering:\n{}",
        bad.join("\n")
    );
    for (from, to) in KNOWN {
        let still = set.contains(&((*from).to_owned(), (*to).to_owned()));
        assert!(
            still,
            "{from} -> {to} is gone: take it off KNOWN in tests/layers.rs"
        );
    }
}

#[test]
fn the_scanner_sees_every_form_of_import() {
    let text = code(
        "use crate::wire::hex;\nuse crate::{config::{A, B}, error::E, self};\n\
         let x = crate::platform::same_path(a, b); // crate::sandbox in a comment\n",
    );
    let got: Vec<String> = named(&text).into_iter().collect();
    assert_eq!(got, ["config", "error", "platform", "wire"]);
}
