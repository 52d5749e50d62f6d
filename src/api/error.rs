//! The API error type and its one rendering as an OperationOutcome.
//!
//! | variant               | status | issue code        |
//! |-----------------------|--------|-------------------|
//! | `BadRequest`          | 400    | given per issue   |
//! | `Unauthorized`        | 401    | login (+ `WWW-Authenticate: Bearer …`) |
//! | `Forbidden`           | 403    | forbidden (+ `WWW-Authenticate: Bearer error="insufficient_scope"`) |
//! | `InsufficientAuthentication` | 401 | login (+ `error="insufficient_user_authentication"`) |
//! | `TooManyRequests`     | 429    | throttled (+ `Retry-After`) |
//! | `NotFound`            | 404    | not-found         |
//! | `MethodNotAllowed`    | 405    | not-supported     |
//! | `NotAcceptable`       | 406    | not-supported     |
//! | `Gone`                | 410    | deleted           |
//! | `PreconditionFailed`  | 412    | conflict / multiple-matches |
//! | `PayloadTooLarge`     | 413    | too-long          |
//! | `TooManyEntries`      | 413    | too-long (a Bundle past `max_bundle_entries`) |
//! | `InEntry`             | the entry's | the entry's issues, located at `Bundle.entry[i]` |
//! | `UnsupportedMediaType`| 415    | not-supported     |
//! | `Unprocessable`       | 422    | given per issue   |
//! | `Unavailable`         | 503    | transient → exception |
//! | `AuditUnavailable`    | 503    | exception (the access could not be audited: no data) |
//! | `Timeout`             | 503    | timeout           |
//! | `Internal`            | 500    | exception         |
//!
//! Texts are fixed strings chosen here: never the submitted data, never internal error text.
//! A 5xx is logged (without PHI) with the request's span; the client sees a generic message.

