//! The configuration reference, made from the configuration's JSON Schema
//! (the config types and their doc comments): the book's reference page
//! and tlsrelay.toml(5) say exactly what the parser accepts.

use serde_json::Value;

/// One TOML table of the configuration and its keys.
#[derive(Debug)]
pub struct Table {
    /// As it is written in a file: `[limits]`, `[[listeners]]`,
    /// `[listeners.tls]`; empty for the top level.
    pub header: String,
    pub doc: String,
    pub keys: Vec<Key>,
}

/// A key that holds a value (not a table).
#[derive(Debug)]
pub struct Key {
    pub name: String,
    /// What it holds, as an operator writes it: `duration`, `"a" | "b"`,
    /// `array of cidr`.
    pub kind: String,
    pub default: Option<String>,
    pub doc: String,
}

/// The configuration's tables, top level first, each followed by the
/// tables inside it.
pub fn tables() -> Vec<Table> {
    let schema =
        serde_json::to_value(tlsrelay_core::config::Config::schema()).expect("a schema is JSON");
    let mut out = Vec::new();
    let defs = schema.get("$defs").cloned().unwrap_or(Value::Null);
    walk(
        &defs,
        &schema,
        "",
        String::new(),
        "Settings of the relay as a whole.".into(),
        &mut out,
    );
    out
}

/// Keys whose doc comment is missing (a table's may be on its type).
pub fn undocumented() -> Vec<String> {
    let mut missing = Vec::new();
    for table in tables() {
        if table.doc.is_empty() {
            missing.push(table.header.clone());
        }
        for key in &table.keys {
            if key.doc.is_empty() {
                missing.push(format!("{} {}", table.header, key.name));
            }
        }
    }
    missing
}

fn walk(
    defs: &Value,
    object: &Value,
    path: &str,
    header: String,
    doc: String,
    out: &mut Vec<Table>,
) {
    let at = out.len();
    out.push(Table {
        header,
        doc,
        keys: Vec::new(),
    });
    let Some(properties) = object.get("properties").and_then(Value::as_object) else {
        return;
    };
    let mut inner = Vec::new();
    for (name, property) in properties {
        let doc = text(property.get("description"));
        let dotted = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        match table_of(defs, property) {
            Some((def, many)) => {
                let doc = if doc.is_empty() {
                    text(def.get("description"))
                } else {
                    doc
                };
                let header = if many {
                    format!("[[{dotted}]]")
                } else {
                    format!("[{dotted}]")
                };
                inner.push((def.clone(), dotted, header, doc));
            }
            None => out[at].keys.push(Key {
                name: name.clone(),
                kind: kind(defs, property),
                default: property
                    .get("default")
                    .filter(|d| !d.is_null())
                    .map(|d| d.to_string()),
                doc,
            }),
        }
    }
    for (def, dotted, header, doc) in inner {
        walk(defs, &def, &dotted, header, doc, out);
    }
}

/// The object type a property holds (directly, optionally or as an array
/// of them), and whether it is an array: such a property is a table.
fn table_of(defs: &Value, property: &Value) -> Option<(Value, bool)> {
    let many = property.get("type").and_then(Value::as_str) == Some("array");
    let target = if many {
        property.get("items")?
    } else {
        property
    };
    let resolved = resolve(defs, target);
    resolved
        .get("properties")
        .is_some()
        .then(|| (resolved.clone(), many))
}

/// A `$ref`, or the one non-null alternative of an optional value, to
/// what it stands for.
fn resolve<'a>(defs: &'a Value, value: &'a Value) -> &'a Value {
    if let Some(name) = value
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
    {
        if let Some(def) = defs.get(name) {
            return resolve(defs, def);
        }
    }
    if let Some(alternatives) = value.get("anyOf").and_then(Value::as_array) {
        let real: Vec<&Value> = alternatives
            .iter()
            .filter(|a| a.get("type").and_then(Value::as_str) != Some("null"))
            .collect();
        if let [one] = real[..] {
            return resolve(defs, one);
        }
    }
    value
}

