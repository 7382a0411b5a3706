//! Next-hop connections kept idle between sessions, as Postfix's
//! connection cache keeps them (`smtp_connection_cache_time_limit`,
//! `smtp_connection_reuse_time_limit`): a session that ends on a clean
//! next hop ([`tlsrelay_core::smtp::forward::Action::Release`]) parks it here, and the
//! next session to the same connector and recipient domain takes it after
//! an RSET proves it alive, skipping the connect, the banner, EHLO,
//! STARTTLS and the handshake.
//!
//! Each connector has its own store (a reload's new plan starts empty, so
//! a changed policy never sends mail over a connection the old one
//! opened); the key within it is the recipient domain for MX delivery, so
//! one domain's connection never carries another's mail.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::hop::HopConnection;

/// A connection is not reused once this old (Postfix: 300 s), so a next
/// hop's changed certificate or address is seen again soon.
pub const LIFETIME: Duration = Duration::from_secs(300);

/// Idle connections kept per destination; more are closed with QUIT.
pub const PER_DESTINATION: usize = 32;

/// Destinations with idle connections, at most; more are closed.
const DESTINATIONS: usize = 1000;

/// One connector's idle next-hop connections, by recipient domain (None
/// for a connector with fixed next hops).
pub struct IdleHops {
    /// How long a connection waits idle for a session (the connector's
    /// `connection_cache_time`, 2 s unless set: long enough for a busy
    /// sender's next session, short enough that a next hop never sees the
    /// relay hold connections it does not use).
    idle_time: Duration,
    parked: Mutex<HashMap<Option<String>, Vec<Parked>>>,
    next_id: AtomicU64,
}

struct Parked {
    id: u64,
    hop: HopConnection,
}

impl IdleHops {
    pub fn new(idle_time: Duration) -> IdleHops {
        IdleHops {
            idle_time,
            parked: Mutex::default(),
            next_id: AtomicU64::new(0),
        }
    }

    /// Keeps `hop` for the idle time, then QUITs it unless a session took
    /// it. One past its lifetime, or past the caps, is QUIT at once.
    pub fn park(self: &Arc<Self>, domain: Option<String>, hop: HopConnection) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let refused = {
            let mut parked = self.parked.lock().expect("not poisoned");
            let full = match parked.get(&domain) {
                Some(list) => list.len() >= PER_DESTINATION,
                None => parked.len() >= DESTINATIONS,
            };
            if full || hop.facts.opened.elapsed() >= LIFETIME {
                Some(hop)
            } else {
                parked
                    .entry(domain.clone())
                    .or_default()
                    .push(Parked { id, hop });
                None
            }
        };
        let store = self.clone();
        tokio::spawn(async move {
            if let Some(hop) = refused {
                return hop.quit().await;
            }
            tokio::time::sleep(store.idle_time).await;
            if let Some(hop) = store.remove(&domain, |p| p.id == id) {
                hop.quit().await;
            }
        });
    }

    /// The most recently parked connection to `domain` still within its
    /// lifetime, if any. The caller proves it alive (RSET) before use.
    pub fn take(&self, domain: &Option<String>) -> Option<HopConnection> {
        self.remove(domain, |p| p.hop.facts.opened.elapsed() < LIFETIME)
    }

    fn remove(
        &self,
        domain: &Option<String>,
        which: impl Fn(&Parked) -> bool,
    ) -> Option<HopConnection> {
        let mut parked = self.parked.lock().expect("not poisoned");
        let list = parked.get_mut(domain)?;
        let found = list.iter().rposition(which).map(|i| list.remove(i).hop);
        if list.is_empty() {
            parked.remove(domain);
        }
        found
    }
}
