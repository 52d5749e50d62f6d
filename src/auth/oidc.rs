//! External OpenID Connect providers: discovery and JWKS through the `openidconnect` crate,
//! access tokens (JWTs) verified against the provider's keys, claims mapped to a [`Principal`]
//! by configurable names. Keys are cached and refetched when a token names an unknown `kid`
//! (at most once a minute per provider, so a flood of bogus kids cannot hammer the provider).

use super::scope::ScopeSet;
use super::{AuthError, Principal, PrincipalKind, TokenCache};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use openidconnect::core::CoreProviderMetadata;
use openidconnect::IssuerUrl;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One provider, as configured (`[[oidc_provider]]` in the TOML file).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The issuer URL; discovery reads `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    /// The `aud` this server requires in the provider's access tokens.
    pub audience: String,
    #[serde(default = "default_scope_claim")]
    pub scope_claim: String,
    #[serde(default = "default_patient_claim")]
    pub patient_claim: String,
    #[serde(default = "default_fhir_user_claim")]
    pub fhir_user_claim: String,
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
}

fn default_scope_claim() -> String {
    "scope".into()
}
fn default_patient_claim() -> String {
    "patient".into()
}
fn default_fhir_user_claim() -> String {
    "fhirUser".into()
}
fn default_roles_claim() -> String {
    "roles".into()
}

const REFRESH_AT_MOST_EVERY: Duration = Duration::from_secs(60);
/// Asymmetric algorithms only: an HMAC "signature" keyed with a public key proves nothing.
const ACCEPTED: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

struct Keys {
    by_kid: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    fetched: Instant,
}

pub struct ExternalProvider {
    config: ProviderConfig,
    http: openidconnect::reqwest::blocking::Client,
    keys: Mutex<Keys>,
    cache: TokenCache,
    endpoints: ProviderEndpoints,
}

impl std::fmt::Debug for ExternalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalProvider")
            .field("issuer", &self.config.issuer)
            .finish_non_exhaustive()
    }
}

/// Where a provider's endpoints are (from its discovery document), for the SMART configuration
/// this server publishes when the provider signs users in.
#[derive(Debug, Clone)]
pub struct ProviderEndpoints {
    pub issuer: String,
    pub jwks_uri: String,
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: Option<String>,
}

type KeysByKid = HashMap<String, (DecodingKey, Option<Algorithm>)>;

fn fetch_keys(
    config: &ProviderConfig,
    http: &openidconnect::reqwest::blocking::Client,
) -> Result<(KeysByKid, ProviderEndpoints), AuthError> {
    let issuer =
        IssuerUrl::new(config.issuer.clone()).map_err(|_| AuthError::Setup("oidc issuer is not a URL".into()))?;
    let metadata = CoreProviderMetadata::discover(&issuer, http)
        .map_err(|e| AuthError::Setup(format!("OpenID Connect discovery for {} failed: {e}", config.issuer)))?;
    let endpoints = ProviderEndpoints {
        issuer: config.issuer.clone(),
        jwks_uri: metadata.jwks_uri().url().to_string(),
        authorization_endpoint: Some(metadata.authorization_endpoint().url().to_string()),
        token_endpoint: metadata.token_endpoint().map(|t| t.url().to_string()),
    };
    let mut by_kid = HashMap::new();
    for key in metadata.jwks().keys() {
        let Ok(json) = serde_json::to_value(key) else { continue };
        let Ok(jwk) = serde_json::from_value::<Jwk>(json) else {
            continue;
        };
        let Some(kid) = jwk.common.key_id.clone() else { continue };
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok());
        if let Ok(decoding) = DecodingKey::from_jwk(&jwk) {
            by_kid.insert(kid, (decoding, alg));
        }
    }
    Ok((by_kid, endpoints))
}

impl ExternalProvider {
    /// Discovers the provider and fetches its keys (at start-up: a provider that cannot be
    /// reached stops the server rather than failing every request later).
    pub fn discover(config: ProviderConfig) -> Result<ExternalProvider, AuthError> {
        let http = openidconnect::reqwest::blocking::Client::builder()
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| AuthError::Setup(format!("HTTP client: {e}")))?;
        let (by_kid, endpoints) = fetch_keys(&config, &http)?;
        Ok(ExternalProvider {
            config,
            endpoints,
            http,
            keys: Mutex::new(Keys {
                by_kid,
                fetched: Instant::now(),
            }),
            cache: TokenCache::default(),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    fn key_for(&self, kid: &str) -> Option<(DecodingKey, Option<Algorithm>)> {
        {
            let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(k) = keys.by_kid.get(kid) {
                return Some(k.clone());
            }
            if keys.fetched.elapsed() < REFRESH_AT_MOST_EVERY {
                return None;
            }
        }
        // Unknown kid: the provider may have rotated its keys. Fetch on a plain thread: the
        // blocking HTTP client must not run inside the server's async runtime.
        let (config, http) = (self.config.clone(), self.http.clone());
        let fetched = std::thread::spawn(move || fetch_keys(&config, &http)).join().ok()?;
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.fetched = Instant::now();
        match fetched {
            Ok((by_kid, _)) => keys.by_kid = by_kid,
            Err(e) => tracing::warn!(issuer = %self.config.issuer, error = %e, "refreshing provider keys failed"),
        }
        keys.by_kid.get(kid).cloned()
    }

    /// Verifies an access token from this provider and maps its claims (cached until expiry).
    pub fn authenticate(&self, token: &str, is_type: impl Fn(&str) -> bool) -> Result<Arc<Principal>, AuthError> {
        let key = TokenCache::key(token);
        let now = chrono::Utc::now().timestamp();
        if let Some(p) = self.cache.get(&key, now) {
            return Ok(p);
        }
        let principal = Arc::new(self.verify(token, is_type)?);
        self.cache.insert(key, principal.clone(), now);
        Ok(principal)
    }

    fn verify(&self, token: &str, is_type: impl Fn(&str) -> bool) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::InvalidToken("malformed token"))?;
        if !ACCEPTED.contains(&header.alg) {
            return Err(AuthError::InvalidToken("unexpected signing algorithm"));
        }
        let kid = header.kid.ok_or(AuthError::InvalidToken("unknown signing key"))?;
        let (key, key_alg) = self
            .key_for(&kid)
            .ok_or(AuthError::InvalidToken("unknown signing key"))?;
        if key_alg.is_some_and(|a| a != header.alg) {
            return Err(AuthError::InvalidToken("unexpected signing algorithm"));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<HashMap<String, Value>>(token, &key, &validation)
            .map_err(|e| super::jwt_error(&e))?
            .claims;
        let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_string);
        let list = |name: &str| -> Vec<String> {
            match claims.get(name) {
                Some(Value::String(s)) => s.split(' ').filter(|x| !x.is_empty()).map(str::to_string).collect(),
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
                _ => Vec::new(),
            }
        };
        let scopes = ScopeSet::parse(&list(&self.config.scope_claim).join(" "), &is_type);
        let patient = text(&self.config.patient_claim);
        let fhir_user = text(&self.config.fhir_user_claim);
        let kind = if patient.is_some() {
            PrincipalKind::Patient
        } else if fhir_user.is_some() {
            PrincipalKind::User
        } else {
            PrincipalKind::System
        };
        Ok(Principal {
            subject: text("sub").unwrap_or_default(),
            kind,
            scopes,
            patient,
            fhir_user,
            client_id: text("client_id").or_else(|| text("azp")),
            amr: list("amr"),
            roles: list(&self.config.roles_claim),
            // break-glass is a claim of the built-in issuer only until a provider mapping is agreed
            break_glass: false,
            purpose_of_use: text("purpose_of_use"),
            token_id: text("jti").unwrap_or_default(),
            expires_at: claims.get("exp").and_then(Value::as_i64).unwrap_or(0),
        })
    }
}

/// The unverified `iss` of a JWT, to pick the provider that must then verify it.
pub fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Value>(&bytes)
        .ok()?
        .get("iss")?
        .as_str()
        .map(str::to_string)
}

/// The configured external providers, by issuer.
#[derive(Debug, Default)]
pub struct Providers {
    by_issuer: HashMap<String, Arc<ExternalProvider>>,
}

impl Providers {
    pub fn discover_all(configs: &[ProviderConfig]) -> Result<Providers, AuthError> {
        let mut by_issuer = HashMap::new();
        for c in configs {
            let p = ExternalProvider::discover(c.clone())?;
            by_issuer.insert(c.issuer.clone(), Arc::new(p));
        }
        Ok(Providers { by_issuer })
    }

    pub fn for_issuer(&self, issuer: &str) -> Option<&Arc<ExternalProvider>> {
        self.by_issuer.get(issuer)
    }

    pub fn is_empty(&self) -> bool {
        self.by_issuer.is_empty()
    }

    /// The providers' endpoints, by issuer.
    pub fn metadata(&self) -> Vec<ProviderEndpoints> {
        let mut out: Vec<ProviderEndpoints> = self.by_issuer.values().map(|p| p.endpoints.clone()).collect();
        out.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        out
    }
}
