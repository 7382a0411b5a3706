//! `cargo xtask vmtest`: runs test binaries inside a VM whose kernel has
//! kernel TLS (this host's kernel is built without CONFIG_TLS);
//! `cargo xtask bench --vm`: the relay's kTLS and userspace paths side by
//! side on that kernel.
//!
//! The kernels are Debian's cloud images (CONFIG_TLS=m), fetched with apt
//! into `target/vm/cache`: 6.12 (LTS, the machine's own suite; kTLS cannot
//! rekey) and 6.18 (LTS, from trixie-backports through a private apt state
//! under `target/vm/apt`, leaving the machine's sources alone; rekeys TLS
//! 1.3 since 6.14). trixie-backports' 6.19 and 7.x images split their
//! modules into packages the archive does not carry for 6.19, so 6.18 is
//! the newest 6.x that boots with its crypto modules. The initramfs holds busybox, the TLS and crypto
//! modules, the test binaries with their shared libraries, and an init that
//! mounts the usual filesystems, loads the modules, runs the tests and
//! powers off. qemu runs it under TCG (this machine's nested KVM fails on
//! the kernel's decompressor); the guest's console is streamed here and the
//! tests' status becomes ours.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{cargo, root, run};

/// A kernel the kTLS suite runs on: the newest cloud image of a series.
pub struct KernelSeries {
    /// Package name prefix and suffix (Debian's cloud kernel has
    /// CONFIG_TLS=m).
    prefix: &'static str,
    suffix: &'static str,
    /// An extra apt source, read through a private apt state.
    source: Option<&'static str>,
    /// Whether its kTLS can rekey (TLS 1.3 KeyUpdate, Linux 6.14+).
    rekey: bool,
    /// MiB the bulk tests relay each way (TLSRELAY_BULK_MIB): the full 64
    /// on the newest kernel, less on the older one to keep CI short.
    bulk_mib: u32,
}

pub const LTS_6_12: KernelSeries = KernelSeries {
    prefix: "linux-image-6.12.",
    suffix: "-cloud-amd64-unsigned",
    source: None,
    rekey: false,
    bulk_mib: 16,
};

pub const LTS_6_18: KernelSeries = KernelSeries {
    prefix: "linux-image-6.18.",
    suffix: "-cloud-amd64",
    source: Some("http://deb.debian.org/debian trixie-backports main"),
    rekey: true,
    bulk_mib: 64,
};

impl KernelSeries {
    fn name(&self) -> &'static str {
        self.prefix
            .trim_start_matches("linux-image-")
            .trim_end_matches('.')
    }
}

/// Modules kTLS needs for AES-GCM and ChaCha20-Poly1305, in load order
/// (dependencies found in each module's `depends=` are loaded first).
/// aesni-intel and crypto_simd refuse to load under TCG; the built-in
/// generic AES serves then.
const MODULES: &[&str] = &[
    "gf128mul",
    "cryptd",
    "crypto_simd",
    "crypto_null",
    "geniv",
    "seqiv",
    "ghash-generic",
    "ghash-clmulni-intel",
    "gcm",
    "aesni-intel",
    "libchacha",
    "chacha_generic",
    "chacha",
    "chacha-x86_64",
    "poly1305-x86_64",
    "chacha20poly1305",
    "tls",
];

/// Test binaries (in the tlsrelay-tests package) that run in the guest.
const VM_TESTS: &[&str] = &["ktls", "relay_data"];

/// The guest gets this long before it is declared hung.
const GUEST_TIMEOUT: Duration = Duration::from_secs(25 * 60);

