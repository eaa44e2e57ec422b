//! The token verifier on any `jwt_token` string, and on tokens built from parts: a header
//! and claims of any shape (or raw bytes), signed with the right key, a wrong one or not
//! at all. Whatever it accepts must be an HS256 token signed with the key, of type
//! `access`, not expired and naming a positive user id, with its `iat` and `jti` as the
//! claims give them; and a token that is plainly right must be accepted.

#![no_main]

use std::sync::LazyLock;

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use channelgate::identity::{Credentials, Identity, IdentityError, TokenVerifier};
use channelgate_fuzz::{Json, digits};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

const SECRET: &[u8] = b"fuzz-secret";
const USER_ID_CLAIM: &str = "user_id";
/// The verifier's leeway on `exp`, and then some.
const LEEWAY_SECS: u64 = 10;

static VERIFIER: LazyLock<TokenVerifier> =
    LazyLock::new(|| TokenVerifier::new(SECRET, USER_ID_CLAIM).expect("a verifier"));

#[derive(Debug, Arbitrary)]
enum Input {
    /// Any query parameter value.
    Raw(String),
    Built(Built),
}

#[derive(Debug, Arbitrary)]
struct Built {
    key: Key,
    header: Part<HeaderFields>,
    claims: Part<ClaimFields>,
    signature: Signature,
    mangle: Mangle,
}

