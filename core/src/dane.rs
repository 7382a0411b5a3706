//! DANE for SMTP (RFC 7672) as decisions over DNS answers, free of I/O:
//! which TLSA records count, and what an MX host's lookups make of its
//! TLS (authenticate by TLSA, encrypt without authentication, the
//! connector's own policy, or not at all). Matching a certificate against
//! the records needs digests and lives in the runtime.

use std::fmt;

use crate::config::DaneMode;

/// A DNS answer and whether DNSSEC proved it (an empty answer is a
/// proven or unproven denial).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer<T> {
    pub records: Vec<T>,
    pub secure: bool,
}

/// Why a lookup gave no usable answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsFailure {
    /// DNSSEC validation failed: the answer may be forged.
    #[error("DNSSEC validation failed for {0}")]
    Bogus(String),
    /// SERVFAIL, a timeout, no name server: worth a retry.
    #[error("DNS lookup failed for {0}")]
    Temporary(String),
}

/// One TLSA record (RFC 6698): certificate usage, selector, matching
/// type, and the association data.
#[derive(Clone, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

pub const DANE_TA: u8 = 2;
pub const DANE_EE: u8 = 3;

impl Tlsa {
    /// RFC 7672 3.1: SMTP uses DANE-TA(2) and DANE-EE(3) only; selectors
    /// full certificate(0) and SPKI(1); matching exact(0), SHA2-256(1) and
    /// SHA2-512(2) with data of the digest's length.
    pub fn usable(&self) -> bool {
        let length_ok = match self.matching {
            0 => !self.data.is_empty(),
            1 => self.data.len() == 32,
            2 => self.data.len() == 64,
            _ => false,
        };
        matches!(self.usage, DANE_TA | DANE_EE) && self.selector <= 1 && length_ok
    }
}

impl fmt::Display for Tlsa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.usage, self.selector, self.matching)
    }
}

impl Tlsa {
    /// The record's presentation form, `3 1 1 <hex>`, as a zone file and
    /// a TLS report's policy string write it.
    pub fn presentation(&self) -> String {
        format!("{self} {}", crate::hex(&self.data))
    }
}

impl fmt::Debug for Tlsa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLSA {}", self.presentation())
    }
}

/// How TLS to one MX host is to be secured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostTls {
    /// Authenticate by these (usable, DNSSEC-proven) TLSA records; TLS is
    /// mandatory.
    Dane(Vec<Tlsa>),
    /// TLSA records exist but none is usable: TLS is mandatory, without
    /// authentication (RFC 7672 2.2).
    EncryptOnly,
    /// No DANE for this host: the connector's own policy applies.
    Policy,
    /// Do not deliver to this host; the reason (and its RFC 8460 result
    /// type) says why.
    Skip {
        reason: String,
        result: &'static str,
    },
}

/// RFC 7672 2.2: DANE applies to an MX host only when the MX answer (or
/// the implicit MX) and the host's address answer are both DNSSEC-proven;
/// then its TLSA answer decides. A TLSA lookup that fails validation, or
/// fails at all, makes the host unusable (its TLSA could exist).
pub fn host_tls(
    mode: DaneMode,
    mx_secure: bool,
    address_secure: bool,
    tlsa: Option<Result<Answer<Tlsa>, DnsFailure>>,
) -> HostTls {
    let required = || {
        HostTls::Skip {
        reason: "DANE is required (dane = \"only\") but the destination publishes no DNSSEC-proven TLSA records".into(),
        result: "dane-required",
    }
    };
    if mode == DaneMode::Off {
        return HostTls::Policy;
    }
    let tlsa = match tlsa {
        Some(tlsa) if mx_secure && address_secure => tlsa,
        _ if mode == DaneMode::Only => return required(),
        _ => return HostTls::Policy,
    };
    match tlsa {
        Err(DnsFailure::Bogus(what)) => HostTls::Skip {
            reason: format!("DNSSEC validation failed for the TLSA records of {what}"),
            result: "dnssec-invalid",
        },
        Err(DnsFailure::Temporary(what)) => HostTls::Skip {
            reason: format!("the TLSA lookup for {what} failed"),
            result: "dnssec-invalid",
        },
        Ok(answer) if answer.records.is_empty() || !answer.secure => match mode {
            DaneMode::Only => required(),
            _ => HostTls::Policy,
        },
        Ok(answer) => {
            let usable: Vec<Tlsa> = answer.records.into_iter().filter(Tlsa::usable).collect();
            if usable.is_empty() {
                HostTls::EncryptOnly
            } else {
                HostTls::Dane(usable)
            }
        }
    }
}

