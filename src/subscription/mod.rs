//! Subscriptions: R4 rest-hook subscriptions (`criteria` a search) and the Subscriptions R5
//! Backport for R4 (topic-based: a topic per resource type, filtered by that type's search
//! parameters). How a notification is made:
//!
//! 1. Matching, on the write path, in memory: every node keeps the active subscriptions by
//!    resource type (`Subscriptions`, rebuilt after a write of a Subscription and every two
//!    seconds); a write's index rows are tested against the criteria (`matcher`) and each match
//!    is inserted into `subscription_outbox` in the write's own transaction (`store::subscription`).
//! 2. Delivery, off the write path (`deliver`): workers on any node take one subscription at a
//!    time under a lease, filter its events by the owner's grant as it stands then, number them,
//!    send them in order, and retry with exponential backoff; every attempt is an AuditEvent.

pub mod deliver;
pub mod matcher;
pub mod notification;

use crate::crypto::Cipher;
use crate::search::query::Recheck;
use crate::search::Registry;
use crate::store::search_query::Cond;
use crate::store::subscription::{Change, ChangeEvent, WriteWatch};
use crate::store::{Access, Store};
use serde_json::Value;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, RwLock};

/// The Backport IG's extensions and profile.
pub const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
/// The canonical URL of the topic "a resource of type T was created, updated or deleted" is this
/// followed by T.
pub const TOPIC_BASE: &str = "https://fhirvault.dev/SubscriptionTopic/";

/// What a notification carries of each resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Nothing but that something happened (R4 without payload, Backport `empty`).
    Empty,
    /// The resource's id (Backport `id-only`, its default).
    IdOnly,
    /// The resource as the owner may read it (R4 with a payload, Backport `full-resource`).
    FullResource,
}

impl Payload {
    pub fn code(self) -> &'static str {
        match self {
            Payload::Empty => "empty",
            Payload::IdOnly => "id-only",
            Payload::FullResource => "full-resource",
        }
    }
}

/// The flavour of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flavor {
    /// R4: `criteria` is the search.
    R4,
    /// The Backport IG: `criteria` is a topic, the search its filter.
    Backport { topic: String },
}

/// A Subscription resource, read and checked.
#[derive(Debug, Clone)]
pub struct Spec {
    pub id: String,
    pub flavor: Flavor,
    pub status: String,
    pub resource_type: String,
    /// The conditions of the search (criteria or filter); all clauses must hold.
    pub clauses: Vec<Vec<Cond>>,
    /// What identifying parameters' blind matches must be confirmed with on the content.
    pub rechecks: Vec<Recheck>,
    pub events: Vec<ChangeEvent>,
    pub endpoint: String,
    /// `channel.header`, as (name, value).
    pub headers: Vec<(String, String)>,
    pub payload: Payload,
    pub heartbeat_secs: Option<u64>,
    pub timeout_secs: u64,
    pub max_count: usize,
    /// `end`: no notification after it.
    pub end: Option<chrono::NaiveDateTime>,
}

/// Why a Subscription is refused (the element and a fixed reason, never a value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub at: &'static str,
    pub reason: String,
}

fn refuse(at: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError {
        at,
        reason: reason.into(),
    }
}

/// What reading a Subscription needs from the server.
pub struct SpecContext<'a> {
    pub registry: &'a Registry,
    pub cipher: &'a Cipher,
    pub is_type: &'a dyn Fn(&str) -> bool,
    pub full_resource_allowed: bool,
    pub allowed_networks: &'a [crate::config::IpNetwork],
}

fn extension<'v>(element: &'v Value, name: &str) -> Option<&'v Value> {
    element["extension"]
        .as_array()?
        .iter()
        .find(|e| e["url"].as_str() == Some(&format!("{BACKPORT}{name}")))
}

fn unsigned(element: &Value, name: &str) -> Option<u64> {
    let e = extension(element, name)?;
    e["valueUnsignedInt"]
        .as_u64()
        .or_else(|| e["valuePositiveInt"].as_u64())
}

