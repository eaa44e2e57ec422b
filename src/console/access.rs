//! Who may use the console: anyone under `--dev`, the holders of `--console-token`
//! otherwise, and nobody when neither is given (the console is then not served: 404).
//!
//! A browser shows the token once, in the login form; the answer sets a session cookie
//! (`HttpOnly`, `SameSite=Strict`, path `/console/`) whose value is not the console token
//! but a short-lived HS256 token signed with it, so the console token is never stored in
//! the browser and a session ends by itself. Nodes that share the console token accept
//! each other's sessions. Scripts send `authorization: Bearer <console token>` instead.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

use crate::identity::same_secret;

/// The session cookie's name.
pub const COOKIE: &str = "channelgate_console";
/// How long a console session lasts.
const SESSION_SECS: u64 = 12 * 3600;
/// The audience of a session token, so that no other token signed with the same key
/// (none should be) passes for one.
const AUDIENCE: &str = "channelgate-console";
/// The shortest accepted console token.
const MIN_TOKEN_CHARS: usize = 16;

/// Who may use the console, as the settings say.
#[derive(Clone, PartialEq, Eq)]
pub enum ConsoleAccess {
    /// Not served: every console path answers 404.
    Off,
    /// `--dev` without a token: anyone who reaches the port.
    Open,
    /// `--console-token`: only who shows it.
    Token(Arc<str>),
}

impl std::fmt::Debug for ConsoleAccess {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConsoleAccess::Off => "Off",
            ConsoleAccess::Open => "Open",
            ConsoleAccess::Token(_) => "Token(<hidden>)",
        })
    }
}

impl ConsoleAccess {
    /// `--console-token` and `--dev` as one setting: a token wins, even under `--dev`.
    pub fn resolve(token: Option<String>, dev: bool) -> Result<ConsoleAccess, String> {
        match token {
            Some(token) if token.chars().count() < MIN_TOKEN_CHARS => Err(format!(
                "--console-token must be at least {MIN_TOKEN_CHARS} characters"
            )),
            Some(token) if !token.bytes().all(|b| b.is_ascii_graphic()) => Err(
                "--console-token must be printable ASCII without spaces (it is sent in a header)"
                    .into(),
            ),
            Some(token) => Ok(ConsoleAccess::Token(token.into())),
            None if dev => Ok(ConsoleAccess::Open),
            None => Ok(ConsoleAccess::Off),
        }
    }

    pub fn is_on(&self) -> bool {
        *self != ConsoleAccess::Off
    }
}

/// Checks each console request against the access setting.
pub struct Gate {
    access: ConsoleAccess,
    /// Signs and checks session cookies; `None` unless a token is set.
    keys: Option<(EncodingKey, DecodingKey)>,
}

impl Gate {
    pub fn new(access: ConsoleAccess) -> Result<Gate, String> {
        let keys = match &access {
            ConsoleAccess::Token(token) => Some((
                EncodingKey::from_secret(token.as_bytes())
                    .map_err(|e| format!("console session key: {e}"))?,
                DecodingKey::from_secret(token.as_bytes())
                    .map_err(|e| format!("console session key: {e}"))?,
            )),
            _ => None,
        };
        Ok(Gate { access, keys })
    }

    /// Whether the console needs a token (and so has a login form).
    pub fn needs_token(&self) -> bool {
        matches!(self.access, ConsoleAccess::Token(_))
    }

    /// Whether a request may use the console: always when open; with a token, when it
    /// carries a valid session cookie or the token as a bearer.
    pub fn allows(&self, headers: &http::HeaderMap) -> bool {
        let ConsoleAccess::Token(token) = &self.access else {
            return self.access == ConsoleAccess::Open;
        };
        let bearer = headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix("Bearer "))
            .any(|given| same_secret(given.trim().as_bytes(), token.as_bytes()));
        bearer || cookie(headers).is_some_and(|session| self.valid_session(session))
    }

    /// The `Set-Cookie` value that opens a session, if `given` is the console token.
    pub fn login(&self, given: &str) -> Option<String> {
        let (ConsoleAccess::Token(token), Some((key, _))) = (&self.access, &self.keys) else {
            return None;
        };
        if !same_secret(given.trim().as_bytes(), token.as_bytes()) {
            return None;
        }
        let claims = serde_json::json!({
            "aud": AUDIENCE,
            "exp": jsonwebtoken::get_current_timestamp() + SESSION_SECS,
        });
        let session = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key).ok()?;
        Some(format!(
            "{COOKIE}={session}; Path=/console/; Max-Age={SESSION_SECS}; HttpOnly; SameSite=Strict"
        ))
    }

    /// The `Set-Cookie` value that ends a session.
    pub fn logout() -> String {
        format!("{COOKIE}=; Path=/console/; Max-Age=0; HttpOnly; SameSite=Strict")
    }

    fn valid_session(&self, session: &str) -> bool {
        let Some((_, key)) = &self.keys else {
            return false;
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud"]);
        validation.leeway = 0;
        jsonwebtoken::decode::<serde_json::Value>(session, key, &validation).is_ok()
    }
}

/// The session cookie's value, if the request carries one.
fn cookie(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "a-console-token-of-some-length";

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn settings_resolve_to_off_open_or_token() {
        assert_eq!(ConsoleAccess::resolve(None, false), Ok(ConsoleAccess::Off));
        assert_eq!(ConsoleAccess::resolve(None, true), Ok(ConsoleAccess::Open));
        let token = ConsoleAccess::resolve(Some(TOKEN.into()), true).unwrap();
        assert_eq!(token, ConsoleAccess::Token(TOKEN.into()));
        assert!(!format!("{token:?}").contains(TOKEN));
        assert!(ConsoleAccess::resolve(Some("short".into()), false).is_err());
        assert!(ConsoleAccess::resolve(Some("with a space in the token".into()), false).is_err());
    }

    #[test]
    fn a_token_opens_by_bearer_or_by_the_session_cookie_of_the_login() {
        let gate = Gate::new(ConsoleAccess::Token(TOKEN.into())).unwrap();
        assert!(!gate.allows(&headers(&[])));
        assert!(gate.allows(&headers(&[("authorization", &format!("Bearer {TOKEN}"))])));
        assert!(!gate.allows(&headers(&[("authorization", "Bearer wrong")])));
        assert!(gate.login("wrong").is_none());
        let set_cookie = gate.login(TOKEN).expect("the right token logs in");
        assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"));
        assert!(!set_cookie.contains(TOKEN), "the cookie is not the token");
        let pair = set_cookie.split(';').next().unwrap();
        assert!(gate.allows(&headers(&[("cookie", &format!("other=1; {pair}"))])));
        assert!(!gate.allows(&headers(&[("cookie", &format!("{COOKIE}=forged"))])));
        let other = Gate::new(ConsoleAccess::Token("another-token-of-some-length".into()));
        assert!(!other.unwrap().allows(&headers(&[("cookie", pair)])));
    }

    #[test]
    fn open_allows_everyone_and_off_nobody() {
        assert!(
            Gate::new(ConsoleAccess::Open)
                .unwrap()
                .allows(&headers(&[]))
        );
        assert!(!Gate::new(ConsoleAccess::Off).unwrap().allows(&headers(&[])));
    }
}