#[derive(Debug, Arbitrary)]
enum Key {
    Right,
    Wrong(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum Part<T> {
    Fields(T),
    /// Any bytes, base64-encoded as a part should be.
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct HeaderFields {
    alg: Alg,
    typ: Option<String>,
    kid: Option<String>,
    extra: Vec<(HeaderName, Json)>,
}

#[derive(Debug, Arbitrary)]
enum Alg {
    Hs256,
    Hs384,
    Hs512,
    Rs256,
    Es256,
    EdDsa,
    None,
    LowerCase,
    Missing,
    Other(String),
    NotAString(Json),
}

#[derive(Debug, Arbitrary)]
enum HeaderName {
    Known(u8),
    Other(String),
}

const HEADER_NAMES: [&str; 13] = [
    "alg", "typ", "cty", "jku", "jwk", "kid", "x5u", "x5c", "x5t", "x5t#S256", "crit", "enc", "b64",
];

#[derive(Debug, Arbitrary)]
struct ClaimFields {
    extra: Vec<(ClaimName, Json)>,
    token_type: Option<TokenType>,
    exp: Option<Exp>,
    user_id: Option<UserId>,
}

#[derive(Debug, Arbitrary)]
enum TokenType {
    Access,
    Refresh,
    Other(String),
    NotAString(Json),
}

#[derive(Debug, Arbitrary)]
enum Exp {
    /// Seconds from now.
    Ahead(u32),
    /// Seconds ago.
    Behind(u32),
    Float(f64),
    Integer(u64),
    Other(Json),
}

#[derive(Debug, Arbitrary)]
enum UserId {
    Integer(i64),
    Digits(Digits),
    Text(String),
    Other(Json),
}

#[derive(Debug)]
struct Digits(String);

impl<'a> Arbitrary<'a> for Digits {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        digits(u).map(Digits)
    }
}

#[derive(Debug, Arbitrary)]
enum ClaimName {
    Known(u8),
    Other(String),
}

/// The spec claims jsonwebtoken reads, and the ones the verifier reads.
const CLAIM_NAMES: [&str; 9] = [
    "exp",
    "nbf",
    "aud",
    "iss",
    "sub",
    "iat",
    "jti",
    "token_type",
    USER_ID_CLAIM,
];
/// Claims that may make a token invalid whatever the rest says.
const CHECKED_CLAIMS: [&str; 7] = [
    "exp",
    "nbf",
    "aud",
    "iss",
    "sub",
    "token_type",
    USER_ID_CLAIM,
];

#[derive(Debug, Arbitrary)]
enum Signature {
    Hs256,
    Hs384,
    Hs512,
    Empty,
    Raw(Vec<u8>),
}

/// Encodings a token should not be accepted in, or may be only when they change nothing.
#[derive(Debug, Arbitrary)]
enum Mangle {
    Nothing,
    /// Base64 with `=` padding.
    Padded,
    /// The standard alphabet (`+/`) instead of the URL-safe one.
    StandardAlphabet,
    Surrounded(char),
    MoreParts(String),
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn name_of<const N: usize>(names: &[&str; N], known: u8) -> String {
    names[usize::from(known) % N].to_string()
}

impl HeaderName {
    fn name(&self) -> String {
        match self {
            HeaderName::Known(i) => name_of(&HEADER_NAMES, *i),
            HeaderName::Other(name) => name.clone(),
        }
    }
}

impl ClaimName {
    fn name(&self) -> String {
        match self {
            ClaimName::Known(i) => name_of(&CLAIM_NAMES, *i),
            ClaimName::Other(name) => name.clone(),
        }
    }
}

impl HeaderFields {
    fn json(&self) -> Map<String, Value> {
        let mut header = Map::new();
        for (name, Json(value)) in &self.extra {
            header.insert(name.name(), value.clone());
        }
        let alg = match &self.alg {
            Alg::Hs256 => Some(Value::from("HS256")),
            Alg::Hs384 => Some(Value::from("HS384")),
            Alg::Hs512 => Some(Value::from("HS512")),
            Alg::Rs256 => Some(Value::from("RS256")),
            Alg::Es256 => Some(Value::from("ES256")),
            Alg::EdDsa => Some(Value::from("EdDSA")),
            Alg::None => Some(Value::from("none")),
            Alg::LowerCase => Some(Value::from("hs256")),
            Alg::Missing => None,
            Alg::Other(alg) => Some(Value::from(alg.as_str())),
            Alg::NotAString(Json(value)) => Some(value.clone()),
        };
        match alg {
            Some(alg) => header.insert("alg".into(), alg),
            None => header.remove("alg"),
        };
        for (name, value) in [("typ", &self.typ), ("kid", &self.kid)] {
            if let Some(value) = value {
                header.insert(name.into(), Value::from(value.as_str()));
            }
        }
        header
    }

    /// A header nothing could object to: HS256, and a `typ` and `kid` at most.
    fn plainly_right(&self) -> bool {
        matches!(self.alg, Alg::Hs256) && self.extra.is_empty()
    }
}

impl ClaimFields {
    fn json(&self, now: u64) -> Map<String, Value> {
        let mut claims = Map::new();
        for (name, Json(value)) in &self.extra {
            claims.insert(name.name(), value.clone());
        }
        if let Some(token_type) = &self.token_type {
            let value = match token_type {
                TokenType::Access => Value::from("access"),
                TokenType::Refresh => Value::from("refresh"),
                TokenType::Other(text) => Value::from(text.as_str()),
                TokenType::NotAString(Json(value)) => value.clone(),
            };
            claims.insert("token_type".into(), value);
        }
        if let Some(exp) = &self.exp {
            let value = match exp {
                Exp::Ahead(secs) => Value::from(now + u64::from(*secs)),
                Exp::Behind(secs) => Value::from(now as i64 - i64::from(*secs)),
                Exp::Float(exp) => {
                    serde_json::Number::from_f64(*exp).map_or(Value::Null, Value::Number)
                }
                Exp::Integer(exp) => Value::from(*exp),
                Exp::Other(Json(value)) => value.clone(),
            };
            claims.insert("exp".into(), value);
        }
        if let Some(user_id) = &self.user_id {
            let value = match user_id {
                UserId::Integer(id) => Value::from(*id),
                UserId::Digits(Digits(digits)) => Value::from(digits.as_str()),
                UserId::Text(text) => Value::from(text.as_str()),
                UserId::Other(Json(value)) => value.clone(),
            };
            claims.insert(USER_ID_CLAIM.into(), value);
        }
        claims
    }

    /// The user a token with these claims must be accepted for, if the claims are plainly
    /// right: an access token expiring in a minute or more, with a positive user id, and
    /// no other claim that jsonwebtoken or the verifier reads.
    fn plainly_right(&self) -> Option<i64> {
        let others_unread = self
            .extra
            .iter()
            .all(|(name, _)| !CHECKED_CLAIMS.contains(&name.name().as_str()));
        let fresh = matches!(self.exp, Some(Exp::Ahead(secs)) if secs >= 60);
        let access = matches!(self.token_type, Some(TokenType::Access));
        let user_id = match &self.user_id {
            Some(UserId::Integer(id)) => Some(*id),
            Some(UserId::Digits(Digits(digits))) if !digits.is_empty() => digits.parse().ok(),
            _ => None,
        }
        .filter(|id| *id > 0);
        user_id.filter(|_| others_unread && fresh && access)
    }
}

fn encode_part<T>(part: &Part<T>, json: impl Fn(&T) -> Map<String, Value>) -> String {
    match part {
        Part::Fields(fields) => URL_SAFE_NO_PAD.encode(Value::Object(json(fields)).to_string()),
        Part::Raw(bytes) => URL_SAFE_NO_PAD.encode(bytes),
    }
}

fn sign(message: &str, key: &[u8], algorithm: Algorithm) -> String {
    match EncodingKey::from_secret(key) {
        Ok(key) => jsonwebtoken::crypto::sign(message.as_bytes(), &key, algorithm)
            .expect("HMAC signs anything"),
        // A key HMAC cannot take: no signature at all.
        Err(_) => String::new(),
    }
}

impl Built {
    fn token(&self, now: u64) -> String {
        let key: &[u8] = match &self.key {
            Key::Right => SECRET,
            Key::Wrong(key) => key,
        };
        let header = encode_part(&self.header, HeaderFields::json);
        let claims = encode_part(&self.claims, |c| c.json(now));
        let message = format!("{header}.{claims}");
        let signature = match &self.signature {
            Signature::Hs256 => sign(&message, key, Algorithm::HS256),
            Signature::Hs384 => sign(&message, key, Algorithm::HS384),
            Signature::Hs512 => sign(&message, key, Algorithm::HS512),
            Signature::Empty => String::new(),
            Signature::Raw(bytes) => URL_SAFE_NO_PAD.encode(bytes),
        };
        let token = format!("{message}.{signature}");
        let reencode = |token: &str, engine: &dyn Fn(Vec<u8>) -> String| {
            token
                .split('.')
                .map(|part| {
                    URL_SAFE_NO_PAD
                        .decode(part)
                        .map_or_else(|_| part.to_string(), &engine)
                })
                .collect::<Vec<_>>()
                .join(".")
        };
        match &self.mangle {
            Mangle::Nothing => token,
            Mangle::Padded => reencode(&token, &|bytes| URL_SAFE.encode(bytes)),
            Mangle::StandardAlphabet => reencode(&token, &|bytes| STANDARD.encode(bytes)),
            Mangle::Surrounded(c) => format!("{c}{token}{c}"),
            Mangle::MoreParts(more) => format!("{token}.{more}"),
        }
    }

    /// The user this token must be accepted for, if it is plainly right.
    fn plainly_right(&self) -> Option<i64> {
        let right_key = match &self.key {
            Key::Right => true,
            Key::Wrong(key) => key == SECRET,
        };
        let header = matches!(&self.header, Part::Fields(h) if h.plainly_right());
        let signed = matches!(self.signature, Signature::Hs256);
        let encoded = matches!(self.mangle, Mangle::Nothing);
        match &self.claims {
            Part::Fields(claims) if right_key && header && signed && encoded => {
                claims.plainly_right()
            }
            _ => None,
        }
    }
}

/// What must be true of a token the verifier accepted: checked here on the token's own
/// bytes, without jsonwebtoken's validation.
fn check_accepted(token: &str, credentials: &Credentials, checked_at: u64) {
    let user_id = credentials.identity.user_id;
    assert!(user_id > 0, "{token:?} accepted for user {user_id}");
    let parts: Vec<&str> = token.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        panic!("{token:?} accepted without three parts");
    };
    let json_of = |part: &str| -> Map<String, Value> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .unwrap_or_else(|e| panic!("{token:?} accepted with a part that is not base64: {e}"));
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{token:?} accepted with a part that is not an object: {e}"))
    };
    assert_eq!(
        json_of(header).get("alg"),
        Some(&Value::from("HS256")),
        "{token:?} accepted with another algorithm"
    );
    let expected = URL_SAFE_NO_PAD
        .decode(sign(
            &format!("{header}.{claims}"),
            SECRET,
            Algorithm::HS256,
        ))
        .expect("our own signature");
    assert_eq!(
        URL_SAFE_NO_PAD.decode(signature).ok(),
        Some(expected),
        "{token:?} accepted without the key's signature"
    );
    let claims = json_of(claims);
    assert_eq!(
        claims.get("token_type"),
        Some(&Value::from("access")),
        "{token:?} accepted and not an access token"
    );
    let exp = claims.get("exp").and_then(Value::as_f64);
    assert!(
        exp.is_some_and(|exp| exp.round() + LEEWAY_SECS as f64 >= checked_at as f64),
        "{token:?} accepted with exp {:?} at {checked_at}",
        claims.get("exp")
    );
    let claimed = match claims.get(USER_ID_CLAIM) {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s
            .parse()
            .ok()
            .filter(|_| s.bytes().all(|b| b.is_ascii_digit())),
        _ => None,
    };
    assert_eq!(
        claimed,
        Some(user_id),
        "{token:?} accepted for another user"
    );
    assert_eq!(
        credentials.issued_at,
        claims.get("iat").and_then(Value::as_i64),
        "{token:?}: iat"
    );
    let jti = match claims.get("jti") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    assert_eq!(credentials.token_id, jti, "{token:?}: jti");
}

/// Verifies `token` both ways (the identity alone, and with its credentials) and checks the
/// answers.
fn verify(token: &str, checked_at: u64) -> Result<Credentials, IdentityError> {
    let verified = VERIFIER.verify_credentials(Some(token));
    assert_eq!(
        VERIFIER.verify(Some(token)),
        verified.clone().map(|c| c.identity),
        "{token:?}: verify and verify_credentials disagree"
    );
    match &verified {
        Ok(credentials) if token == "anonymous" => {
            assert_eq!(credentials, &Credentials::ANONYMOUS)
        }
        Ok(credentials) => check_accepted(token, credentials, checked_at),
        Err(IdentityError::Missing) => assert!(token.is_empty()),
        Err(error) => assert!(!token.is_empty() && !error.to_string().is_empty()),
    }
    verified
}

fuzz_target!(|input: Input| {
    let checked_at = now();
    match input {
        Input::Raw(token) => {
            let _ = verify(&token, checked_at);
        }
        Input::Built(built) => {
            let token = built.token(checked_at);
            let verified = verify(&token, checked_at);
            if let Some(user_id) = built.plainly_right() {
                assert_eq!(
                    verified.map(|c| c.identity),
                    Ok(Identity { user_id }),
                    "{token:?} from {built:?} is plainly right"
                );
            }
        }
    }
});