use crate::fhir::{Issue, IssueType, OperationOutcome};
use crate::store::StoreError;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use chrono::NaiveDateTime;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("bad request")]
    BadRequest(Vec<Issue>),
    /// No credentials (`reason` None) or invalid ones (`reason` says which check failed).
    #[error("unauthorized")]
    Unauthorized { reason: Option<&'static str> },
    #[error("forbidden")]
    Forbidden,
    #[error("insufficient user authentication")]
    InsufficientAuthentication,
    #[error("too many requests")]
    TooManyRequests { retry_after: u64 },
    #[error("not found")]
    NotFound(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("not acceptable")]
    NotAcceptable,
    #[error("gone")]
    Gone {
        version_id: i64,
        last_updated: NaiveDateTime,
    },
    #[error("precondition failed")]
    PreconditionFailed(IssueType, &'static str),
    #[error("payload too large")]
    PayloadTooLarge(usize),
    #[error("too many bundle entries")]
    TooManyEntries(usize),
    /// Entry `index` of a transaction failed with `error`: the whole transaction is undone.
    #[error("bundle entry failed")]
    InEntry { index: usize, error: Box<ApiError> },
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("unprocessable")]
    Unprocessable(Vec<Issue>),
    #[error("service unavailable")]
    Unavailable,
    /// The request's AuditEvent could not be made durable: the response is withheld.
    #[error("audit unavailable")]
    AuditUnavailable,
    /// The request took longer than `request_timeout_secs`.
    #[error("request timed out")]
    Timeout,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The failure as an AuditEvent's `outcomeDesc`: status and a fixed text, never request data.
    pub fn audit_text(&self) -> String {
        let status = self.status_code().as_u16();
        match self {
            ApiError::Unauthorized { reason: Some(r) } => format!("{status} unauthorized: {r}"),
            ApiError::NotFound(what) => format!("{status} {what}"),
            ApiError::PreconditionFailed(_, text) => format!("{status} {text}"),
            ApiError::InEntry { index, error } => format!("entry {index}: {}", error.audit_text()),
            other => format!("{status} {other}"),
        }
    }

    pub fn bad_request(code: IssueType, text: &'static str) -> ApiError {
        ApiError::BadRequest(vec![Issue::error(code, text)])
    }

    pub fn outcome(&self) -> OperationOutcome {
        let issues = match self {
            ApiError::BadRequest(issues) | ApiError::Unprocessable(issues) => issues.clone(),
            ApiError::NotFound(what) => vec![Issue::error(IssueType::NotFound, *what)],
            ApiError::Unauthorized { reason: None } => {
                vec![Issue::error(
                    IssueType::Login,
                    "authentication required: send Authorization: Bearer <token>",
                )]
            }
            ApiError::Unauthorized { reason: Some(r) } => {
                vec![Issue::error(
                    IssueType::Login,
                    format!("the access token is not valid: {r}"),
                )]
            }
            ApiError::InsufficientAuthentication => vec![Issue::error(
                IssueType::Login,
                "multi-factor authentication is required for user access to this server",
            )],
            ApiError::TooManyRequests { .. } => vec![Issue::error(
                IssueType::Throttled,
                "too many failed authentication attempts from this address; retry later",
            )],
            ApiError::Forbidden => vec![Issue::error(
                IssueType::Forbidden,
                "the access token's scopes do not allow this interaction",
            )],
            ApiError::MethodNotAllowed => vec![Issue::error(
                IssueType::NotSupported,
                "this interaction is not supported on this URL",
            )],
            ApiError::NotAcceptable => vec![Issue::error(
                IssueType::NotSupported,
                "only JSON is supported: application/fhir+json or application/json",
            )],
            ApiError::Gone { .. } => vec![Issue::error(IssueType::Deleted, "the resource has been deleted")],
            ApiError::PreconditionFailed(code, text) => vec![Issue::error(*code, *text)],
            ApiError::PayloadTooLarge(limit) => {
                vec![Issue::error(
                    IssueType::TooLong,
                    format!("the request body exceeds the limit of {limit} bytes"),
                )]
            }
            ApiError::TooManyEntries(limit) => vec![Issue::error(
                IssueType::TooLong,
                format!("the Bundle has more than the {limit} entries this server accepts in one request"),
            )],
            ApiError::InEntry { index, error } => {
                let mut issues = error.outcome().issue;
                for i in &mut issues {
                    let at = format!("Bundle.entry[{index}]");
                    i.diagnostics = Some(format!(
                        "{at}: {} (the transaction was not applied)",
                        i.diagnostics.as_deref().unwrap_or("failed")
                    ));
                    i.expression = if i.expression.is_empty() {
                        vec![at]
                    } else {
                        i.expression.iter().map(|e| format!("{at}.resource.{e}")).collect()
                    };
                }
                issues
            }
            ApiError::UnsupportedMediaType => vec![Issue::error(
                IssueType::NotSupported,
                "request bodies must be application/fhir+json or application/json",
            )],
            ApiError::Unavailable => vec![Issue::error(IssueType::Exception, "the server is busy; retry later")],
            ApiError::Timeout => vec![Issue::error(
                IssueType::Timeout,
                "the request took too long and was abandoned; retry later",
            )],
            ApiError::AuditUnavailable => vec![Issue::error(
                IssueType::Exception,
                "the access could not be recorded in the audit log, so no data is returned; retry later",
            )],
            ApiError::Internal => vec![Issue::error(IssueType::Exception, "internal server error")],
        };
        OperationOutcome::new(issues)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::InsufficientAuthentication => StatusCode::UNAUTHORIZED,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            ApiError::Gone { .. } => StatusCode::GONE,
            ApiError::PreconditionFailed(..) => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge(_) | ApiError::TooManyEntries(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::InEntry { error, .. } => error.status_code(),
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable | ApiError::AuditUnavailable | ApiError::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        resp.insert_header((header::CONTENT_TYPE, super::FHIR_JSON));
        // an entry's failure answers with the headers that failure has (WWW-Authenticate …)
        let headers_of = match self {
            ApiError::InEntry { error, .. } => error.as_ref(),
            other => other,
        };
        if let ApiError::Gone {
            version_id,
            last_updated,
        } = headers_of
        {
            resp.insert_header((header::ETAG, super::etag(*version_id)));
            resp.insert_header((header::LAST_MODIFIED, super::http_date(last_updated)));
        }
        match headers_of {
            ApiError::Unauthorized { reason: None } => {
                resp.insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"fhirvault\""));
            }
            ApiError::Unauthorized { reason: Some(_) } => {
                resp.insert_header((
                    header::WWW_AUTHENTICATE,
                    "Bearer realm=\"fhirvault\", error=\"invalid_token\"",
                ));
            }
            ApiError::Forbidden => {
                resp.insert_header((
                    header::WWW_AUTHENTICATE,
                    "Bearer realm=\"fhirvault\", error=\"insufficient_scope\"",
                ));
            }
            ApiError::InsufficientAuthentication => {
                resp.insert_header((
                    header::WWW_AUTHENTICATE,
                    "Bearer realm=\"fhirvault\", error=\"insufficient_user_authentication\"",
                ));
            }
            ApiError::TooManyRequests { retry_after } => {
                resp.insert_header((header::RETRY_AFTER, retry_after.to_string()));
            }
            _ => {}
        }
        // every 503 says when to come back: a timed-out request too (during a failover a request
        // may wait on the pool past `request_timeout_secs`; the next one will not)
        if matches!(
            self,
            ApiError::Unavailable | ApiError::AuditUnavailable | ApiError::Timeout
        ) {
            resp.insert_header((header::RETRY_AFTER, HeaderValue::from_static("1")));
        }
        resp.body(serde_json::to_vec(&self.outcome()).expect("OperationOutcome serializes"))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound => ApiError::NotFound("resource not found"),
            StoreError::Gone {
                version_id,
                last_updated,
            } => ApiError::Gone {
                version_id,
                last_updated,
            },
            StoreError::VersionConflict { .. } => {
                ApiError::PreconditionFailed(IssueType::Conflict, "the resource version does not match If-Match")
            }
            StoreError::MultipleMatches => ApiError::PreconditionFailed(
                IssueType::MultipleMatches,
                "the condition matched more than one resource",
            ),
            StoreError::Pool(_) => {
                tracing::warn!("database pool exhausted or unreachable");
                ApiError::Unavailable
            }
            e if e.is_lost_connection() => {
                tracing::warn!("database connection lost; it is dropped from the pool");
                ApiError::Unavailable
            }
            other => {
                // Store errors carry no PHI (values are bound parameters, never in messages).
                tracing::error!(error = %other, "storage failure");
                ApiError::Internal
            }
        }
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> ApiError {
        use crate::auth::AuthError;
        match e {
            AuthError::Missing => ApiError::Unauthorized { reason: None },
            AuthError::InvalidToken(r) => ApiError::Unauthorized { reason: Some(r) },
            AuthError::InsufficientScope => ApiError::Forbidden,
            AuthError::Hidden => ApiError::NotFound("resource not found"),
            AuthError::InsufficientAuthentication => ApiError::InsufficientAuthentication,
            AuthError::TooManyFailures { retry_after } => ApiError::TooManyRequests { retry_after },
            AuthError::Setup(msg) => {
                tracing::error!(error = %msg, "auth setup failure");
                ApiError::Internal
            }
        }
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(_: actix_web::error::BlockingError) -> ApiError {
        tracing::error!("blocking task failed");
        ApiError::Internal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_maps_to_its_status() {
        let ts = chrono::DateTime::from_timestamp(0, 0).unwrap().naive_utc();
        let cases: Vec<(ApiError, u16)> = vec![
            (ApiError::bad_request(IssueType::Invalid, "x"), 400),
            (ApiError::NotFound("x"), 404),
            (ApiError::Unauthorized { reason: None }, 401),
            (ApiError::Unauthorized { reason: Some("x") }, 401),
            (ApiError::Forbidden, 403),
            (ApiError::InsufficientAuthentication, 401),
            (ApiError::TooManyRequests { retry_after: 5 }, 429),
            (ApiError::MethodNotAllowed, 405),
            (ApiError::NotAcceptable, 406),
            (
                ApiError::Gone {
                    version_id: 2,
                    last_updated: ts,
                },
                410,
            ),
            (ApiError::PreconditionFailed(IssueType::Conflict, "x"), 412),
            (ApiError::PayloadTooLarge(10), 413),
            (ApiError::TooManyEntries(10), 413),
            (
                ApiError::InEntry {
                    index: 3,
                    error: Box::new(ApiError::Forbidden),
                },
                403,
            ),
            (ApiError::UnsupportedMediaType, 415),
            (ApiError::Unprocessable(vec![]), 422),
            (ApiError::Unavailable, 503),
            (ApiError::AuditUnavailable, 503),
            (ApiError::Timeout, 503),
            (ApiError::Internal, 500),
        ];
        for (e, status) in cases {
            assert_eq!(e.status_code().as_u16(), status);
            let resp = e.error_response();
            assert_eq!(resp.headers().get("content-type").unwrap(), super::super::FHIR_JSON);
            // a 503 always says when to come back
            assert_eq!(
                status == 503,
                resp.headers().contains_key("retry-after") && status != 429
            );
        }
    }
}
