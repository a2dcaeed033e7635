//! [`Family`]: which of RULER's synthetic task families to generate, by the name users write.

use std::str::FromStr;

/// A family of synthetic tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// A 5-digit pass key hidden in filler.
    Passkey,
    /// One "special magic number" for a key, hidden in filler.
    Niah,
    /// Several keys with their numbers in filler; one is asked about.
    NiahMulti,
    /// A JSON object of random UUID keys and values; one key is asked about.
    Kv,
    /// A chain of variable assignments spread through filler; all names are asked for.
    Vt,
    /// A numbered word list where ten words are frequent; the ten are asked for.
    Cwe,
}

impl Family {
    /// Every family, in documentation order.
    pub const ALL: [Family; 6] = [
        Family::Passkey,
        Family::Niah,
        Family::NiahMulti,
        Family::Kv,
        Family::Vt,
        Family::Cwe,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Family::Passkey => "passkey",
            Family::Niah => "niah",
            Family::NiahMulti => "niah-multi",
            Family::Kv => "kv",
            Family::Vt => "vt",
            Family::Cwe => "cwe",
        }
    }

    /// Whether the family places its needle at a requested depth.
    pub fn uses_depth(self) -> bool {
        matches!(
            self,
            Family::Passkey | Family::Niah | Family::NiahMulti | Family::Kv
        )
    }
}

/// A name that is no [`Family`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown family `{name}` (expected one of {})", Family::ALL.map(Family::name).join(", "))]
pub struct UnknownFamily {
    /// The name as given.
    pub name: String,
}

impl FromStr for Family {
    type Err = UnknownFamily;

    fn from_str(s: &str) -> Result<Self, UnknownFamily> {
        Family::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| UnknownFamily {
                name: s.to_string(),
            })
    }
}
