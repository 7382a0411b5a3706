//! OCSP responses (RFC 6960) to staple: parsed far enough to refuse one
//! that is not for the certificate, not "good", or not current. The
//! signature is the client's to check; a response that fails these checks
//! would only make careful clients refuse the handshake.

use std::fmt;

/// What a response says about a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OcspStatus {
    pub status: CertStatus,
    /// Seconds since the Unix epoch.
    pub this_update: i64,
    pub next_update: Option<i64>,
    /// What the responder signed, for checking its signature.
    pub signed: Signed,
}

/// The signed part of a response: the DER of `tbsResponseData`, the
/// signature algorithm's OID (contents), the signature, and the
/// certificates the responder sent along (a delegated signer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Signed {
    pub tbs: Vec<u8>,
    pub algorithm: Vec<u8>,
    pub signature: Vec<u8>,
    pub certs: Vec<Vec<u8>>,
}

/// A DER element `tag` around `body`.
pub fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match body.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n < 0x100 => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend(body);
    out
}

/// An OCSP request (no nonce) for one certificate: its issuer's name and
/// key hashed with SHA-1 (what responders universally accept) and its
/// serial number (DER INTEGER contents).
pub fn request(issuer_name_sha1: &[u8], issuer_key_sha1: &[u8], serial: &[u8]) -> Vec<u8> {
    let sha1 = tlv(
        SEQUENCE,
        &[0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00],
    );
    let cert_id = tlv(
        SEQUENCE,
        &[
            sha1,
            tlv(0x04, issuer_name_sha1),
            tlv(0x04, issuer_key_sha1),
            tlv(0x02, serial),
        ]
        .concat(),
    );
    let request = tlv(SEQUENCE, &cert_id);
    let tbs = tlv(SEQUENCE, &tlv(SEQUENCE, &request));
    tlv(SEQUENCE, &tbs)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertStatus {
    Good,
    Revoked,
    Unknown,
}

impl fmt::Display for CertStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CertStatus::Good => "good",
            CertStatus::Revoked => "revoked",
            CertStatus::Unknown => "unknown",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OcspError {
    #[error("not an OCSP response: {0}")]
    Malformed(&'static str),
    #[error("the responder answered {0} (not successful)")]
    Unsuccessful(&'static str),
    #[error("no response for this certificate (serial {0})")]
    OtherCertificate(String),
    #[error("the certificate's status is {0}")]
    NotGood(CertStatus),
    #[error("not current: {0}")]
    Stale(String),
}

/// A DER element: its tag and contents.
struct Element<'a> {
    tag: u8,
    body: &'a [u8],
}

/// Reads one DER element off the front of `input`.
fn element<'a>(input: &mut &'a [u8]) -> Result<Element<'a>, OcspError> {
    let bad = OcspError::Malformed("truncated or invalid DER");
    let (&tag, rest) = input.split_first().ok_or(bad.clone())?;
    let (&first, mut rest) = rest.split_first().ok_or(bad.clone())?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return Err(bad);
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| acc << 8 | b as usize);
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return Err(bad);
    }
    let (body, after) = rest.split_at(len);
    *input = after;
    Ok(Element { tag, body })
}

fn expect<'a>(input: &mut &'a [u8], tag: u8, what: &'static str) -> Result<&'a [u8], OcspError> {
    let e = element(input)?;
    if e.tag != tag {
        return Err(OcspError::Malformed(what));
    }
    Ok(e.body)
}

const SEQUENCE: u8 = 0x30;
const OCSP_BASIC: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x01];

/// Checks `der` is a successful, current response saying "good" for the
/// certificate with this serial number (its DER INTEGER contents) at
/// `now` (seconds since the epoch).
pub fn check(der: &[u8], serial: &[u8], now: i64) -> Result<OcspStatus, OcspError> {
    let status = status_for(der, serial)?;
    if status.status != CertStatus::Good {
        return Err(OcspError::NotGood(status.status));
    }
    if status.this_update > now + 300 {
        return Err(OcspError::Stale(format!(
            "thisUpdate {} is in the future",
            format_time(status.this_update)
        )));
    }
    if let Some(next) = status.next_update {
        if next <= now {
            return Err(OcspError::Stale(format!(
                "nextUpdate {} has passed",
                format_time(next)
            )));
        }
    }
    Ok(status)
}

