//! What is sent: the Backport IG's notification Bundles (type `history`, the
//! SubscriptionStatus Parameters first) and R4's rest-hook requests.

use super::{Payload, Spec};
use crate::store::subscription::ChangeEvent;
use chrono::NaiveDateTime;
use serde_json::{json, Value};

/// The kind of a notification (`SubscriptionStatus.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Handshake,
    Heartbeat,
    EventNotification,
    QueryStatus,
    QueryEvent,
}

impl Kind {
    pub fn code(self) -> &'static str {
        match self {
            Kind::Handshake => "handshake",
            Kind::Heartbeat => "heartbeat",
            Kind::EventNotification => "event-notification",
            Kind::QueryStatus => "query-status",
            Kind::QueryEvent => "query-event",
        }
    }
}

/// One event of a notification, as its recipient may see it.
#[derive(Debug, Clone)]
pub struct Event {
    pub number: i64,
    pub resource_type: String,
    pub id: String,
    pub event: ChangeEvent,
    pub recorded: NaiveDateTime,
    /// The resource as the recipient may read it (full-resource only).
    pub resource: Option<Value>,
    /// False when the recipient may no longer see the resource: the event keeps its number
    /// and nothing else (no focus), so the numbers never skip and nothing leaks.
    pub visible: bool,
    /// The patients whose compartment holds the resource (for the audit record).
    pub patients: Vec<String>,
}

fn instant(ts: &NaiveDateTime) -> String {
    ts.and_utc().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What a SubscriptionStatus says of its subscription.
pub struct Header<'a> {
    /// The base URL resources are named under.
    pub base: &'a str,
    pub spec: &'a Spec,
    pub topic: &'a str,
    pub status: &'a str,
    pub kind: Kind,
    pub events_since_start: i64,
}

/// The SubscriptionStatus (a Parameters resource in R4).
pub fn status_parameters(h: &Header<'_>, events: &[Event], error: Option<&str>) -> Value {
    let (base, spec, topic, status, kind, events_since_start) =
        (h.base, h.spec, h.topic, h.status, h.kind, h.events_since_start);
    let mut parameter = vec![
        json!({"name": "subscription", "valueReference": {"reference": format!("{base}/Subscription/{}", spec.id)}}),
        json!({"name": "topic", "valueCanonical": topic}),
        json!({"name": "status", "valueCode": status}),
        json!({"name": "type", "valueCode": kind.code()}),
        json!({"name": "events-since-subscription-start", "valueString": events_since_start.to_string()}),
    ];
    for e in events {
        let mut part = vec![
            json!({"name": "event-number", "valueString": e.number.to_string()}),
            json!({"name": "timestamp", "valueInstant": instant(&e.recorded)}),
        ];
        if e.visible && spec.payload != Payload::Empty {
            part.push(json!({"name": "focus", "valueReference": {"reference": format!("{base}/{}/{}", e.resource_type, e.id)}}));
        }
        parameter.push(json!({"name": "notification-event", "part": part}));
    }
    if let Some(reason) = error {
        parameter.push(json!({"name": "error", "valueCodeableConcept": {"text": reason}}));
    }
    json!({"resourceType": "Parameters", "parameter": parameter})
}

/// A notification Bundle (type `history`): the status first, then an entry per visible event
/// (with `id-only`, its URL and request; with `full-resource`, the resource too).
pub fn bundle(h: &Header<'_>, events: &[Event], now: &NaiveDateTime) -> Value {
    let (base, spec) = (h.base, h.spec);
    let parameters = status_parameters(h, events, None);
    let mut entry = vec![json!({
        "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
        "resource": parameters,
        "request": {"method": "GET", "url": format!("{base}/Subscription/{}/$status", spec.id)},
        "response": {"status": "200"},
    })];
    if spec.payload != Payload::Empty {
        for e in events.iter().filter(|e| e.visible) {
            let (method, status) = match e.event {
                ChangeEvent::Create => ("POST", "201"),
                ChangeEvent::Update => ("PUT", "200"),
                ChangeEvent::Delete => ("DELETE", "204"),
            };
            let mut item = json!({
                "fullUrl": format!("{base}/{}/{}", e.resource_type, e.id),
                "request": {"method": method, "url": format!("{}/{}", e.resource_type, e.id)},
                "response": {"status": status},
            });
            if let Some(r) = &e.resource {
                item["resource"] = r.clone();
            }
            entry.push(item);
        }
    }
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "history",
        "timestamp": instant(now),
        "entry": entry,
    })
}
