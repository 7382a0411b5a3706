//! Measuring a running relay: CPU and RSS of its process tree, the
//! machine's CPU, perf profiles, leftover processes.

use super::*;

/// Raises the open-file limit as far as allowed (10 000 idle connections
/// take 20 000 descriptors in a relay) and returns the soft limit.
pub(crate) fn raise_open_files() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `limit`.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        let wanted = libc::rlimit {
            rlim_cur: 1 << 18,
            rlim_max: limit.rlim_max.max(1 << 18),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

/// A relay (or the direct pseudo-peer) ready for load at `listen`.
pub(super) struct Running {
    /// Declared first: stops recording before the relay is killed.
    pub(super) _profile: Option<Profile>,
    pub(super) child: Option<Guard>,
    pub(super) listen: SocketAddr,
    /// tlsrelay's session reports' data paths.
    pub(super) paths: Option<mpsc::Receiver<String>>,
}

impl Running {
    /// Counts the relay's system calls until [`Counters::per_mb`].
    pub(super) fn counters(&self, dir: &Path) -> Option<Counters> {
        Counters::start(self.child.as_ref()?.0.id(), dir)
    }

    pub(super) fn cpu_seconds(&self) -> anyhow::Result<f64> {
        match &self.child {
            Some(c) => tree_cpu_seconds(c.0.id()),
            None => Ok(f64::NAN),
        }
    }

    pub(super) fn rss_bytes(&self) -> f64 {
        self.child
            .as_ref()
            .map_or(f64::NAN, |c| tree_rss_bytes(c.0.id()))
    }

    /// The data path of the last session tlsrelay reported.
    pub(super) fn path(&self) -> String {
        let Some(rx) = &self.paths else {
            return String::new();
        };
        let mut last = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| "?".into());
        while let Ok(p) = rx.try_recv() {
            last = p;
        }
        last
    }
}

/// The system calls and context switches of a relay's threads while a cell
/// runs (`perf stat` on tracepoints): what a GB costs besides CPU time.
pub(super) struct Counters {
    perf: std::process::Child,
    out: PathBuf,
}

/// The system calls counted one by one; the rest only in the total.
pub(super) const COUNTED_CALLS: &[&str] = &[
    "recvfrom",
    "sendto",
    "read",
    "write",
    "readv",
    "writev",
    "recvmsg",
    "sendmsg",
    "splice",
    "epoll_wait",
    "io_uring_enter",
    "futex",
];

impl Counters {
    /// Starts counting the threads of `pid`'s process tree; `None` without
    /// perf or its tracepoints (the columns then show "-").
    pub(super) fn start(pid: u32, dir: &Path) -> Option<Counters> {
        let tids: Vec<String> = tree(pid)
            .into_iter()
            .flat_map(|p| {
                std::fs::read_dir(format!("/proc/{p}/task"))
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t.ok()?.file_name().into_string().ok())
            })
            .collect();
        let mut events = vec![
            "raw_syscalls:sys_enter".to_string(),
            "context-switches".to_string(),
        ];
        events.extend(
            COUNTED_CALLS
                .iter()
                .map(|c| format!("syscalls:sys_enter_{c}")),
        );
        let out = dir.join(format!("perf-stat-{pid}.csv"));
        let perf = Command::new("perf")
            .args(["stat", "-x", ",", "--no-big-num", "-e", &events.join(",")])
            .arg("-o")
            .arg(&out)
            .args(["-t", &tids.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        // perf opens its counters after it starts.
        std::thread::sleep(Duration::from_millis(300));
        Some(Counters { perf, out })
    }

    /// Stops counting: per MB moved, every system call, context switches,
    /// and each of [`COUNTED_CALLS`].
    pub(super) fn per_mb(mut self, bytes: f64) -> Sample {
        // SAFETY: signals our own perf child.
        unsafe { libc::kill(self.perf.id() as i32, libc::SIGINT) };
        let _ = self.perf.wait();
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let mb = bytes / 1e6;
        let mut sample = Sample::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split(',').collect();
            let (Some(count), Some(event)) = (fields.first(), fields.get(2)) else {
                continue;
            };
            let Ok(count) = count.parse::<f64>() else {
                continue;
            };
            let key = match *event {
                "raw_syscalls:sys_enter" => "syscalls_per_mb",
                "context-switches" => "switches_per_mb",
                other => match other.strip_prefix("syscalls:sys_enter_") {
                    Some(call) => match COUNTED_CALLS.iter().find(|c| **c == call) {
                        Some(c) => call_key(c),
                        None => continue,
                    },
                    None => continue,
                },
            };
            sample.insert(key, count / mb);
        }
        sample
    }
}

/// The sample key of one counted system call, per MB.
fn call_key(call: &str) -> &'static str {
    match call {
        "recvfrom" => "recvfrom_per_mb",
        "sendto" => "sendto_per_mb",
        "read" => "read_per_mb",
        "write" => "write_per_mb",
        "readv" => "readv_per_mb",
        "writev" => "writev_per_mb",
        "recvmsg" => "recvmsg_per_mb",
        "sendmsg" => "sendmsg_per_mb",
        "splice" => "splice_per_mb",
        "epoll_wait" => "epoll_wait_per_mb",
        "io_uring_enter" => "io_uring_enter_per_mb",
        _ => "futex_per_mb",
    }
}

/// `perf record` of one relay process, turned into a flamegraph when
/// dropped.
pub(super) struct Profile {
    pub(super) perf: std::process::Child,
    pub(super) data: PathBuf,
    pub(super) stem: PathBuf,
}