/// The BasicOCSPResponse: what was signed, by which algorithm, the
/// signature and the certificates sent with it; and its ResponseData.
fn basic_response<'a>(bytes: &mut &'a [u8]) -> Result<(Signed, &'a [u8]), OcspError> {
    let mut basic = expect(bytes, 0x04, "response")?;
    let mut basic = expect(&mut basic, SEQUENCE, "BasicOCSPResponse")?;
    let before = basic;
    let data = expect(&mut basic, SEQUENCE, "ResponseData")?;
    let tbs = before[..before.len() - basic.len()].to_vec();
    let mut algorithm = expect(&mut basic, SEQUENCE, "signatureAlgorithm")?;
    let algorithm = expect(&mut algorithm, 0x06, "signatureAlgorithm")?.to_vec();
    let signature = match expect(&mut basic, 0x03, "signature")? {
        [0, rest @ ..] => rest.to_vec(),
        _ => return Err(OcspError::Malformed("signature")),
    };
    let mut certs = Vec::new();
    if let Ok(Element { tag: 0xa0, body }) = element(&mut basic) {
        let mut list = body;
        let mut list = expect(&mut list, SEQUENCE, "certs")?;
        while !list.is_empty() {
            let start = list;
            element(&mut list)?;
            certs.push(start[..start.len() - list.len()].to_vec());
        }
    }
    let signed = Signed {
        tbs,
        algorithm,
        signature,
        certs,
    };
    Ok((signed, data))
}

/// What `der` says about the certificate with this serial number.
pub fn status_for(der: &[u8], serial: &[u8]) -> Result<OcspStatus, OcspError> {
    let mut input = der;
    let mut response = expect(&mut input, SEQUENCE, "OCSPResponse")?;
    let code = expect(&mut response, 0x0a, "responseStatus")?;
    match code {
        [0] => {}
        [1] => return Err(OcspError::Unsuccessful("malformedRequest")),
        [2] => return Err(OcspError::Unsuccessful("internalError")),
        [3] => return Err(OcspError::Unsuccessful("tryLater")),
        [5] => return Err(OcspError::Unsuccessful("sigRequired")),
        [6] => return Err(OcspError::Unsuccessful("unauthorized")),
        _ => return Err(OcspError::Malformed("responseStatus")),
    }
    let mut bytes = expect(&mut response, 0xa0, "responseBytes")?;
    let mut bytes = expect(&mut bytes, SEQUENCE, "responseBytes")?;
    if expect(&mut bytes, 0x06, "responseType")? != OCSP_BASIC {
        return Err(OcspError::Malformed("not a basic OCSP response"));
    }
    let (signed, mut data) = basic_response(&mut bytes)?;
    let mut e = element(&mut data)?;
    if e.tag == 0xa0 {
        e = element(&mut data)?; // version
    }
    if e.tag != 0xa1 && e.tag != 0xa2 {
        return Err(OcspError::Malformed("responderID"));
    }
    expect(&mut data, 0x18, "producedAt")?;
    let mut responses = expect(&mut data, SEQUENCE, "responses")?;
    while !responses.is_empty() {
        let mut single = expect(&mut responses, SEQUENCE, "SingleResponse")?;
        let mut cert_id = expect(&mut single, SEQUENCE, "CertID")?;
        expect(&mut cert_id, SEQUENCE, "hashAlgorithm")?;
        expect(&mut cert_id, 0x04, "issuerNameHash")?;
        expect(&mut cert_id, 0x04, "issuerKeyHash")?;
        if expect(&mut cert_id, 0x02, "serialNumber")? != serial {
            continue;
        }
        let status = match element(&mut single)?.tag {
            0x80 => CertStatus::Good,
            0xa1 => CertStatus::Revoked,
            0x82 => CertStatus::Unknown,
            _ => return Err(OcspError::Malformed("certStatus")),
        };
        let this_update = time(expect(&mut single, 0x18, "thisUpdate")?)?;
        let next_update = match element(&mut single) {
            Ok(Element { tag: 0xa0, body }) => {
                let mut body = body;
                Some(time(expect(&mut body, 0x18, "nextUpdate")?)?)
            }
            _ => None,
        };
        return Ok(OcspStatus {
            status,
            this_update,
            next_update,
            signed,
        });
    }
    Err(OcspError::OtherCertificate(hex(serial)))
}

