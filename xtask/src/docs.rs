//! `cargo xtask docs`: the book (mdBook, docs/), the man pages, the
//! shell completions and screenshots of the book, into target/docs/. A warning from mdBook fails it,
//! as an error does: a broken link or a missing page is a bug in the docs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::{cargo, root, run};

/// The mdBook release the book is built with (installed when missing).
const MDBOOK: &str = "0.5.4";

/// Builds everything into target/docs/: `book/`, `man/`, `completions/`.
pub fn build() -> anyhow::Result<()> {
    let out = root().join("target/docs");
    book(&out)?;
    run(
        "build the relay (its man pages and completions)",
        cargo().args(["build", "-p", "tlsrelay", "--bin", "tlsrelay"]),
    )?;
    man_and_completions(&root().join("target/debug/tlsrelay"), &out)?;
    screenshots(&out)?;
    println!(
        "docs: {} (open index.html), {}, {}",
        out.join("book").display(),
        out.join("man").display(),
        out.join("completions").display()
    );
    Ok(())
}

fn book(out: &Path) -> anyhow::Result<()> {
    ensure_mdbook()?;
    let stage = stage_with_bench_figures(out)?;
    println!("\n=== mdbook build docs");
    let output = mdbook()
        .arg("build")
        .arg(&stage)
        .arg("--dest-dir")
        .arg(out.join("book"))
        .output()
        .context("cannot start mdbook")?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    print!("{log}");
    if !output.status.success() {
        bail!("mdbook build failed ({})", output.status);
    }
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    if !complaints.is_empty() {
        bail!("mdbook warned:\n{}", complaints.join("\n"));
    }
    Ok(())
}

/// docs/ copied under `out` with one more page: the figures and charts of
/// the last `cargo xtask bench` on this machine (target/bench), or a
/// note that there is none. The checked-in pages stay as written.
fn stage_with_bench_figures(out: &Path) -> anyhow::Result<PathBuf> {
    let stage = out.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    copy_dir(&root().join("docs"), &stage)?;
    let bench = root().join("target/bench");
    let report = std::fs::read_to_string(bench.join("report.json")).ok();
    let page = match report
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
    {
        Some(Ok(report)) => {
            let charts = stage.join("src/bench");
            std::fs::create_dir_all(&charts)?;
            bench_page(&report, &bench, &charts)?
        }
        _ => "# Latest run on this machine\n\nNo `cargo xtask bench` has run on the machine that \
              built this book (there is no `target/bench/report.json`).\n"
            .to_string(),
    };
    std::fs::write(stage.join("src/bench-latest.md"), page)?;
    let summary = stage.join("src/SUMMARY.md");
    let listed = std::fs::read_to_string(&summary)?.replace(
        "- [Performance](performance.md)\n",
        "- [Performance](performance.md)\n  - [Latest run on this machine](bench-latest.md)\n",
    );
    std::fs::write(summary, listed)?;
    Ok(stage)
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        let dest = to.join(path.file_name().expect("a directory entry has a name"));
        if path.is_dir() {
            copy_dir(&path, &dest)?;
        } else {
            std::fs::copy(&path, &dest)?;
        }
    }
    Ok(())
}

/// The headline figure and the relay's CPU of each table, as the bench
/// prints them.
const HEADLINES: [(&str, &str); 6] = [
    ("gbit_per_s", "Gbit/s"),
    ("requests_per_s", "requests/s"),
    ("handshakes_per_s", "handshakes/s"),
    ("messages_per_s", "messages/s"),
    ("kib_per_connection", "KiB per connection"),
    ("failed_new", "failed new sessions"),
];
const CPU: [(&str, &str); 4] = [
    ("cpu_s_per_gb", "relay CPU s/GB"),
    ("cpu_us_per_req", "relay CPU µs/request"),
    ("cpu_ms_per_handshake", "relay CPU ms/handshake"),
    ("cpu_us_per_msg", "relay CPU µs/message"),
];