pub fn vmtest(only: Option<&str>) -> anyhow::Result<()> {
    ensure_host_tools()?;
    let vm = root().join("target/vm");
    let tests = build_tests()?;
    let mut payload: Vec<(String, PathBuf)> = tests
        .iter()
        .map(|t| {
            let name = t.file_name().unwrap().to_string_lossy();
            let base = name.rsplit_once('-').map_or(name.as_ref(), |(b, _)| b);
            (format!("tests/{base}"), t.clone())
        })
        .collect();
    // OpenSSL's s_client as a KeyUpdate peer (its libraries follow by ldd).
    payload.push(("bin/openssl".into(), which("openssl")?));
    let mut failed = Vec::new();
    for series in [LTS_6_12, LTS_6_18] {
        let kernel = fetch_kernel(&vm, &series)?;
        let initramfs = vm.join(format!("initramfs-{}.cpio", series.name()));
        let run = format!(
            // The relay's own KeyUpdates every 1,024 records (16 MiB) where
            // the kernel can rekey: the bulk tests cross several.
            "export TLSRELAY_EXPECT_REKEY={} TLSRELAY_REKEY_AFTER_RECORDS=1024 TLSRELAY_BULK_MIB={}\n{}",
            u8::from(series.rekey),
            series.bulk_mib,
            RUN_TESTS.replace("@FILTER@", &shell_quote(only.unwrap_or_default())),
        );
        build_initramfs(&kernel, &payload, &run, &initramfs)?;
        let (status, _) = boot(&kernel.vmlinuz, &initramfs, Clock::Host)?;
        if status == 0 {
            println!("vmtest: all tests passed on Linux {}", series.name());
        } else {
            failed.push(series.name());
        }
    }
    if !failed.is_empty() {
        bail!("tests in the VM failed on Linux {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo xtask bench --vm`: TLS termination and bridge through the relay
/// with kTLS on and off, alternating, inside the VM. Returns the guest's
/// results, one JSON object per run, and its kernel's AEAD drivers.
pub fn bench(quick: bool) -> anyhow::Result<(Vec<serde_json::Value>, Vec<String>)> {
    ensure_host_tools()?;
    let vm = root().join("target/vm");
    // The newer kernel: its kTLS is what a current deployment runs.
    let kernel = fetch_kernel(&vm, &LTS_6_18)?;
    let bin = crate::build_bench_binaries(quick)?;
    let payload = vec![
        ("bench/tlsrelay".to_string(), bin.join("tlsrelay")),
        ("bench/tlsrelay-load".to_string(), bin.join("tlsrelay-load")),
    ];
    // Instruction counts repeat (within 2 % run to run): two rounds of one
    // stream say as much as more would.
    let (rounds, bytes, conns) = if quick {
        (1, 16 << 20, "1")
    } else {
        (2, 64 << 20, "1")
    };
    let script = RUN_BENCH
        .replace("@ROUNDS@", &rounds.to_string())
        .replace("@BYTES@", &bytes.to_string())
        .replace("@CONNS@", conns);
    let initramfs = vm.join("initramfs-bench.cpio");
    build_initramfs(&kernel, &payload, &script, &initramfs)?;
    let (status, lines) = boot(&kernel.vmlinuz, &initramfs, Clock::Instructions)?;
    if status != 0 {
        bail!("the bench in the VM failed (status {status})");
    }
    let crypto = lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix("CRYPTO "))
        .map(str::to_string)
        .collect();
    let runs = lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix("BENCH "))
        .map(|j| serde_json::from_str(j).with_context(|| format!("guest result {j}")))
        .collect::<anyhow::Result<_>>()?;
    Ok((runs, crypto))
}

/// qemu, a static busybox and dpkg-deb; installed with apt when missing.
fn ensure_host_tools() -> anyhow::Result<()> {
    let wanted = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("/bin/busybox", "busybox-static"),
        ("objcopy", "binutils"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| !(crate::prereqs::found(cmd) || Path::new(cmd).exists()))
        .map(|(_, pkg)| *pkg)
        .collect();
    crate::prereqs::apt_install(&missing)
}

struct Kernel {
    vmlinuz: PathBuf,
    /// `lib/modules/<version>` of the extracted package.
    modules: PathBuf,
}

/// Finds the newest kernel package of a series, downloads and extracts it
/// (both cached under `vm/cache/<series>`).
fn fetch_kernel(vm: &Path, series: &KernelSeries) -> anyhow::Result<Kernel> {
    let cache = vm.join("cache").join(series.name());
    std::fs::create_dir_all(&cache)?;
    let cached_deb = || -> anyhow::Result<Option<PathBuf>> {
        let mut debs: Vec<PathBuf> = std::fs::read_dir(&cache)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        debs.sort();
        Ok(debs.pop())
    };
    let deb = match cached_deb()? {
        Some(deb) => deb,
        None => {
            let apt = Apt::for_source(vm, series.source)?;
            let mut names = apt.packages(series)?;
            if names.is_empty() {
                apt.update()?;
                names = apt.packages(series)?;
            }
            names.sort_by_key(|n| version_key(n));
            let newest = names.pop().with_context(|| {
                format!("no {}*{} package in apt", series.prefix, series.suffix)
            })?;
            run(
                &format!("apt-get download {newest}"),
                apt.command("apt-get")
                    .arg("download")
                    .arg(&newest)
                    .current_dir(&cache),
            )?;
            cached_deb()?.context("apt-get download left no .deb")?
        }
    };
    let extracted = cache.join("kernel");
    if !extracted.join("boot").exists() {
        let _ = std::fs::remove_dir_all(&extracted);
        run(
            "dpkg-deb -x",
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted),
        )?;
    }
    let vmlinuz = std::fs::read_dir(extracted.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the kernel package")?;
    // Debian 13's packages put modules under /usr/lib.
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .filter_map(|d| std::fs::read_dir(extracted.join(d)).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .next()
        .context("no lib/modules in the kernel package")?;
    println!("vmtest: kernel {}", vmlinuz.display());
    Ok(Kernel { vmlinuz, modules })
}

/// apt with the machine's sources, or with one extra source through a
/// private state (lists, cache, status) so the machine's apt is untouched.
struct Apt {
    options: Vec<String>,
}

impl Apt {
    fn for_source(vm: &Path, source: Option<&str>) -> anyhow::Result<Apt> {
        let Some(source) = source else {
            return Ok(Apt {
                options: Vec::new(),
            });
        };
        let dir = vm.join("apt");
        for d in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let list = dir.join("sources.list");
        std::fs::write(
            &list,
            format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {source}\n"),
        )?;
        let at = |p: &str| dir.join(p).display().to_string();
        let options = [
            format!("Dir::Etc::SourceList={}", list.display()),
            "Dir::Etc::SourceParts=/dev/null".to_string(),
            format!("Dir::State::Lists={}", at("lists")),
            format!("Dir::Cache={}", at("cache")),
            "Dir::State::status=/dev/null".to_string(),
            "APT::Sandbox::User=root".to_string(),
        ];
        Ok(Apt {
            options: options
                .into_iter()
                .flat_map(|o| ["-o".to_string(), o])
                .collect(),
        })
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(tool);
        cmd.args(&self.options);
        cmd
    }

    fn update(&self) -> anyhow::Result<()> {
        run(
            "apt-get update",
            self.command("apt-get").args(["update", "-qq"]),
        )
    }

    fn packages(&self, series: &KernelSeries) -> anyhow::Result<Vec<String>> {
        let out = self
            .command("apt-cache")
            .args(["pkgnames", series.prefix])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|n| n.ends_with(series.suffix))
            .map(str::to_string)
            .collect())
    }
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found on PATH"))
}