/// GeneralizedTime `YYYYMMDDHHMMSS[.f]Z` as seconds since the epoch.
fn time(text: &[u8]) -> Result<i64, OcspError> {
    let bad = OcspError::Malformed("GeneralizedTime");
    let text = std::str::from_utf8(text).map_err(|_| bad.clone())?;
    if text.len() < 15 || !text.ends_with('Z') || !text.is_ascii() {
        return Err(bad);
    }
    let n = |range: std::ops::Range<usize>| text[range].parse::<i64>().map_err(|_| bad.clone());
    let (y, m, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (hh, mm, ss) = (n(8..10)?, n(10..12)?, n(12..14)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return Err(bad);
    }
    Ok(days_from_civil(y, m, d) * 86400 + hh * 3600 + mm * 60 + ss)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// `2026-11-30 10:00:00 UTC`.
pub fn format_time(t: i64) -> String {
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    // civil_from_days (H. Hinnant)
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A basic response for `serial` with this status tag and times.
    fn response(serial: &[u8], status: &[u8], this: &str, next: Option<&str>) -> Vec<u8> {
        let cert_id = tlv(
            SEQUENCE,
            &[
                tlv(SEQUENCE, &[0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a]),
                tlv(0x04, &[1; 20]),
                tlv(0x04, &[2; 20]),
                tlv(0x02, serial),
            ]
            .concat(),
        );
        let mut single = [cert_id, status.to_vec(), tlv(0x18, this.as_bytes())].concat();
        if let Some(next) = next {
            single.extend(tlv(0xa0, &tlv(0x18, next.as_bytes())));
        }
        let data = tlv(
            SEQUENCE,
            &[
                tlv(0xa2, &tlv(0x04, &[3; 20])),
                tlv(0x18, this.as_bytes()),
                tlv(SEQUENCE, &tlv(SEQUENCE, &single)),
            ]
            .concat(),
        );
        let basic = tlv(
            SEQUENCE,
            &[data, tlv(SEQUENCE, &[0x06, 0x01, 0x00]), tlv(0x03, &[0, 1])].concat(),
        );
        let bytes = tlv(
            SEQUENCE,
            &[tlv(0x06, OCSP_BASIC), tlv(0x04, &basic)].concat(),
        );
        tlv(SEQUENCE, &[tlv(0x0a, &[0]), tlv(0xa0, &bytes)].concat())
    }

    const NOW: &str = "20261130100000Z";

    fn now() -> i64 {
        time(NOW.as_bytes()).unwrap()
    }

    #[test]
    fn a_current_good_response_for_the_certificate_staples() {
        let der = response(
            &[0x12, 0x34],
            &[0x80, 0x00],
            "20261130090000Z",
            Some("20261207090000Z"),
        );
        let status = check(&der, &[0x12, 0x34], now()).unwrap();
        assert_eq!(status.status, CertStatus::Good);
        assert_eq!(format_time(status.this_update), "2026-11-30 09:00:00 UTC");
        assert_eq!(
            format_time(status.next_update.unwrap()),
            "2026-12-07 09:00:00 UTC"
        );
    }

    #[test]
    fn other_certificates_revoked_or_stale_responses_are_refused() {
        let good = response(
            &[0x12, 0x34],
            &[0x80, 0x00],
            "20261130090000Z",
            Some("20261207090000Z"),
        );
        assert_eq!(
            check(&good, &[0x56], now()),
            Err(OcspError::OtherCertificate("56".into()))
        );
        let revoked = response(
            &[0x12, 0x34],
            &tlv(0xa1, &tlv(0x18, b"20261101000000Z")),
            "20261130090000Z",
            None,
        );
        assert_eq!(
            check(&revoked, &[0x12, 0x34], now()),
            Err(OcspError::NotGood(CertStatus::Revoked))
        );
        let expired = response(
            &[0x12, 0x34],
            &[0x80, 0x00],
            "20261101000000Z",
            Some("20261108000000Z"),
        );
        assert!(matches!(
            check(&expired, &[0x12, 0x34], now()),
            Err(OcspError::Stale(_))
        ));
        assert!(matches!(
            check(b"\x30\x03\x0a\x01\x03", &[1], now()),
            Err(OcspError::Unsuccessful("tryLater"))
        ));
        assert!(matches!(
            check(b"-----BEGIN", &[1], now()),
            Err(OcspError::Malformed(_))
        ));
    }

    #[test]
    fn the_signed_part_is_what_precedes_the_signature() {
        let der = response(&[0x12], &[0x80, 0x00], "20261130090000Z", None);
        let status = status_for(&der, &[0x12]).unwrap();
        assert_eq!(status.signed.tbs[0], SEQUENCE);
        assert_eq!(status.signed.algorithm, [0x00]);
        assert_eq!(status.signed.signature, [0x01]);
        let request = request(&[1; 20], &[2; 20], &[0x12]);
        assert_eq!(&request[..2], &[0x30, request.len() as u8 - 2]);
    }

    #[test]
    fn dates_convert_both_ways() {
        assert_eq!(time(b"19700101000000Z").unwrap(), 0);
        assert_eq!(time(b"20000229120000Z").unwrap(), 951825600);
        assert_eq!(format_time(951825600), "2000-02-29 12:00:00 UTC");
        assert!(time(b"20261330000000Z").is_err());
    }
}
