//! What the fuzz targets share: JSON values built from fuzzer bytes, and the page table's
//! rules written out a second time, as the oracle that `PageRegistry::resolve` must agree
//! with.

use arbitrary::{Arbitrary, Unstructured};
use channelgate::pages::{Page, PageError, PageRegistry, PageSpec, ParamKind};
use serde_json::{Map, Number, Value};

/// Strings the code under test compares against: frame types, page names, token types.
const WORDS: [&str; 12] = [
    "ping",
    "replay_events",
    "presence.focus",
    "table",
    "row",
    "view",
    "dashboard",
    "restricted_view",
    "access",
    "users",
    "table-1",
    "",
];

/// How deep generated JSON nests.
const MAX_DEPTH: u32 = 3;

/// The largest id, in digits: ids may be given as strings of digits.
const I64_MAX_DIGITS: &str = "9223372036854775807";

/// A JSON value of any shape, biased towards what pages and events care about: ids as
/// numbers and digit strings near the edges, slugs, and `type` strings.
#[derive(Debug, Clone, PartialEq)]
pub struct Json(pub Value);

impl<'a> Arbitrary<'a> for Json {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        json(u, MAX_DEPTH).map(Json)
    }
}

/// A JSON value nesting at most `depth` levels.
pub fn json(u: &mut Unstructured, depth: u32) -> arbitrary::Result<Value> {
    let kinds = if depth == 0 { 9 } else { 11 };
    Ok(match u.int_in_range(0..=kinds)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(u.int_in_range(-3i64..=1000)?),
        3 => {
            let n = edge_integer(u)?;
            i64::try_from(n).map_or_else(|_| Value::from(n as u64), Value::from)
        }
        4 => Value::from(u.arbitrary::<u64>()?),
        5 => Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        6 => Value::String(u.arbitrary()?),
        7 => Value::String(digits(u)?),
        8 => Value::String(slug_like(u)?),
        9 => Value::String(WORDS[u.choose_index(WORDS.len())?].into()),
        10 => {
            let len = u.int_in_range(0..=4)?;
            Value::Array(
                (0..len)
                    .map(|_| json(u, depth - 1))
                    .collect::<Result<_, _>>()?,
            )
        }
        _ => {
            let len = u.int_in_range(0..=4)?;
            let mut object = Map::new();
            for _ in 0..len {
                object.insert(u.arbitrary()?, json(u, depth - 1)?);
            }
            Value::Object(object)
        }
    })
}

/// Integers at the edges of `i64` and `u64`.
fn edge_integer(u: &mut Unstructured) -> arbitrary::Result<i128> {
    let base = [
        0i128,
        i64::MAX as i128,
        i64::MIN as i128,
        u64::MAX as i128,
        1 << 53,
        -(1 << 53),
    ][u.choose_index(6)?];
    let nudge = u.int_in_range(-2i128..=2)?;
    // serde_json takes an i128 only within i64 or u64.
    Ok((base + nudge).clamp(i64::MIN as i128, u64::MAX as i128))
}

/// A string of ASCII digits, often around the length of `i64::MAX`.
pub fn digits(u: &mut Unstructured) -> arbitrary::Result<String> {
    if u.ratio(1, 3)? {
        // i64::MAX itself, or one more, with leading zeros at times.
        let zeros = "0".repeat(u.int_in_range(0..=2)?);
        let tail = if u.arbitrary()? {
            I64_MAX_DIGITS
        } else {
            "9223372036854775808"
        };
        return Ok(format!("{zeros}{tail}"));
    }
    let len = u.int_in_range(0..=22)?;
    (0..len)
        .map(|_| Ok(char::from(b'0' + u.int_in_range(0..=9)?)))
        .collect()
}

/// A string of slug characters with, at times, one that is not; up to 130 long.
pub fn slug_like(u: &mut Unstructured) -> arbitrary::Result<String> {
    const SLUG: &[u8] = b"abcXYZ019_-";
    let len = if u.ratio(1, 8)? {
        u.int_in_range(126..=130)?
    } else {
        u.int_in_range(0..=12)?
    };
    let mut out = String::with_capacity(len);
    for _ in 0..len {
        out.push(char::from(SLUG[u.choose_index(SLUG.len())?]));
    }
    if u.ratio(1, 6)? {
        let odd: char = u.arbitrary()?;
        let at = u.int_in_range(0..=out.len())?;
        if out.is_char_boundary(at) {
            out.insert(at, odd);
        }
    }
    Ok(out)
}

/// Whether `name` could be a group name: nothing a client sends may add other characters.
pub fn is_group_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An id as the page table documents it: a JSON integer from 0 to `i64::MAX`, or a
/// non-empty string of ASCII digits of such a value.
fn expected_id(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_u64().and_then(|n| i64::try_from(n).ok()),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            let significant = s.trim_start_matches('0');
            let fits = significant.len() < I64_MAX_DIGITS.len()
                || (significant.len() == I64_MAX_DIGITS.len() && significant <= I64_MAX_DIGITS);
            // Digits only, so the value is the digits read in base ten.
            fits.then(|| {
                significant
                    .bytes()
                    .fold(0i64, |n, b| n * 10 + i64::from(b - b'0'))
            })
        }
        _ => None,
    }
}

