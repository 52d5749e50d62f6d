//! Alerts to a configured webhook. Sent off the request path (a plain thread, bounded time), so a
//! slow or failing receiver never delays or fails the request; failures are logged.

use super::Principal;
use serde_json::json;
use std::time::Duration;

/// Posts `{event, subject, client, interaction, time}` for a break-glass request: who and what
/// kind of access, never the reason (free text) nor any resource.
pub fn break_glass(url: &str, p: &Principal, interaction: &'static str) {
    let body = json!({
        "event": "break-glass",
        "subject": p.subject,
        "client": p.client_id,
        "interaction": interaction,
        "token_id": p.token_id,
        "time": chrono::Utc::now().to_rfc3339(),
    });
    let url = url.to_string();
    std::thread::spawn(move || {
        let sent = openidconnect::reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .build()
            .and_then(|c| {
                c.post(&url)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
            })
            .and_then(|r| r.error_for_status());
        if let Err(e) = sent {
            tracing::warn!(error = %e.without_url(), "break-glass webhook failed");
        }
    });
}
