//! Addresses of upstream servers named by DNS, kept for their records'
//! TTL: a server whose name moves to another address is followed once its
//! records expire, and while they live a session or a health check pays
//! no lookup (getaddrinfo knows no TTL and takes a blocking thread per
//! call). `/etc/hosts` is read first, as getaddrinfo would.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use hickory_resolver::config::ResolveHosts;
use hickory_resolver::TokioResolver;
use tlsrelay_core::upstream::HostPort;

/// The resolver of upstream server names (cheap to clone: one cache),
/// built at the first name it is asked.
#[derive(Clone)]
pub struct UpstreamNames {
    /// `None` where no resolver could be built (no readable
    /// /etc/resolv.conf): getaddrinfo then, per connect.
    resolver: Arc<OnceLock<Option<TokioResolver>>>,
    nameservers: Vec<SocketAddr>,
}

impl std::fmt::Debug for UpstreamNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "names from {:?}", self.nameservers)
    }
}

impl UpstreamNames {
    /// Asks `nameservers` (none: those of /etc/resolv.conf).
    pub fn new(nameservers: &[SocketAddr]) -> UpstreamNames {
        UpstreamNames {
            resolver: Arc::default(),
            nameservers: nameservers.to_vec(),
        }
    }

    fn resolver(&self) -> Option<&TokioResolver> {
        self.resolver
            .get_or_init(|| build(&self.nameservers))
            .as_ref()
    }

    /// The addresses to connect to for `address`: itself when the host is
    /// an IP address, else the name's A and AAAA records.
    pub async fn resolve(&self, address: &HostPort) -> io::Result<Vec<SocketAddr>> {
        let port = address.port;
        if let Ok(ip) = address.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let Some(resolver) = self.resolver() else {
            let found = tokio::net::lookup_host((address.host.as_str(), port)).await?;
            return Ok(found.collect());
        };
        let ips = resolver
            .lookup_ip(address.host.as_str())
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e))?;
        let found: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(ip, port)).collect();
        match found.is_empty() {
            true => Err(io::Error::new(io::ErrorKind::NotFound, "no address")),
            false => Ok(found),
        }
    }
}

fn build(nameservers: &[SocketAddr]) -> Option<TokioResolver> {
    let resolver = crate::dns::resolver_builder(nameservers).and_then(|mut builder| {
        builder.options_mut().use_hosts_file = ResolveHosts::Always;
        builder.build()
    });
    match resolver {
        Ok(resolver) => Some(resolver),
        Err(e) => {
            tracing::warn!("upstream names resolved per connect by getaddrinfo: {e}");
            None
        }
    }
}
