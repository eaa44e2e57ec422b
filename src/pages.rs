//! The page registry: which pages a client may subscribe to, their typed parameters, and
//! the channel group, permission group and presence space each page maps to.
//!
//! Pure. Parameters are validated here and nowhere else, so that no parameter can forge
//! another group's name: only ids (digits) and slugs (`[A-Za-z0-9_-]`) ever reach a group
//! name, and the registry refuses a table whose templates would use anything else.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The type of one page parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// A non-negative integer up to `i64::MAX`, as a JSON integer or a string of digits.
    Id,
    /// An [`ParamKind::Id`] or null (or absent).
    OptionalId,
    /// 1 to 128 characters of `[A-Za-z0-9_-]`; may form a group name.
    Slug,
    /// 1 to 1024 printable ASCII characters without spaces; never part of a group name.
    Token,
    /// A [`ParamKind::Token`] or null (or absent).
    OptionalToken,
}

/// One parameter of a page type, as written in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ParamSpec {
    pub name: String,
    pub kind: ParamKind,
}

/// One page type, as written in the config file (`[[pages]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct PageSpec {
    /// The `page` value clients send.
    pub name: String,
    #[serde(default)]
    pub parameters: Vec<ParamSpec>,
    /// The channel group, with `{param}` placeholders: `table-{table_id}`.
    pub group: String,
    /// The permission group the backend revokes by, with placeholders; none if absent.
    #[serde(default)]
    pub permission_group: Option<String>,
    /// Whether anonymous connections may subscribe.
    #[serde(default)]
    pub anonymous: bool,
    /// The presence space (who else is here), with placeholders; none if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_space: Option<String>,
}

/// A page a client subscribed to, with its parameters validated and normalised.
#[derive(Debug, Clone)]
pub struct Page {
    /// The page type's name.
    pub page: Arc<str>,
    /// The declared parameters, ids as JSON integers, absent optionals as null.
    pub parameters: Value,
    pub group: Arc<str>,
    pub permission_group: Option<Arc<str>>,
    /// Whether anonymous connections may hold this page.
    pub anonymous: bool,
    /// The presence space of the page: from the page table, or from the authorizer's answer.
    pub presence_space: Option<Arc<str>>,
}

/// A page is its type and parameters; what they map to follows from them (the presence
/// space an authorizer named included), so two subscribes of one page are one page.
impl PartialEq for Page {
    fn eq(&self, other: &Page) -> bool {
        self.page == other.page && self.parameters == other.parameters
    }
}

/// Why a page could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageError {
    UnknownPage,
    /// The named parameter is missing or malformed.
    InvalidParameter(String),
}

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    Param(usize),
}

/// A group-name template, parsed once when the registry is built.
#[derive(Debug, Clone)]
struct Template(Vec<Part>);

impl Template {
    fn parse(text: &str, params: &[ParamSpec]) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("template {text:?} has an unclosed '{{'"))?
                + open;
            let name = &rest[open + 1..close];
            let index = params
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| format!("template {text:?} names undeclared parameter {name:?}"))?;
            if !matches!(params[index].kind, ParamKind::Id | ParamKind::Slug) {
                return Err(format!(
                    "template {text:?} uses parameter {name:?}; only `id` and `slug` parameters may form a group name"
                ));
            }
            parts.push(Part::Param(index));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("template {text:?} has a stray '}}'"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        if parts.is_empty() {
            return Err("a group template may not be empty".into());
        }
        Ok(Template(parts))
    }

    fn render(&self, values: &[Value]) -> String {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Param(i) => match &values[*i] {
                    Value::String(s) => out.push_str(s),
                    other => out.push_str(&other.to_string()),
                },
            }
        }
        out
    }
}

#[derive(Debug)]
struct PageType {
    name: Arc<str>,
    params: Vec<ParamSpec>,
    group: Template,
    permission_group: Option<Template>,
    anonymous: bool,
    presence_space: Option<Template>,
}

/// The page types a node accepts.
#[derive(Debug)]
pub struct PageRegistry {
    types: HashMap<String, PageType>,
}