/// Reads a Subscription resource: its flavour, search, channel and limits. Every refusal names
/// the element; no value of the resource is repeated.
pub fn read_spec(ctx: &SpecContext<'_>, id: &str, resource: &Value) -> Result<Spec, SpecError> {
    let criteria = resource["criteria"]
        .as_str()
        .ok_or_else(|| refuse("Subscription.criteria", "criteria is required"))?;
    let channel = &resource["channel"];
    if channel["type"].as_str() != Some("rest-hook") {
        return Err(refuse(
            "Subscription.channel.type",
            "only rest-hook channels are supported",
        ));
    }
    let (flavor, search) = if criteria.starts_with("http://") || criteria.starts_with("https://") {
        let t = criteria
            .strip_prefix(TOPIC_BASE)
            .filter(|t| (ctx.is_type)(t))
            .ok_or_else(|| refuse("Subscription.criteria", "this server offers no such SubscriptionTopic"))?;
        let filters: Vec<&str> = resource["_criteria"]
            .get("extension")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|e| e["url"].as_str() == Some(&format!("{BACKPORT}backport-filter-criteria")))
            .filter_map(|e| e["valueString"].as_str())
            .collect();
        let search = match filters.as_slice() {
            [] => t.to_string(),
            [one] => {
                let (ft, _) = one.split_once('?').unwrap_or((one, ""));
                if ft != t {
                    return Err(refuse(
                        "Subscription._criteria",
                        "a filter must search the topic's resource type",
                    ));
                }
                one.to_string()
            }
            _ => {
                return Err(refuse(
                    "Subscription._criteria",
                    "one filter criteria per subscription is supported",
                ))
            }
        };
        (
            Flavor::Backport {
                topic: criteria.to_string(),
            },
            search,
        )
    } else {
        (Flavor::R4, criteria.to_string())
    };
    let (resource_type, query) = search.split_once('?').unwrap_or((search.as_str(), ""));
    if !(ctx.is_type)(resource_type) {
        return Err(refuse(
            "Subscription.criteria",
            "the criteria must name a resource type",
        ));
    }
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    if let Some((k, _)) = pairs
        .iter()
        .find(|(k, _)| k.starts_with('_') && k != "_id" && k != "_tag")
    {
        let _ = k;
        return Err(refuse(
            "Subscription.criteria",
            "result parameters and _-parameters other than _id and _tag have no meaning in criteria",
        ));
    }
    let parsed =
        crate::search::query::parse(ctx.registry, ctx.cipher, resource_type, &pairs, 1, true).map_err(|_| {
            refuse(
                "Subscription.criteria",
                "the criteria is not a search this server answers",
            )
        })?;
    if !parsed.query.clauses.iter().flatten().all(matcher::answerable) {
        return Err(refuse(
            "Subscription.criteria",
            "chained and _has parameters are not supported in criteria",
        ));
    }
    let endpoint = channel["endpoint"]
        .as_str()
        .ok_or_else(|| refuse("Subscription.channel.endpoint", "a rest-hook needs an endpoint"))?;
    check_endpoint(endpoint, ctx.allowed_networks).map_err(|r| refuse("Subscription.channel.endpoint", r))?;
    let mut headers = Vec::new();
    for h in channel["header"].as_array().into_iter().flatten() {
        let (name, value) = h
            .as_str()
            .and_then(|h| h.split_once(':'))
            .ok_or_else(|| refuse("Subscription.channel.header", "headers are `Name: value`"))?;
        let name = name.trim();
        let valid_name = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
        let value = value.trim();
        if !valid_name || value.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(refuse("Subscription.channel.header", "headers are `Name: value`"));
        }
        headers.push((name.to_string(), value.to_string()));
    }
    let payload_type = channel["payload"].as_str();
    if payload_type.is_some_and(|p| p != "application/fhir+json" && p != "application/json") {
        return Err(refuse(
            "Subscription.channel.payload",
            "only application/fhir+json is sent",
        ));
    }
    let payload = match &flavor {
        Flavor::R4 if payload_type.is_some() => Payload::FullResource,
        Flavor::R4 => Payload::Empty,
        Flavor::Backport { .. } => {
            match extension(&channel["_payload"], "backport-payload-content").and_then(|e| e["valueCode"].as_str()) {
                None | Some("id-only") => Payload::IdOnly,
                Some("empty") => Payload::Empty,
                Some("full-resource") => Payload::FullResource,
                Some(_) => {
                    return Err(refuse(
                        "Subscription.channel.payload",
                        "content is empty, id-only or full-resource",
                    ))
                }
            }
        }
    };
    if payload == Payload::FullResource && !ctx.full_resource_allowed {
        return Err(refuse(
            "Subscription.channel.payload",
            "this server sends ids, not whole resources (subscription_full_resource)",
        ));
    }
    // R4 and the Backport alike: creates, updates and deletes (a deletion's filter is checked
    // on the version deleted)
    let events = vec![ChangeEvent::Create, ChangeEvent::Update, ChangeEvent::Delete];
    let end = resource["end"]
        .as_str()
        .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok())
        .map(|e| e.naive_utc());
    Ok(Spec {
        id: id.to_string(),
        flavor,
        status: resource["status"].as_str().unwrap_or("requested").to_string(),
        resource_type: resource_type.to_string(),
        clauses: parsed.query.clauses,
        rechecks: parsed.rechecks,
        events,
        endpoint: endpoint.to_string(),
        headers,
        payload,
        heartbeat_secs: unsigned(channel, "backport-heartbeat-period").filter(|s| *s > 0),
        timeout_secs: unsigned(channel, "backport-timeout").unwrap_or(30).clamp(1, 120),
        max_count: unsigned(channel, "backport-max-count").unwrap_or(20).clamp(1, 100) as usize,
        end,
    })
}

