//! `cargo xtask deb`: a Debian package of the release binary (its debug
//! information split off beside the package), the systemd unit, a
//! configuration that runs as installed (the embedded default: loopback,
//! a self-signed certificate), the example edge configuration, the man
//! pages and the shell completions. Built
//! with dpkg-deb from a staged tree, so nothing beyond dpkg is needed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::{cargo, root, run};

const CONFIG: &str = "/etc/tlsrelay/tlsrelay.toml";
/// The configuration's JSON Schema, named by the installed configuration's
/// `#:schema` line so that editors check and complete it.
const SCHEMA: &str = "/usr/share/tlsrelay/tlsrelay.schema.json";

/// Builds `target/deb/tlsrelay_<version>_amd64.deb`; its path.
pub fn build() -> anyhow::Result<PathBuf> {
    run(
        "build the release binary",
        cargo().args(["build", "--release", "-p", "tlsrelay", "--bin", "tlsrelay"]),
    )?;
    let version = package_version()?;
    let out = root().join("target/deb");
    let stage = out.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    let file = |path: &str, contents: &[u8], mode: u32| -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dest = stage.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("staged files are in directories"))?;
        std::fs::write(&dest, contents).with_context(|| format!("staging {path}"))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    // The binary without its debug information, which goes beside the
    // package (and is found through the debuglink).
    let binary = root().join("target/release/tlsrelay");
    let debug = out.join("tlsrelay.debug");
    let stripped = out.join("tlsrelay.stripped");
    std::fs::create_dir_all(&out)?;
    objcopy(&["--only-keep-debug"], &binary, &debug)?;
    objcopy(
        &[
            "--strip-debug",
            "--strip-unneeded",
            &format!("--add-gnu-debuglink={}", debug.display()),
        ],
        &binary,
        &stripped,
    )?;
    file("/usr/bin/tlsrelay", &std::fs::read(&stripped)?, 0o755)?;
    let unit = std::fs::read_to_string(root().join("deploy/tlsrelay.service"))?
        .replace("/usr/local/bin/tlsrelay", "/usr/bin/tlsrelay")
        .replace("/etc/tlsrelay/edge.toml", CONFIG)
        // The package installs the man pages the unit can point to.
        .replace(
            "Documentation=",
            "Documentation=man:tlsrelay(8) man:tlsrelay-run(8) ",
        );
    file(
        "/lib/systemd/system/tlsrelay.service",
        unit.as_bytes(),
        0o644,
    )?;
    // The embedded default, run as the package's own user once bound.
    let config = format!(
        "#:schema {SCHEMA}\n# Runs as this user once its listeners are bound (the package made it).\nuser = \"tlsrelay\"\n\n{}",
        std::fs::read_to_string(root().join("core/src/default.toml"))?
    );
    file(CONFIG, config.as_bytes(), 0o640)?;
    let schema = std::fs::read(root().join("docs/tlsrelay.schema.json"))?;
    file(SCHEMA, &schema, 0o644)?;
    let edge = std::fs::read(root().join("deploy/edge.toml"))?;
    file("/usr/share/doc/tlsrelay/examples/edge.toml", &edge, 0o644)?;
    let readme = std::fs::read(root().join("README.md"))?;
    file("/usr/share/doc/tlsrelay/README.md", &readme, 0o644)?;
    stage_docs(&binary, &out, &file)?;
    let size_kib = std::fs::metadata(&stripped)?.len() / 1024 + 64;
    let control = format!(
        "Package: tlsrelay\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: tlsrelay developers <tlsrelay@example.org>\n\
         Installed-Size: {size_kib}\n\
         Depends: libc6 (>= 2.34), adduser\n\
         Section: net\n\
         Priority: optional\n\
         Description: kernel-accelerated TLS relay for mail edges and bulk TCP\n \
         rustls handshakes and an opportunistic-or-forced TLS policy, kernel TLS\n \
         and splice for the bytes, SMTP connectors that never relay openly, and\n \
         eBPF counters of every TLS version and downgrade on the wire.\n"
    );
    file("/DEBIAN/control", control.as_bytes(), 0o644)?;
    file("/DEBIAN/conffiles", format!("{CONFIG}\n").as_bytes(), 0o644)?;
    // The user the relay gives up root for; it reads the configuration
    // (group tlsrelay) on reloads.
    let postinst = format!(
        "#!/bin/sh\nset -e\nif [ \"$1\" = configure ]; then\n  if ! getent passwd tlsrelay >/dev/null; then\n    adduser --system --group --no-create-home --home /var/lib/tlsrelay --quiet tlsrelay\n  fi\n  chgrp tlsrelay {CONFIG}\nfi\n"
    );
    file("/DEBIAN/postinst", postinst.as_bytes(), 0o755)?;
    let deb = out.join(format!("tlsrelay_{version}_amd64.deb"));
    run(
        "dpkg-deb --build",
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    println!(
        "deb: {} (debug information: {})",
        deb.display(),
        debug.display()
    );
    Ok(deb)
}

