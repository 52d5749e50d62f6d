//! The built-in SMART authorization server: authorization code with PKCE (S256 only), refresh
//! tokens that rotate (a spent one presented again revokes its family), client credentials for
//! backend services with `private_key_jwt` (RS384/ES384, `jti` once, `exp` at most five minutes
//! ahead), introspection (RFC 7662) and revocation (RFC 7009); users with argon2 passwords and
//! TOTP second factors, lockout, idle sessions, EHR launch values.
//!
//! HTTP lives in `api::smart`; this module decides. Nothing here logs or returns a secret: errors
//! are fixed texts, and the store sees only hashes of bearer secrets.

use super::issuer::Issuer;
use super::scope::{Context, ScopeSet};
use super::{AuthError, TokenRequest};
use crate::crypto::Aad;
use crate::store::auth::{ClientRow, CodeRow, LaunchRow, NewUser, RefreshRow, RefreshUse, UserRow};
use crate::store::{Store, StoreError};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use chrono::NaiveDateTime;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// The longest a client assertion may live (SMART Backend Services: five minutes).
const ASSERTION_MAX_SECS: i64 = 300;
/// How long an authorization request may sit on the login and consent pages.
/// How long a sign-in may take, from the authorize request to consent.
pub const REQUEST_SECS: i64 = 600;
const CODE_SECS: i64 = 60;
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const JWKS_URI_CACHE: Duration = Duration::from_secs(300);

/// Lifetimes and limits of the authorization server.
#[derive(Debug, Clone)]
pub struct Settings {
    pub access_token_secs: i64,
    pub session_idle_secs: i64,
    pub refresh_idle_secs: i64,
    pub refresh_absolute_secs: i64,
    pub login_max_failures: i32,
    pub login_lockout_secs: i64,
    /// Users must enrol and present a TOTP code to sign in.
    pub mfa_required: bool,
}

