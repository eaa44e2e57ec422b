//! Who a connection belongs to: the backend's HS256 access token, or `anonymous`.
//!
//! The algorithm is pinned to HS256 (no `none`, no switching to another algorithm), the
//! expiry is checked with a small leeway, and the token must be an access token.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

/// The user id of anonymous connections.
pub const ANONYMOUS_USER_ID: i64 = 0;

/// Whether a secret a client sent (an API key, a console token) is the expected one, in a
/// time that does not depend on where they differ.
pub fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Seconds of clock skew tolerated on `exp`.
const EXPIRY_LEEWAY_SECS: u64 = 10;

/// Who is on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The backend's user id; [`ANONYMOUS_USER_ID`] for anonymous connections.
    pub user_id: i64,
}

impl Identity {
    pub const ANONYMOUS: Identity = Identity {
        user_id: ANONYMOUS_USER_ID,
    };

    pub fn is_anonymous(&self) -> bool {
        self.user_id == ANONYMOUS_USER_ID
    }
}

/// A verified token: who it is, and the claims the backend's connect check judges (a
/// token issued before the user's last password change is no longer good, for instance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub identity: Identity,
    /// `iat`, seconds since the epoch; `None` when the token has none.
    pub issued_at: Option<i64>,
    /// `jti`; `None` when the token has none.
    pub token_id: Option<String>,
}

impl Credentials {
    pub const ANONYMOUS: Credentials = Credentials {
        identity: Identity::ANONYMOUS,
        issued_at: None,
        token_id: None,
    };
}

/// Why a token was refused. Logged, never sent to the client (it only learns "failed").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityError {
    Missing,
    /// Signature, algorithm, expiry or format: what jsonwebtoken said.
    Invalid(String),
    WrongTokenType,
    /// The user id claim is absent, not a positive integer, or not digits.
    BadUserId,
}

impl std::fmt::Display for IdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentityError::Missing => write!(f, "no jwt_token given"),
            IdentityError::Invalid(e) => write!(f, "token refused: {e}"),
            IdentityError::WrongTokenType => write!(f, "token_type is not \"access\""),
            IdentityError::BadUserId => write!(f, "user id claim missing or not a positive id"),
        }
    }
}

/// Checks access tokens signed with the backend's shared key.
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
    user_id_claim: String,
}

impl TokenVerifier {
    pub fn new(secret: &[u8], user_id_claim: &str) -> Result<Self, String> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = EXPIRY_LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp"]);
        Ok(TokenVerifier {
            key: DecodingKey::from_secret(secret).map_err(|e| format!("JWT secret: {e}"))?,
            validation,
            user_id_claim: user_id_claim.to_string(),
        })
    }

    /// The identity behind the `jwt_token` query parameter.
    pub fn verify(&self, token: Option<&str>) -> Result<Identity, IdentityError> {
        self.verify_credentials(token).map(|c| c.identity)
    }

    /// The identity behind the `jwt_token` query parameter, with what the connect check
    /// asks the backend about the token itself.
    pub fn verify_credentials(&self, token: Option<&str>) -> Result<Credentials, IdentityError> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(IdentityError::Missing)?;
        if token == "anonymous" {
            return Ok(Credentials::ANONYMOUS);
        }
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| IdentityError::Invalid(e.to_string()))?
            .claims;
        if claims.get("token_type").and_then(Value::as_str) != Some("access") {
            return Err(IdentityError::WrongTokenType);
        }
        let user_id = match claims.get(&self.user_id_claim) {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) if s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
            _ => None,
        }
        .filter(|id| *id > 0)
        .ok_or(IdentityError::BadUserId)?;
        Ok(Credentials {
            identity: Identity { user_id },
            issued_at: claims.get("iat").and_then(Value::as_i64),
            token_id: claims.get("jti").and_then(|jti| match jti {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }),
        })
    }
}

/// Signs an access token the way the backend does; for `--dev`'s sample token and tests.
pub fn sign_access_token(
    secret: &[u8],
    user_id_claim: &str,
    user_id: i64,
    lifetime_secs: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let exp = jsonwebtoken::get_current_timestamp() + lifetime_secs;
    let claims = serde_json::json!({
        "token_type": "access",
        "exp": exp,
        user_id_claim: user_id,
    });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret";

    #[test]
    fn valid_anonymous_and_missing() {
        let v = TokenVerifier::new(SECRET, "user_id").unwrap();
        let token = sign_access_token(SECRET, "user_id", 42, 60).unwrap();
        assert_eq!(v.verify(Some(&token)), Ok(Identity { user_id: 42 }));
        assert_eq!(v.verify(Some("anonymous")), Ok(Identity::ANONYMOUS));
        assert_eq!(v.verify(None), Err(IdentityError::Missing));
        assert_eq!(v.verify(Some("")), Err(IdentityError::Missing));
    }

    #[test]
    fn credentials_carry_issued_at_and_token_id() {
        let v = TokenVerifier::new(SECRET, "user_id").unwrap();
        let exp = jsonwebtoken::get_current_timestamp() + 60;
        let claims = serde_json::json!({
            "token_type": "access", "exp": exp, "user_id": 3, "iat": 1_700_000_000, "jti": "abc",
        });
        let key = EncodingKey::from_secret(SECRET).unwrap();
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        let credentials = v.verify_credentials(Some(&token)).unwrap();
        assert_eq!(credentials.identity, Identity { user_id: 3 });
        assert_eq!(credentials.issued_at, Some(1_700_000_000));
        assert_eq!(credentials.token_id.as_deref(), Some("abc"));
        let bare = sign_access_token(SECRET, "user_id", 3, 60).unwrap();
        let credentials = v.verify_credentials(Some(&bare)).unwrap();
        assert_eq!((credentials.issued_at, credentials.token_id), (None, None));
    }

    #[test]
    fn configurable_claim_name() {
        let v = TokenVerifier::new(SECRET, "sub_id").unwrap();
        let token = sign_access_token(SECRET, "sub_id", 7, 60).unwrap();
        assert_eq!(v.verify(Some(&token)), Ok(Identity { user_id: 7 }));
        let other = sign_access_token(SECRET, "user_id", 7, 60).unwrap();
        assert_eq!(v.verify(Some(&other)), Err(IdentityError::BadUserId));
    }
}