/// Whether an address is internal: loopback, private, link-local, shared, unspecified,
/// multicast, reserved or documentation (IPv4 inside IPv6 judged as IPv4).
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            v.is_loopback()
                || v.is_private()
                || v.is_link_local()
                || v.is_unspecified()
                || v.is_broadcast()
                || v.is_multicast()
                || v.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || o[0] >= 240
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
        }
        IpAddr::V6(v) => {
            if let Some(v4) = v.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let s = v.segments();
            v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x64 && s[1] == 0xff9b)
        }
    }
}

/// Whether the endpoint may be reached at `ip`: public, or internal inside an allowed network.
pub fn address_allowed(ip: IpAddr, allowed: &[crate::config::IpNetwork]) -> bool {
    !is_internal(ip) || allowed.iter().any(|n| n.contains(ip))
}

fn loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v) => v.to_ipv4_mapped().map_or(v.is_loopback(), |v4| v4.is_loopback()),
        IpAddr::V4(v) => v.is_loopback(),
    }
}

/// The endpoint's URL as it may be used: https (plain http to loopback only), no credentials
/// in it, and, when it names an address, one outside internal networks unless allowed. Names
/// are checked again when they are resolved, before every connection (`deliver`).
pub fn check_endpoint(endpoint: &str, allowed: &[crate::config::IpNetwork]) -> Result<(), &'static str> {
    let url = openidconnect::url::Url::parse(endpoint).map_err(|_| "the endpoint is not a URL")?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("the endpoint must not carry credentials (use channel.header)");
    }
    if url.fragment().is_some() {
        return Err("the endpoint must not have a fragment");
    }
    let host = url.host().ok_or("the endpoint needs a host")?;
    let ip = match host {
        openidconnect::url::Host::Ipv4(v) => Some(IpAddr::V4(v)),
        openidconnect::url::Host::Ipv6(v) => Some(IpAddr::V6(v)),
        openidconnect::url::Host::Domain(d) if d.eq_ignore_ascii_case("localhost") => {
            Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
        }
        openidconnect::url::Host::Domain(_) => None,
    };
    match url.scheme() {
        "https" => {}
        "http" if ip.is_some_and(loopback) => {}
        "http" => return Err("the endpoint must use https (plain http only to loopback)"),
        _ => return Err("the endpoint must be an https URL"),
    }
    if let Some(ip) = ip {
        if !address_allowed(ip, allowed) {
            return Err("the endpoint is an internal address this server does not send to");
        }
    }
    Ok(())
}