/// Sort key for `linux-image-6.12.N+…`: the numeric parts.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Builds the VM test binaries and returns their paths.
fn build_tests() -> anyhow::Result<Vec<PathBuf>> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "-p",
        "tlsrelay-tests",
        "--no-run",
        "--message-format=json",
    ]);
    for t in VM_TESTS {
        cmd.args(["--test", t]);
    }
    println!("\n=== build the VM test binaries");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the VM tests failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["profile"]["test"] == true {
            if let Some(exe) = msg["executable"].as_str() {
                found.push(PathBuf::from(exe));
            }
        }
    }
    if found.len() != VM_TESTS.len() {
        bail!(
            "expected {} test binaries, cargo reported {found:?}",
            VM_TESTS.len()
        );
    }
    Ok(found)
}

/// A newc-format cpio archive, written as the kernel's initramfs unpacker
/// reads it.
struct Cpio<W: Write> {
    out: W,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Cpio {
            out,
            ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        data: &[u8],
        rdev: (u32, u32),
    ) -> std::io::Result<()> {
        let name = name.trim_start_matches('/');
        self.ino += 1;
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + name.len() + 1)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, len: usize) -> std::io::Result<()> {
        let pad = (4 - len % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])
    }

    /// A directory and its parents, once each.
    fn dir(&mut self, path: &str) -> std::io::Result<()> {
        let path = path.trim_matches('/');
        let mut so_far = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !so_far.is_empty() {
                so_far.push('/');
            }
            so_far.push_str(part);
            if self.dirs.insert(so_far.clone()) {
                let name = so_far.clone();
                self.entry(&name, 0o040755, &[], (0, 0))?;
            }
        }
        Ok(())
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        if let Some((parent, _)) = path.trim_start_matches('/').rsplit_once('/') {
            self.dir(parent)?;
        }
        self.entry(path, 0o100000 | mode, data, (0, 0))
    }

    fn symlink(&mut self, path: &str, target: &str) -> std::io::Result<()> {
        if let Some((parent, _)) = path.trim_start_matches('/').rsplit_once('/') {
            self.dir(parent)?;
        }
        self.entry(path, 0o120777, target.as_bytes(), (0, 0))
    }

    fn finish(mut self) -> std::io::Result<W> {
        self.entry("TRAILER!!!", 0, &[], (0, 0))?;
        Ok(self.out)
    }
}

