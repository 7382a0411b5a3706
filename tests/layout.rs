//! The crates' shape: no import circles between the modules of any crate
//! (a module's own submodules count as part of it: a child may use its
//! parent's items). A circle means two modules that cannot be read,
//! tested or moved apart; the message names the modules on it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`, with its module path (`a::b`; the
/// crate root's files are the empty path).
fn modules(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(dir).unwrap().with_extension("");
                let mut parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().to_string())
                    .collect();
                if parts.last().is_some_and(|p| p == "mod") {
                    parts.pop();
                }
                if parts.len() == 1 && (parts[0] == "lib" || parts[0] == "main") {
                    parts.clear();
                }
                found.push((parts.join("::"), path));
            }
        }
    }
    found
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths a file names after `crate::` or `super::` (groups in braces
/// expanded), as module paths from the crate root. Comments and the
/// file's test module are left out: they do not make one module need
/// another.
fn references(module: &str, text: &str) -> Vec<Vec<String>> {
    let code: String = text
        .split("#[cfg(test)]")
        .next()
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let here: Vec<String> = if module.is_empty() {
        Vec::new()
    } else {
        module.split("::").map(str::to_string).collect()
    };
    let mut found = Vec::new();
    for (anchor, base) in [
        ("crate::", Vec::new()),
        ("super::", here[..here.len().saturating_sub(1)].to_vec()),
    ] {
        for (at, _) in code.match_indices(anchor) {
            let before = &code[..at];
            if before.chars().last().is_some_and(is_ident) || before.ends_with("::") {
                continue; // `my_crate::`, or the second `super::` of a chain
            }
            let mut rest = &code[at + anchor.len()..];
            let mut base = base.clone();
            while let Some(more) = rest.strip_prefix("super::") {
                base.pop();
                rest = more;
            }
            for path in expand(rest) {
                let mut full = base.clone();
                full.extend(path);
                found.push(full);
            }
        }
    }
    found
}

/// `a::b::C` -> [[a, b, C]]; `{a::B, c}` -> [[a, B], [c]] (one level of
/// nesting is what the code uses).
fn expand(rest: &str) -> Vec<Vec<String>> {
    if let Some(group) = rest.strip_prefix('{') {
        let mut depth = 0;
        let end = group
            .char_indices()
            .find(|&(_, c)| {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => return true,
                    '}' => depth -= 1,
                    _ => {}
                }
                false
            })
            .map_or(group.len(), |(i, _)| i);
        return group[..end]
            .split(',')
            .map(|item| path_of(item.trim()))
            .filter(|p| !p.is_empty())
            .collect();
    }
    vec![path_of(rest)]
}

fn path_of(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = text;
    loop {
        let ident: String = rest.chars().take_while(|&c| is_ident(c)).collect();
        if ident.is_empty() {
            break;
        }
        rest = &rest[ident.len()..];
        parts.push(ident);
        match rest.strip_prefix("::") {
            Some(r) if !r.starts_with('{') => rest = r,
            _ => break,
        }
    }
    parts
}

/// Module -> the modules it uses (not its own ancestors or itself).
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let files = modules(src);
    let known: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut graph = BTreeMap::new();
    for (module, path) in &files {
        if module.is_empty() {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        let mut uses = BTreeSet::new();
        for path in references(module, &text) {
            let target = (1..=path.len())
                .rev()
                .map(|k| path[..k].join("::"))
                .find(|candidate| known.contains(candidate));
            if let Some(target) = target {
                let ancestor = module == &target || module.starts_with(&format!("{target}::"));
                if !ancestor && !target.is_empty() {
                    uses.insert(target);
                }
            }
        }
        graph.insert(module.clone(), uses);
    }
    graph
}

/// The graph's strongly connected components with more than one module.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Tarjan's algorithm, iterative.
    let names: Vec<&String> = graph.keys().collect();
    let index_of: BTreeMap<&String, usize> =
        names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let edges: Vec<Vec<usize>> = names
        .iter()
        .map(|n| {
            graph[*n]
                .iter()
                .filter_map(|t| index_of.get(t).copied())
                .collect()
        })
        .collect();
    let n = names.len();
    let (mut index, mut low, mut on) = (vec![usize::MAX; n], vec![0; n], vec![false; n]);
    let (mut stack, mut next, mut found) = (Vec::new(), 0, Vec::new());
    for start in 0..n {
        if index[start] != usize::MAX {
            continue;
        }
        let mut work = vec![(start, 0usize)];
        while let Some(&mut (v, ref mut edge)) = work.last_mut() {
            if *edge == 0 && index[v] == usize::MAX {
                index[v] = next;
                low[v] = next;
                next += 1;
                stack.push(v);
                on[v] = true;
            }
            if let Some(&w) = edges[v].get(*edge) {
                *edge += 1;
                if index[w] == usize::MAX {
                    work.push((w, 0));
                } else if on[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut component = Vec::new();
                while let Some(w) = stack.pop() {
                    on[w] = false;
                    component.push(names[w].clone());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    found.push(component);
                }
            }
        }
    }
    found
}

#[test]
fn no_crate_has_import_circles() {
    let mut report = Vec::new();
    let mut modules = 0;
    for crate_src in [
        "core/src",
        "sys/src",
        "relay/src",
        "tests/src",
        "benches/src",
        "xtask/src",
    ] {
        let graph = graph(&root().join(crate_src));
        modules += graph.len();
        for circle in circles(&graph) {
            report.push(format!("{crate_src}: {}", circle.join(" <-> ")));
        }
    }
    assert!(modules >= 60, "only {modules} modules found");
    assert!(report.is_empty(), "import circles:\n{}", report.join("\n"));
}

/// The checker sees a circle when there is one: through `super::`, a
/// braced group and a nested module, and not through a comment.
#[test]
fn the_checker_finds_a_planted_circle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |path: &str, text: &str| {
        let path = src.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("lib.rs", "mod a;\nmod b;\n");
    write("a/mod.rs", "mod c;\nmod d;\n");
    write("a/d.rs", "use super::c::C;\npub struct D;\n");
    write("a/c.rs", "use crate::b::B;\npub struct C;\n");
    write(
        "b.rs",
        "// crate::a::c is only named in this comment\npub struct B;\n",
    );
    assert_eq!(circles(&graph(src)), Vec::<Vec<String>>::new());
    write("b.rs", "use crate::{a::d::D, x};\npub struct B;\n");
    assert_eq!(
        circles(&graph(src)),
        vec![vec!["a::c".to_string(), "a::d".into(), "b".into()]]
    );
    // A child using its parent's items is no circle.
    write("b.rs", "pub struct B;\n");
    write(
        "a/mod.rs",
        "mod c;\nmod d;\nuse self::d::D;\npub struct A;\n",
    );
    write("a/c.rs", "use super::super::a::A;\npub struct C;\n");
    assert_eq!(circles(&graph(src)), Vec::<Vec<String>>::new());
}
