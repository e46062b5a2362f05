//! `Secret`: a string that never prints itself.
//!
//! `corp_secret`, permanent authorisation codes and access tokens all live in this type, so a
//! stray `{:?}` or `{}` in a log line, a metric label or an error body shows `***`, never the
//! value. Reading the value is explicit (`expose`), which keeps every use greppable.

use std::fmt;

/// A secret value. `Debug`, `Display` and `Serialize` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<Box<str>>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the few places that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Replaces every occurrence of this secret in `text` by `***` (for text that came back
    /// from elsewhere, such as an upstream error message, and might echo it).
    pub fn scrub(&self, text: &str) -> String {
        if self.0.is_empty() {
            return text.to_owned();
        }
        text.replace(&*self.0, "***")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Serialises as `***` (`check` prints the effective config by serialising it).
impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_formats_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn scrub_masks_echoed_values() {
        let s = Secret::new("hunter2");
        assert_eq!(s.scrub("bad secret hunter2!"), "bad secret ***!");
        assert_eq!(Secret::new("").scrub("x"), "x");
    }
}