impl PageRegistry {
    /// Builds a registry, refusing specs whose templates are malformed or could be forged.
    pub fn new(specs: &[PageSpec]) -> Result<Self, String> {
        let mut types = HashMap::new();
        for spec in specs {
            let context = |e: String| format!("page {:?}: {e}", spec.name);
            if spec.name.is_empty() {
                return Err("a page type needs a name".into());
            }
            let group = Template::parse(&spec.group, &spec.parameters).map_err(context)?;
            let permission_group = spec
                .permission_group
                .as_deref()
                .map(|t| Template::parse(t, &spec.parameters))
                .transpose()
                .map_err(context)?;
            let presence_space = spec
                .presence_space
                .as_deref()
                .map(|t| Template::parse(t, &spec.parameters))
                .transpose()
                .map_err(context)?;
            let page_type = PageType {
                presence_space,
                name: spec.name.as_str().into(),
                params: spec.parameters.clone(),
                group,
                permission_group,
                anonymous: spec.anonymous,
            };
            if types.insert(spec.name.clone(), page_type).is_some() {
                return Err(format!("page {:?} is defined twice", spec.name));
            }
        }
        Ok(PageRegistry { types })
    }

    /// Baserow's five page types, the built-in default.
    pub fn baserow_specs() -> Vec<PageSpec> {
        fn param(name: &str, kind: ParamKind) -> ParamSpec {
            ParamSpec {
                name: name.into(),
                kind,
            }
        }
        fn spec(
            name: &str,
            parameters: Vec<ParamSpec>,
            group: &str,
            permission_group: Option<&str>,
            anonymous: bool,
        ) -> PageSpec {
            // A table and its rows share one presence space: who else is on this table.
            let presence_space = matches!(name, "table" | "row").then(|| "table-{table_id}".into());
            PageSpec {
                name: name.into(),
                parameters,
                group: group.into(),
                permission_group: permission_group.map(Into::into),
                anonymous,
                presence_space,
            }
        }
        use ParamKind::*;
        vec![
            spec(
                "table",
                vec![param("table_id", Id)],
                "table-{table_id}",
                Some("permissions-table-{table_id}"),
                false,
            ),
            spec(
                "row",
                vec![param("table_id", Id), param("row_id", Id)],
                "table-{table_id}-row-{row_id}",
                Some("permissions-table-{table_id}"),
                false,
            ),
            spec(
                "view",
                vec![param("slug", Slug), param("token", OptionalToken)],
                "view-{slug}",
                None,
                true,
            ),
            spec(
                "dashboard",
                vec![param("dashboard_id", Id)],
                "dashboard-{dashboard_id}",
                Some("permissions-dashboard-{dashboard_id}"),
                false,
            ),
            spec(
                "restricted_view",
                vec![
                    param("restricted_view_id", Id),
                    param("table_id", OptionalId),
                ],
                "restricted-view-{restricted_view_id}",
                Some("permissions-restricted-view-{restricted_view_id}"),
                false,
            ),
        ]
    }

    /// Whether a page type of this name exists.
    pub fn contains(&self, page: &str) -> bool {
        self.types.contains_key(page)
    }

    /// Validates a client's parameters for `page` and names its groups.
    ///
    /// Parameters the page type does not declare are ignored, as Baserow does.
    pub fn resolve(&self, page: &str, params: &Map<String, Value>) -> Result<Page, PageError> {
        let page_type = self.types.get(page).ok_or(PageError::UnknownPage)?;
        let mut values = Vec::with_capacity(page_type.params.len());
        for spec in &page_type.params {
            let value = validate(spec.kind, params.get(&spec.name))
                .ok_or_else(|| PageError::InvalidParameter(spec.name.clone()))?;
            values.push(value);
        }
        let group = page_type.group.render(&values);
        let permission_group = page_type
            .permission_group
            .as_ref()
            .map(|t| t.render(&values));
        let presence_space = page_type
            .presence_space
            .as_ref()
            .map(|t| t.render(&values).into());
        let parameters = page_type
            .params
            .iter()
            .zip(values)
            .map(|(spec, value)| (spec.name.clone(), value))
            .collect();
        Ok(Page {
            page: page_type.name.clone(),
            parameters: Value::Object(parameters),
            group: group.into(),
            permission_group: permission_group.map(Into::into),
            anonymous: page_type.anonymous,
            presence_space,
        })
    }
}

/// Checks one parameter against its kind; `None` means invalid.
fn validate(kind: ParamKind, value: Option<&Value>) -> Option<Value> {
    let is_null = matches!(value, None | Some(Value::Null));
    match kind {
        ParamKind::OptionalId if is_null => Some(Value::Null),
        ParamKind::OptionalToken if is_null => Some(Value::Null),
        ParamKind::Id | ParamKind::OptionalId => parse_id(value?).map(Value::from),
        ParamKind::Slug => match value? {
            Value::String(s) if is_slug(s) => Some(Value::String(s.clone())),
            _ => None,
        },
        ParamKind::Token | ParamKind::OptionalToken => match value? {
            Value::String(s) if is_token(s) => Some(Value::String(s.clone())),
            _ => None,
        },
    }
}

