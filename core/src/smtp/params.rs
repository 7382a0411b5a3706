//! MAIL and RCPT parameters (RFC 5321 4.1.2, 4.1.4). A client may use
//! only the parameters of extensions the relay advertised (`SIZE`, `BODY`
//! of 8BITMIME, `SMTPUTF8`, `REQUIRETLS`); anything else is refused with
//! 555, as Postfix does. What goes to a next hop is written anew from the
//! parsed values, and only for the extensions that next hop offered, so a
//! stranger's `AUTH=ceo@example.org` or `XFORWARD` never reaches a server
//! that might trust the relay's word.

use std::fmt;

use super::codec::{Capabilities, Reply};

/// RFC 6152: the body's content type as the client declared it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
}

/// The parameters of a MAIL command, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// RFC 1870: the size the client declared.
    pub size: Option<u64>,
    pub body: Option<BodyType>,
    /// RFC 6531: the envelope or headers may hold UTF-8.
    pub smtputf8: bool,
    /// RFC 8689: the message may only travel over verified TLS.
    pub requiretls: bool,
}

/// Why a parameter was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// Not a parameter of an extension the relay advertised (555).
    #[error("Unsupported parameter {0}")]
    Unsupported(String),
    /// A known parameter with a value it cannot have (501).
    #[error("Bad value for {0}")]
    Malformed(&'static str),
    /// Given twice (501).
    #[error("{0} given twice")]
    Duplicate(&'static str),
}

impl ParamError {
    /// The reply the client gets.
    pub fn reply(&self) -> Reply {
        let code = match self {
            ParamError::Unsupported(_) => 555,
            ParamError::Malformed(_) | ParamError::Duplicate(_) => 501,
        };
        Reply::new(code, format!("5.5.4 {self}"))
    }
}

/// The longest keyword echoed back in a refusal.
const ECHOED: usize = 32;

fn unsupported(keyword: &str) -> ParamError {
    ParamError::Unsupported(keyword.chars().take(ECHOED).collect())
}

impl MailParams {
    /// Parses MAIL's parameters (`SIZE=1000 BODY=8BITMIME`), keywords in
    /// any case.
    pub fn parse(text: &str) -> Result<MailParams, ParamError> {
        let mut params = MailParams::default();
        for param in text.split_ascii_whitespace() {
            let (keyword, value) = match param.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (param, None),
            };
            match (keyword.to_ascii_uppercase().as_str(), value) {
                ("SIZE", Some(v)) => {
                    let size =
                        (!v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()))
                            .then(|| v.parse::<u64>().ok())
                            .flatten()
                            .ok_or(ParamError::Malformed("SIZE"))?;
                    if params.size.replace(size).is_some() {
                        return Err(ParamError::Duplicate("SIZE"));
                    }
                }
                ("BODY", Some(v)) => {
                    let body = match v.to_ascii_uppercase().as_str() {
                        "7BIT" => BodyType::SevenBit,
                        "8BITMIME" => BodyType::EightBitMime,
                        // BINARYMIME needs CHUNKING and BINARYMIME, which the
                        // relay does not advertise.
                        _ => return Err(ParamError::Malformed("BODY")),
                    };
                    if params.body.replace(body).is_some() {
                        return Err(ParamError::Duplicate("BODY"));
                    }
                }
                ("SMTPUTF8", None) => {
                    if std::mem::replace(&mut params.smtputf8, true) {
                        return Err(ParamError::Duplicate("SMTPUTF8"));
                    }
                }
                ("REQUIRETLS", None) => {
                    if std::mem::replace(&mut params.requiretls, true) {
                        return Err(ParamError::Duplicate("REQUIRETLS"));
                    }
                }
                ("SIZE" | "BODY", None) => {
                    return Err(ParamError::Malformed(
                        if keyword.eq_ignore_ascii_case("SIZE") {
                            "SIZE"
                        } else {
                            "BODY"
                        },
                    ))
                }
                ("SMTPUTF8", Some(_)) => return Err(ParamError::Malformed("SMTPUTF8")),
                ("REQUIRETLS", Some(_)) => return Err(ParamError::Malformed("REQUIRETLS")),
                _ => return Err(unsupported(keyword)),
            }
        }
        Ok(params)
    }

    /// The parameters as a next hop offering `offers` gets them: each one
    /// only where its extension is offered. (SMTPUTF8 and REQUIRETLS
    /// messages a next hop cannot take are refused before MAIL is sent:
    /// see [`super::forward`].)
    pub fn for_next_hop(&self, offers: &Capabilities) -> String {
        let mut out = Vec::new();
        if let (Some(size), true) = (self.size, offers.has("SIZE")) {
            out.push(format!("SIZE={size}"));
        }
        if let (Some(body), true) = (self.body, offers.has("8BITMIME")) {
            out.push(body.to_string());
        }
        if self.smtputf8 && offers.has("SMTPUTF8") {
            out.push("SMTPUTF8".into());
        }
        if self.requiretls && offers.has("REQUIRETLS") {
            out.push("REQUIRETLS".into());
        }
        out.join(" ")
    }
}