/// One parameter checked against its kind, written from the kinds' documentation;
/// `None` for a value the page must refuse.
fn expected_param(kind: ParamKind, value: Option<&Value>) -> Option<Value> {
    let is_null = matches!(value, None | Some(Value::Null));
    let string = || match value {
        Some(Value::String(s)) => Some(s.as_str()),
        _ => None,
    };
    match kind {
        ParamKind::OptionalId | ParamKind::OptionalToken if is_null => Some(Value::Null),
        ParamKind::Id | ParamKind::OptionalId => expected_id(value?).map(Value::from),
        ParamKind::Slug => string()
            .filter(|s| (1..=128).contains(&s.len()) && is_group_name(s))
            .map(Value::from),
        ParamKind::Token | ParamKind::OptionalToken => string()
            .filter(|s| {
                (1..=1024).contains(&s.len()) && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
            })
            .map(Value::from),
    }
}

/// What a resolved page must be, field by field (a `Page`'s own equality may compare less).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedPage {
    pub page: String,
    pub parameters: Value,
    pub group: String,
    pub permission_group: Option<String>,
    pub anonymous: bool,
    pub presence_space: Option<String>,
}

impl ExpectedPage {
    pub fn of(page: &Page) -> Self {
        ExpectedPage {
            page: page.page.to_string(),
            parameters: page.parameters.clone(),
            group: page.group.to_string(),
            permission_group: page.permission_group.as_deref().map(String::from),
            anonymous: page.anonymous,
            presence_space: page.presence_space.as_deref().map(String::from),
        }
    }
}

/// What resolving `page` with `params` must give, by the specs alone.
pub fn expected_page(
    specs: &[PageSpec],
    page: &str,
    params: &Map<String, Value>,
) -> Result<ExpectedPage, PageError> {
    let spec = specs
        .iter()
        .find(|spec| spec.name == page)
        .ok_or(PageError::UnknownPage)?;
    let mut values = Map::new();
    for param in &spec.parameters {
        let value = expected_param(param.kind, params.get(&param.name))
            .ok_or_else(|| PageError::InvalidParameter(param.name.clone()))?;
        values.insert(param.name.clone(), value);
    }
    let render = |template: &str| {
        let mut out = template.to_string();
        for (name, value) in &values {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out = out.replace(&format!("{{{name}}}"), &text);
        }
        out
    };
    Ok(ExpectedPage {
        page: spec.name.clone(),
        group: render(&spec.group),
        permission_group: spec.permission_group.as_deref().map(render),
        anonymous: spec.anonymous,
        presence_space: spec.presence_space.as_deref().map(render),
        parameters: Value::Object(values),
    })
}

/// Resolves `page` and checks the answer against [`expected_page`], and what must hold of
/// any page: group, permission group and presence space names made of id and slug
/// characters only, and resolving a page's own normalised parameters gives the same page
/// again.
pub fn check_resolve(
    registry: &PageRegistry,
    specs: &[PageSpec],
    page: &str,
    params: &Map<String, Value>,
) {
    let resolved = registry.resolve(page, params);
    let expected = expected_page(specs, page, params);
    assert_eq!(
        resolved
            .as_ref()
            .map(ExpectedPage::of)
            .map_err(Clone::clone),
        expected,
        "page {page:?} with {params:?}: the registry and its specs disagree"
    );
    assert_eq!(
        registry.contains(page),
        !matches!(resolved, Err(PageError::UnknownPage))
    );
    let Ok(resolved) = resolved else {
        return;
    };
    assert!(
        is_group_name(&resolved.group),
        "forged group {:?} from {params:?}",
        resolved.group
    );
    for (what, name) in [
        ("permission group", &resolved.permission_group),
        ("presence space", &resolved.presence_space),
    ] {
        if let Some(name) = name {
            assert!(
                is_group_name(name),
                "forged {what} {name:?} from {params:?}"
            );
        }
    }
    let Value::Object(normalised) = &resolved.parameters else {
        panic!("parameters are not an object: {:?}", resolved.parameters);
    };
    assert_eq!(
        registry
            .resolve(page, normalised)
            .as_ref()
            .map(ExpectedPage::of),
        Ok(ExpectedPage::of(&resolved)),
        "normalised parameters resolve to another page"
    );
}

/// The built-in page table and the specs it was built from.
pub fn default_pages() -> (PageRegistry, Vec<PageSpec>) {
    let specs = PageRegistry::baserow_specs();
    let registry = PageRegistry::new(&specs).expect("the built-in page table");
    (registry, specs)
}
