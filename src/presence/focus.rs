//! Where in a space a member is: the focus types a client may send, and their check.
//!
//! A focus is `null` or an object with a known `type` and exactly that type's fields,
//! each a non-negative JSON integer (an id). Anything else is dropped, so a client can
//! relay nothing through presence but ids in a shape the backend's frontend knows.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The largest focus, as JSON text, that is relayed.
pub const MAX_FOCUS_BYTES: usize = 512;

/// One focus type, as written in the config file (`[[focus_types]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FocusTypeSpec {
    /// The focus's `type` value.
    pub name: String,
    /// Its fields besides `type`, each an id.
    pub fields: Vec<String>,
}

/// Why a focus was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FocusError {
    NotAnObject,
    UnknownType,
    /// A field missing, extra, or not an id.
    WrongFields,
    TooBig,
}

/// The focus types a node accepts.
#[derive(Debug, Clone)]
pub struct FocusTypes {
    fields: HashMap<String, Vec<String>>,
}

impl FocusTypes {
    pub fn new(specs: &[FocusTypeSpec]) -> Result<FocusTypes, String> {
        let mut fields = HashMap::new();
        for spec in specs {
            if spec.name.is_empty() {
                return Err("a focus type needs a name".into());
            }
            if spec.fields.iter().any(|f| f == "type" || f.is_empty()) {
                return Err(format!(
                    "focus type {:?}: fields must be named, and not \"type\"",
                    spec.name
                ));
            }
            if fields
                .insert(spec.name.clone(), spec.fields.clone())
                .is_some()
            {
                return Err(format!("focus type {:?} is defined twice", spec.name));
            }
        }
        Ok(FocusTypes { fields })
    }

    /// Baserow's: a cell (`row_id`, `field_id`) or a row (`row_id`).
    pub fn baserow_specs() -> Vec<FocusTypeSpec> {
        let spec = |name: &str, fields: &[&str]| FocusTypeSpec {
            name: name.into(),
            fields: fields.iter().map(|f| f.to_string()).collect(),
        };
        vec![
            spec("cell", &["row_id", "field_id"]),
            spec("row", &["row_id"]),
        ]
    }

    /// Checks a focus a client sent against its type; the error says why it is dropped.
    pub fn check(&self, focus: &Value) -> Result<(), FocusError> {
        let object = match focus {
            Value::Null => return Ok(()),
            Value::Object(object) => object,
            _ => return Err(FocusError::NotAnObject),
        };
        let fields = object
            .get("type")
            .and_then(Value::as_str)
            .and_then(|name| self.fields.get(name))
            .ok_or(FocusError::UnknownType)?;
        let is_id = |v: &Value| v.as_u64().is_some_and(|id| id <= i64::MAX as u64);
        if object.len() != fields.len() + 1
            || !fields.iter().all(|f| object.get(f).is_some_and(is_id))
        {
            return Err(FocusError::WrongFields);
        }
        if focus.to_string().len() > MAX_FOCUS_BYTES {
            return Err(FocusError::TooBig);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn known_types_with_exactly_their_ids_pass() {
        let types = FocusTypes::new(&FocusTypes::baserow_specs()).unwrap();
        assert_eq!(types.check(&Value::Null), Ok(()));
        assert_eq!(
            types.check(&json!({"type": "cell", "row_id": 1, "field_id": 2})),
            Ok(())
        );
        assert_eq!(types.check(&json!({"type": "row", "row_id": 0})), Ok(()));
        for (focus, error) in [
            (json!("cell"), FocusError::NotAnObject),
            (json!({"type": "table"}), FocusError::UnknownType),
            (json!({"row_id": 1}), FocusError::UnknownType),
            (json!({"type": "row"}), FocusError::WrongFields),
            (
                json!({"type": "row", "row_id": -1}),
                FocusError::WrongFields,
            ),
            (
                json!({"type": "row", "row_id": "1"}),
                FocusError::WrongFields,
            ),
            (
                json!({"type": "row", "row_id": 1.5}),
                FocusError::WrongFields,
            ),
            (
                json!({"type": "row", "row_id": 1, "note": "hi"}),
                FocusError::WrongFields,
            ),
        ] {
            assert_eq!(types.check(&focus), Err(error), "{focus}");
        }
    }

    #[test]
    fn a_focus_over_512_bytes_is_dropped() {
        let fields: Vec<String> = (0..40).map(|i| format!("field_number_{i}")).collect();
        let types = FocusTypes::new(&[FocusTypeSpec {
            name: "wide".into(),
            fields: fields.clone(),
        }])
        .unwrap();
        let mut focus = serde_json::Map::new();
        focus.insert("type".into(), json!("wide"));
        for f in &fields {
            focus.insert(f.clone(), json!(1));
        }
        assert_eq!(types.check(&Value::Object(focus)), Err(FocusError::TooBig));
    }
}