/// An OAuth error: the RFC 6749 code and a fixed description (never request data).
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("{0}")]
    InvalidRequest(&'static str),
    #[error("{0}")]
    InvalidClient(&'static str),
    #[error("{0}")]
    InvalidGrant(&'static str),
    #[error("{0}")]
    UnauthorizedClient(&'static str),
    #[error("unsupported grant_type")]
    UnsupportedGrantType,
    #[error("{0}")]
    InvalidScope(&'static str),
    #[error("the bearer token is not valid")]
    InvalidToken,
    #[error("internal error")]
    Server(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl OAuthError {
    pub fn code(&self) -> &'static str {
        match self {
            OAuthError::InvalidRequest(_) => "invalid_request",
            OAuthError::InvalidClient(_) => "invalid_client",
            OAuthError::InvalidGrant(_) => "invalid_grant",
            OAuthError::UnauthorizedClient(_) => "unauthorized_client",
            OAuthError::UnsupportedGrantType => "unsupported_grant_type",
            OAuthError::InvalidScope(_) => "invalid_scope",
            OAuthError::InvalidToken => "invalid_token",
            OAuthError::Server(_) => "server_error",
        }
    }
}

impl From<StoreError> for OAuthError {
    fn from(e: StoreError) -> Self {
        OAuthError::Server(Box::new(e))
    }
}

impl From<crate::crypto::CryptoError> for OAuthError {
    fn from(e: crate::crypto::CryptoError) -> Self {
        OAuthError::Server(Box::new(e))
    }
}

impl From<AuthError> for OAuthError {
    fn from(e: AuthError) -> Self {
        OAuthError::Server(Box::new(e))
    }
}

/// Why `/authorize` cannot go on: shown on a page (the client or redirect URI cannot be
/// trusted with a redirect), or sent back to the client's redirect URI.
#[derive(Debug)]
pub enum AuthorizeFailure {
    Page(&'static str),
    Redirect(String),
    Server(OAuthError),
}

impl From<StoreError> for AuthorizeFailure {
    fn from(e: StoreError) -> Self {
        AuthorizeFailure::Server(e.into())
    }
}

/// A validated authorization request, carried (sealed) through the sign-in and consent pages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthzRequest {
    pub client_id: String,
    pub client_name: String,
    pub redirect_uri: String,
    /// The requested scopes the client may have.
    pub scope: String,
    pub state: Option<String>,
    pub code_challenge: String,
    pub nonce: Option<String>,
    /// Context from an EHR launch value.
    pub launch_patient: Option<String>,
    pub launch_encounter: Option<String>,
    pub expires: i64,
}

impl AuthzRequest {
    /// The scopes, parsed.
    pub fn scopes(&self) -> ScopeSet {
        ScopeSet::parse(&self.scope, |_| true)
    }

    /// A standalone launch asking for a patient the user has to choose.
    pub fn needs_patient_choice(&self, user: &UserRow) -> bool {
        let s = self.scopes();
        let asks_patient = s.launch_patient || s.resources.iter().any(|r| r.context == Context::Patient);
        asks_patient && self.launch_patient.is_none() && own_patient(user).is_none()
    }
}

/// The patient a user is (`fhirUser` = `Patient/…`), if they are one.
pub fn own_patient(user: &UserRow) -> Option<String> {
    user.fhir_user
        .as_deref()
        .and_then(|f| f.strip_prefix("Patient/"))
        .map(str::to_string)
}

/// A token response and what its audit event says.
#[derive(Debug)]
pub struct Issued {
    pub body: Value,
    pub client_id: String,
    pub subject: String,
    pub fhir_user: Option<String>,
    pub patient: Option<String>,
    /// `token-issue` (code, client credentials) or `token-refresh`.
    pub event: &'static str,
}

/// Access tokens revoked before expiry, by `jti` (checked on every request; reloaded from the
/// database by each node, so a revocation on one node reaches the others within seconds).
#[derive(Debug, Default)]
pub struct RevokedTokens {
    by_jti: RwLock<HashMap<String, i64>>,
}

impl RevokedTokens {
    pub fn is_revoked(&self, jti: &str) -> bool {
        self.by_jti.read().unwrap_or_else(|p| p.into_inner()).contains_key(jti)
    }

    pub fn add(&self, jti: &str, expires: i64) {
        self.by_jti
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(jti.to_string(), expires);
    }

    /// Reloads the list from the database.
    pub fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let rows = store.auth_revoked_access_tokens()?;
        let map = rows
            .into_iter()
            .map(|(jti, exp)| (jti, exp.and_utc().timestamp()))
            .collect();
        *self.by_jti.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }
}

/// What a token introspection found.
#[derive(Debug)]
pub struct Introspection {
    pub body: Value,
    pub client_id: Option<String>,
}

pub struct AuthServer {
    store: Arc<Store>,
    issuer: Arc<Issuer>,
    settings: Settings,
    /// Verified against when the user does not exist, so that an unknown user and a wrong
    /// password take the same time.
    dummy_hash: String,
    http: openidconnect::reqwest::blocking::Client,
    jwks_by_uri: Mutex<HashMap<String, (Instant, Value)>>,
    pub revoked: Arc<RevokedTokens>,
    /// When this node last recorded each client's use (`auth_clients.last_token_at`, written
    /// at most once an hour per client and node: an access review needs days, not seconds).
    client_use_noted: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for AuthServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthServer").finish_non_exhaustive()
    }
}

/// SHA-256 of a bearer secret: what the store keeps.
pub fn secret_hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A new random bearer secret (256 bits, base64url).
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    B64.encode(bytes)
}

/// An argon2id hash (PHC string) of a password or client secret.
pub fn hash_password(password: &str) -> Result<String, OAuthError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| OAuthError::Server("password hashing failed".into()))
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A password for the operator (shown once): 20 characters from an unambiguous alphabet.
pub fn generate_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rngs::OsRng;
    (0..20)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The RFC 6238 generator for a secret: SHA-1, six digits, 30-second steps (what every
/// authenticator app supports).
fn totp(secret: &[u8]) -> Option<totp_rs::TOTP> {
    totp_rs::TOTP::new(totp_rs::Algorithm::SHA1, 6, 1, 30, secret.to_vec()).ok()
}

/// The time step (of the previous, current or next) whose code `code` is, if any.
fn totp_step(secret: &[u8], code: &str, now: i64) -> Option<i64> {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let generator = totp(secret)?;
    let current = now / 30;
    (current - 1..=current + 1).find(|step| {
        let expected = generator.generate((*step * 30) as u64);
        constant_time_eq(expected.as_bytes(), code.as_bytes())
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The base32 text and `otpauth://` URI of a TOTP secret, for an authenticator app.
pub fn totp_enrolment(username: &str, secret: &[u8]) -> (String, String) {
    let text = match totp_rs::Secret::Raw(secret.to_vec()).to_encoded() {
        totp_rs::Secret::Encoded(s) => s,
        totp_rs::Secret::Raw(_) => String::new(),
    };
    let label: String = form_urlencoded::byte_serialize(username.as_bytes()).collect();
    let uri =
        format!("otpauth://totp/fhirvault:{label}?secret={text}&issuer=fhirvault&algorithm=SHA1&digits=6&period=30");
    (text, uri)
}

/// A new TOTP secret (160 bits, RFC 4226's recommendation).
pub fn new_totp_secret() -> Zeroizing<Vec<u8>> {
    let mut secret = Zeroizing::new(vec![0u8; 20]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, secret.as_mut_slice());
    secret
}

fn totp_aad(user_id: &str) -> Aad<'_> {
    Aad {
        table: "auth_users",
        resource_type: "totp",
        logical_id: user_id,
        version_id: 0,
    }
}

/// Seals a user's TOTP secret (the store keeps only this).
pub fn seal_totp(cipher: &crate::crypto::Cipher, user_id: &str, secret: &[u8]) -> Result<Vec<u8>, OAuthError> {
    Ok(cipher.seal(&totp_aad(user_id), secret)?.as_bytes().to_vec())
}

/// Re-encrypts every TOTP secret under an older key version (key rotation).
pub fn reencrypt_totp_secrets(store: &Store) -> Result<u64, StoreError> {
    let cipher = store.cipher();
    let mut done = 0;
    for (id, sealed) in store.auth_totp_secrets()? {
        let sealed = crate::crypto::Sealed::from_stored(sealed);
        if let Some(new) = cipher.reseal(&totp_aad(&id), &sealed)? {
            if store.auth_replace_totp_secret(&id, sealed.as_bytes(), new.as_bytes())? {
                done += 1;
            }
        }
    }
    Ok(done)
}

/// Whether the client's allowed scopes cover a requested scope: the same context, the type or
/// `*`, every permission letter (v1 words read as their letters); a granular scope is covered by
/// what covers its base.
fn covered(requested: &str, allowed: &[&str]) -> bool {
    if allowed.contains(&requested) {
        return true;
    }
    let parse = |s: &str| ScopeSet::parse(s, |_| true).resources.into_iter().next();
    let Some(want) = parse(requested) else { return false };
    allowed.iter().filter_map(|a| parse(a)).any(|have| {
        have.constraints.is_empty()
            && have.context == want.context
            && (have.resource_type.is_none() || have.resource_type == want.resource_type)
            && (!want.permissions.create || have.permissions.create)
            && (!want.permissions.read || have.permissions.read)
            && (!want.permissions.update || have.permissions.update)
            && (!want.permissions.delete || have.permissions.delete)
            && (!want.permissions.search || have.permissions.search)
    })
}

/// A client assertion's `jti`, recorded as used once the request is accepted.
struct AssertionUse {
    client_id: String,
    jti: String,
    exp: i64,
}

/// What a backend service may not ask for: a resource scope naming a type this server does not
/// have, or a write scope its registration does not cover (`invalid_scope`; read scopes beyond
/// the registration are left out of the grant, as RFC 6749 lets a server narrow).
fn backend_scopes_acceptable(
    requested: &str,
    client: &ClientRow,
    is_type: &dyn Fn(&str) -> bool,
) -> Result<(), OAuthError> {
    let allowed: Vec<&str> = client.scopes.split_whitespace().collect();
    for token in requested.split_whitespace() {
        let Some(scope) = ScopeSet::parse(token, |_| true).resources.into_iter().next() else {
            continue;
        };
        if scope.resource_type.as_deref().is_some_and(|t| !is_type(t)) {
            return Err(OAuthError::InvalidScope(
                "a requested scope names an unknown resource type",
            ));
        }
        let writes = scope.permissions.create || scope.permissions.update || scope.permissions.delete;
        if writes && !covered(token, &allowed) {
            return Err(OAuthError::InvalidScope(
                "a requested write scope is not registered for this client",
            ));
        }
    }
    Ok(())
}

/// The requested scopes the client may have, in the order asked, without duplicates.
fn allowed_scopes<'a>(requested: &'a str, client: &ClientRow) -> Vec<&'a str> {
    let allowed: Vec<&str> = client.scopes.split_whitespace().collect();
    let mut out: Vec<&str> = Vec::new();
    for s in requested.split_whitespace() {
        if !out.contains(&s) && covered(s, &allowed) {
            out.push(s);
        }
    }
    out
}

fn is_context(scope: &str, context: &str) -> bool {
    scope.split('/').next() == Some(context) && scope.contains('.')
}

fn now_ts() -> i64 {
    chrono::Utc::now().timestamp()
}

fn at(ts: i64) -> NaiveDateTime {
    chrono::DateTime::from_timestamp(ts, 0).unwrap_or_default().naive_utc()
}

/// `uri` with the query parameters added.
pub fn with_query(uri: &str, params: &[(&str, &str)]) -> String {
    let mut out = uri.to_string();
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        ser.append_pair(k, v);
    }
    out.push(if uri.contains('?') { '&' } else { '?' });
    out.push_str(&ser.finish());
    out
}

impl AuthServer {
    pub fn new(store: Arc<Store>, issuer: Arc<Issuer>, settings: Settings) -> Result<AuthServer, OAuthError> {
        let http = openidconnect::reqwest::blocking::Client::builder()
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| OAuthError::Server(Box::new(e)))?;
        Ok(AuthServer {
            store,
            issuer,
            settings,
            dummy_hash: hash_password(&new_secret())?,
            http,
            jwks_by_uri: Mutex::new(HashMap::new()),
            client_use_noted: Mutex::new(HashMap::new()),
            revoked: Arc::new(RevokedTokens::default()),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn seal_blob(&self, kind: &str, bind: &str, plain: &[u8]) -> Result<String, OAuthError> {
        let aad = Aad {
            table: "auth_flow",
            resource_type: kind,
            logical_id: bind,
            version_id: 0,
        };
        Ok(B64.encode(self.store.cipher().seal(&aad, plain)?.as_bytes()))
    }

    fn open_blob(&self, kind: &str, bind: &str, text: &str) -> Option<Zeroizing<Vec<u8>>> {
        let aad = Aad {
            table: "auth_flow",
            resource_type: kind,
            logical_id: bind,
            version_id: 0,
        };
        let bytes = B64.decode(text.trim()).ok()?;
        self.store
            .cipher()
            .open(&aad, &crate::crypto::Sealed::from_stored(bytes))
            .ok()
            .map(Zeroizing::new)
    }

    /// The authorization request as the hidden field the pages carry (sealed: it names the
    /// patient of an EHR launch).
    pub fn seal_request(&self, req: &AuthzRequest) -> Result<String, OAuthError> {
        let json = serde_json::to_vec(req).map_err(|e| OAuthError::Server(Box::new(e)))?;
        self.seal_blob("request", "", &json)
    }

    /// The authorization request back from its hidden field, if it is intact and not expired.
    pub fn open_request(&self, sealed: &str) -> Option<AuthzRequest> {
        let plain = self.open_blob("request", "", sealed)?;
        let req: AuthzRequest = serde_json::from_slice(&plain).ok()?;
        (req.expires >= now_ts()).then_some(req)
    }

    /// Checks an authorization request (`/authorize` parameters).
    pub fn begin_authorize(
        &self,
        params: &HashMap<String, String>,
        fhir_base: &str,
    ) -> Result<AuthzRequest, AuthorizeFailure> {
        let get = |k: &str| params.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let client_id = get("client_id").ok_or(AuthorizeFailure::Page("The request names no client."))?;
        let client = self
            .store
            .auth_client(client_id)?
            .filter(|c| !c.disabled)
            .ok_or(AuthorizeFailure::Page(
                "The application is not registered with this server.",
            ))?;
        let registered: Vec<&str> = client.redirect_uris.lines().filter(|l| !l.is_empty()).collect();
        let redirect_uri = match get("redirect_uri") {
            Some(uri) if registered.contains(&uri) => uri.to_string(),
            None if registered.len() == 1 => registered[0].to_string(),
            _ => {
                return Err(AuthorizeFailure::Page(
                    "The application's redirect address is not one registered for it.",
                ))
            }
        };
        let state = get("state").map(str::to_string);
        let fail = |error: &str, description: &str| {
            let mut p = vec![("error", error), ("error_description", description)];
            if let Some(s) = &state {
                p.push(("state", s));
            }
            AuthorizeFailure::Redirect(with_query(&redirect_uri, &p))
        };
        if get("response_type") != Some("code") {
            return Err(fail("unsupported_response_type", "response_type must be code"));
        }
        let challenge = get("code_challenge").ok_or_else(|| fail("invalid_request", "PKCE is required"))?;
        if get("code_challenge_method") != Some("S256") {
            return Err(fail("invalid_request", "code_challenge_method must be S256"));
        }
        if challenge.len() != 43 || B64.decode(challenge).is_err() {
            return Err(fail("invalid_request", "code_challenge is not a base64url SHA-256"));
        }
        match get("aud") {
            Some(aud) if aud.trim_end_matches('/') == fhir_base.trim_end_matches('/') => {}
            _ => return Err(fail("invalid_request", "aud must be this server's FHIR base URL")),
        }
        let requested = get("scope").unwrap_or("");
        let mut scopes = allowed_scopes(requested, &client);
        // no system-level access through a user's sign-in
        scopes.retain(|s| !is_context(s, "system"));
        if scopes.is_empty() {
            return Err(fail(
                "invalid_scope",
                "none of the requested scopes is allowed to this client",
            ));
        }
        let (mut launch_patient, mut launch_encounter) = (None, None);
        if let Some(launch) = get("launch") {
            let row = self
                .store
                .auth_launch_take(&secret_hash(launch))?
                .filter(|l| l.client_id.as_deref().is_none_or(|c| c == client.client_id))
                .ok_or_else(|| fail("invalid_request", "the launch value is unknown or expired"))?;
            launch_patient = row.patient;
            launch_encounter = row.encounter;
        }
        Ok(AuthzRequest {
            client_id: client.client_id,
            client_name: client.name,
            redirect_uri,
            scope: scopes.join(" "),
            state,
            code_challenge: challenge.to_string(),
            nonce: get("nonce").map(str::to_string),
            launch_patient,
            launch_encounter,
            expires: now_ts() + REQUEST_SECS,
        })
    }

    /// Checks a username and password. Unknown users, disabled and locked accounts and wrong
    /// passwords all take one argon2 verification and give the same `None`.
    pub fn login(&self, username: &str, password: &str) -> Result<Option<UserRow>, OAuthError> {
        let user = self.store.auth_user_by_name(username)?;
        let hash = user
            .as_ref()
            .map_or(self.dummy_hash.as_str(), |u| u.password_hash.as_str());
        let ok = verify_password(password, hash);
        let Some(user) = user else { return Ok(None) };
        let now = crate::store::now();
        if user.disabled || user.locked_until.is_some_and(|t| t > now) {
            return Ok(None);
        }
        if !ok {
            let until = now + chrono::Duration::seconds(self.settings.login_lockout_secs);
            self.store
                .auth_user_login_failed(&user.id, self.settings.login_max_failures, until)?;
            return Ok(None);
        }
        self.store.auth_user_login_succeeded(&user.id)?;
        Ok(Some(user))
    }

    /// Starts a browser session; returns the cookie value.
    pub fn start_session(&self, user: &UserRow, mfa_done: bool, amr: &str) -> Result<String, OAuthError> {
        let token = new_secret();
        self.store
            .auth_session_create(&secret_hash(&token), &user.id, mfa_done, amr)?;
        Ok(token)
    }

    /// The session of a cookie, unless it has been idle too long or its user was disabled.
    pub fn session(&self, cookie: &str) -> Result<Option<(crate::store::auth::SessionRow, UserRow)>, OAuthError> {
        let idle_since = crate::store::now() - chrono::Duration::seconds(self.settings.session_idle_secs);
        Ok(self.store.auth_session_touch(&secret_hash(cookie), idle_since)?)
    }

    pub fn complete_session(&self, cookie: &str, amr: &str) -> Result<(), OAuthError> {
        Ok(self.store.auth_session_complete(&secret_hash(cookie), amr)?)
    }

    pub fn end_session(&self, cookie: &str) -> Result<(), OAuthError> {
        Ok(self.store.auth_session_end(&secret_hash(cookie))?)
    }

    /// A value bound to the session that forms must echo (a cross-site form cannot know it).
    pub fn csrf_token(&self, cookie: &str) -> String {
        B64.encode(&Sha256::digest(format!("fhirvault-csrf:{cookie}").as_bytes())[..16])
    }

    /// Checks a TOTP code of an enrolled user (each code once).
    pub fn verify_totp(&self, user: &UserRow, code: &str) -> Result<bool, OAuthError> {
        let Some(sealed) = &user.totp_secret else {
            return Ok(false);
        };
        let secret = Zeroizing::new(
            self.store
                .cipher()
                .open(&totp_aad(&user.id), &crate::crypto::Sealed::from_stored(sealed.clone()))?,
        );
        match totp_step(&secret, code, now_ts()) {
            Some(step) => Ok(self.store.auth_user_accept_totp_step(&user.id, step)?),
            None => Ok(false),
        }
    }

    /// A secret being enrolled, sealed into the enrolment form (bound to the session).
    pub fn seal_pending_totp(&self, cookie: &str, secret: &[u8]) -> Result<String, OAuthError> {
        self.seal_blob("totp-pending", &self.csrf_token(cookie), secret)
    }

    /// The secret of an enrolment form, if it was sealed for this session.
    pub fn open_pending_totp(&self, cookie: &str, pending: &str) -> Option<Zeroizing<Vec<u8>>> {
        self.open_blob("totp-pending", &self.csrf_token(cookie), pending)
    }

    /// A wrong second-factor code counts toward the account's lockout like a wrong password.
    pub fn record_factor_failure(&self, user: &UserRow) -> Result<(), OAuthError> {
        let until = crate::store::now() + chrono::Duration::seconds(self.settings.login_lockout_secs);
        Ok(self
            .store
            .auth_user_login_failed(&user.id, self.settings.login_max_failures, until)?)
    }

    /// Completes an enrolment: the code proves the user's app holds the pending secret.
    pub fn enrol_totp(&self, cookie: &str, user: &UserRow, pending: &str, code: &str) -> Result<bool, OAuthError> {
        let Some(secret) = self.open_blob("totp-pending", &self.csrf_token(cookie), pending) else {
            return Ok(false);
        };
        let Some(step) = totp_step(&secret, code, now_ts()) else {
            return Ok(false);
        };
        let sealed = seal_totp(self.store.cipher(), &user.id, &secret)?;
        Ok(self.store.auth_user_enrol_totp(&user.id, &sealed, step)?)
    }

    /// The scopes a user may grant the request, and the patient context they come with.
    /// A patient user grants no `user/` scopes and has their own compartment; a practitioner's
    /// `patient/` scopes need the patient of the launch or the one they chose.
    pub fn scope_for_user(
        &self,
        user: &UserRow,
        req: &AuthzRequest,
        chosen_patient: Option<&str>,
    ) -> (Vec<String>, Option<String>) {
        let own = own_patient(user);
        let patient = own
            .clone()
            .or_else(|| req.launch_patient.clone())
            .or_else(|| chosen_patient.map(str::to_string));
        let scopes = req
            .scope
            .split_whitespace()
            .filter(|s| !(own.is_some() && is_context(s, "user")))
            .filter(|s| !(user.fhir_user.is_none() && *s == "fhirUser"))
            .filter(|s| patient.is_some() || !(is_context(s, "patient") || *s == "launch/patient"))
            .map(str::to_string)
            .collect();
        (scopes, patient)
    }

    /// The user approved: a code for the client, and where to send the browser.
    pub fn approve(
        &self,
        user: &UserRow,
        amr: &str,
        auth_time: NaiveDateTime,
        req: &AuthzRequest,
        chosen_patient: Option<&str>,
    ) -> Result<String, OAuthError> {
        let (scopes, patient) = self.scope_for_user(user, req, chosen_patient);
        if scopes.is_empty() {
            return Ok(self.deny(req, "access_denied", "nothing the user may grant was requested"));
        }
        let code = new_secret();
        let now = crate::store::now();
        self.store.auth_code_add(&CodeRow {
            code_hash: secret_hash(&code),
            client_id: req.client_id.clone(),
            user_id: user.id.clone(),
            redirect_uri: req.redirect_uri.clone(),
            scope: scopes.join(" "),
            patient,
            encounter: req.launch_encounter.clone(),
            code_challenge: req.code_challenge.clone(),
            nonce: req.nonce.clone(),
            amr: amr.to_string(),
            auth_time,
            expires_at: now + chrono::Duration::seconds(CODE_SECS),
        })?;
        let mut params = vec![("code", code.as_str())];
        if let Some(s) = &req.state {
            params.push(("state", s));
        }
        Ok(with_query(&req.redirect_uri, &params))
    }

    /// Where to send the browser when the user refused (or nothing could be granted).
    pub fn deny(&self, req: &AuthzRequest, error: &str, description: &str) -> String {
        let mut params = vec![("error", error), ("error_description", description)];
        if let Some(s) = &req.state {
            params.push(("state", s));
        }
        with_query(&req.redirect_uri, &params)
    }

    /// Authenticates the client at the token, introspection and revocation endpoints:
    /// `private_key_jwt`, a client secret (HTTP Basic or form), or a public client's id.
    pub fn authenticate_client(
        &self,
        form: &HashMap<String, String>,
        basic: Option<(String, String)>,
        token_url: &str,
    ) -> Result<ClientRow, OAuthError> {
        let (client, assertion) = self.authenticate_client_deferred(form, basic, token_url)?;
        if let Some(used) = assertion {
            self.first_use(&used)?;
        }
        Ok(client)
    }

    /// Records an assertion's `jti` as used: a second use is refused (`invalid_client`).
    fn first_use(&self, used: &AssertionUse) -> Result<(), OAuthError> {
        if !self
            .store
            .auth_assertion_first_use(&used.client_id, &used.jti, at(used.exp + 5))?
        {
            return Err(OAuthError::InvalidClient("the assertion's jti was used before"));
        }
        Ok(())
    }

    /// [`AuthServer::authenticate_client`] without recording a client assertion's `jti`: the
    /// caller records it ([`AuthServer::first_use`]) once the rest of the request is checked.
    fn authenticate_client_deferred(
        &self,
        form: &HashMap<String, String>,
        basic: Option<(String, String)>,
        token_url: &str,
    ) -> Result<(ClientRow, Option<AssertionUse>), OAuthError> {
        let get = |k: &str| form.get(k).map(String::as_str).filter(|v| !v.is_empty());
        if let Some(assertion) = get("client_assertion") {
            if get("client_assertion_type") != Some(JWT_BEARER) {
                return Err(OAuthError::InvalidClient("unsupported client_assertion_type"));
            }
            return self
                .verify_assertion(assertion, get("client_id"), token_url)
                .map(|(c, used)| (c, Some(used)));
        }
        let (client_id, secret) = match (&basic, get("client_id")) {
            (Some((id, secret)), _) => (id.as_str(), Some(secret.as_str())),
            (None, Some(id)) => (id, get("client_secret")),
            (None, None) => return Err(OAuthError::InvalidClient("client authentication is required")),
        };
        let client = self
            .store
            .auth_client(client_id)?
            .filter(|c| !c.disabled)
            .ok_or(OAuthError::InvalidClient("client authentication failed"))?;
        match (&client.secret_hash, secret) {
            (Some(hash), Some(secret)) if verify_password(secret, hash) => Ok((client, None)),
            (None, None) if client.client_type == "public" => Ok((client, None)),
            _ => Err(OAuthError::InvalidClient("client authentication failed")),
        }
    }

    fn client_keys(&self, client: &ClientRow) -> Result<Value, OAuthError> {
        if let Some(jwks) = &client.jwks {
            return serde_json::from_str(jwks).map_err(|_| OAuthError::InvalidClient("the client's JWKS is invalid"));
        }
        let Some(uri) = &client.jwks_uri else {
            return Err(OAuthError::InvalidClient("the client has no registered keys"));
        };
        if let Some((at, keys)) = self.jwks_by_uri.lock().unwrap_or_else(|p| p.into_inner()).get(uri) {
            if at.elapsed() < JWKS_URI_CACHE {
                return Ok(keys.clone());
            }
        }
        // the blocking HTTP client must not run inside the server's async runtime
        let (http, url) = (self.http.clone(), uri.clone());
        let fetched = std::thread::spawn(move || -> Option<Value> {
            let resp = http.get(&url).send().ok()?;
            if !resp.status().is_success() {
                return None;
            }
            serde_json::from_slice(&resp.bytes().ok()?).ok()
        })
        .join()
        .ok()
        .flatten()
        .ok_or(OAuthError::InvalidClient("the client's jwks_uri could not be read"))?;
        self.jwks_by_uri
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uri.clone(), (Instant::now(), fetched.clone()));
        Ok(fetched)
    }

    fn verify_assertion(
        &self,
        assertion: &str,
        form_client: Option<&str>,
        token_url: &str,
    ) -> Result<(ClientRow, AssertionUse), OAuthError> {
        let bad = OAuthError::InvalidClient("the client assertion is not valid");
        let header = jsonwebtoken::decode_header(assertion)
            .map_err(|_| OAuthError::InvalidClient("malformed client assertion"))?;
        if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
            return Err(OAuthError::InvalidClient(
                "client assertions must be signed with RS384 or ES384",
            ));
        }
        // who claims to sign: read before verifying, to find the key; verified below
        let unverified: Value = assertion
            .split('.')
            .nth(1)
            .and_then(|p| B64.decode(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(OAuthError::InvalidClient("malformed client assertion"))?;
        let client_id = unverified["iss"]
            .as_str()
            .ok_or(OAuthError::InvalidClient("the assertion has no iss"))?;
        if form_client.is_some_and(|c| c != client_id) {
            return Err(bad);
        }
        let client = self
            .store
            .auth_client(client_id)?
            .filter(|c| !c.disabled && c.client_type == "confidential")
            .ok_or(OAuthError::InvalidClient("client authentication failed"))?;
        // a `jku` names where the signing key lives: only the client's registered JWKS URL may
        // (it is never fetched from the header: that would let anyone name a key, and reach
        // any address from this server)
        if let Some(jku) = &header.jku {
            if client.jwks_uri.as_deref() != Some(jku.as_str()) {
                return Err(OAuthError::InvalidClient(
                    "the assertion's jku is not the client's registered JWKS URL",
                ));
            }
        }
        let keys = self.client_keys(&client)?;
        let candidates: Vec<&Value> = keys["keys"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|k| header.kid.is_none() || k["kid"].as_str() == header.kid.as_deref())
                    .collect()
            })
            .unwrap_or_default();
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[client_id]);
        validation.set_audience(&[token_url]);
        validation.sub = Some(client_id.to_string());
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        let mut claims = None;
        for key in candidates {
            let Ok(jwk) = serde_json::from_value::<jsonwebtoken::jwk::Jwk>(key.clone()) else {
                continue;
            };
            let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            if let Ok(data) = jsonwebtoken::decode::<Value>(assertion, &decoding, &validation) {
                claims = Some(data.claims);
                break;
            }
        }
        let claims = claims.ok_or(bad)?;
        let exp = claims["exp"]
            .as_i64()
            .ok_or(OAuthError::InvalidClient("the assertion has no exp"))?;
        if exp > now_ts() + ASSERTION_MAX_SECS {
            return Err(OAuthError::InvalidClient(
                "the assertion expires more than five minutes ahead",
            ));
        }
        let jti = claims["jti"]
            .as_str()
            .filter(|j| !j.is_empty())
            .ok_or(OAuthError::InvalidClient("the assertion has no jti"))?;
        let used = AssertionUse {
            client_id: client_id.to_string(),
            jti: jti.to_string(),
            exp,
        };
        Ok((client, used))
    }

    /// The token endpoint.
    pub fn token(
        &self,
        form: &HashMap<String, String>,
        basic: Option<(String, String)>,
        token_url: &str,
        is_type: &dyn Fn(&str) -> bool,
    ) -> Result<Issued, OAuthError> {
        let get = |k: &str| form.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let grant = get("grant_type").ok_or(OAuthError::InvalidRequest("grant_type is required"))?;
        if !matches!(grant, "authorization_code" | "refresh_token" | "client_credentials") {
            return Err(OAuthError::UnsupportedGrantType);
        }
        let (client, assertion) = self.authenticate_client_deferred(form, basic, token_url)?;
        // a backend service's scopes are checked before its assertion is spent: a refused scope
        // is `invalid_scope`, a replayed assertion `invalid_client` whatever it asks
        if grant == "client_credentials" {
            backend_scopes_acceptable(get("scope").unwrap_or(""), &client, is_type)?;
        }
        if let Some(used) = assertion {
            self.first_use(&used)?;
        }
        match grant {
            "authorization_code" => self.redeem_code(&client, form),
            "refresh_token" => self.refresh(&client, form),
            _ => self.client_credentials(&client, form),
        }
    }

    fn redeem_code(&self, client: &ClientRow, form: &HashMap<String, String>) -> Result<Issued, OAuthError> {
        let get = |k: &str| form.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let code = get("code").ok_or(OAuthError::InvalidRequest("code is required"))?;
        let verifier = get("code_verifier").ok_or(OAuthError::InvalidRequest("code_verifier is required"))?;
        let row = self
            .store
            .auth_code_take(&secret_hash(code))?
            .ok_or(OAuthError::InvalidGrant("the code is unknown, used or expired"))?;
        if row.client_id != client.client_id {
            return Err(OAuthError::InvalidGrant("the code was issued to another client"));
        }
        if get("redirect_uri") != Some(row.redirect_uri.as_str()) {
            return Err(OAuthError::InvalidGrant(
                "redirect_uri does not match the authorization request",
            ));
        }
        if !(43..=128).contains(&verifier.len())
            || B64.encode(Sha256::digest(verifier.as_bytes())) != row.code_challenge
        {
            return Err(OAuthError::InvalidGrant(
                "code_verifier does not match the code_challenge",
            ));
        }
        let user = self
            .store
            .auth_user(&row.user_id)?
            .filter(|u| !u.disabled)
            .ok_or(OAuthError::InvalidGrant("the user's account is disabled"))?;
        let amr: Vec<String> = row.amr.split_whitespace().map(str::to_string).collect();
        let scopes = ScopeSet::parse(&row.scope, |_| true);
        let mut body = self.access_token_body(client, &user, &row.scope, row.patient.as_deref(), &amr)?;
        if let Some(enc) = &row.encounter {
            body["encounter"] = json!(enc);
        }
        if scopes.offline_access || scopes.online_access {
            let refresh = new_secret();
            let now = crate::store::now();
            let absolute = now + chrono::Duration::seconds(self.settings.refresh_absolute_secs);
            self.store.auth_refresh_add(&RefreshRow {
                token_hash: secret_hash(&refresh),
                family_id: uuid::Uuid::new_v4().to_string(),
                client_id: client.client_id.clone(),
                user_id: Some(user.id.clone()),
                scope: row.scope.clone(),
                patient: row.patient.clone(),
                encounter: row.encounter.clone(),
                amr: row.amr.clone(),
                status: "active".into(),
                issued_at: now,
                idle_expires_at: (now + chrono::Duration::seconds(self.settings.refresh_idle_secs)).min(absolute),
                family_expires_at: absolute,
            })?;
            body["refresh_token"] = json!(refresh);
        }
        if scopes.openid && (scopes.fhir_user || scopes.profile) {
            let now = now_ts();
            let mut claims = json!({
                "iss": self.issuer.issuer(), "sub": user.id, "aud": client.client_id,
                "iat": now, "exp": now + self.settings.access_token_secs,
                "auth_time": row.auth_time.and_utc().timestamp(), "amr": amr,
                "preferred_username": user.username,
            });
            if let Some(f) = &user.fhir_user {
                claims["fhirUser"] = json!(f);
            }
            if let Some(n) = &row.nonce {
                claims["nonce"] = json!(n);
            }
            body["id_token"] = json!(self.issuer.sign(&claims, "JWT")?);
        }
        Ok(Issued {
            body,
            client_id: client.client_id.clone(),
            subject: user.id.clone(),
            fhir_user: user.fhir_user.clone(),
            patient: row.patient,
            event: "token-issue",
        })
    }

    fn access_token_body(
        &self,
        client: &ClientRow,
        user: &UserRow,
        scope: &str,
        patient: Option<&str>,
        amr: &[String],
    ) -> Result<Value, OAuthError> {
        let expires_in = self.settings.access_token_secs.min(self.issuer.max_lifetime());
        let token = self.issuer.issue(&TokenRequest {
            scope: scope.to_string(),
            patient: patient.map(str::to_string),
            fhir_user: user.fhir_user.clone(),
            client_id: Some(client.client_id.clone()),
            subject: Some(user.id.clone()),
            expires_in,
            amr: amr.to_vec(),
            roles: user.roles.split_whitespace().map(str::to_string).collect(),
            purpose_of_use: None,
            btg_reason: None,
        })?;
        self.note_client_use(&client.client_id);
        let mut body = json!({
            "access_token": token, "token_type": "Bearer", "expires_in": expires_in, "scope": scope,
        });
        if let Some(p) = patient {
            body["patient"] = json!(p);
            // a practitioner working on a patient should see who it is; a patient knows
            body["need_patient_banner"] = json!(own_patient(user).is_none());
        }
        Ok(body)
    }

    fn refresh(&self, client: &ClientRow, form: &HashMap<String, String>) -> Result<Issued, OAuthError> {
        let presented = form
            .get("refresh_token")
            .filter(|v| !v.is_empty())
            .ok_or(OAuthError::InvalidRequest("refresh_token is required"))?;
        let hash = secret_hash(presented);
        // a token presented by another client is refused before it is spent
        match self.store.auth_refresh(&hash)? {
            Some(row) if row.client_id == client.client_id => {}
            _ => return Err(OAuthError::InvalidGrant("the refresh token is not valid")),
        }
        let next = new_secret();
        let row = match self
            .store
            .auth_refresh_use(&hash, &secret_hash(&next), self.settings.refresh_idle_secs)?
        {
            RefreshUse::Rotated(row) => *row,
            RefreshUse::Replayed { .. } => {
                return Err(OAuthError::InvalidGrant(
                    "the refresh token was already used: every token of its grant is revoked",
                ))
            }
            RefreshUse::Invalid => return Err(OAuthError::InvalidGrant("the refresh token is not valid")),
        };
        let user_id = row.user_id.clone().unwrap_or_default();
        let Some(user) = self.store.auth_user(&user_id)?.filter(|u| !u.disabled) else {
            self.store.auth_refresh_revoke_family(&row.family_id)?;
            return Err(OAuthError::InvalidGrant("the user's account is disabled"));
        };
        // a narrower scope may be asked for; never a wider one
        let scope = match form.get("scope").filter(|s| !s.is_empty()) {
            Some(asked) => {
                let granted: Vec<&str> = row.scope.split_whitespace().collect();
                if !asked.split_whitespace().all(|s| granted.contains(&s)) {
                    return Err(OAuthError::InvalidScope("a refresh cannot widen the grant"));
                }
                asked.clone()
            }
            None => row.scope.clone(),
        };
        let amr: Vec<String> = row.amr.split_whitespace().map(str::to_string).collect();
        let mut body = self.access_token_body(client, &user, &scope, row.patient.as_deref(), &amr)?;
        body["refresh_token"] = json!(next);
        if let Some(enc) = &row.encounter {
            body["encounter"] = json!(enc);
        }
        Ok(Issued {
            body,
            client_id: client.client_id.clone(),
            subject: user.id,
            fhir_user: user.fhir_user,
            patient: row.patient,
            event: "token-refresh",
        })
    }

    fn client_credentials(&self, client: &ClientRow, form: &HashMap<String, String>) -> Result<Issued, OAuthError> {
        if client.client_type != "confidential" {
            return Err(OAuthError::UnauthorizedClient(
                "client_credentials needs a confidential client",
            ));
        }
        let requested = form.get("scope").map(String::as_str).unwrap_or("");
        let scopes: Vec<&str> = allowed_scopes(requested, client)
            .into_iter()
            .filter(|s| is_context(s, "system"))
            .collect();
        if scopes.is_empty() {
            return Err(OAuthError::InvalidScope(
                "none of the requested system scopes is allowed to this client",
            ));
        }
        let scope = scopes.join(" ");
        let expires_in = self.settings.access_token_secs.min(self.issuer.max_lifetime());
        let token = self.issuer.issue(&TokenRequest {
            scope: scope.clone(),
            client_id: Some(client.client_id.clone()),
            subject: Some(client.client_id.clone()),
            expires_in,
            ..TokenRequest::default()
        })?;
        self.note_client_use(&client.client_id);
        Ok(Issued {
            body: json!({"access_token": token, "token_type": "Bearer", "expires_in": expires_in, "scope": scope}),
            client_id: client.client_id.clone(),
            subject: client.client_id.clone(),
            fhir_user: None,
            patient: None,
            event: "token-issue",
        })
    }

    /// Records that a client was issued a token (for the access review), once an hour.
    fn note_client_use(&self, client_id: &str) {
        const EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
        {
            let mut noted = self.client_use_noted.lock().unwrap_or_else(|p| p.into_inner());
            if noted.get(client_id).is_some_and(|at| at.elapsed() < EVERY) {
                return;
            }
            noted.insert(client_id.to_string(), Instant::now());
        }
        if let Err(e) = self.store.auth_client_used(client_id) {
            tracing::warn!(error = %e, "recording a client's last token failed");
            self.client_use_noted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(client_id);
        }
    }

    /// RFC 7662: what a token is, to an authenticated client (or the bearer of a valid token).
    pub fn introspect(&self, token: &str, is_type: impl Fn(&str) -> bool) -> Result<Introspection, OAuthError> {
        if let Ok(p) = self.issuer.authenticate(token, is_type) {
            if self.revoked.is_revoked(&p.token_id) {
                return Ok(Introspection {
                    body: json!({"active": false}),
                    client_id: None,
                });
            }
            let mut body = json!({
                "active": true, "token_type": "Bearer", "scope": p.scopes.raw.join(" "),
                "sub": p.subject, "exp": p.expires_at, "iss": self.issuer.issuer(),
                "aud": self.issuer.audience(), "jti": p.token_id,
            });
            if let Some(c) = &p.client_id {
                body["client_id"] = json!(c);
            }
            if let Some(pt) = &p.patient {
                body["patient"] = json!(pt);
            }
            if let Some(f) = &p.fhir_user {
                body["fhirUser"] = json!(f);
            }
            return Ok(Introspection {
                body,
                client_id: p.client_id.clone(),
            });
        }
        let now = crate::store::now();
        match self.store.auth_refresh(&secret_hash(token))? {
            Some(r) if r.status == "active" && r.idle_expires_at >= now && r.family_expires_at >= now => {
                let mut body = json!({
                    "active": true, "token_type": "refresh_token", "scope": r.scope, "client_id": r.client_id,
                    "exp": r.idle_expires_at.and_utc().timestamp(), "iss": self.issuer.issuer(),
                });
                if let Some(u) = &r.user_id {
                    body["sub"] = json!(u);
                }
                Ok(Introspection {
                    body,
                    client_id: Some(r.client_id),
                })
            }
            _ => Ok(Introspection {
                body: json!({"active": false}),
                client_id: None,
            }),
        }
    }

    /// RFC 7009: revokes a refresh token (and its grant) or an access token of this client.
    /// Unknown tokens and other clients' tokens are answered the same (success, nothing done).
    pub fn revoke(&self, client: &ClientRow, token: &str, is_type: impl Fn(&str) -> bool) -> Result<bool, OAuthError> {
        if let Some(r) = self.store.auth_refresh(&secret_hash(token))? {
            if r.client_id == client.client_id {
                self.store.auth_refresh_revoke_family(&r.family_id)?;
                return Ok(true);
            }
            return Ok(false);
        }
        if let Ok(p) = self.issuer.authenticate(token, is_type) {
            if p.client_id.as_deref() == Some(client.client_id.as_str()) {
                self.store.auth_revoke_access_token(&p.token_id, at(p.expires_at))?;
                self.revoked.add(&p.token_id, p.expires_at);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The OpenID Connect userinfo of an access token's user.
    pub fn userinfo(&self, principal: &super::Principal) -> Result<Value, OAuthError> {
        if !principal.scopes.openid {
            return Err(OAuthError::InvalidToken);
        }
        let user = self
            .store
            .auth_user(&principal.subject)?
            .filter(|u| !u.disabled)
            .ok_or(OAuthError::InvalidToken)?;
        let mut body = json!({"sub": user.id, "preferred_username": user.username});
        if let Some(f) = &user.fhir_user {
            body["fhirUser"] = json!(f);
        }
        Ok(body)
    }
}

/// A user to add (`fhirvault admin user add`, the first-run bootstrap).
pub fn new_user(
    username: &str,
    password: &str,
    fhir_user: Option<String>,
    roles: &[String],
) -> Result<NewUser, OAuthError> {
    Ok(NewUser {
        id: uuid::Uuid::new_v4().to_string(),
        username: username.to_string(),
        password_hash: hash_password(password)?,
        fhir_user,
        roles: roles.join(" "),
        totp_secret: None,
    })
}

/// A launch value for an EHR launch (`fhirvault admin launch`): the value, and its row.
pub fn new_launch(
    patient: Option<String>,
    encounter: Option<String>,
    client_id: Option<String>,
    expires_in: i64,
) -> (String, LaunchRow) {
    let value = new_secret();
    let row = LaunchRow {
        launch_hash: secret_hash(&value),
        patient,
        encounter,
        client_id,
        expires_at: crate::store::now() + chrono::Duration::seconds(expires_in),
    };
    (value, row)
}

/// The scopes a client's description prints as (for pages): plain words per scope.
pub fn describe_scope(scope: &str) -> String {
    match scope {
        "openid" => return "Confirm who you are to the application".into(),
        "fhirUser" => return "Tell the application which FHIR user you are".into(),
        "profile" => return "Tell the application your user profile".into(),
        "launch" => return "Use the context the EHR launched it in".into(),
        "launch/patient" => return "Work with the patient you choose".into(),
        "offline_access" => return "Keep access after you sign out (until revoked)".into(),
        "online_access" => return "Keep access while you are signed in".into(),
        _ => {}
    }
    let Some(r) = ScopeSet::parse(scope, |_| true).resources.into_iter().next() else {
        return scope.to_string();
    };
    let mut verbs = Vec::new();
    let p = r.permissions;
    for (on, word) in [
        (p.create, "create"),
        (p.read, "read"),
        (p.update, "update"),
        (p.delete, "delete"),
        (p.search, "search"),
    ] {
        if on {
            verbs.push(word);
        }
    }
    let what = r.resource_type.unwrap_or_else(|| "all resource types".into());
    let whose = match r.context {
        Context::Patient => "of the selected patient",
        Context::User => "you may access",
        Context::System => "on the whole server",
    };
    // a granular scope names its condition plainly: "… Observation, only where category is
    // laboratory (http://terminology.hl7.org/CodeSystem/observation-category) …"
    let conditions: Vec<String> = r
        .constraints
        .iter()
        .map(|(param, value)| {
            let value: String = percent_encoding::percent_decode_str(value)
                .decode_utf8_lossy()
                .into_owned();
            let values: Vec<String> = value
                .split(',')
                .map(|v| match v.rsplit_once('|') {
                    Some((system, code)) if !system.is_empty() && !code.is_empty() => format!("{code} ({system})"),
                    _ => v.trim_matches('|').to_string(),
                })
                .collect();
            format!("{param} is {}", values.join(" or "))
        })
        .collect();
    let constrained = if conditions.is_empty() {
        String::new()
    } else {
        format!(", only where {}", conditions.join(" and "))
    };
    format!("{} {what} {whose}{constrained}", capitalize(&verbs.join(", ")))
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Rows for `admin client list`: one line per client.
pub fn client_summary(c: &ClientRow) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    m.insert("client_id", c.client_id.clone());
    m.insert("name", c.name.clone());
    m.insert("type", c.client_type.clone());
    m.insert("status", if c.disabled { "disabled" } else { "active" }.into());
    m.insert(
        "auth",
        match (&c.secret_hash, &c.jwks, &c.jwks_uri) {
            (_, Some(_), _) | (_, _, Some(_)) => "private_key_jwt",
            (Some(_), _, _) => "client_secret",
            _ => "none (PKCE)",
        }
        .into(),
    );
    m.insert("redirect_uris", c.redirect_uris.lines().collect::<Vec<_>>().join(" "));
    m.insert("scopes", c.scopes.clone());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_scopes_cover_narrower_requests_only() {
        let allowed = ["patient/*.rs", "user/Observation.read", "openid", "launch/patient"];
        assert!(covered("patient/Observation.rs", &allowed));
        assert!(covered("patient/Observation.r", &allowed));
        assert!(covered("patient/*.read", &allowed));
        assert!(covered(
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
            &allowed
        ));
        assert!(covered("user/Observation.s", &allowed));
        assert!(covered("openid", &allowed));
        assert!(!covered("patient/Observation.cruds", &allowed));
        assert!(!covered("user/Patient.r", &allowed));
        assert!(!covered("system/*.rs", &allowed));
        assert!(!covered("fhirUser", &allowed));
        assert!(!covered("offline_access", &allowed));
    }

    #[test]
    fn totp_codes_match_rfc_6238_and_a_step_either_side() {
        // RFC 6238 appendix B, SHA-1 key, T = 59 s → 94287082 (eight digits; six: 287082)
        let secret = b"12345678901234567890";
        assert_eq!(totp_step(secret, "287082", 59), Some(1));
        assert_eq!(totp_step(secret, "287082", 89), Some(1));
        assert_eq!(totp_step(secret, "287082", 150), None);
        assert_eq!(totp_step(secret, "28708", 59), None);
        assert_eq!(totp_step(secret, "abcdef", 59), None);
        let (text, uri) = totp_enrolment("dr who", secret);
        assert_eq!(text, "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        assert!(uri.starts_with("otpauth://totp/fhirvault:dr+who?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&"));
    }

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        assert!(!verify_password("x", "not a hash"));
        assert_eq!(generate_password().len(), 20);
    }

    #[test]
    fn scope_descriptions_are_plain_words() {
        assert_eq!(
            describe_scope("patient/Observation.rs"),
            "Read, search Observation of the selected patient"
        );
        assert_eq!(
            describe_scope("user/*.cruds"),
            "Create, read, update, delete, search all resource types you may access"
        );
        assert_eq!(describe_scope("launch/patient"), "Work with the patient you choose");
        assert_eq!(
            describe_scope(
                "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category%7Claboratory"
            ),
            "Read, search Observation of the selected patient, only where category is laboratory \
             (http://terminology.hl7.org/CodeSystem/observation-category)"
        );
        assert_eq!(
            describe_scope("user/Condition.rs?category=problem-list-item,health-concern&clinical-status=active"),
            "Read, search Condition you may access, only where category is problem-list-item or health-concern \
             and clinical-status is active"
        );
    }
}
