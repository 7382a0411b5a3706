//! The documentation cannot drift from the code: every TOML example in the
//! README and the book is a configuration the relay accepts, parsed and
//! validated by the code `tlsrelay check` runs (keys, types, references)
//! and by the JSON Schema editors get.
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
    let schema = jsonschema::validator_for(
        &serde_json::from_str(&tlsrelay::config_reference::schema_json()).unwrap(),
    )
    .unwrap();
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
            // What an editor checks against the shipped schema.
            let value: serde_json::Value = toml::from_str(&text).unwrap();
            for error in schema.iter_errors(&value) {
                failures.push(format!(
                    "{file}: the schema refuses it: {error} at {}",
                    error.instance_path()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 10, "only {checked} examples found");
    // The schema refuses what check refuses: a misspelt value and key.
    let misspelt: serde_json::Value = toml::from_str(
        "[[listeners]]\nname = \"in\"\naddress = \"127.0.0.1:1\"\ntls.mode = \"opportunstic\"\nupstrem = \"out\"\n",
    )
    .unwrap();
    assert_eq!(schema.iter_errors(&misspelt).count(), 2, "{misspelt}");
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

/// Every key of the configuration has a doc comment: the reference and
/// tlsrelay.toml(5) are made of them.
#[test]
fn every_configuration_key_is_documented() {
    let missing = tlsrelay::config_reference::undocumented();
    assert!(
        missing.is_empty(),
        "configuration keys without a doc comment in core/src/config.rs:\n{}",
        missing.join("\n")
    );
    let keys: usize = tlsrelay::config_reference::tables()
        .iter()
        .map(|t| t.keys.len())
        .sum();
    assert!(keys >= 100, "only {keys} keys found");
}

/// The book's reference page and the JSON Schema shipped for editors are
/// what the configuration's types say now. `TLSRELAY_BLESS=1 cargo test
/// -p tlsrelay-tests --test docs` rewrites them after a change.
#[test]
fn the_reference_and_the_schema_are_generated_from_the_config_types() {
    let generated = [
        (
            root().join("docs/src/reference.md"),
            tlsrelay::config_reference::markdown(),
        ),
        (
            root().join("docs/tlsrelay.schema.json"),
            tlsrelay::config_reference::schema_json(),
        ),
    ];
    let bless = std::env::var_os("TLSRELAY_BLESS").is_some();
    for (path, text) in generated {
        if bless {
            std::fs::write(&path, &text).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == text,
            "{} is not what the config types say; run TLSRELAY_BLESS=1 cargo test -p tlsrelay-tests --test docs",
            path.display()
        );
    }
}

/// The configurations shipped whole (deploy/, the embedded default) are
/// what the schema describes, so an editor opening one shows no error.
#[test]
fn the_shipped_configurations_validate_against_the_schema() {
    let schema = jsonschema::validator_for(
        &serde_json::from_str(&tlsrelay::config_reference::schema_json()).unwrap(),
    )
    .unwrap();
    for file in [
        "deploy/edge.toml",
        "deploy/edge-relay.toml",
        "core/src/default.toml",
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let value: serde_json::Value = toml::from_str(&text).unwrap();
        let errors: Vec<String> = schema
            .iter_errors(&value)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{file}: {}", errors.join("\n"));
    }
}

/// The metric families a text uses (`tlsrelay_…`).
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("tlsrelay_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        // A histogram's series are its family's name and a suffix.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .map_or(name.clone(), str::to_string);
        names.push(family);
    }
    names
}

/// The Grafana dashboard and the Prometheus rules query only metrics the
/// relay exposes (the metrics page lists them, and a test holds the page
/// to /metrics); the dashboard is JSON Grafana can import.
#[test]
fn the_dashboard_and_alerts_use_only_metrics_the_relay_exposes() {
    let page = std::fs::read_to_string(root().join("docs/src/observability.md")).unwrap();
    let dashboard = std::fs::read_to_string(root().join("deploy/grafana/tlsrelay.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let panels = json["panels"].as_array().unwrap();
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut queries = String::new();
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            queries += target["expr"].as_str().unwrap();
            queries.push('\n');
        }
    }
    let rules =
        std::fs::read_to_string(root().join("deploy/prometheus/tlsrelay-rules.yml")).unwrap();
    for (what, text) in [("dashboard", &queries), ("alert rules", &rules)] {
        let names = metric_names(text);
        assert!(names.len() >= 5, "{what}: {names:?}");
        for name in names {
            assert!(
                page.contains(&format!("`{name}`")),
                "the {what} query {name}, which docs/src/observability.md does not list"
            );
        }
    }
}

/// (basic code if written as a number, enhanced code) of each reply the
/// relay's source constructs: `Reply::new(451, "4.7.5 …")`, the dialogue's
/// `self.error(503, "5.5.1 …")`, raw `"421 4.7.0 …"` lines, and
/// constructors whose basic code is a variable (`None`).
fn replies_in_the_code() -> Vec<(Option<String>, String)> {
    let mut found = Vec::new();
    let mut files = Vec::new();
    for dir in ["core/src", "relay/src"] {
        let mut stack = vec![root().join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && !path.ends_with("pair_tests.rs")
                {
                    files.push(path);
                }
            }
        }
    }
    let enhanced = |s: &str| -> Option<String> {
        let code: String = s
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let parts: Vec<&str> = code.split('.').collect();
        (parts.len() == 3
            && parts.iter().all(|p| !p.is_empty())
            && s[code.len()..].starts_with(' '))
        .then_some(code)
    };
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        // Tests assert replies; they do not send them.
        let text = text.split("#[cfg(test)]").next().unwrap();
        let flat: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        for call in ["Reply::new(", ".error(", ".reply("] {
            for (at, _) in flat.match_indices(call) {
                let args = &flat[at + call.len()..];
                let (code, rest) = args.split_once(',').unwrap_or((args, ""));
                let rest = rest.trim_start_matches('&').trim_start_matches("format!(");
                let Some(rest) = rest.strip_prefix('"') else {
                    continue;
                };
                // The flattened text lost the space after the code.
                let dotted: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.')
                    .collect();
                if dotted.split('.').count() != 3 || dotted.ends_with('.') {
                    continue;
                }
                let basic = (code.len() == 3 && code.chars().all(|c| c.is_ascii_digit()))
                    .then(|| code.to_string());
                found.push((basic, dotted));
            }
        }
        for (at, _) in text.match_indices('"') {
            let s = &text[at + 1..];
            if s.len() > 5 && s[..3].chars().all(|c| c.is_ascii_digit()) && &s[3..4] == " " {
                if let Some(e) = enhanced(&s[4..]) {
                    found.push((Some(s[..3].to_string()), e));
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// The reply tables in the book say what the relay answers: every code
/// they list is one the code sends, and every refusal (4xx, 5xx) the code
/// sends is listed.
#[test]
fn the_reply_tables_match_the_replies_the_code_sends() {
    let page = std::fs::read_to_string(root().join("docs/src/mail-edge.md")).unwrap();
    let section = &page[page.find("### Replies").unwrap()..];
    let section = &section[..section.find("\nMAIL is answered").unwrap()];
    let mut listed = Vec::new();
    for span in section.split('`').skip(1).step_by(2) {
        let mut words = span.split(' ');
        if let (Some(code), Some(e)) = (words.next(), words.next()) {
            if code.len() == 3
                && code.chars().all(|c| c.is_ascii_digit())
                && e.split('.').count() == 3
            {
                listed.push((code.to_string(), e.to_string()));
            }
        }
    }
    let sent = replies_in_the_code();
    assert!(sent.len() >= 30, "the scan found only {sent:?}");
    for (code, e) in &listed {
        assert!(
            sent.iter()
                .any(|(c, s)| s == e && c.as_ref().is_none_or(|c| c == code)),
            "the book lists `{code} {e}`, which nothing in core/ or relay/ sends"
        );
    }
    for (code, e) in &sent {
        let refusal = code
            .as_ref()
            .is_none_or(|c| c.starts_with('4') || c.starts_with('5'));
        if refusal {
            assert!(
                listed.iter().any(|(c, l)| l == e && code.as_ref().is_none_or(|code| code == c)),
                "the code sends {} {e}, which the reply tables in docs/src/mail-edge.md do not list",
                code.as_deref().unwrap_or("???")
            );
        }
    }
}
