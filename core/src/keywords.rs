//! Config keywords: enums written as kebab-case words, with errors that list
//! the accepted words ("unknown mode 'opportunstic', expected one of off,
//! opportunistic, required, implicit").

/// Implements `Deserialize`, `Display`, `as_str` and `ALL` for a fieldless
/// enum from a table of its words.
macro_rules! keywords {
    ($ty:ident, $what:literal, { $($variant:ident => $word:literal),+ $(,)? }) => {
        impl $ty {
            /// Every accepted word, in the order documentation lists them.
            pub const ALL: &'static [(&'static str, $ty)] = &[$(($word, $ty::$variant)),+];

            pub fn as_str(&self) -> &'static str {
                match self {
                    $($ty::$variant => $word),+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL
                    .iter()
                    .find(|(word, _)| *word == s)
                    .map(|(_, v)| *v)
                    .ok_or_else(|| {
                        let words: Vec<&str> = Self::ALL.iter().map(|(w, _)| *w).collect();
                        format!("unknown {} '{}', expected one of {}", $what, s, words.join(", "))
                    })
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl schemars::JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($ty).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "type": "string", "enum": [$($word),+] })
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let word = <String as serde::Deserialize>::deserialize(d)?;
                word.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