impl fmt::Display for BodyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BodyType::SevenBit => "BODY=7BIT",
            BodyType::EightBitMime => "BODY=8BITMIME",
        })
    }
}

/// RCPT's parameters: the relay advertises no extension with any (DSN's
/// NOTIFY and ORCPT included), so every one is refused.
pub fn check_rcpt_params(text: &str) -> Result<(), ParamError> {
    match text.split_ascii_whitespace().next() {
        None => Ok(()),
        Some(param) => Err(unsupported(
            param.split_once('=').map_or(param, |(keyword, _)| keyword),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offers(keywords: &[&str]) -> Capabilities {
        Capabilities {
            keywords: keywords
                .iter()
                .map(|k| (k.to_string(), String::new()))
                .collect(),
        }
    }

    #[test]
    fn advertised_parameters_parse_in_any_case() {
        assert_eq!(
            MailParams::parse("size=1000 Body=8bitmime SMTPUTF8 requiretls"),
            Ok(MailParams {
                size: Some(1000),
                body: Some(BodyType::EightBitMime),
                smtputf8: true,
                requiretls: true,
            })
        );
        assert_eq!(MailParams::parse(""), Ok(MailParams::default()));
    }

    /// Every parameter a stranger tried: AUTH (no AUTH offered), DSN's,
    /// XFORWARD, inventions, an address where a parameter belongs.
    #[test]
    fn parameters_of_extensions_not_advertised_are_refused_with_555() {
        for (text, keyword) in [
            ("AUTH=ceo@example.org", "AUTH"),
            ("AUTH=<>", "AUTH"),
            ("ENVID=spoof", "ENVID"),
            ("RET=FULL", "RET"),
            ("XFORWARD=1", "XFORWARD"),
            ("SIZE=10 XEVIL=<a@b>", "XEVIL"),
            ("BODY=7BIT SMTPUTF8 X", "X"),
        ] {
            let err = MailParams::parse(text).unwrap_err();
            assert_eq!(err, ParamError::Unsupported(keyword.into()), "{text}");
            let reply = err.reply();
            assert_eq!(reply.code, 555, "{text}");
            assert!(reply.text().starts_with("5.5.4 "), "{text}");
        }
        for text in [
            "NOTIFY=SUCCESS,FAILURE",
            "ORCPT=rfc822;boss@example.org",
            "<victim@evil.test>",
            "XEVIL2=1",
        ] {
            assert_eq!(
                check_rcpt_params(text).unwrap_err().reply().code,
                555,
                "{text}"
            );
        }
        assert_eq!(check_rcpt_params(""), Ok(()));
    }

    #[test]
    fn malformed_and_repeated_values_are_501() {
        for text in [
            "SIZE=",
            "SIZE=-1",
            "SIZE=1e9",
            "SIZE=99999999999999999999999",
            "SIZE",
            "BODY=BINARYMIME",
            "BODY",
            "SMTPUTF8=yes",
            "REQUIRETLS=1",
            "SIZE=1 SIZE=2",
            "BODY=7BIT BODY=8BITMIME",
            "SMTPUTF8 smtputf8",
            "REQUIRETLS REQUIRETLS",
        ] {
            assert_eq!(
                MailParams::parse(text).unwrap_err().reply().code,
                501,
                "{text}"
            );
        }
    }

    /// Each parameter x whether the next hop offers its extension: passed
    /// on (as the relay writes it) exactly when offered.
    #[test]
    fn every_parameter_reaches_a_next_hop_only_where_it_is_offered() {
        let all = MailParams {
            size: Some(4242),
            body: Some(BodyType::EightBitMime),
            smtputf8: true,
            requiretls: true,
        };
        let cases = [
            ("SIZE", "SIZE=4242"),
            ("8BITMIME", "BODY=8BITMIME"),
            ("SMTPUTF8", "SMTPUTF8"),
            ("REQUIRETLS", "REQUIRETLS"),
        ];
        for mask in 0..16u32 {
            let offered: Vec<&str> = cases
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, (k, _))| *k)
                .collect();
            let line = all.for_next_hop(&offers(&offered));
            let want: Vec<&str> = cases
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, (_, p))| *p)
                .collect();
            assert_eq!(line, want.join(" "), "offered {offered:?}");
        }
        // Nothing declared, nothing sent, whatever is offered.
        assert_eq!(
            MailParams::default().for_next_hop(&offers(&["SIZE", "8BITMIME", "SMTPUTF8", "DSN"])),
            ""
        );
        let seven = MailParams {
            body: Some(BodyType::SevenBit),
            ..MailParams::default()
        };
        assert_eq!(seven.for_next_hop(&offers(&["8BITMIME"])), "BODY=7BIT");
    }
}
