//! A listener's access rules ([`tlsrelay_core::access`]) on the clock,
//! behind a lock: consulted at accept, before a byte is read.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use tlsrelay_core::access::{default_burst, AccessRules, Denied};

pub struct ClientAccess {
    rules: Mutex<AccessRules>,
    open: bool,
    started: Instant,
}

impl ClientAccess {
    pub fn new(access: &tlsrelay_core::config::Access) -> ClientAccess {
        let rules = AccessRules::new(
            access.allow.clone(),
            access.deny.clone(),
            access.rate,
            access.burst,
        );
        ClientAccess {
            open: rules.is_open(),
            rules: Mutex::new(rules),
            started: Instant::now(),
        }
    }

    /// The burst in force for `access` (for the plan's description).
    pub fn burst_of(access: &tlsrelay_core::config::Access) -> u32 {
        access
            .burst
            .unwrap_or_else(|| access.rate.map_or(1, default_burst))
    }

    pub fn admit(&self, ip: IpAddr) -> Result<(), Denied> {
        if self.open {
            return Ok(());
        }
        let now = self.started.elapsed().as_secs_f64();
        self.rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(ip, now)
    }
}