/// One table per bench table and scenario: medians over the rounds, and
/// tlsrelay over each peer (min/median/max of the per-round ratio), with
/// the chart the bench drew for it.
fn bench_page(report: &serde_json::Value, bench: &Path, charts: &Path) -> anyhow::Result<String> {
    let mut page = format!(
        "# Latest run on this machine\n\nThe last `cargo xtask bench` where this book was built: \
         {} round(s){}, {} CPUs. Medians over the rounds; `tlsrelay/this` is min/median/max \
         of the per-round ratio. Only the cells that run measured are here.\n",
        report["rounds"],
        if report["quick"].as_bool() == Some(true) {
            " of the debug build (`--quick`: a smoke run, the numbers mean nothing)"
        } else {
            ", release build"
        },
        report["cpus"]
    );
    let rows = report["rows"].as_array().cloned().unwrap_or_default();
    let mut groups: Vec<(&str, &str)> = Vec::new();
    for row in &rows {
        let key = (
            row["table"].as_str().unwrap_or_default(),
            row["scenario"].as_str().unwrap_or_default(),
        );
        if !groups.contains(&key) {
            groups.push(key);
        }
    }
    for (table, scenario) in groups {
        page += &format!("\n## {table}: {scenario}\n\n");
        let slug = format!("{table} {scenario}")
            .to_ascii_lowercase()
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join("-");
        let chart = bench.join(format!("{slug}.svg"));
        if chart.exists() {
            std::fs::copy(&chart, charts.join(format!("{slug}.svg")))?;
            page += &format!("![{table}: {scenario}](bench/{slug}.svg)\n\n");
        }
        let members: Vec<&serde_json::Value> = rows
            .iter()
            .filter(|r| r["table"] == table && r["scenario"] == scenario)
            .collect();
        page += &figures_table(&members);
    }
    Ok(page)
}

