//! JSON kept as its text: what plugins return is stored, handed on and served without being
//! parsed into a tree (a 32 MiB array of numbers is about 640 MiB as a `serde_json::Value`).

use serde_json::value::RawValue;

/// A JSON value kept as its (checked) text. It serializes as that JSON, unchanged.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct JsonText(Box<RawValue>);

impl JsonText {
    /// Checks `text` is one JSON value (surrounding whitespace is dropped) without building it.
    pub fn parse(text: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text).map(JsonText)
    }

    /// `text` as JSON when it is JSON, else as a JSON string holding it (what a tool that
    /// returns plain text means).
    pub fn or_string(text: String) -> Self {
        match serde_json::from_str::<serde::de::IgnoredAny>(&text) {
            // Checked just before: parsing it again cannot fail.
            Ok(_) => JsonText::parse(text).unwrap_or_default(),
            Err(_) => JsonText::of(&text),
        }
    }

    /// The JSON of `value`.
    pub fn of<T: serde::Serialize + ?Sized>(value: &T) -> Self {
        // Serializing to text fails only for maps with non-string keys, which no caller has.
        JsonText(serde_json::value::to_raw_value(value).unwrap_or_else(|_| Self::null().0))
    }

    /// `null`.
    pub fn null() -> Self {
        JsonText(RawValue::NULL.to_owned())
    }

    /// Whether it is `null`.
    pub fn is_null(&self) -> bool {
        self.get() == "null"
    }

    /// Its text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// It, as a serde_json raw value.
    pub fn as_raw(&self) -> &RawValue {
        &self.0
    }

    /// Its text as an owned string.
    pub fn into_string(self) -> String {
        let boxed: Box<str> = self.0.into();
        boxed.into()
    }

    /// It, parsed (for small values: step inputs, reports).
    pub fn to_value(&self) -> serde_json::Value {
        // It holds checked JSON (within the same nesting limit), so this never falls back.
        serde_json::from_str(self.get()).unwrap_or(serde_json::Value::Null)
    }

    /// It, read as a `T`.
    pub fn read<'a, T: serde::Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.get())
    }
}

/// JSON read back from the store.
pub(crate) fn stored(text: String) -> Result<JsonText, crate::DbError> {
    JsonText::parse(text).map_err(|e| crate::DbError::Invalid(format!("stored JSON is unreadable: {e}")))
}

impl Default for JsonText {
    fn default() -> Self {
        Self::null()
    }
}

impl From<serde_json::Value> for JsonText {
    fn from(value: serde_json::Value) -> Self {
        JsonText::of(&value)
    }
}

/// Equal when they are the same JSON value (not only the same text).
impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get() || self.to_value() == other.to_value()
    }
}

impl PartialEq<serde_json::Value> for JsonText {
    fn eq(&self, other: &serde_json::Value) -> bool {
        &self.to_value() == other
    }
}

impl std::fmt::Debug for JsonText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.get())
    }
}

impl std::fmt::Display for JsonText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.get())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn text_is_kept_checked_and_compared_as_json() {
        let raw = JsonText::parse(" {\"b\": [1, 2], \"a\": null}\n".into()).unwrap();
        assert_eq!(raw.get(), "{\"b\": [1, 2], \"a\": null}");
        assert_eq!(raw, serde_json::json!({"a": null, "b": [1, 2]}));
        assert!(JsonText::parse("{\"a\":".into()).is_err());
        assert!(JsonText::parse("1 2".into()).is_err());
        assert_eq!(JsonText::or_string("not json".into()).get(), "\"not json\"");
        assert_eq!(JsonText::or_string("[1]".into()).get(), "[1]");
        assert!(JsonText::default().is_null());
        assert_eq!(serde_json::to_string(&vec![raw]).unwrap(), "[{\"b\": [1, 2], \"a\": null}]");
    }
}
