//! Page parameters: any JSON a client may send with a page name, resolved through the
//! default page table, directly and as a subscribe frame. The registry must agree with
//! its specs (ids, slugs and tokens as documented), never forge a group name, and resolve
//! a page's own normalised parameters to the same page.

#![no_main]

use std::sync::LazyLock;

use arbitrary::Arbitrary;
use channelgate::pages::{PageRegistry, PageSpec};
use channelgate::protocol::{ClientFrame, parse_client_frame};
use channelgate_fuzz::{Json, check_resolve, default_pages};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

static PAGES: LazyLock<(PageRegistry, Vec<PageSpec>)> = LazyLock::new(default_pages);

/// Every parameter name of the default table, and the frame's own keys.
static NAMES: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut names: Vec<String> = PAGES
        .1
        .iter()
        .flat_map(|spec| spec.parameters.iter().map(|p| p.name.clone()))
        .collect();
    names.extend(["page", "remove_page", "type"].map(String::from));
    names.sort();
    names.dedup();
    names
});

#[derive(Debug, Arbitrary)]
enum Name {
    /// One of the table's names, by index.
    Known(u8),
    Other(String),
}

impl Name {
    fn of(&self, known: &[String]) -> String {
        match self {
            Name::Known(i) => known[usize::from(*i) % known.len()].clone(),
            Name::Other(name) => name.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    page: Name,
    params: Vec<(Name, Json)>,
}

fuzz_target!(|input: Input| {
    let (registry, specs) = &*PAGES;
    let page_names: Vec<String> = specs.iter().map(|spec| spec.name.clone()).collect();
    let page = input.page.of(&page_names);
    let params: Map<String, Value> = input
        .params
        .iter()
        .map(|(name, Json(value))| (name.of(&NAMES), value.clone()))
        .collect();
    check_resolve(registry, specs, &page, &params);

    // The same as a client sends it: `{"page": ..., <params>}` as text, a subscribe frame
    // (or a focus frame, when a `type` parameter says `presence.focus`; its `type` and
    // `focus` are not parameters). Its parameters are the ones given (values go through
    // JSON text, where a float need not come back bit for bit, so the oracle runs again on
    // what was parsed).
    let focus = params.get("type").and_then(Value::as_str) == Some("presence.focus");
    let not_params: &[&str] = if focus {
        &["page", "type", "focus"]
    } else {
        &["page"]
    };
    let mut frame = params.clone();
    frame.insert("page".into(), Value::String(page.clone()));
    let text = Value::Object(frame).to_string();
    let (parsed, parsed_params) = match parse_client_frame(&text) {
        Ok(ClientFrame::Subscribe { page, params }) if !focus => (page, params),
        Ok(ClientFrame::PresenceFocus { page, params, .. }) if focus => (page, params),
        other => panic!("{text} parsed as {other:?}"),
    };
    assert_eq!(parsed, page);
    assert!(
        parsed_params
            .keys()
            .eq(params.keys().filter(|k| !not_params.contains(&k.as_str()))),
        "{text}"
    );
    check_resolve(registry, specs, &parsed, &parsed_params);
});
