//! nginx serving files over HTTPS on loopback addresses, one site per
//! address with its own certificate: MTA-STS policy hosts for the tests.
//! Port 443 is fixed by RFC 8461, so this needs root.

use std::process::{Child, Command, Stdio};

use crate::Leaf;

/// One site: its address (port 443), certificate, and files by path.
pub struct Site<'a> {
    pub ip: &'a str,
    pub leaf: &'a Leaf,
    pub files: &'a [(&'a str, &'a str)],
}

pub struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
}

/// Whether nginx can serve the tests here (installed, and root for port
/// 443); says why not, and fails in CI.
pub fn can_serve_https() -> bool {
    if !crate::have_program("nginx", "-v", "nginx") {
        return false;
    }
    if !crate::is_root() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI runs as root"
        );
        eprintln!("skipped: serving HTTPS on port 443 needs root");
        return false;
    }
    true
}

impl Nginx {
    pub fn start(sites: &[Site<'_>]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let mut servers = String::new();
        for (i, site) in sites.iter().enumerate() {
            let root = path.join(format!("site{i}"));
            for (file, content) in site.files {
                let file = root.join(file.trim_start_matches('/'));
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(file, content).unwrap();
            }
            servers += &format!(
                "server {{ listen {}:443 ssl; ssl_certificate {}; ssl_certificate_key {}; root {}; }}\n",
                site.ip,
                site.leaf.chain.display(),
                site.leaf.key.display(),
                root.display()
            );
        }
        let temp = |name: &str| format!("{name} {}/{name};", path.display());
        let config = format!(
            "daemon off;\nmaster_process off;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\nevents {{ worker_connections 64; }}\nhttp {{\naccess_log off;\n{}\n{}\n{}\n{}\n{}\ntypes {{ text/plain txt; }}\ndefault_type application/octet-stream;\n{servers}}}\n",
            temp("client_body_temp_path"),
            temp("proxy_temp_path"),
            temp("fastcgi_temp_path"),
            temp("uwsgi_temp_path"),
            temp("scgi_temp_path"),
            p = path.display(),
        );
        std::fs::write(path.join("nginx.conf"), config).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(path)
            .arg("-c")
            .arg(path.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        for site in sites {
            let addr = format!("{}:443", site.ip).parse().unwrap();
            crate::wait_for_listener(addr, "nginx", &path.join("error.log"));
        }
        Nginx { child, _dir: dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