/// The active subscriptions of this node, by resource type: what writes are matched against.
#[derive(Default)]
struct Active {
    by_type: HashMap<String, TypeIndex>,
    by_id: HashMap<String, Arc<Spec>>,
}

/// The subscriptions on one resource type, found by what a write's index rows hold: most
/// criteria require one reference (`patient=…`) or code among a few, so a write is tested
/// against the subscriptions keyed by its own references and codes, and the rest, rather than
/// against every subscription on the type.
#[derive(Default)]
struct TypeIndex {
    all: Vec<Arc<Spec>>,
    keyed: HashMap<(String, String), Vec<Arc<Spec>>>,
    unkeyed: Vec<Arc<Spec>>,
}

/// The key of a reference or token row (or condition).
fn row_key(param: &str, kind: char, value: &str) -> (String, String) {
    (param.to_string(), format!("{kind}|{value}"))
}

/// Keys one of which every version the criteria match holds: those of a clause whose every
/// alternative is a reference to one id, or a token with a code.
fn criteria_keys(clauses: &[Vec<Cond>]) -> Option<Vec<(String, String)>> {
    clauses.iter().find_map(|any| {
        any.iter()
            .map(|c| match c {
                Cond::Reference { param, id, .. } => Some(row_key(param, 'r', id)),
                Cond::Token {
                    param,
                    code: Some(code),
                    ..
                } => Some(row_key(param, 't', code)),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .filter(|keys| !keys.is_empty())
    })
}

impl TypeIndex {
    fn add(&mut self, spec: Arc<Spec>) {
        match criteria_keys(&spec.clauses) {
            Some(keys) => {
                for k in keys {
                    self.keyed.entry(k).or_default().push(spec.clone());
                }
            }
            None => self.unkeyed.push(spec.clone()),
        }
        self.all.push(spec);
    }

    /// The subscriptions that may match a version with these rows (each once).
    fn candidates<'a>(&'a self, rows: &[crate::store::search_index::SearchRow]) -> Vec<&'a Arc<Spec>> {
        use crate::store::search_index::SearchRow;
        let mut out: Vec<&Arc<Spec>> = self.unkeyed.iter().collect();
        if self.keyed.is_empty() {
            return out;
        }
        let mut seen = std::collections::HashSet::new();
        for row in rows {
            let key = match row {
                SearchRow::Reference { param, target_id, .. } => row_key(param, 'r', target_id),
                SearchRow::Token {
                    param,
                    code: Some(code),
                    ..
                } => row_key(param, 't', code),
                _ => continue,
            };
            for spec in self.keyed.get(&key).into_iter().flatten() {
                if seen.insert(Arc::as_ptr(spec)) {
                    out.push(spec);
                }
            }
        }
        out
    }
}

/// The subscriptions every write is matched against, and the signal that wakes delivery.
pub struct Subscriptions {
    active: RwLock<Arc<Active>>,
    /// Bumped when a transaction that recorded matches commits; delivery workers wait on it.
    kick: Arc<(Mutex<u64>, Condvar)>,
}

impl std::fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriptions").finish_non_exhaustive()
    }
}

impl Default for Subscriptions {
    fn default() -> Self {
        Subscriptions {
            active: RwLock::new(Arc::new(Active::default())),
            kick: Arc::new((Mutex::new(0), Condvar::new())),
        }
    }
}

