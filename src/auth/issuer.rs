//! The built-in token issuer: ES256 access tokens signed with a P-256 key kept in the data
//! directory (mode 0600), and their validation. Used by `fhirvault token` and by the server.
//!
//! Validation pins the algorithm to ES256 (so `alg: none` and HS/RS confusion fail), checks the
//! key id, issuer, audience, `exp` and `nbf`, and requires `sub`, `exp`, `iss` and `aud`.

use super::scope::ScopeSet;
use super::{AuthError, Principal, PrincipalKind, TokenCache};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use zeroize::Zeroizing;

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
    pub jti: String,
    pub scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(default, rename = "fhirUser", skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub amr: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Declared purpose of use (`BTG` for break-glass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose_of_use: Option<String>,
    /// The reason a break-glass access was declared (required with `BTG`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub btg_reason: Option<String>,
}

/// What to put in a new token.
#[derive(Debug, Clone, Default)]
pub struct TokenRequest {
    pub scope: String,
    pub patient: Option<String>,
    pub fhir_user: Option<String>,
    pub client_id: Option<String>,
    pub subject: Option<String>,
    pub expires_in: i64,
    pub amr: Vec<String>,
    pub roles: Vec<String>,
    pub purpose_of_use: Option<String>,
    pub btg_reason: Option<String>,
}

pub struct Issuer {
    issuer: String,
    audience: String,
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    max_lifetime: i64,
    break_glass_secs: i64,
    cache: TokenCache,
    /// The verification key as a JWK (the JWKS endpoint publishes it).
    jwk: serde_json::Value,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn err(msg: impl Into<String>) -> AuthError {
    AuthError::Setup(msg.into())
}

impl Issuer {
    /// Opens the signing key file, creating a new P-256 key (mode 0600) on first use.
    pub fn open_or_create(
        key_file: &Path,
        issuer: &str,
        audience: &str,
        max_lifetime: i64,
        break_glass_secs: i64,
    ) -> Result<Issuer, AuthError> {
        let pem: Zeroizing<Vec<u8>> = match crate::secret_file::read_private(key_file).map_err(err)? {
            Some(pem) => pem,
            None => {
                let key = p256::SecretKey::random(&mut rand::rngs::OsRng);
                let pem = key
                    .to_pkcs8_pem(LineEnding::LF)
                    .map_err(|_| err("encoding the new signing key"))?;
                match crate::secret_file::create_private(key_file, pem.as_bytes()) {
                    Ok(()) => tracing::info!(path = %key_file.display(), "created a new token signing key"),
                    // another process created it in the meantime: use theirs
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(err(format!("creating {}: {e}", key_file.display()))),
                }
                crate::secret_file::read_private(key_file)
                    .map_err(err)?
                    .ok_or_else(|| err(format!("{} vanished after creation", key_file.display())))?
            }
        };
        let pem = std::str::from_utf8(&pem).map_err(|_| err("the signing key file is not PEM"))?;
        let secret =
            p256::SecretKey::from_pkcs8_pem(pem).map_err(|_| err("the signing key file is not a P-256 PKCS#8 key"))?;
        let public_pem = secret
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|_| err("encoding the public key"))?;
        let public_der = secret
            .public_key()
            .to_public_key_der()
            .map_err(|_| err("encoding the public key"))?;
        let kid = hex(&Sha256::digest(public_der.as_bytes())[..16]);
        let point = secret.public_key().to_encoded_point(false);
        let (Some(x), Some(y)) = (point.x(), point.y()) else {
            return Err(err("the signing key has no affine coordinates"));
        };
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": b64.encode(x), "y": b64.encode(y),
        });
        let encoding = EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|_| err("loading the signing key"))?;
        let decoding =
            DecodingKey::from_ec_pem(public_pem.as_bytes()).map_err(|_| err("loading the verification key"))?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.algorithms = vec![Algorithm::ES256];
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        Ok(Issuer {
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            kid,
            encoding,
            decoding,
            validation,
            max_lifetime,
            break_glass_secs,
            cache: TokenCache::default(),
            jwk,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The `aud` of this issuer's access tokens.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The public key that verifies this issuer's tokens, as a JWK.
    pub fn jwk(&self) -> &serde_json::Value {
        &self.jwk
    }

    /// The longest lifetime this issuer gives an access token.
    pub fn max_lifetime(&self) -> i64 {
        self.max_lifetime
    }

    /// Signs other claims (an OpenID Connect ID token) with the issuer's key.
    pub fn sign(&self, claims: &impl Serialize, typ: &str) -> Result<String, AuthError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some(typ.into());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(|_| AuthError::Setup("signing failed".into()))
    }

    /// Signs a new access token. Lifetimes above the configured maximum are refused.
    pub fn issue(&self, req: &TokenRequest) -> Result<String, AuthError> {
        Ok(self.issue_with_id(req)?.0)
    }

    /// Signs a token as [`Issuer::issue`] does, and returns its id (`jti`) with it.
    pub fn issue_with_id(&self, req: &TokenRequest) -> Result<(String, String), AuthError> {
        if req.expires_in <= 0 || req.expires_in > self.max_lifetime {
            return Err(AuthError::Setup(format!(
                "expires-in must be between 1 and {} seconds (max_token_lifetime_secs)",
                self.max_lifetime
            )));
        }
        let now = chrono::Utc::now().timestamp();
        let subject = req
            .subject
            .clone()
            .or_else(|| req.fhir_user.clone())
            .or_else(|| req.client_id.clone())
            .unwrap_or_else(|| "fhirvault-cli".into());
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: subject,
            aud: self.audience.clone(),
            exp: now + req.expires_in,
            nbf: now,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: req.scope.clone(),
            patient: req.patient.clone(),
            fhir_user: req.fhir_user.clone(),
            client_id: req.client_id.clone(),
            amr: req.amr.clone(),
            roles: req.roles.clone(),
            purpose_of_use: req.purpose_of_use.clone(),
            btg_reason: req.btg_reason.clone(),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("at+jwt".into());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|_| AuthError::Setup("signing failed".into()))?;
        Ok((token, claims.jti))
    }

    /// Validates a bearer token and returns who it speaks for.
    pub fn authenticate(&self, token: &str, is_type: impl Fn(&str) -> bool) -> Result<Arc<Principal>, AuthError> {
        let key = TokenCache::key(token);
        let now = chrono::Utc::now().timestamp();
        if let Some(p) = self.cache.get(&key, now) {
            return Ok(p);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::InvalidToken("malformed token"))?;
        if header.alg != Algorithm::ES256 {
            return Err(AuthError::InvalidToken("unexpected signing algorithm"));
        }
        if header.kid.as_deref() != Some(self.kid.as_str()) {
            return Err(AuthError::InvalidToken("unknown signing key"));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| super::jwt_error(&e))?;
        let c = data.claims;
        // Break-glass: only for a user, only with a stated reason, only within the window after
        // the token was issued; a token that declares it without a reason is not accepted.
        let break_glass = match c.purpose_of_use.as_deref() {
            Some("BTG") => {
                if c.btg_reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
                    return Err(AuthError::InvalidToken("break-glass requires a reason"));
                }
                c.fhir_user.is_some() && now - c.iat <= self.break_glass_secs
            }
            _ => false,
        };
        let scopes = ScopeSet::parse(&c.scope, &is_type);
        let kind = if c.patient.is_some() {
            PrincipalKind::Patient
        } else if c.fhir_user.is_some() {
            PrincipalKind::User
        } else {
            PrincipalKind::System
        };
        let principal = Arc::new(Principal {
            subject: c.sub,
            kind,
            scopes,
            patient: c.patient,
            fhir_user: c.fhir_user,
            client_id: c.client_id,
            amr: c.amr,
            roles: c.roles,
            break_glass,
            purpose_of_use: c.purpose_of_use,
            token_id: c.jti,
            expires_at: c.exp,
        });
        self.cache.insert(key, principal.clone(), now);
        Ok(principal)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