fn kind(defs: &Value, value: &Value) -> String {
    if let Some(name) = value
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
    {
        let def = &defs[name];
        if let Some(words) = def.get("enum").and_then(Value::as_array) {
            return words
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(" | ");
        }
        return match name {
            "ServerEntry" => "host:port, or { address, weight, backup }".into(),
            other => other.to_lowercase(),
        };
    }
    if let Some(alternatives) = value.get("anyOf").and_then(Value::as_array) {
        let kinds: Vec<String> = alternatives
            .iter()
            .filter(|a| a.get("type").and_then(Value::as_str) != Some("null"))
            .map(|a| kind(defs, a))
            .collect();
        return kinds.join(" or ");
    }
    let types: Vec<&str> = match value.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    match types.iter().find(|t| **t != "null") {
        Some(&"array") => format!(
            "array of {}",
            value
                .get("items")
                .map_or("values".into(), |i| kind(defs, i))
        ),
        Some(t) => t.to_string(),
        None => "value".into(),
    }
}

/// A doc comment's text as one paragraph.
fn text(description: Option<&Value>) -> String {
    description
        .and_then(Value::as_str)
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The book's reference page.
pub fn markdown() -> String {
    let mut page = String::from(
        "# Configuration reference\n\n\
         Every key `tlsrelay check` accepts, made from the configuration's types\n\
         and their doc comments (a test fails when this page differs from them).\n\
         Editors validate and complete a file against `docs/tlsrelay.schema.json`\n\
         (installed as `/usr/share/tlsrelay/tlsrelay.schema.json`) when its first\n\
         line is `#:schema` and that path. Durations are written `\"500ms\"`,\n\
         `\"10s\"`, `\"5m\"`, `\"1h\"` or as whole seconds.\n",
    );
    for table in tables() {
        let header = if table.header.is_empty() {
            "Top level".to_string()
        } else {
            format!("`{}`", table.header)
        };
        page += &format!("\n## {header}\n\n{}\n\n", table.doc);
        for key in &table.keys {
            let default = key
                .default
                .as_deref()
                .map(|d| format!(", default `{d}`"))
                .unwrap_or_default();
            page += &format!(
                "- **`{}`** ({}{default}): {}\n",
                key.name,
                key.kind.replace('|', "\\|"),
                key.doc
            );
        }
    }
    page
}

/// tlsrelay.toml(5).
pub fn roff() -> String {
    let escape = |s: &str| s.replace('\\', "\\\\").replace('-', "\\-");
    let line = |s: &str| {
        let s = escape(s);
        if s.starts_with('.') || s.starts_with('\'') {
            format!("\\&{s}")
        } else {
            s
        }
    };
    let mut page = String::from(
        ".TH tlsrelay.toml 5\n.SH NAME\ntlsrelay.toml \\- the configuration of tlsrelay(8)\n\
         .SH DESCRIPTION\nA TOML file; unknown keys are errors, and every error names the file, \
         the line and the key. \\fBtlsrelay check\\fR validates one. Durations are written \
         \"500ms\", \"10s\", \"5m\", \"1h\" or as whole seconds.\n",
    );
    for table in tables() {
        let header = if table.header.is_empty() {
            "TOP LEVEL".to_string()
        } else {
            table.header.clone()
        };
        page += &format!(".SH {}\n{}\n", line(&header), line(&table.doc));
        for key in &table.keys {
            let default = key
                .default
                .as_deref()
                .map(|d| format!(", default {d}"))
                .unwrap_or_default();
            page += &format!(
                ".TP\n\\fB{}\\fR ({}{})\n{}\n",
                escape(&key.name),
                escape(&key.kind),
                escape(&default),
                line(&key.doc)
            );
        }
    }
    page += ".SH SEE ALSO\ntlsrelay(8)\n";
    page
}

/// The schema as shipped for editors.
pub fn schema_json() -> String {
    let mut text = serde_json::to_string_pretty(&tlsrelay_core::config::Config::schema())
        .expect("a schema is JSON");
    text.push('\n');
    text
}
