//! `cargo xtask test`'s import-cycle check: mesh-daemon's modules must import one way.
//!
//! A module depends on another when its code names it (`use crate::a::b`, `crate::a::X` inline,
//! `super::…`, `self::…`, or a child module's name at the start of a path). Declaring a child
//! (`mod b;`) is ownership, not a dependency. Test modules (`#[cfg(test)] mod … { … }`) are left
//! out: tests may reach anywhere. This reads the source text (comments, strings and test modules
//! removed) rather than compiling it, which is all one-way imports need and keeps xtask std-only;
//! `cargo modules dependencies --acyclic` would say the same but builds rust-analyzer first.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// One module: its path (`proxy::hbone`, `crate` for lib.rs), where it lives and its text.
#[derive(Debug, Clone)]
pub struct Module {
    pub path: String,
    pub file: String,
    pub text: String,
}

/// An edge and the line that makes it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub line: usize,
}

/// Checks mesh-daemon's library for module cycles; the error lists each cycle and its lines.
pub fn check_daemon(root: &Path) -> anyhow::Result<usize> {
    let src = root.join("mesh-daemon/src");
    let modules = read_modules(&src)?;
    let n = modules.len();
    let edges = edges(&modules);
    let cycles = cycles(&modules, &edges);
    if cycles.is_empty() {
        return Ok(n);
    }
    let mut msg = String::from(
        "mesh-daemon's modules import each other in a cycle; move the shared part into a leaf \
         module (socket.rs, tap.rs) or put a trait in the lower module:\n",
    );
    for c in &cycles {
        msg.push_str("  ");
        msg.push_str(c);
        msg.push('\n');
    }
    bail!(msg)
}