/// Decompressed module bytes, by name, with their `depends=` lists.
fn load_modules(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut index: HashMap<String, PathBuf> = HashMap::new();
    let mut stack = vec![dir.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko.xz"))
            {
                index.insert(name.replace('_', "-"), p);
            }
        }
    }
    let read = |name: &str| -> anyhow::Result<Option<Vec<u8>>> {
        let Some(path) = index.get(&name.replace('_', "-")) else {
            return Ok(None); // built into the kernel
        };
        let out = Command::new("xz").arg("-dc").arg(path).output()?;
        if !out.status.success() {
            bail!("xz -dc {}", path.display());
        }
        Ok(Some(out.stdout))
    };
    let mut ordered: Vec<(String, Vec<u8>)> = Vec::new();
    fn visit(
        name: &str,
        read: &dyn Fn(&str) -> anyhow::Result<Option<Vec<u8>>>,
        ordered: &mut Vec<(String, Vec<u8>)>,
    ) -> anyhow::Result<()> {
        if ordered.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let Some(bytes) = read(name)? else {
            return Ok(());
        };
        for dep in depends(&bytes) {
            visit(&dep, read, ordered)?;
        }
        ordered.push((name.to_string(), bytes));
        Ok(())
    }
    for m in MODULES {
        visit(m, &read, &mut ordered)?;
    }
    Ok(ordered)
}