impl Profile {
    pub(super) fn record(pid: u32, dir: &Path, stem: &str) -> anyhow::Result<Profile> {
        let data = dir.join(format!("{stem}.data"));
        let perf = Command::new("perf")
            .args(["record", "-F", "999", "--call-graph", "dwarf,16384", "-o"])
            .arg(&data)
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record")?;
        // perf attaches to the threads after it starts.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Profile {
            perf,
            data,
            stem: dir.join(stem),
        })
    }

    /// Stops recording and writes `<stem>.svg` and `<stem>.folded`; prints
    /// the frames where most samples were taken.
    pub(super) fn finish(&mut self) -> anyhow::Result<()> {
        // SAFETY: signals our own perf child.
        unsafe { libc::kill(self.perf.id() as i32, libc::SIGINT) };
        self.perf.wait()?;
        let script = Command::new("perf")
            .args(["script", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("perf script")?;
        use inferno::collapse::Collapse;
        let mut folded = Vec::new();
        inferno::collapse::perf::Folder::from(inferno::collapse::perf::Options::default())
            .collapse(&script.stdout[..], &mut folded)?;
        std::fs::write(self.stem.with_extension("folded"), &folded)?;
        let svg = self.stem.with_extension("svg");
        let mut options = inferno::flamegraph::Options::default();
        options.title = format!(
            "tlsrelay: {}",
            self.stem.file_name().unwrap_or_default().to_string_lossy()
        );
        inferno::flamegraph::from_reader(&mut options, &folded[..], std::fs::File::create(&svg)?)?;
        println!("flamegraph: {}", svg.display());
        for (frame, share) in hottest(&String::from_utf8_lossy(&folded), 12) {
            println!("  {share:5.1} %  {frame}");
        }
        Ok(())
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            println!("profile {}: {e:#}", self.stem.display());
        }
    }
}

/// The frames with the most samples on top (self time), with their share.
pub(super) fn hottest(folded: &str, n: usize) -> Vec<(String, f64)> {
    let mut by_frame: BTreeMap<&str, u64> = BTreeMap::new();
    let mut total = 0;
    for line in folded.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let count: u64 = count.parse().unwrap_or(0);
        let top = stack.rsplit(';').next().unwrap_or(stack);
        *by_frame.entry(top).or_default() += count;
        total += count;
    }
    let mut v: Vec<(String, f64)> = by_frame
        .into_iter()
        .map(|(f, c)| (f.to_string(), 100.0 * c as f64 / total.max(1) as f64))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.truncate(n);
    v
}

/// Debian's linux-perf, for `--profile`.
pub(super) fn install_perf() -> anyhow::Result<()> {
    if crate::prereqs::succeeds(Command::new("perf").arg("--version")) {
        return Ok(());
    }
    crate::prereqs::apt_install(&["linux-perf"])
}

pub(super) fn pick(v: &serde_json::Value, keys: &[&'static str]) -> Sample {
    keys.iter()
        .map(|&k| (k, v[k].as_f64().unwrap_or(f64::NAN)))
        .collect()
}

/// Reads tlsrelay's session reports and sends each one's data path.
pub(super) fn session_paths(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // Skip the readiness probe's empty session.
            if line.contains("bytes=0/0") {
                continue;
            }
            if let Some(i) = line.find(" path=") {
                let path = line[i + 6..].split_whitespace().next().unwrap_or("");
                let _ = tx.send(path.to_string());
            }
        }
    });
    rx
}

/// The processes of a tree: `pid` and its descendants.
/// Processes still in one of these process groups (the peers' groups,
/// whose leaders the bench has already ended).
pub(super) fn leftovers(groups: &[u32]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // After "(comm)": state, ppid, pgrp. A zombie is gone already
            // (waiting for init to reap it), not left behind.
            let mut fields = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace());
            let state = fields.as_mut().and_then(Iterator::next);
            let group = fields
                .as_mut()
                .and_then(|f| f.nth(1))
                .and_then(|g| g.parse::<u32>().ok());
            state != Some("Z") && group.is_some_and(|g| groups.contains(&g))
        })
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("{pid} ({})", comm.trim())
        })
        .collect()
}

pub(super) fn tree(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        all.push(p);
        let children =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        frontier.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    all
}

/// CPU seconds of a process tree, reaped children included.
/// CPU seconds the whole machine has spent busy (every process and the
/// kernel's softirqs): on loopback a sender's CPU also carries its
/// receiver's TCP work, so the relay's own figure alone can mislead.
pub(super) fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return f64::NAN;
    };
    // user nice system idle iowait irq softirq steal: clock ticks.
    let t: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    if t.len() < 8 {
        return f64::NAN;
    }
    (t[0] + t[1] + t[2] + t[5] + t[6] + t[7]) / 100.0
}

pub(super) fn tree_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for p in tree(pid) {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat[stat.rfind(')').context("stat format")? + 2..]
            .split_whitespace()
            .collect();
        // utime, stime, cutime, cstime: clock ticks (USER_HZ).
        total += fields[11..15]
            .iter()
            .map(|v| v.parse::<f64>().unwrap_or(0.0))
            .sum::<f64>()
            / 100.0;
    }
    Ok(total)
}

/// Resident bytes of a process tree.
pub(crate) fn tree_rss_bytes(pid: u32) -> f64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .sum::<f64>()
        * 1024.0
}

pub(crate) fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
