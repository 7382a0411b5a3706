//! JSON Schema for the configuration's types that serde reads from text
//! (durations, addresses, patterns): what an editor shows and checks, and
//! what the reference in the book is generated from.

/// A type written as one string of a documented form.
macro_rules! string_schema {
    ($ty:ty, $name:literal, $form:literal) => {
        impl schemars::JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "type": "string", "description": $form })
            }
        }
    };
}

/// A duration: `"500ms"`, `"10s"`, `"5m"`, `"1h"`, or whole seconds.
pub struct DurationText;

impl schemars::JsonSchema for DurationText {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A duration: \"500ms\", \"10s\", \"5m\", \"1h\", or whole seconds.",
            "anyOf": [
                { "type": "string", "pattern": "^[0-9]+ *(ms|s|m|h)$" },
                { "type": "integer", "minimum": 0 }
            ]
        })
    }
}

/// A socket address, `"127.0.0.1:25"` or `"[::]:25"`.
pub struct SocketAddrText;
string_schema!(
    SocketAddrText,
    "SocketAddr",
    "An IP address and port: \"0.0.0.0:25\", \"[::]:443\"."
);

string_schema!(
    crate::smtp::address::Cidr,
    "Cidr",
    "An address or a network: \"192.0.2.1\", \"10.0.0.0/8\", \"2001:db8::/32\"."
);
string_schema!(
    crate::smtp::address::DomainPattern,
    "DomainPattern",
    "A mail domain, \"example.org\", or \".example.org\" for its subdomains."
);
string_schema!(
    crate::policy::NamePattern,
    "NamePattern",
    "A certificate name: \"mail.example.org\", or \"*.example.org\" one label deep."
);

impl schemars::JsonSchema for crate::policy::MinVersion {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "MinVersion".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A TLS version: \"1.2\" or \"1.3\" (a number is read too).",
            "anyOf": [
                { "type": "string", "enum": ["1.2", "1.3", "TLSv1.2", "TLSv1.3"] },
                { "type": "number", "enum": [1.2, 1.3] }
            ]
        })
    }
}
