//! `tlsrelay run` as a child process, as systemd or an operator runs it:
//! the listeners it printed, its log kept for assertions, signals.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::patience;

pub struct RelayProcess {
    pub child: Child,
    pub listeners: Vec<(String, SocketAddr)>,
    log: Arc<Mutex<Vec<String>>>,
}

impl RelayProcess {
    /// Starts `bin run --config config --state-dir state` (and `extra`
    /// arguments) and waits for its banner.
    pub fn start(
        bin: &str,
        config: &Path,
        state: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> RelayProcess {
        let mut child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        let mut relay = RelayProcess {
            child,
            listeners: Vec::new(),
            log,
        };
        // The banner's last line; "state directory" alone also matches a
        // listener's description ("certificate from the state directory").
        relay.wait_for_line("the banner's end", |l| {
            l.trim_start().starts_with("state directory ")
        });
        relay.listeners = relay
            .log()
            .iter()
            .filter_map(|line| {
                let rest = line.trim().strip_prefix("listener ")?;
                let (name, addr) = rest.split_once(" listening on ")?;
                Some((name.to_string(), addr.parse().ok()?))
            })
            .collect();
        relay
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == listener)
            .unwrap_or_else(|| panic!("no listener {listener}: {:?}", self.listeners))
            .1
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line contains `text`; panics with the log if none
    /// does in time (or the relay exits).
    pub fn wait_for_log(&mut self, text: &str) -> String {
        self.wait_for_line(&format!("a line with {text:?}"), |l| l.contains(text))
    }

    /// Waits until a log line satisfies `wanted` (described by `what`).
    pub fn wait_for_line(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + patience();
        loop {
            if let Some(line) = self.log().into_iter().find(|l| wanted(l)) {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the readers catch the last lines.
                std::thread::sleep(std::time::Duration::from_millis(200));
                panic!(
                    "tlsrelay exited ({status}) before logging {what}:\n{}",
                    self.log().join("\n")
                );
            }
            if Instant::now() > deadline {
                panic!("no log line: {what}:\n{}", self.log().join("\n"));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill({signal})");
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