/// The `depends=` entry of a module's .modinfo section.
fn depends(module: &[u8]) -> Vec<String> {
    let key = b"depends=";
    module
        .split(|&b| b == 0)
        .find(|s| s.starts_with(key))
        .map(|s| {
            String::from_utf8_lossy(&s[key.len()..])
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Shared libraries a binary needs, from ldd.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output()?;
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /sys/fs/bpf /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
hostname tlsrelay-vm
ip link set lo up
for m in $(cat /modules/order); do
    insmod /modules/$m.ko 2>/dev/null || echo "vmtest: module $m not loaded"
done
echo "vmtest: kernel $(uname -r), $(nproc) CPUs"
# An emulated CPU is tens of times slower: a test's wait for one event
# (a reply after 64 MiB through software AES) gets 300 s, not 20: in
# isolation that reply comes within a minute on 6.18 (KeyUpdates included),
# and twice that or more when the host's CPUs are busy.
export TLSRELAY_PATIENCE_SECS=300
export TLSRELAY_EXPECT_KTLS=1 HOME=/tmp TMPDIR=/tmp RUST_BACKTRACE=1
status=0
@RUN@
cat /proc/net/tls_stat
echo "VMTEST-STATUS=$status"
poweroff -f
"#;

/// A word for the guest's shell, whatever it holds.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The init's work for `vmtest`: every test binary, one test at a time
/// (those matching `@FILTER@`, which is empty for all).
const RUN_TESTS: &str = r#"for t in /tests/*; do
    echo "vmtest: running $t"
    $t --test-threads=1 @FILTER@ || status=1
done"#;

/// The init's work for `bench --vm`: a discarding sink (plain and TLS),
/// then per scenario and round the relay with kTLS on, then off, under the
/// same blast; one `BENCH {json}` line per run.
const RUN_BENCH: &str = r#"cd /tmp
L=/bench/tlsrelay-load
# Which implementations the kernel's TLS gets (the highest priority wins).
for alg in 'gcm(aes)' 'rfc7539(chacha20,poly1305)'; do
  awk -v alg="$alg" '$1 == "name" { name = $3 } $1 == "driver" { driver = $3 }
    $1 == "priority" && name == alg { print "CRYPTO", alg, driver, $3 }' /proc/crypto
done
$L certs --out /tmp/c
$L sink --listen 127.0.0.1:7001 >/dev/null &
$L sink --listen 127.0.0.1:7002 --cert /tmp/c/bench.crt --key /tmp/c/bench.key >/dev/null &
sleep 2
port=7100
# The relay's time on the CPU in ns, all its threads (schedstat's first
# field, from the scheduler clock): the guest clock counts instructions
# (qemu -icount shift=0), so these are its instructions, kernel TLS work in
# its syscalls included.
relay_ns() { cat /proc/$1/task/*/schedstat | awk '{ ns += $1 } END { print ns }'; }
for scenario in termination-aes128 termination-aes256 termination-chacha20 bridge; do
  suite=""
  case $scenario in
    termination-aes128) suite="--suite TLS13_AES_128_GCM_SHA256" ;;
    termination-aes256) suite="--suite TLS13_AES_256_GCM_SHA384" ;;
    termination-chacha20) suite="--suite TLS13_CHACHA20_POLY1305_SHA256" ;;
  esac
  if [ $scenario = bridge ]; then
    up=7002; route='tls.policy = "required"
tls.verify = "encryption-only"'
  else
    up=7001; route='tls.policy = "plain"'
  fi
  for conns in @CONNS@; do
    for round in $(seq @ROUNDS@); do
      for ktls in true false; do
        port=$((port + 1))
        printf '%s\n' 'ebpf.enabled = false' '[dataplane]' "ktls = $ktls" \
          '[[listeners]]' 'name = "bench"' "address = \"127.0.0.1:$port\"" \
          'upstream = "sink"' 'tls.mode = "implicit"' \
          'tls.certificates = [{ chain = "/tmp/c/bench.crt", key = "/tmp/c/bench.key" }]' \
          '[[upstreams]]' 'name = "sink"' "address = \"127.0.0.1:$up\"" "$route" > /tmp/relay.toml
        /bench/tlsrelay run --config /tmp/relay.toml --state-dir /tmp/state > /tmp/relay.log 2>&1 &
        relay=$!
        sleep 3
        ns=$(relay_ns $relay)
        result=$($L blast --to 127.0.0.1:$port --tls $suite --connections $conns --bytes $((@BYTES@ / conns))) || { status=1; cat /tmp/relay.log; }
        ns=$(( $(relay_ns $relay) - ns ))
        sleep 1
        path=$(grep -o ' path=[^ ]*' /tmp/relay.log | tail -1 | cut -d= -f2)
        kill $relay; wait $relay 2>/dev/null
        echo "BENCH {\"scenario\":\"$scenario\",\"connections\":$conns,\"ktls\":$ktls,\"path\":\"$path\",\"relay_ns\":$ns,\"result\":${result:-null}}"
      done
    done
  done
done
# SMTP with STARTTLS on both legs: 1 MiB messages from 4 connections, by
# DATA and by BDAT, kTLS on then off.
$L smtp-sink --listen 127.0.0.1:7003 --cert /tmp/c/bench.crt --key /tmp/c/bench.key >/dev/null &
sleep 2
for scenario in smtp-data smtp-bdat; do
  bdat=""
  [ $scenario = smtp-bdat ] && bdat="--bdat"
  for round in $(seq @ROUNDS@); do
    for ktls in true false; do
      port=$((port + 1))
      printf '%s\n' 'ebpf.enabled = false' 'accepted_domains = ["bench.test"]' '[dataplane]' "ktls = $ktls" \
        '[[listeners]]' 'name = "mx"' "address = \"127.0.0.1:$port\"" 'protocol = "smtp"' \
        'hostname = "relay.bench.test"' 'tls.mode = "opportunistic"' \
        'tls.certificates = [{ chain = "/tmp/c/bench.crt", key = "/tmp/c/bench.key" }]' \
        '[[outbound_connectors]]' 'name = "sink"' 'recipient_domains = ["bench.test"]' \
        'next_hops = ["127.0.0.1:7003"]' 'tls.policy = "required"' 'tls.verify = "encryption-only"' > /tmp/relay.toml
      /bench/tlsrelay run --config /tmp/relay.toml --state-dir /tmp/state > /tmp/relay.log 2>&1 &
      relay=$!
      sleep 3
      ns=$(relay_ns $relay)
      result=$($L smtp --to 127.0.0.1:$port --connections 4 --messages $((@BYTES@ / 4 / 1048576)) --size 1048576 $bdat) || { status=1; cat /tmp/relay.log; }
      ns=$(( $(relay_ns $relay) - ns ))
      sleep 1
      path=$(grep -o ' path=[^ ]*\( ktls=[^ ]*\)\?' /tmp/relay.log | tail -1 | sed 's/^ path=//')
      kill $relay; wait $relay 2>/dev/null
      echo "BENCH {\"scenario\":\"$scenario\",\"connections\":4,\"ktls\":$ktls,\"path\":\"$path\",\"relay_ns\":$ns,\"result\":${result:-null}}"
    done
  done
done"#;

fn build_initramfs(
    kernel: &Kernel,
    payload: &[(String, PathBuf)],
    run: &str,
    out: &Path,
) -> anyhow::Result<()> {
    println!("\n=== build the initramfs");
    let file = std::fs::File::create(out)?;
    let mut cpio = Cpio::new(std::io::BufWriter::new(file));
    for d in [
        "dev", "proc", "sys", "tmp", "bin", "sbin", "etc", "modules", "tests", "bench",
    ] {
        cpio.dir(d)?;
    }
    cpio.entry("dev/console", 0o020600, &[], (5, 1))?;
    cpio.file("bin/busybox", 0o755, &std::fs::read("/bin/busybox")?)?;
    cpio.symlink("bin/sh", "busybox")?;
    cpio.file("init", 0o755, INIT.replace("@RUN@", run).as_bytes())?;
    cpio.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n")?;
    let modules = load_modules(&kernel.modules)?;
    let order: Vec<&str> = modules.iter().map(|(n, _)| n.as_str()).collect();
    cpio.file("modules/order", 0o644, order.join("\n").as_bytes())?;
    for (name, bytes) in &modules {
        cpio.file(&format!("modules/{name}.ko"), 0o644, bytes)?;
    }
    let mut libs = BTreeSet::new();
    for (dest, binary) in payload {
        libs.extend(shared_libraries(binary)?);
        let stripped = out.with_extension("stripped");
        let status = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(binary)
            .arg(&stripped)
            .status()?;
        if !status.success() {
            bail!("objcopy --strip-debug {}", binary.display());
        }
        cpio.file(dest, 0o755, &std::fs::read(&stripped)?)?;
    }
    for lib in libs {
        let real = std::fs::canonicalize(&lib)?;
        cpio.file(&lib.to_string_lossy(), 0o755, &std::fs::read(real)?)?;
    }
    cpio.finish()?.flush()?;
    println!(
        "vmtest: initramfs {} ({} MiB, modules: {})",
        out.display(),
        std::fs::metadata(out)?.len() >> 20,
        order.join(" ")
    );
    Ok(())
}

/// The guest's clock.
#[derive(Clone, Copy, PartialEq)]
enum Clock {
    /// The host's: both vCPUs on host threads (fastest).
    Host,
    /// One tick per executed guest instruction (`-icount shift=0`, idle
    /// time skipped): a guest second is 10^9 instructions whatever the host
    /// is doing, so timings inside are instruction counts. One vCPU, so a
    /// process's CPU time is the instructions it ran (with two, a vCPU's
    /// clock runs on while the other executes).
    Instructions,
}

/// Boots the kernel under TCG, streams the console, returns the guest's
/// status and its console lines. A kernel that dies before the init script
/// starts (TCG has oopsed in the kernel's own boot-time code patching, with
/// no test run) is booted again, at most twice.
fn boot(vmlinuz: &Path, initramfs: &Path, clock: Clock) -> anyhow::Result<(i32, Vec<String>)> {
    for _ in 0..2 {
        let (status, lines) = boot_once(vmlinuz, initramfs, clock)?;
        if let Some(status) = status {
            return Ok((status, lines));
        }
        if lines.iter().any(|l| l.contains("vmtest: kernel")) {
            bail!("the guest ended without reporting a test status (see its console above)");
        }
        println!("vmtest: the kernel died before the tests started; booting again");
    }
    let (status, lines) = boot_once(vmlinuz, initramfs, clock)?;
    let status = status
        .context("the guest ended without reporting a test status (see its console above)")?;
    Ok((status, lines))
}

fn boot_once(
    vmlinuz: &Path,
    initramfs: &Path,
    clock: Clock,
) -> anyhow::Result<(Option<i32>, Vec<String>)> {
    println!("\n=== boot the kTLS kernel (qemu, TCG)");
    let mut qemu = Command::new("qemu-system-x86_64");
    match clock {
        Clock::Host => qemu.args(["-accel", "tcg,thread=multi", "-smp", "2"]),
        Clock::Instructions => {
            qemu.args(["-accel", "tcg", "-icount", "shift=0,sleep=off", "-smp", "1"])
        }
    };
    let mut child = qemu
        .args(["-cpu", "max", "-m", "3072"])
        .args([
            "-nographic",
            "-no-reboot",
            "-monitor",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut status = None;
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(line) => {
                println!("  vm| {line}");
                lines.push(line.clone());
                if let Some(s) = line.trim().strip_prefix("VMTEST-STATUS=") {
                    status = s.parse().ok();
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if started.elapsed() > GUEST_TIMEOUT {
            let _ = child.kill();
            bail!("the VM did not finish within {GUEST_TIMEOUT:?}");
        }
    }
    let _ = child.wait();
    println!("vmtest: guest ran {:.0} s", started.elapsed().as_secs_f64());
    Ok((status, lines))
}