/// A scenario's rows: per relay and x, the headline figure and the
/// relay's CPU (medians over the rounds), and tlsrelay over it.
fn figures_table(rows: &[&serde_json::Value]) -> String {
    let runs = |r: &serde_json::Value| r["runs"].as_array().cloned().unwrap_or_default();
    let pick = |keys: &[(&'static str, &'static str)]| {
        keys.iter()
            .find(|(k, _)| {
                rows.iter()
                    .any(|r| runs(r).iter().any(|x| x.get(*k).is_some()))
            })
            .copied()
    };
    let columns: Vec<(&str, &str)> = pick(&HEADLINES).into_iter().chain(pick(&CPU)).collect();
    let mut table = "| x | relay |".to_string();
    for (_, title) in &columns {
        table += &format!(" {title} |");
    }
    table += " tlsrelay/this |\n";
    table += &"|---".repeat(columns.len() + 3);
    table += "|\n";
    for r in rows {
        table += &format!(
            "| {} | {} |",
            r["x"].as_str().unwrap_or_default(),
            r["peer"].as_str().unwrap_or_default()
        );
        for (key, _) in &columns {
            let values: Vec<f64> = runs(r).iter().filter_map(|x| x[*key].as_f64()).collect();
            table += &median(values).map_or(" – |".into(), |v| format!(" {v:.2} |"));
        }
        let ratios: Vec<f64> = r["tlsrelay_over_peer"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default();
        let ratio = match (
            ratios.iter().copied().reduce(f64::min),
            median(ratios.clone()),
            ratios.iter().copied().reduce(f64::max),
        ) {
            (Some(lo), Some(mid), Some(hi)) => format!("{lo:.2}/{mid:.2}/{hi:.2}"),
            _ => "–".into(),
        };
        table += &format!(" {ratio} |\n");
    }
    table
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|x| x.is_finite());
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// The front page, the performance page and the latest bench figures as a
/// browser renders them
/// (headless Chromium), to look at: tables readable, nothing missing.
/// Without Chromium this is skipped, except under CI where it fails.
fn screenshots(out: &Path) -> anyhow::Result<()> {
    let browser = "chromium-headless-shell";
    if !crate::prereqs::found(browser) {
        if std::env::var("CI").as_deref() == Ok("true") {
            bail!("{browser} is missing (the prerequisites install it)");
        }
        println!("docs: no screenshots ({browser} not installed)");
        return Ok(());
    }
    let shots = out.join("screenshots");
    std::fs::create_dir_all(&shots)?;
    for (page, height) in [
        ("index", 1600),
        ("performance", 3200),
        ("bench-latest", 3200),
    ] {
        let png = shots.join(format!("{page}.png"));
        let _ = std::fs::remove_file(&png);
        let html = out.join("book").join(format!("{page}.html"));
        let output = Command::new(browser)
            .args(["--no-sandbox", "--disable-gpu", "--hide-scrollbars"])
            .arg(format!("--window-size=1280,{height}"))
            .arg(format!("--screenshot={}", png.display()))
            .arg(format!("file://{}", html.display()))
            .output()
            .with_context(|| format!("cannot start {browser}"))?;
        // A rendered page of text is tens of KiB; a blank one a few.
        let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
        if !output.status.success() || size < 20_000 {
            bail!(
                "{browser} did not render {} ({} bytes): {}",
                html.display(),
                size,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        println!("docs: {} ({size} bytes)", png.display());
    }
    Ok(())
}

/// The shipped Prometheus alerting rules: valid, and their unit tests
/// (deploy/prometheus/tlsrelay-rules.test.yml) pass.
pub fn check_alert_rules() -> anyhow::Result<()> {
    let dir = root().join("deploy/prometheus");
    run(
        "promtool check rules",
        Command::new("promtool")
            .current_dir(&dir)
            .args(["check", "rules", "tlsrelay-rules.yml"]),
    )?;
    run(
        "promtool test rules",
        Command::new("promtool").current_dir(&dir).args([
            "test",
            "rules",
            "tlsrelay-rules.test.yml",
        ]),
    )
}

/// The man pages (section 8) and bash, zsh and fish completions, from the
/// binary's own command-line definitions, so they cannot drift from it.
pub fn man_and_completions(tlsrelay: &Path, out: &Path) -> anyhow::Result<()> {
    let man = out.join("man");
    let _ = std::fs::remove_dir_all(&man);
    run(
        "tlsrelay man pages",
        Command::new(tlsrelay).arg("man").arg(&man),
    )?;
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in COMPLETIONS {
        let output = Command::new(tlsrelay)
            .args(["completions", shell])
            .output()
            .with_context(|| format!("tlsrelay completions {shell}"))?;
        if !output.status.success() || output.stdout.is_empty() {
            bail!("tlsrelay completions {shell} failed ({})", output.status);
        }
        std::fs::write(completions.join(file), output.stdout)?;
    }
    Ok(())
}

/// Each shell and the file name its completion directory expects.
pub const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "tlsrelay"),
    ("zsh", "_tlsrelay"),
    ("fish", "tlsrelay.fish"),
];

fn ensure_mdbook() -> anyhow::Result<()> {
    let version = mdbook().arg("--version").output();
    if let Ok(v) = &version {
        if String::from_utf8_lossy(&v.stdout).contains(MDBOOK) {
            return Ok(());
        }
    }
    // Only what building needs: no file watcher or web server.
    run(
        &format!("cargo install mdbook {MDBOOK}"),
        Command::new("cargo").args([
            "install",
            "mdbook",
            "--locked",
            "--version",
            MDBOOK,
            "--no-default-features",
            "--features",
            "search",
        ]),
    )
}

/// `cargo install` puts it in $CARGO_HOME/bin, which need not be on PATH.
fn mdbook() -> Command {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    match home.map(|h| h.join("bin/mdbook")) {
        Some(path) if path.exists() => Command::new(path),
        _ => Command::new("mdbook"),
    }
}

/// The man pages `man_and_completions` wrote under `out`.
pub fn man_pages(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(out.join("man"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    pages.sort();
    Ok(pages)
}