impl Subscriptions {
    /// The subscription `id`, if it is requested or active.
    pub fn get(&self, id: &str) -> Option<Arc<Spec>> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .get(id)
            .cloned()
    }

    /// How many subscriptions are requested or active.
    pub fn len(&self) -> usize {
        self.active.read().unwrap_or_else(|p| p.into_inner()).by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rebuilds the active set from the Subscription resources stored now.
    pub fn refresh(&self, store: &Store, ctx: &SpecContext<'_>) -> Result<(), crate::store::StoreError> {
        let pairs = vec![("status".to_string(), "requested,active".to_string())];
        let Ok(parsed) = crate::search::query::parse(ctx.registry, ctx.cipher, "Subscription", &pairs, 500, true)
        else {
            return Ok(());
        };
        let mut q = parsed.query;
        q.total = false;
        let mut active = Active::default();
        loop {
            let page = store.search_contents(&Access::All, &q)?;
            let full = page.len() == q.count as usize;
            if let Some((id, _)) = page.last() {
                q.after = Some(("Subscription".into(), id.clone()));
            }
            for (id, json) in page {
                let Ok(value) = serde_json::from_slice::<Value>(&json) else {
                    continue;
                };
                match read_spec(ctx, &id, &value) {
                    Ok(spec) => {
                        let spec = Arc::new(spec);
                        active
                            .by_type
                            .entry(spec.resource_type.clone())
                            .or_default()
                            .add(spec.clone());
                        active.by_id.insert(id, spec);
                    }
                    // written under other settings (or search parameters) than those now
                    Err(e) => tracing::warn!(subscription = %id, at = e.at, reason = %e.reason,
                        "a stored Subscription is not matched"),
                }
            }
            if !full {
                break;
            }
        }
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(active);
        Ok(())
    }

    /// Wakes the delivery workers.
    pub fn kick(&self) {
        let (lock, signal) = &*self.kick;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        signal.notify_all();
    }

    /// Waits for a kick after `seen`, at most `timeout`; returns the kick count.
    pub fn wait(&self, seen: u64, timeout: std::time::Duration) -> u64 {
        let (lock, signal) = &*self.kick;
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = signal
            .wait_timeout_while(guard, timeout, |n| *n == seen)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

impl WriteWatch for Subscriptions {
    fn matches(&self, change: &Change<'_>) -> Vec<String> {
        let active = self.active.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(index) = active.by_type.get(change.resource_type) else {
            return Vec::new();
        };
        let now = crate::store::now();
        // a deletion has no rows: every subscription on the type that takes deletions gets it,
        // its filter checked on the deleted version at delivery
        let candidates: Vec<&Arc<Spec>> = match change.event {
            ChangeEvent::Delete => index.all.iter().collect(),
            _ => index.candidates(change.search),
        };
        candidates
            .into_iter()
            .filter(|s| s.events.contains(&change.event))
            .filter(|s| s.end.is_none_or(|end| now < end))
            .filter(|s| {
                change.event == ChangeEvent::Delete
                    || matcher::holds(&s.clauses, change.resource_type, change.id, change.search)
            })
            .map(|s| s.id.clone())
            .collect()
    }

    fn committed(&self) {
        self.kick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IpNetwork;

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "2001:db8::1",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
        let loopback = [IpNetwork::parse("127.0.0.0/8").unwrap()];
        assert!(address_allowed("127.0.0.2".parse().unwrap(), &loopback));
        assert!(!address_allowed("10.0.0.1".parse().unwrap(), &loopback));
    }

    #[test]
    fn endpoints_are_checked_as_written() {
        let none: &[IpNetwork] = &[];
        let lo = [IpNetwork::parse("127.0.0.1").unwrap()];
        assert!(check_endpoint("https://example.org/hook", none).is_ok());
        assert!(check_endpoint("http://example.org/hook", none).is_err());
        assert!(check_endpoint("http://127.0.0.1:9/hook", none).is_err());
        assert!(check_endpoint("http://127.0.0.1:9/hook", &lo).is_ok());
        assert!(check_endpoint("http://localhost:9/hook", &lo).is_ok());
        assert!(check_endpoint("https://[::1]/hook", &lo).is_err());
        assert!(check_endpoint("https://a:b@example.org/", none).is_err());
        assert!(check_endpoint("https://example.org/#x", none).is_err());
        assert!(check_endpoint("ftp://example.org/", none).is_err());
        assert!(check_endpoint("not a url", none).is_err());
    }
}