/// Puts a file (path in the package, contents, mode) into the staged tree.
type StageFile<'a> = dyn Fn(&str, &[u8], u32) -> anyhow::Result<()> + 'a;

/// Man pages (gzipped, as Debian wants them) and shell completions, from
/// the packaged binary's own definitions.
fn stage_docs(binary: &Path, out: &Path, file: &StageFile) -> anyhow::Result<()> {
    let generated = out.join("docs");
    crate::docs::man_and_completions(binary, &generated)?;
    for page in crate::docs::man_pages(&generated)? {
        let name = page
            .file_name()
            .expect("a page has a name")
            .to_string_lossy();
        let gz = gzip(&std::fs::read(&page)?)?;
        let section = name.rsplit('.').next().unwrap_or("8");
        file(
            &format!("/usr/share/man/man{section}/{name}.gz"),
            &gz,
            0o644,
        )?;
    }
    let completions = generated.join("completions");
    for (dir, name) in [
        ("/usr/share/bash-completion/completions", "tlsrelay"),
        ("/usr/share/zsh/vendor-completions", "_tlsrelay"),
        ("/usr/share/fish/vendor_completions.d", "tlsrelay.fish"),
    ] {
        file(
            &format!("{dir}/{name}"),
            &std::fs::read(completions.join(name))?,
            0o644,
        )?;
    }
    Ok(())
}

/// Unpacks the package into a scratch root and runs the binary it installs
/// on the configuration it installs: what an operator's first `check` does.
pub fn check(deb: &Path) -> anyhow::Result<()> {
    let scratch = root().join("target/deb/root");
    let _ = std::fs::remove_dir_all(&scratch);
    run(
        "dpkg-deb --extract into a scratch root",
        Command::new("dpkg-deb")
            .arg("--extract")
            .arg(deb)
            .arg(&scratch),
    )?;
    for path in [
        "usr/bin/tlsrelay",
        "lib/systemd/system/tlsrelay.service",
        "etc/tlsrelay/tlsrelay.toml",
        "usr/share/doc/tlsrelay/examples/edge.toml",
        "usr/share/man/man8/tlsrelay.8.gz",
        "usr/share/man/man5/tlsrelay.toml.5.gz",
        "usr/share/tlsrelay/tlsrelay.schema.json",
        "usr/share/man/man8/tlsrelay-run.8.gz",
        "usr/share/bash-completion/completions/tlsrelay",
    ] {
        if !scratch.join(path).exists() {
            bail!("the package lacks /{path}");
        }
    }
    run(
        "the installed binary checks the installed configuration",
        Command::new(scratch.join("usr/bin/tlsrelay"))
            .arg("check")
            .arg(scratch.join(CONFIG.trim_start_matches('/'))),
    )
}

/// gzip -9n: compressed as Debian policy wants man pages, without a
/// timestamp so the package is reproducible.
fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start gzip")?;
    child.stdin.take().expect("piped").write_all(data)?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("gzip failed ({})", output.status);
    }
    Ok(output.stdout)
}

fn objcopy(args: &[&str], from: &Path, to: &Path) -> anyhow::Result<()> {
    run(
        &format!("objcopy {}", args.join(" ")),
        Command::new("objcopy").args(args).arg(from).arg(to),
    )
}

/// The relay crate's version, from its manifest.
fn package_version() -> anyhow::Result<String> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| {
            let v = l.strip_prefix("version = \"")?;
            Some(v.trim_end_matches('"').to_string())
        })
        .context("no version in the workspace manifest")
}
