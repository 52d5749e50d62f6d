//! The HTTP edge: thin actix handlers that parse a request into one interaction, make one call
//! into the domain, and shape the response. Errors leave as OperationOutcome (see [`error`]).

pub mod audit;
mod bundle;
mod console;
pub mod crud;
pub mod discovery;
pub mod docs;
pub mod error;
mod export;
pub mod history;
pub mod metadata;
mod negotiate;
pub mod ops;
mod pages;
pub mod route;
pub mod search;
mod sign_in;
pub mod smart;
mod subscriptions;
pub mod trail;
mod validate;

pub use error::ApiError;
pub use negotiate::{Format, Prefer};

use crate::config::Config;
use crate::fhir::{IssueType, OperationOutcome, Validator};
use crate::store::Store;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, DefaultHeaders, ErrorHandlerResponse, ErrorHandlers, Next};
use actix_web::{web, App, HttpRequest, HttpResponse};
use chrono::NaiveDateTime;
use futures_util::FutureExt;
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// Everything a handler needs, shared by all workers.
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub validator: Arc<Validator>,
    /// StructureDefinition validation (R4 and the loaded profiles), compiled once.
    pub structures: Arc<crate::fhir::structure::StructureValidator>,
    pub issuer: Arc<crate::auth::Issuer>,
    pub compartment: Arc<crate::fhir::compartment::PatientCompartment>,
    /// The search parameters (R4, the guides', those stored through the API): `current()`.
    pub search: Arc<crate::search::live::LiveRegistry>,
    pub attributes: Arc<crate::auth::attributes::AttributePolicy>,
    pub providers: crate::auth::oidc::Providers,
    pub auth_failures: crate::auth::limiter::FailureLimiter,
    /// Requests per client per minute (`rate_limit_per_minute`), when limited.
    pub request_limit: Option<crate::auth::limiter::FailureLimiter>,
    pub resource_types: HashSet<String>,
    /// The audit ledger every request records through.
    pub auditor: Arc<crate::audit::Auditor>,
    /// The built-in SMART authorization server (`auth_server`; set by `server::build_state`).
    pub auth_server: Option<Arc<crate::auth::server::AuthServer>>,
    /// Bulk Data export jobs (their runners are started by `server::build_state`).
    pub exporter: Arc<crate::bulk::Exporter>,
    /// The subscriptions every write is matched against (set as the store's watch).
    pub subscriptions: Arc<crate::subscription::Subscriptions>,
    /// This node's notification delivery (started by `server::build_state` when serving).
    pub delivery: Option<Arc<crate::subscription::deliver::Delivery>>,
    /// Request counters and latency histograms (`/metrics`).
    pub metrics: ops::Metrics,
    /// The CapabilityStatement, rendered at start-up and again when the search parameters change.
    pub capability: std::sync::RwLock<metadata::Rendered>,
    /// The OpenAPI document, rendered on first request and again when the search parameters change.
    pub openapi: std::sync::RwLock<Option<metadata::Rendered>>,
    /// SQLite: the lock that keeps a second server process off this database (held while the
    /// state lives; set by `server::build_state`).
    pub single_node: Option<Arc<std::fs::File>>,
    /// Set when the node was asked to stop (SIGTERM): `/readyz` fails so that load balancers
    /// send no new requests, while requests keep being served until the drain delay ends.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        store: Arc<Store>,
        validator: Arc<Validator>,
        issuer: Arc<crate::auth::Issuer>,
        compartment: Arc<crate::fhir::compartment::PatientCompartment>,
        attributes: Arc<crate::auth::attributes::AttributePolicy>,
        providers: crate::auth::oidc::Providers,
        auditor: Arc<crate::audit::Auditor>,
        search: Arc<crate::search::live::LiveRegistry>,
        structures: Arc<crate::fhir::structure::StructureValidator>,
    ) -> AppState {
        let resource_types: HashSet<String> = validator.resource_types().map(str::to_string).collect();
        let exporter = crate::bulk::Exporter::new(
            store.clone(),
            search.clone(),
            attributes.clone(),
            config.clone(),
            validator.clone(),
        );
        let auth_failure_limit = config.auth_failure_limit;
        let rate_limit = config.rate_limit_per_minute;
        let registry = search.current();
        let capability = metadata::capability_statement(&config, &providers, &validator, &registry, &structures);
        let subscriptions = Arc::new(crate::subscription::Subscriptions::default());
        store.set_watch(subscriptions.clone());
        AppState {
            subscriptions,
            delivery: None,
            config,
            store,
            validator,
            structures,
            issuer,
            compartment,
            search,
            attributes,
            providers,
            auth_failures: crate::auth::limiter::FailureLimiter::new(auth_failure_limit),
            request_limit: (rate_limit > 0)
                .then(|| crate::auth::limiter::FailureLimiter::new(rate_limit.min(u32::MAX as u64) as u32)),
            resource_types,
            auditor,
            auth_server: None,
            exporter,
            metrics: ops::Metrics::default(),
            capability: std::sync::RwLock::new(metadata::Rendered {
                registry: Arc::as_ptr(&registry) as usize,
                bytes: Arc::new(serde_json::to_vec(&capability).expect("CapabilityStatement serializes")),
            }),
            openapi: Default::default(),
            single_node: None,
            draining: Default::default(),
        }
    }

    /// What reading a Subscription resource needs (its search against the registry current now).
    pub fn subscription_context<'a>(
        &'a self,
        registry: &'a crate::search::Registry,
        is_type: &'a dyn Fn(&str) -> bool,
    ) -> crate::subscription::SpecContext<'a> {
        crate::subscription::SpecContext {
            registry,
            cipher: self.store.cipher(),
            is_type,
            full_resource_allowed: self.config.subscription_full_resource,
            allowed_networks: &self.config.subscription_allowed_networks,
        }
    }

    /// Rebuilds this node's active subscriptions (after a write of one here).
    pub fn refresh_subscriptions(&self) {
        let registry = self.search.current();
        let is_type = |t: &str| self.validator.is_resource_type(t);
        if let Err(e) = self
            .subscriptions
            .refresh(&self.store, &self.subscription_context(&registry, &is_type))
        {
            tracing::warn!(error = %e, "reading the stored Subscriptions failed");
        }
    }

    /// Checks `{type}` against the R4 resource types (an unknown type is a 404, as in HAPI).
    pub fn resource_type<'a>(&self, name: &'a str) -> Result<&'a str, ApiError> {
        if self.resource_types.contains(name) {
            Ok(name)
        } else {
            Err(ApiError::NotFound("unknown resource type"))
        }
    }

    /// A principal whose SMART v2 granular scopes are compiled against this server's search
    /// parameters (until then they grant nothing); others are returned as they are.
    fn with_scope_filters(&self, p: Arc<crate::auth::Principal>) -> Arc<crate::auth::Principal> {
        if !p.scopes.any_granular() {
            return p;
        }
        let mut compiled = (*p).clone();
        compiled.scopes.compile_filters(&self.search.current());
        Arc::new(compiled)
    }

    /// Validates the request's bearer token and the authentication policy. Failures are logged
    /// (reason and client address, never the token) and counted per address; an address over
    /// the limit gets 429 without its token being looked at.
    pub fn authenticate(&self, req: &HttpRequest) -> Result<Arc<crate::auth::Principal>, ApiError> {
        use crate::auth::limiter::FailureKey;
        use crate::auth::AuthError;
        let peer = req.peer_addr().map(|a| a.ip());
        if let Some(retry_after) = peer.and_then(|ip| self.auth_failures.blocked(&FailureKey::Address(ip))) {
            return Err(AuthError::TooManyFailures { retry_after }.into());
        }
        let result = self.check_token(req).map(|p| self.with_scope_filters(p)).and_then(|p| {
            if self.config.require_mfa && p.kind == crate::auth::PrincipalKind::User && !p.has_mfa() {
                Err(AuthError::InsufficientAuthentication)
            } else {
                Ok(p)
            }
        });
        match result {
            Ok(p) => {
                if let Some(retry_after) = p
                    .client_id
                    .as_ref()
                    .and_then(|c| self.auth_failures.blocked(&FailureKey::Client(c.clone())))
                {
                    return Err(AuthError::TooManyFailures { retry_after }.into());
                }
                Ok(p)
            }
            Err(e) => {
                let failures = peer
                    .map(|ip| self.auth_failures.record_failure(FailureKey::Address(ip)))
                    .unwrap_or(0);
                tracing::warn!(
                    peer = %peer.map(|ip| ip.to_string()).unwrap_or_default(),
                    reason = %e,
                    failures_this_minute = failures,
                    "authentication failed"
                );
                Err(e.into())
            }
        }
    }

    /// Records a refused authorization (403) against the client and the address, and logs it
    /// without token or PHI: repeated probing of what a token may do is throttled like guessing.
    pub fn record_denial(&self, req: &HttpRequest, p: &crate::auth::Principal, interaction: &'static str) {
        use crate::auth::limiter::FailureKey;
        let peer = req.peer_addr().map(|a| a.ip());
        if let Some(ip) = peer {
            self.auth_failures.record_failure(FailureKey::Address(ip));
        }
        let by_client = p
            .client_id
            .as_ref()
            .map(|c| self.auth_failures.record_failure(FailureKey::Client(c.clone())))
            .unwrap_or(0);
        tracing::warn!(
            peer = %peer.map(|ip| ip.to_string()).unwrap_or_default(),
            client = %p.client_id.as_deref().unwrap_or(""),
            subject = %p.subject,
            interaction,
            failures_this_minute = by_client,
            "authorization refused"
        );
    }

    fn check_token(&self, req: &HttpRequest) -> Result<Arc<crate::auth::Principal>, crate::auth::AuthError> {
        use crate::auth::AuthError;
        let header = req.headers().get(header::AUTHORIZATION).ok_or(AuthError::Missing)?;
        let value = header
            .to_str()
            .map_err(|_| AuthError::InvalidToken("malformed Authorization header"))?;
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => token.trim(),
            _ => return Err(AuthError::InvalidToken("expected the Bearer scheme")),
        };
        let is_type = |t: &str| self.resource_types.contains(t);
        // The unverified issuer only picks who verifies; the verifier checks it again.
        match crate::auth::oidc::unverified_issuer(token) {
            Some(iss) if iss != self.issuer.issuer() => match self.providers.for_issuer(&iss) {
                Some(provider) => provider.authenticate(token, is_type),
                None => Err(AuthError::InvalidToken("wrong issuer")),
            },
            _ => {
                let p = self.issuer.authenticate(token, is_type)?;
                if self
                    .auth_server
                    .as_ref()
                    .is_some_and(|a| a.revoked.is_revoked(&p.token_id))
                {
                    return Err(AuthError::InvalidToken("token revoked"));
                }
                Ok(p)
            }
        }
    }

    /// The base URL used in `Location` and `fullUrl`: the configured public URL, else the
    /// request's scheme and host plus the FHIR base path.
    pub fn base_url(&self, req: &HttpRequest) -> String {
        match &self.config.public_url {
            Some(u) => u.clone(),
            None => {
                let info = req.connection_info();
                format!("{}://{}{}", info.scheme(), info.host(), self.config.base_path)
            }
        }
    }
}

