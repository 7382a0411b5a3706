//! The documentation cannot drift from the code: every TOML example in the
//! README and the book is a configuration the relay accepts, parsed and
//! validated by the code `tlsrelay check` runs (keys, types, references).
//! A block fenced `toml,fragment` holds top-level tables of a larger file
//! (checked beside a minimal listener); one fenced `toml,listener` holds a
//! TCP listener's keys (checked inside one).

use std::path::{Path, PathBuf};
use tlsrelay_core::config::Config;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The documents whose examples operators copy.
fn documents() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = [
        "README.md",
        "CONTRIBUTING.md",
        "SECURITY.md",
        "CHANGELOG.md",
    ]
    .iter()
    .map(|name| root().join(name))
    .collect();
    docs.extend(book_pages());
    docs
}

/// The book's pages, docs/src/*.md.
fn book_pages() -> Vec<PathBuf> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root().join("docs/src"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    pages
}

/// What a fragment is checked with: a listener and the upstream it names.
const LISTENER: &str =
    "[[listeners]]\nname = \"in\"\naddress = \"127.0.0.1:4430\"\nupstream = \"out\"\n";
const UPSTREAM: &str = "[[upstreams]]\nname = \"out\"\naddress = \"127.0.0.1:4432\"\n";

/// (first line number, fence info, text) of each fenced block.
fn blocks(text: &str) -> Vec<(usize, String, String)> {
    let mut found = Vec::new();
    let mut open: Option<(usize, String, String)> = None;
    for (n, line) in text.lines().enumerate() {
        match open.take() {
            None => {
                if let Some(info) = line.trim_start().strip_prefix("```") {
                    open = Some((n + 2, info.trim().to_string(), String::new()));
                }
            }
            Some((start, info, mut body)) => {
                if line.trim_start().starts_with("```") {
                    found.push((start, info, body));
                } else {
                    body.push_str(line);
                    body.push('\n');
                    open = Some((start, info, body));
                }
            }
        }
    }
    found
}

#[test]
fn every_toml_example_in_the_docs_is_a_valid_configuration() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        let name = doc
            .strip_prefix(root())
            .unwrap_or(&doc)
            .display()
            .to_string();
        for (line, info, body) in blocks(&text) {
            let text = match info.as_str() {
                "toml" => body,
                "toml,fragment" => format!("{body}\n{LISTENER}{UPSTREAM}"),
                "toml,listener" => format!("{LISTENER}{body}\n{UPSTREAM}"),
                _ => continue,
            };
            let file = format!("{name}, the example at line {line}");
            match Config::parse(&text, &file, root()) {
                Ok(_) => checked += 1,
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 10, "only {checked} examples found");
}

/// Every relative link in the README and the book names a file that
/// exists (mdBook does not check), and every page is in the book's table
/// of contents.
#[test]
fn every_link_in_the_docs_resolves_and_every_page_is_listed() {
    let link = |text: &str| -> Vec<String> {
        let mut targets = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                targets.push(rest[..end].to_string());
            }
        }
        targets
    };
    let mut broken = Vec::new();
    let mut links = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        let dir = doc.parent().unwrap();
        for target in link(&text) {
            if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
                continue;
            }
            links += 1;
            let path = target.split('#').next().unwrap();
            if !dir.join(path).exists() {
                broken.push(format!("{}: {target}", doc.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(links >= 20, "only {links} links found");
    let summary = std::fs::read_to_string(root().join("docs/src/SUMMARY.md")).unwrap();
    let listed = link(&summary);
    for page in book_pages() {
        let name = page.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            name == "SUMMARY.md" || listed.contains(&name),
            "{name} is not in docs/src/SUMMARY.md"
        );
    }
}