/// Every `.rs` file of the library (not the binaries' `main.rs`, `app.rs`, `bin/`), as modules.
pub fn read_modules(src: &Path) -> anyhow::Result<Vec<Module>> {
    let mut files = Vec::new();
    walk(src, &mut files)?;
    let mut out = Vec::new();
    for f in files {
        let rel = f.strip_prefix(src).context("file outside src")?;
        let rel_s = rel.to_string_lossy().replace('\\', "/");
        // The binaries' own modules (main.rs declares app.rs) reach the library as
        // `mesh_daemon::…`, never as `crate::`, so they cannot close a cycle.
        // A `tests.rs` is a test module (`#[cfg(test)] mod tests;`): tests may reach anywhere.
        if rel_s == "main.rs"
            || rel_s == "app.rs"
            || rel_s.starts_with("bin/")
            || rel_s == "tests.rs"
            || rel_s.ends_with("/tests.rs")
        {
            continue;
        }
        let path = if rel_s == "lib.rs" {
            "crate".to_string()
        } else {
            rel_s.trim_end_matches(".rs").replace('/', "::")
        };
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
        out.push(Module {
            path,
            file: format!("mesh-daemon/src/{rel_s}"),
            text,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Colons,
    Open,
    Close,
    Comma,
    Other,
}

/// Removes comments, string and char literals, keeping line breaks so lines still count.
fn strip(text: &str) -> String {
    let b: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == '\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_before(&b, i) {
            // A raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            'raw: while j < b.len() {
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break 'raw;
                }
                if b[j] == '\n' {
                    out.push('\n');
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                if b.get(i) == Some(&'\n') {
                    out.push('\n');
                }
                i += 1;
            }
            out.push_str("\"\"");
            i += 1;
        } else if c == '\'' {
            // A char literal ('a', '\n', '\u{1F}') or a lifetime ('a): only the former is skipped.
            let close = if next == Some('\\') {
                (i + 2..b.len().min(i + 12)).find(|&k| b[k] == '\'')
            } else if b.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match close {
                Some(k) => {
                    out.push_str("' '");
                    i = k + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_before(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

/// Tokens with their line numbers.
fn tokens(text: &str) -> Vec<(Tok, usize)> {
    let b: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphabetic() || c == '_' {
            let s = i;
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                i += 1;
            }
            out.push((Tok::Ident(b[s..i].iter().collect()), line));
        } else if c == ':' && b.get(i + 1) == Some(&':') {
            out.push((Tok::Colons, line));
            i += 2;
        } else {
            out.push((
                match c {
                    '{' => Tok::Open,
                    '}' => Tok::Close,
                    ',' => Tok::Comma,
                    _ => Tok::Other,
                },
                line,
            ));
            i += 1;
        }
    }
    out
}

/// Drops `#[cfg(test)] mod name { … }` blocks (tokens from the attribute to the closing brace).
fn without_tests(toks: Vec<(Tok, usize)>) -> Vec<(Tok, usize)> {
    let mut out = Vec::with_capacity(toks.len());
    let mut i = 0;
    let is = |i: usize, t: &str| matches!(toks.get(i), Some((Tok::Ident(s), _)) if s == t);
    while i < toks.len() {
        // `#` `[` cfg `(` test `)` `]` are Other/Ident tokens: look for `cfg ( test`.
        if is(i, "cfg") && is(i + 2, "test") {
            // Skip to the `mod`, then its block.
            let mut j = i + 3;
            while j < toks.len() && j < i + 8 && !is(j, "mod") {
                j += 1;
            }
            if is(j, "mod") && toks.get(j + 2).map(|t| &t.0) != Some(&Tok::Open) {
                // `mod tests;`: its file is left out by `read_modules`; drop the declaration.
                while matches!(out.last(), Some((Tok::Other, _))) {
                    out.pop();
                }
                i = j + 3;
                continue;
            }
            if is(j, "mod") {
                let mut k = j;
                while k < toks.len() && toks[k].0 != Tok::Open {
                    k += 1;
                }
                let mut depth = 0;
                while k < toks.len() {
                    match toks[k].0 {
                        Tok::Open => depth += 1,
                        Tok::Close => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    k += 1;
                }
                // Also drop the `#[` already pushed.
                while matches!(out.last(), Some((Tok::Other, _))) {
                    out.pop();
                }
                i = k + 1;
                continue;
            }
        }
        out.push(toks[i].clone());
        i += 1;
    }
    out
}

/// Parses a path or use tree starting at `i` (the token after the first segment's `::`),
/// collecting each leaf path (prefix + segments).
fn tree(toks: &[(Tok, usize)], mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    loop {
        match toks.get(i).map(|t| &t.0) {
            Some(Tok::Ident(s)) => {
                if s == "self" {
                    // `{self, …}` names the prefix itself.
                } else {
                    path.push(s.clone());
                }
                if toks.get(i + 1).map(|t| &t.0) == Some(&Tok::Colons) {
                    i += 2;
                    continue;
                }
                out.push(path);
                return;
            }
            Some(Tok::Open) => {
                // A group: each comma-separated subtree with this prefix.
                let mut depth = 0;
                let mut start = i + 1;
                let mut k = i;
                while k < toks.len() {
                    match toks[k].0 {
                        Tok::Open => depth += 1,
                        Tok::Close => {
                            depth -= 1;
                            if depth == 0 {
                                tree(toks, start, path.clone(), out);
                                return;
                            }
                        }
                        Tok::Comma if depth == 1 => {
                            tree(toks, start, path.clone(), out);
                            start = k + 1;
                        }
                        _ => {}
                    }
                    k += 1;
                }
                return;
            }
            _ => {
                out.push(path);
                return;
            }
        }
    }
}

/// The dependency edges between modules.
pub fn edges(modules: &[Module]) -> BTreeSet<Edge> {
    let known: BTreeSet<&str> = modules.iter().map(|m| m.path.as_str()).collect();
    let mut out = BTreeSet::new();
    for m in modules {
        let here: Vec<String> = if m.path == "crate" {
            vec![]
        } else {
            m.path.split("::").map(str::to_string).collect()
        };
        let children: BTreeSet<String> = known
            .iter()
            .filter_map(|k| {
                let rest = if here.is_empty() {
                    Some(*k)
                } else {
                    k.strip_prefix(&format!("{}::", m.path))
                };
                rest.filter(|r| !r.contains("::") && *r != "crate")
                    .map(str::to_string)
            })
            .collect();
        let toks = without_tests(tokens(&strip(&m.text)));
        for i in 0..toks.len() {
            let Tok::Ident(first) = &toks[i].0 else {
                continue;
            };
            if toks.get(i + 1).map(|t| &t.0) != Some(&Tok::Colons) {
                continue;
            }
            // Only the start of a path: not `a::first::`, and not `mod first`.
            if i > 0 && toks[i - 1].0 == Tok::Colons {
                continue;
            }
            let prefix: Vec<String> = match first.as_str() {
                "crate" => vec![],
                "self" => here.clone(),
                "super" => {
                    let mut p = here.clone();
                    p.pop();
                    let mut j = i + 2;
                    while matches!(toks.get(j), Some((Tok::Ident(s), _)) if s == "super")
                        && toks.get(j + 1).map(|t| &t.0) == Some(&Tok::Colons)
                    {
                        p.pop();
                        j += 2;
                    }
                    p
                }
                c if children.contains(c) => {
                    let mut p = here.clone();
                    p.push(c.to_string());
                    let mut leaves = Vec::new();
                    tree(&toks, i + 2, p, &mut leaves);
                    add(&mut out, &known, &m.path, &leaves, toks[i].1);
                    continue;
                }
                _ => continue,
            };
            let mut start = i + 2;
            while first == "super"
                && matches!(toks.get(start), Some((Tok::Ident(s), _)) if s == "super")
            {
                start += 2;
            }
            let mut leaves = Vec::new();
            tree(&toks, start, prefix, &mut leaves);
            add(&mut out, &known, &m.path, &leaves, toks[i].1);
        }
    }
    out
}

fn add(
    out: &mut BTreeSet<Edge>,
    known: &BTreeSet<&str>,
    from: &str,
    leaves: &[Vec<String>],
    line: usize,
) {
    for leaf in leaves {
        // The longest prefix that is a module is what the path depends on.
        let mut target = "crate".to_string();
        for n in (1..=leaf.len()).rev() {
            let p = leaf[..n].join("::");
            if known.contains(p.as_str()) {
                target = p;
                break;
            }
        }
        if target != from && target != "crate" {
            // The first line that makes an edge is evidence enough.
            if !out.iter().any(|e| e.from == from && e.to == target) {
                out.insert(Edge {
                    from: from.to_string(),
                    to: target,
                    line,
                });
            }
        }
    }
}

/// Each cycle (one per strongly connected component of more than one module), as
/// `a -> b -> a (a.rs:3, b.rs:9)`.
pub fn cycles(modules: &[Module], edges: &BTreeSet<Edge>) -> Vec<String> {
    let mut adj: BTreeMap<&str, Vec<&Edge>> = BTreeMap::new();
    for e in edges {
        adj.entry(e.from.as_str()).or_default().push(e);
    }
    let file = |m: &str| {
        modules
            .iter()
            .find(|x| x.path == m)
            .map_or(m.to_string(), |x| x.file.clone())
    };
    let mut seen_in_cycle: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    for m in modules {
        if seen_in_cycle.contains(&m.path) {
            continue;
        }
        // The shortest cycle through m, by breadth-first search back to it.
        let mut prev: BTreeMap<&str, &Edge> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([m.path.as_str()]);
        let mut found: Option<&Edge> = None;
        'bfs: while let Some(n) = queue.pop_front() {
            for e in adj.get(n).into_iter().flatten() {
                if e.to == m.path {
                    found = Some(e);
                    break 'bfs;
                }
                if !prev.contains_key(e.to.as_str()) {
                    prev.insert(e.to.as_str(), e);
                    queue.push_back(e.to.as_str());
                }
            }
        }
        let Some(last) = found else { continue };
        let mut chain = vec![last];
        let mut at = last.from.as_str();
        while at != m.path {
            let e = prev[at];
            chain.push(e);
            at = e.from.as_str();
        }
        chain.reverse();
        let names: Vec<&str> = std::iter::once(m.path.as_str())
            .chain(chain.iter().map(|e| e.to.as_str()))
            .collect();
        let lines: Vec<String> = chain
            .iter()
            .map(|e| format!("{}:{} uses {}", file(&e.from), e.line, e.to))
            .collect();
        for e in &chain {
            seen_in_cycle.insert(e.from.clone());
        }
        out.push(format!("{} ({})", names.join(" -> "), lines.join("; ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(path: &str, text: &str) -> Module {
        Module {
            path: path.into(),
            file: format!("{}.rs", path.replace("::", "/")),
            text: text.into(),
        }
    }

    fn edge_set(ms: &[Module]) -> Vec<(String, String)> {
        edges(ms).into_iter().map(|e| (e.from, e.to)).collect()
    }

    #[test]
    fn finds_edges_of_every_path_shape() {
        let ms = [
            m("crate", "pub mod a; pub mod b; pub mod c; pub mod d;"),
            m(
                "a",
                "pub mod inner;\nuse crate::{b::{self, X}, c::Y};\nfn f() { inner::g(); }",
            ),
            m("a::inner", "use super::super::d; fn g() { super::h(); }"),
            m(
                "b",
                "// crate::c::Z in a comment\nconst S: &str = \"crate::d::W\";\nfn f(x: &'static str) -> char { 'x' }",
            ),
            m(
                "c",
                "fn f() {}\n#[cfg(test)]\nmod tests { use crate::a::Thing; }\n#[cfg(test)]\nmod more;\nfn g() { crate::a::h(); }",
            ),
            m("d", "fn f() { let _ = crate::b::X; }"),
        ];
        assert_eq!(
            edge_set(&ms),
            [
                ("a", "a::inner"),
                ("a", "b"),
                ("a", "c"),
                ("a::inner", "a"),
                ("a::inner", "d"),
                ("c", "a"),
                ("d", "b"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .to_vec()
        );
    }

    #[test]
    fn reports_a_cycle_with_its_lines_and_passes_a_tree() {
        let acyclic = [
            m("crate", "pub mod a; pub mod b; pub mod c;"),
            m("a", "use crate::b::X;"),
            m("b", "use crate::c::Y;"),
            m("c", ""),
        ];
        assert!(cycles(&acyclic, &edges(&acyclic)).is_empty());
        let cyclic = [
            m("crate", "pub mod a; pub mod b; pub mod c;"),
            m("a", "use crate::b::X;"),
            m("b", "\nuse crate::c::Y;"),
            m("c", "\n\nfn f() { crate::a::go() }"),
        ];
        let found = cycles(&cyclic, &edges(&cyclic));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0],
            "a -> b -> c -> a (a.rs:1 uses b; b.rs:2 uses c; c.rs:3 uses a)"
        );
    }

    #[test]
    fn parent_and_child_using_each_other_is_a_cycle() {
        let ms = [
            m("crate", "pub mod p;"),
            m("p", "pub mod k; pub struct S { c: k::Client }"),
            m("p::k", "fn f() { super::helper() }"),
        ];
        assert_eq!(cycles(&ms, &edges(&ms)).len(), 1);
    }

    #[test]
    fn the_daemon_reads_as_modules() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("root");
        let ms = read_modules(&root.join("mesh-daemon/src")).expect("read");
        assert!(ms.iter().any(|m| m.path == "proxy::hbone"), "{ms:?}");
        assert!(
            !ms.iter()
                .any(|m| m.path == "main" || m.path.starts_with("bin"))
        );
    }
}
