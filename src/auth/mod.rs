//! Authentication and authorization: bearer tokens turned into a [`Principal`], SMART scopes
//! ([`scope`]), and the policy that decides each interaction ([`policy`]).
//!
//! What is enforced today, and how it fails closed where the machinery is not built yet:
//! * every FHIR endpoint but `metadata` needs a valid bearer token from the built-in issuer;
//! * resource scopes decide by resource type and interaction (SMART v2 letters, v1 words);
//! * a `patient/` scope reaches the patient's compartment (official CompartmentDefinition),
//!   decided on the resource content for reads and writes (old and new content alike), and on
//!   the stored `resource_compartments` of each version for listings (filtered in the query);
//! * granular scopes (`?category=…`) grant nothing until search can evaluate them.

pub mod attributes;
pub mod issuer;
pub mod limiter;
pub mod oidc;
pub mod policy;
pub mod scope;

pub use issuer::{Issuer, TokenRequest};
pub use scope::{Context, Permission, ScopeSet};

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
