//! Authentication and authorization: bearer tokens turned into a [`Principal`], SMART scopes
//! ([`scope`]), and the policy that decides each interaction ([`policy`]).
//!
//! What is enforced today, and how it fails closed where the machinery is not built yet:
//! * every FHIR endpoint but `metadata` needs a valid bearer token from the built-in issuer;
//! * resource scopes decide by resource type and interaction (SMART v2 letters, v1 words);
//! * a `patient/` scope reaches the patient's compartment (official CompartmentDefinition),
//!   decided on the resource content for reads and writes (old and new content alike), and on
//!   the stored `resource_compartments` of each version for listings (filtered in the query);
//! * in a patient's context, the shared types (`shared_resource_types`) are readable where a
//!   resource lies in nobody's compartment;
//! * SMART v2 granular scopes (`patient/Observation.rs?category=…|laboratory`) grant only what
//!   their filter admits (`crate::search::granular`): in the query for searches and `$everything`
//!   and Bulk export, on the content for reads, includes, history and writes. A condition the
//!   server cannot evaluate (not a token parameter, a `*` type) grants nothing; so do granular
//!   scopes where a listing cannot apply them (system history, chains through such a type).

pub mod alert;
pub mod attributes;
pub mod console;
pub mod issuer;
pub mod limiter;
pub mod oidc;
pub mod policy;
pub mod scope;
pub mod server;

pub use issuer::{Issuer, TokenRequest};
pub use scope::{Context, Permission, ScopeSet};

/// Verified tokens by SHA-256 of their text, until they expire: an ECDSA or RSA verification
/// costs more than the read it guards, so each token is verified once.
#[derive(Debug, Default)]
pub struct TokenCache {
    entries: std::sync::Mutex<std::collections::HashMap<[u8; 32], std::sync::Arc<Principal>>>,
}

const TOKEN_CACHE_MAX: usize = 10_000;

impl TokenCache {
    pub fn key(token: &str) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(token.as_bytes()).into()
    }

    /// The principal of a token verified before, if it has not expired since.
    pub fn get(&self, key: &[u8; 32], now: i64) -> Option<std::sync::Arc<Principal>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(key).filter(|p| p.expires_at > now).cloned()
    }

    pub fn insert(&self, key: [u8; 32], principal: std::sync::Arc<Principal>, now: i64) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= TOKEN_CACHE_MAX {
            entries.retain(|_, p| p.expires_at > now);
            if entries.len() >= TOKEN_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(key, principal);
    }
}

/// The fixed, token-free reason for a JWT that did not verify.
pub fn jwt_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    AuthError::InvalidToken(match e.kind() {
        K::ExpiredSignature => "token expired",
        K::ImmatureSignature => "token not yet valid",
        K::InvalidIssuer => "wrong issuer",
        K::InvalidAudience => "wrong audience",
        K::InvalidSignature => "bad signature",
        K::InvalidAlgorithm => "unexpected signing algorithm",
        K::MissingRequiredClaim(_) => "missing required claim",
        _ => "malformed token",
    })
}

/// What a token grants, kept beyond the token: a subscription's notifications are filtered by
/// the grant of the client that wrote it, as it stands at each delivery (the scopes recorded
/// here, the client and user still enabled, the token not revoked).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    pub subject: String,
    /// `system`, `user` or `patient`.
    pub kind: String,
    pub scopes: String,
    pub patient: Option<String>,
    pub fhir_user: Option<String>,
    pub client_id: Option<String>,
    pub roles: Vec<String>,
    /// The token it was granted with (a revocation of it withdraws the grant).
    pub token_id: String,
}

impl Grant {
    pub fn of(p: &Principal) -> Grant {
        Grant {
            subject: p.subject.clone(),
            kind: match p.kind {
                PrincipalKind::System => "system",
                PrincipalKind::User => "user",
                PrincipalKind::Patient => "patient",
            }
            .into(),
            scopes: p.scopes.raw.join(" "),
            patient: p.patient.clone(),
            fhir_user: p.fhir_user.clone(),
            client_id: p.client_id.clone(),
            roles: p.roles.clone(),
            token_id: p.token_id.clone(),
        }
    }

    pub fn to_json(&self) -> String {
        // a struct of strings always serializes
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(json: &str) -> Option<Grant> {
        serde_json::from_str(json).ok()
    }

    /// The principal the grant acts as (granular scope filters compiled against `registry`;
    /// never break-glass).
    pub fn principal(&self, registry: &crate::search::Registry, is_type: impl Fn(&str) -> bool) -> Principal {
        let mut scopes = ScopeSet::parse(&self.scopes, is_type);
        scopes.compile_filters(registry);
        Principal {
            subject: self.subject.clone(),
            kind: match self.kind.as_str() {
                "system" => PrincipalKind::System,
                "user" => PrincipalKind::User,
                _ => PrincipalKind::Patient,
            },
            scopes,
            patient: self.patient.clone(),
            fhir_user: self.fhir_user.clone(),
            client_id: self.client_id.clone(),
            amr: Vec::new(),
            roles: self.roles.clone(),
            break_glass: false,
            purpose_of_use: None,
            token_id: self.token_id.clone(),
            expires_at: 0,
        }
    }
}

/// Who a request acts for, from a validated token.
#[derive(Debug, Clone)]
pub struct Principal {
    pub subject: String,
    pub kind: PrincipalKind,
    pub scopes: ScopeSet,
    /// The launch patient (SMART `patient` claim).
    pub patient: Option<String>,
    pub fhir_user: Option<String>,
    pub client_id: Option<String>,
    pub amr: Vec<String>,
    /// Roles from the token (`roles` claim), for attribute-level rules.
    pub roles: Vec<String>,
    /// A declared emergency access (purpose of use BTG, with a reason, within its window):
    /// widens the patient-compartment check only, and is logged as an alert on every use.
    pub break_glass: bool,
    /// Declared purpose of use (a v3 ActReason code such as TREAT or BTG), for the audit record.
    pub purpose_of_use: Option<String>,
    pub token_id: String,
    pub expires_at: i64,
}

impl Principal {
    /// Whether the token says the user authenticated with more than one factor.
    pub fn has_mfa(&self) -> bool {
        self.amr.iter().any(|m| matches!(m.as_str(), "mfa" | "otp" | "hwk"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    Patient,
    User,
    System,
}

/// Errors of authentication and authorization. Texts are fixed: never a token, never PHI.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("authentication required")]
    Missing,
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
    /// The token is valid but its scopes do not allow the interaction.
    #[error("insufficient scope")]
    InsufficientScope,
    /// Allowed by type, but the resource is outside the token's rights: answered as absent,
    /// so that a token cannot learn which resources exist.
    #[error("not found")]
    Hidden,
    /// A user token without multi-factor authentication where policy requires it.
    #[error("multi-factor authentication required")]
    InsufficientAuthentication,
    /// Too many failed authentications from this address.
    #[error("too many failed authentications")]
    TooManyFailures { retry_after: u64 },
    #[error("auth setup: {0}")]
    Setup(String),
}
