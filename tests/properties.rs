//! Properties of the pure middle over generated input: what a client or the backend sends
//! never panics the frame decoder, the parser, the page table, the publish checks or the
//! token verifier, and
//! what they accept keeps its promises (no forged group names, `_event_id` framing that
//! stays JSON).

use channelgate::event;
use channelgate::identity::TokenVerifier;
use channelgate::outbox::Frame;
use channelgate::pages::PageRegistry;
use channelgate::proto::{PublishRequest, publish_request::Target};
use channelgate::protocol::{ClientFrame, parse_client_frame};
use channelgate::transport::frames::Decoder;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// JSON values of any shape, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        "[0-9]{1,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn page_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("table".to_string()),
        Just("row".to_string()),
        Just("view".to_string()),
        Just("dashboard".to_string()),
        Just("restricted_view".to_string()),
        ".{0,10}",
    ]
}

proptest! {
    #[test]
    fn any_text_parses_or_is_refused_without_panicking(text in ".{0,64}") {
        let _ = parse_client_frame(&text);
    }

    #[test]
    fn any_json_object_parses_or_is_refused(value in json_value()) {
        let _ = parse_client_frame(&value.to_string());
    }

    #[test]
    fn a_resolved_page_never_forges_a_group_name(page in page_name(), params in prop::collection::btree_map(
        prop_oneof![Just("table_id".to_string()), Just("row_id".to_string()), Just("slug".to_string()),
                    Just("token".to_string()), Just("dashboard_id".to_string()),
                    Just("restricted_view_id".to_string()), "[a-z_]{1,8}"],
        json_value(), 0..4)) {
        let registry = PageRegistry::new(&PageRegistry::baserow_specs()).expect("the built-in pages");
        let params: Map<String, Value> = params.into_iter().collect();
        if let Ok(resolved) = registry.resolve(&page, &params) {
            prop_assert!(resolved.group.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "group {:?} from {params:?}", resolved.group);
        }
        // A subscribe frame of the same carries the same page and parameter names (values
        // go through JSON text, where a float need not come back bit for bit).
        let mut frame = params.clone();
        frame.insert("page".into(), Value::String(page.clone()));
        if let Ok(ClientFrame::Subscribe { page: parsed, params: parsed_params }) =
            parse_client_frame(&Value::Object(frame).to_string())
        {
            prop_assert_eq!(parsed, page);
            prop_assert!(parsed_params.keys().eq(params.keys()));
        }
    }

    #[test]
    fn accepted_payloads_frame_into_json_carrying_their_id(
        fields in prop::collection::btree_map(prop_oneof!["[a-z_]{1,10}", Just("_event_id".to_string())], json_value(), 0..5),
        kind in ".{0,10}",
        spaces in " {0,3}",
        id in 1u64..(1 << 53),
    ) {
        let mut object: Map<String, Value> = fields.into_iter().collect();
        object.insert("type".into(), Value::String(kind));
        let text = format!("{spaces}{}{spaces}", Value::Object(object));
        let request = PublishRequest {
            target: Some(Target::Group("table-1".into())),
            payload: text.clone(),
            ..Default::default()
        };
        let event = event::from_request(request, 1 << 20);
        prop_assert!(event.is_ok(), "an object with a string type is accepted: {text}");
        if let Ok(event) = event {
            let frame = Frame::event(&text, id);
            let wire = frame.wire();
            let header = match wire[1] & 0x7f { 126 => 4, 127 => 10, _ => 2 };
            let framed: Value = serde_json::from_slice(&wire[header..]).expect("the frame is JSON");
            prop_assert_eq!(&framed["_event_id"], &json!(id));
            prop_assert!(event.payload_for("socket", 1).is_some());
        }
    }

    #[test]
    fn any_token_is_verified_or_refused_without_panicking(token in ".{0,200}") {
        let verifier = TokenVerifier::new(b"secret", "user_id").expect("a verifier");
        let _ = verifier.verify(Some(&token));
    }
}

/// Client frames, masked, of any opcode and flags, with arbitrary bytes among them.
fn wire() -> impl Strategy<Value = Vec<u8>> {
    let frame = (
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..200),
        any::<[u8; 4]>(),
    )
        .prop_map(|(first, payload, mask)| {
            let mut out = vec![first, 0x80 | payload.len().min(125) as u8];
            if payload.len() > 125 {
                out[1] = 0x80 | 126;
                out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            }
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            out
        });
    let piece = prop_oneof![4 => frame, 1 => prop::collection::vec(any::<u8>(), 0..16)];
    prop::collection::vec(piece, 0..6).prop_map(|pieces| pieces.concat())
}

proptest! {
    /// However a read splits the bytes, the decoder never panics and finds the same
    /// messages and the same verdict as when they come in one read.
    #[test]
    fn the_frame_decoder_does_not_depend_on_how_reads_split(
        bytes in wire(),
        split in any::<prop::sample::Index>(),
    ) {
        let whole = {
            let mut out = Vec::new();
            let verdict = Decoder::new(1024).feed(&bytes, &mut out);
            (out, verdict)
        };
        let at = split.index(bytes.len() + 1);
        let mut decoder = Decoder::new(1024);
        let mut out = Vec::new();
        let mut verdict = decoder.feed(&bytes[..at], &mut out);
        if verdict.is_ok() {
            verdict = decoder.feed(&bytes[at..], &mut out);
        }
        prop_assert_eq!((out, verdict), whole);
    }
}