/// `W/"<version>"`
pub fn etag(version_id: i64) -> String {
    format!("W/\"{version_id}\"")
}

/// RFC 7231 date for `Last-Modified`.
pub fn http_date(ts: &NaiveDateTime) -> String {
    let secs = ts.and_utc().timestamp().max(0) as u64;
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// Runs blocking (database, crypto) work off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    web::block(f).await?
}

/// Builds the application: the FHIR routes under the configured base path, middleware for
/// request ids and PHI-safe tracing, security headers, panic containment, and OperationOutcome
/// for every error, including those raised by actix itself (unknown route, bad method …).
pub fn app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let base = state.config.base_path.clone();
    let mut headers = DefaultHeaders::new()
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::CACHE_CONTROL, "no-store"))
        .add((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        ))
        .add((header::X_FRAME_OPTIONS, "DENY"))
        .add((header::REFERRER_POLICY, "no-referrer"));
    if state.config.tls.is_some() || state.config.behind_tls_proxy {
        // clients reach us over HTTPS only: browsers must not fall back to plaintext
        headers = headers.add((header::STRICT_TRANSPORT_SECURITY, "max-age=63072000; includeSubDomains"));
    }
    App::new()
        .app_data(state.clone())
        .app_data(web::PayloadConfig::new(state.config.max_body_bytes))
        .wrap(ErrorHandlers::new().default_handler(ensure_operation_outcome))
        .wrap(from_fn(contain_panics))
        .wrap(headers)
        .wrap(from_fn(request_id_header))
        .wrap(from_fn(ops::record))
        .wrap(tracing_actix_web::TracingLogger::<crate::telemetry::PhiSafeRootSpan>::new())
        .route("/healthz", web::get().to(ops::healthz))
        .route("/readyz", web::get().to(ops::readyz))
        .route("/metrics", web::get().to(ops::metrics))
        .route("/openapi.json", web::get().to(docs::openapi_json))
        .service(
            // Swagger UI loads its own scripts and styles (from here, never a CDN)
            web::scope("/docs")
                .wrap(DefaultHeaders::new().add((
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                     img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
                )))
                .route("", web::get().to(docs::to_docs_index))
                .service(docs::swagger_ui()),
        )
        // the discovery documents at the root and under the FHIR base (SMART clients look there)
        .configure(discovery::well_known)
        .route("/.well-known/jwks.json", web::get().to(discovery::jwks))
        .service(
            // the sign-in pages: one same-origin stylesheet, no scripts, never framed
            web::scope("/auth")
                .wrap(DefaultHeaders::new().add((
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; frame-ancestors 'none'",
                )))
                .route("/authorize", web::get().to(sign_in::authorize))
                .route("/login", web::post().to(sign_in::login))
                .route("/mfa", web::post().to(sign_in::mfa))
                .route("/mfa/enrol", web::post().to(sign_in::enrol))
                .route("/consent", web::get().to(sign_in::consent_search))
                .route("/consent", web::post().to(sign_in::consent))
                .route("/logout", web::post().to(sign_in::logout))
                .route("/token", web::post().to(smart::token))
                .route("/introspect", web::post().to(smart::introspect))
                .route("/revoke", web::post().to(smart::revoke))
                .route("/jwks", web::get().to(discovery::jwks))
                .route("/userinfo", web::get().to(smart::userinfo))
                .route("/userinfo", web::post().to(smart::userinfo))
                .route("/static/fhirvault.css", web::get().to(sign_in::stylesheet)),
        )
        .service(
            // the compliance console: server-rendered like the sign-in pages, the same discipline
            web::scope("/console")
                .wrap(DefaultHeaders::new().add((
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; \
                     form-action 'self'; frame-ancestors 'none'",
                )))
                .configure(console::routes),
        )
        .service(
            web::scope(&base)
                .configure(discovery::well_known)
                .default_service(web::to(route::dispatch)),
        )
        .default_service(web::to(not_found))
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such endpoint"))
}