/// Whether the TLSA lookup is worth making: only where its answer could
/// be used (RFC 7672 2.2.1/2.2.2).
pub fn wants_tlsa(mode: DaneMode, mx_secure: bool, address_secure: bool) -> bool {
    mode != DaneMode::Off && mx_secure && address_secure
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tlsa(usage: u8, selector: u8, matching: u8, len: usize) -> Tlsa {
        Tlsa {
            usage,
            selector,
            matching,
            data: vec![7; len],
        }
    }

    fn secure(records: Vec<Tlsa>) -> Option<Result<Answer<Tlsa>, DnsFailure>> {
        Some(Ok(Answer {
            records,
            secure: true,
        }))
    }

    #[test]
    fn only_dane_ta_and_ee_with_digests_of_the_right_length_are_usable() {
        assert!(tlsa(3, 1, 1, 32).usable());
        assert!(tlsa(2, 0, 2, 64).usable());
        assert!(tlsa(3, 0, 0, 300).usable());
        assert!(!tlsa(1, 1, 1, 32).usable(), "PKIX-EE is not for SMTP");
        assert!(!tlsa(0, 1, 1, 32).usable(), "PKIX-TA is not for SMTP");
        assert!(!tlsa(3, 1, 1, 31).usable(), "a truncated SHA-256");
        assert!(!tlsa(3, 2, 1, 32).usable(), "an unknown selector");
        assert!(!tlsa(3, 1, 3, 32).usable(), "an unknown matching type");
    }

    #[test]
    fn proven_usable_tlsa_means_dane_and_unusable_ones_still_mean_tls() {
        let ee = tlsa(3, 1, 1, 32);
        assert_eq!(
            host_tls(
                DaneMode::On,
                true,
                true,
                secure(vec![ee.clone(), tlsa(1, 1, 1, 32)])
            ),
            HostTls::Dane(vec![ee])
        );
        assert_eq!(
            host_tls(DaneMode::On, true, true, secure(vec![tlsa(0, 0, 1, 32)])),
            HostTls::EncryptOnly
        );
    }

    #[test]
    fn insecure_mx_or_address_answers_leave_the_policy_or_defer_under_only() {
        for (mx, address) in [(false, true), (true, false)] {
            assert!(!wants_tlsa(DaneMode::On, mx, address));
            let ee = secure(vec![tlsa(3, 1, 1, 32)]);
            assert_eq!(host_tls(DaneMode::On, mx, address, ee), HostTls::Policy);
            assert!(matches!(
                host_tls(DaneMode::Only, mx, address, None),
                HostTls::Skip {
                    result: "dane-required",
                    ..
                }
            ));
        }
        assert_eq!(
            host_tls(DaneMode::On, true, true, secure(vec![])),
            HostTls::Policy
        );
    }

    #[test]
    fn a_bogus_or_failed_tlsa_lookup_makes_the_host_unusable() {
        for failure in [
            DnsFailure::Bogus("_25._tcp.mx.example".into()),
            DnsFailure::Temporary("_25._tcp.mx.example".into()),
        ] {
            assert!(matches!(
                host_tls(DaneMode::On, true, true, Some(Err(failure))),
                HostTls::Skip {
                    result: "dnssec-invalid",
                    ..
                }
            ));
        }
        assert_eq!(
            host_tls(
                DaneMode::Off,
                true,
                true,
                Some(Err(DnsFailure::Bogus("x".into())))
            ),
            HostTls::Policy
        );
    }
}
