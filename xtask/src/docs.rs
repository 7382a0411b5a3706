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
    println!("\n=== mdbook build docs");
    let output = mdbook()
        .arg("build")
        .arg(root().join("docs"))
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

/// The front page and the performance page as a browser renders them
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
    for (page, height) in [("index", 1600), ("performance", 3200)] {
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