/// A panic in a handler becomes a 500 OperationOutcome rather than a dropped connection.
async fn contain_panics(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    // The request cannot be kept for the response (routing needs it unshared), so a panic
    // becomes an error that actix renders through `ApiError::error_response`.
    match AssertUnwindSafe(next.call(req)).catch_unwind().await {
        Ok(res) => res.map(|r| r.map_into_boxed_body()),
        Err(_) => Err(ApiError::Internal.into()),
    }
}

async fn request_id_header(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = actix_web::HttpMessage::extensions(&req)
        .get::<tracing_actix_web::RequestId>()
        .map(|r| r.to_string());
    let mut res = next.call(req).await?;
    if let Some(id) = id.and_then(|i| HeaderValue::from_str(&i).ok()) {
        res.headers_mut()
            .insert(header::HeaderName::from_static("x-request-id"), id);
    }
    Ok(res)
}

/// Any error response not already an OperationOutcome (actix's own 404/405/413/400 from
/// extractors …) is replaced by one, with a fixed text for its status.
fn ensure_operation_outcome<B: MessageBody + 'static>(
    res: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_fhir = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            // the sign-in pages answer their errors as pages
            v.starts_with("application/fhir+json") || v.starts_with("application/json") || v.starts_with("text/html")
        });
    // our own JSON (OperationOutcomes, `/readyz`) stays; actix's plain-text errors are replaced
    if is_fhir {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let (code, text) = match status {
        StatusCode::NOT_FOUND => (IssueType::NotFound, "no such endpoint"),
        StatusCode::METHOD_NOT_ALLOWED => (IssueType::NotSupported, "this interaction is not supported on this URL"),
        StatusCode::PAYLOAD_TOO_LARGE => (IssueType::TooLong, "the request body is too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (IssueType::NotSupported, "unsupported media type"),
        s if s.is_server_error() => (IssueType::Exception, "internal server error"),
        _ => (IssueType::Invalid, "the request could not be processed"),
    };
    let body = serde_json::to_vec(&OperationOutcome::single(crate::fhir::Issue::error(code, text)))
        .expect("OperationOutcome serializes");
    let (req, _) = res.into_parts();
    let resp = HttpResponse::build(status)
        .insert_header((header::CONTENT_TYPE, FHIR_JSON))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .body(body);
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, resp).map_into_right_body(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test as atest;

    async fn boom() -> HttpResponse {
        panic!("a panic message that could quote PHI: Zorblax");
    }

    #[actix_web::test]
    async fn a_panicking_handler_yields_a_500_operation_outcome() {
        let app = atest::init_service(
            App::new()
                .wrap(ErrorHandlers::new().default_handler(ensure_operation_outcome))
                .wrap(from_fn(contain_panics))
                .route("/boom", web::get().to(boom)),
        )
        .await;
        // The server renders an error leaving the middleware stack with its `error_response`.
        let Err(err) = atest::try_call_service(&app, atest::TestRequest::get().uri("/boom").to_request()).await else {
            panic!("the panic should become an error");
        };
        let resp = err.error_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = actix_web::body::to_bytes(resp.into_body()).await.unwrap();
        let text = std::str::from_utf8(&body).unwrap();
        assert!(text.contains("OperationOutcome") && !text.contains("Zorblax"), "{text}");
        // the service keeps answering
        let resp = atest::call_service(&app, atest::TestRequest::get().uri("/nothing").to_request()).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let body = atest::read_body(resp).await;
        assert!(std::str::from_utf8(&body).unwrap().contains("OperationOutcome"));
    }
}
