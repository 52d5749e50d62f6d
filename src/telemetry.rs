//! Structured logs that never contain PHI: no request bodies, no query strings, no paths with
//! ids (the route pattern, such as `/fhir/{type}/{id}`, is logged instead), no panic payloads.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::HttpMessage;
use tracing::Span;
use tracing_actix_web::{RequestId, RootSpanBuilder};

use crate::config::LogFormat;

/// Installs the global subscriber. `FHIRVAULT_LOG` (an `EnvFilter` directive) sets the level.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FHIRVAULT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    install_panic_hook();
}

/// A panic message may quote data being processed: log only where it happened.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "unknown".into());
        tracing::error!(%location, "panic (message withheld: it may contain PHI)");
    }));
}

/// The root span of every request: method, the FHIR interaction (never the path), request id,
/// the agent (client id and token subject, recorded after authentication), status and duration.
pub struct PhiSafeRootSpan;

/// When the request started, for its duration.
#[derive(Clone, Copy)]
struct Started(std::time::Instant);

impl RootSpanBuilder for PhiSafeRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let request_id = request
            .extensions()
            .get::<RequestId>()
            .map(|r| r.to_string())
            .unwrap_or_default();
        request.extensions_mut().insert(Started(std::time::Instant::now()));
        tracing::info_span!(
            "http",
            method = %request.method(),
            // the FHIR interaction, recorded by the router: never the path (it holds ids)
            route = tracing::field::Empty,
            request_id = %request_id,
            client = tracing::field::Empty,
            subject = tracing::field::Empty,
            status = tracing::field::Empty,
        )
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, actix_web::Error>) {
        let status = match outcome {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.as_response_error().status_code().as_u16(),
        };
        let duration_ms = outcome
            .as_ref()
            .ok()
            .and_then(|r| r.request().extensions().get::<Started>().copied())
            .map(|s| s.0.elapsed().as_secs_f64() * 1000.0);
        span.record("status", status);
        span.in_scope(|| {
            if status >= 500 {
                tracing::error!(status, duration_ms, "request failed");
            } else {
                tracing::info!(status, duration_ms, "request");
            }
        });
    }
}