/// An id: a non-negative integer up to `i64::MAX`, given as a JSON integer or digits.
fn parse_id(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().filter(|id| *id >= 0),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<i64>().ok()
        }
        _ => None,
    }
}

/// Whether a presence space named by the authorizer is a name the gateway can use:
/// the same characters as a slug.
pub fn is_space_name(s: &str) -> bool {
    is_slug(s)
}

fn is_slug(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_token(s: &str) -> bool {
    (1..=1024).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn registry() -> PageRegistry {
        PageRegistry::new(&PageRegistry::baserow_specs()).unwrap()
    }

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn ids_as_numbers_or_digit_strings_name_the_same_group() {
        let r = registry();
        let a = r.resolve("table", &params(json!({"table_id": 1}))).unwrap();
        let b = r
            .resolve("table", &params(json!({"table_id": "1"})))
            .unwrap();
        assert_eq!(a.group.as_ref(), "table-1");
        assert_eq!(a, b);
        assert_eq!(a.parameters, json!({"table_id": 1}));
        assert_eq!(a.permission_group.as_deref(), Some("permissions-table-1"));
    }

    #[test]
    fn forged_and_mistyped_ids_are_rejected() {
        let r = registry();
        for bad in [
            json!("5-row-3"),
            json!(-1),
            json!(1.5),
            json!(""),
            json!("99999999999999999999"),
            json!(null),
            json!([1]),
            json!(true),
        ] {
            assert_eq!(
                r.resolve("table", &params(json!({ "table_id": bad }))),
                Err(PageError::InvalidParameter("table_id".into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn every_baserow_page_names_its_group() {
        let r = registry();
        let cases = [
            (
                "row",
                json!({"table_id": 2, "row_id": "3"}),
                "table-2-row-3",
            ),
            (
                "view",
                json!({"slug": "abc_D-1", "token": null}),
                "view-abc_D-1",
            ),
            ("dashboard", json!({"dashboard_id": 7}), "dashboard-7"),
            (
                "restricted_view",
                json!({"restricted_view_id": 4}),
                "restricted-view-4",
            ),
        ];
        for (page, p, group) in cases {
            assert_eq!(r.resolve(page, &params(p)).unwrap().group.as_ref(), group);
        }
        let view = r.resolve("view", &params(json!({"slug": "s"}))).unwrap();
        assert!(view.anonymous);
        assert_eq!(view.parameters, json!({"slug": "s", "token": null}));
    }

    #[test]
    fn slugs_and_tokens_are_checked() {
        let r = registry();
        for slug in [
            json!("a b"),
            json!("a/b"),
            json!(""),
            json!("x".repeat(129)),
        ] {
            assert!(r.resolve("view", &params(json!({ "slug": slug }))).is_err());
        }
        assert!(
            r.resolve("view", &params(json!({"slug": "s", "token": "has space"})))
                .is_err()
        );
        assert_eq!(r.resolve("nope", &Map::new()), Err(PageError::UnknownPage));
    }

    #[test]
    fn templates_that_could_be_forged_are_refused() {
        let spec = PageSpec {
            name: "doc".into(),
            parameters: vec![ParamSpec {
                name: "token".into(),
                kind: ParamKind::Token,
            }],
            group: "doc-{token}".into(),
            permission_group: None,
            anonymous: false,
            presence_space: None,
        };
        assert!(PageRegistry::new(std::slice::from_ref(&spec)).is_err());
        let undeclared = PageSpec {
            group: "doc-{id}".into(),
            ..spec.clone()
        };
        assert!(PageRegistry::new(&[undeclared]).is_err());
        let forged_space = PageSpec {
            group: "doc".into(),
            presence_space: Some("space-{token}".into()),
            ..spec
        };
        assert!(PageRegistry::new(&[forged_space]).is_err());
    }

    #[test]
    fn tables_and_their_rows_share_a_presence_space() {
        let r = registry();
        let table = r.resolve("table", &params(json!({"table_id": 5}))).unwrap();
        let row = r
            .resolve("row", &params(json!({"table_id": "5", "row_id": 9})))
            .unwrap();
        assert_eq!(table.presence_space.as_deref(), Some("table-5"));
        assert_eq!(row.presence_space.as_deref(), Some("table-5"));
        let view = r.resolve("view", &params(json!({"slug": "s"}))).unwrap();
        assert_eq!(view.presence_space, None);
    }
}
