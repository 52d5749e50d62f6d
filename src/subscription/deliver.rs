//! Delivery workers: on every node that has them (`subscription_workers`), each takes one
//! subscription at a time under a lease in `subscription_state`, so a subscription's
//! notifications go out in order from one place, and a node that dies (kill -9 included)
//! leaves its leases to expire and be taken by another, or by itself restarted. At least once:
//! events are marked sent only after the endpoint answered 2xx; a notification sent again
//! carries the numbers it had.

use super::notification::{self, Event, Kind};
use super::{address_allowed, check_endpoint, Flavor, Payload, Spec, SpecContext, Subscriptions};
use crate::audit::event::{Action, Agent, AuditRecord, Kind as AuditKind, Outcome};
use crate::auth::policy::authorize;
use crate::auth::{Grant, Permission, Principal};
use crate::store::subscription::{ChangeEvent, OutboxEvent};
use crate::store::{Store, StoreError};
use chrono::Duration;
use openidconnect::reqwest;
use serde_json::Value;
use std::collections::HashMap;
use std::net::ToSocketAddrs;
use std::sync::Arc;

/// What delivery needs from the server.
pub struct Delivery {
    pub store: Arc<Store>,
    pub search: Arc<crate::search::live::LiveRegistry>,
    pub compartment: Arc<crate::fhir::compartment::PatientCompartment>,
    pub attributes: Arc<crate::auth::attributes::AttributePolicy>,
    pub auditor: Arc<crate::audit::Auditor>,
    pub config: Arc<crate::config::Config>,
    pub validator: Arc<crate::fhir::validate::Validator>,
    pub subscriptions: Arc<Subscriptions>,
    /// Access tokens revoked (the built-in authorization server's list), when it runs here.
    pub revoked: Option<Arc<crate::auth::server::RevokedTokens>>,
    pub node: String,
    /// Certificates trusted for endpoints besides the public roots (`subscription_ca_file`).
    pub roots: Vec<reqwest::Certificate>,
    /// What the active subscriptions were last built from (Subscriptions stored, last write,
    /// search parameter registry).
    pub fingerprint: std::sync::Mutex<Option<Fingerprint>>,
    /// The subscriptions this node's workers are serving now.
    pub serving: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// See [`Delivery::fingerprint`].
pub type Fingerprint = (i64, Option<chrono::NaiveDateTime>, usize);

/// How a delivery attempt ended.
enum Sent {
    Ok,
    /// Why it failed: a fixed text (a status code, "timed out" …), never the endpoint or data.
    Failed(String),
}

/// The longest wait between two attempts.
const MAX_BACKOFF_SECS: i64 = 300;
/// How long delivered events are kept for `$events`.
const KEEP_EVENTS_DAYS: i64 = 7;

impl Delivery {
    /// Reads `subscription_ca_file`.
    pub fn load_roots(config: &crate::config::Config) -> anyhow::Result<Vec<reqwest::Certificate>> {
        let Some(path) = &config.subscription_ca_file else {
            return Ok(Vec::new());
        };
        let pem =
            std::fs::read(path).map_err(|e| anyhow::anyhow!("configuration setting `subscription_ca_file`: {e}"))?;
        reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|_| anyhow::anyhow!("configuration setting `subscription_ca_file`: not PEM certificates"))
    }

    /// The base URL resources are named under in notifications.
    pub fn base_url(&self) -> String {
        match &self.config.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => {
                let scheme = if self.config.tls.is_some() { "https" } else { "http" };
                format!("{scheme}://{}{}", self.config.listen, self.config.base_path)
            }
        }
    }

    /// Rebuilds this node's active subscriptions from the database.
    pub fn refresh(&self) {
        self.fingerprint.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.refresh_if_changed();
    }

    /// Rebuilds them when a Subscription was written since the last time (or the search
    /// parameters changed): the periodic check costs one indexed query.
    fn refresh_if_changed(&self) {
        let registry = self.search.current();
        let Ok(written) = self.store.type_fingerprint(crate::store::subscription::SUBSCRIPTION) else {
            return;
        };
        let now = (written.0, written.1, Arc::as_ptr(&registry) as usize);
        let mut last = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
        if *last == Some(now) {
            return;
        }
        *last = Some(now);
        drop(last);
        let is_type = |t: &str| self.validator.is_resource_type(t);
        let ctx = SpecContext {
            registry: &registry,
            cipher: self.store.cipher(),
            is_type: &is_type,
            full_resource_allowed: self.config.subscription_full_resource,
            allowed_networks: &self.config.subscription_allowed_networks,
        };
        if let Err(e) = self.subscriptions.refresh(&self.store, &ctx) {
            tracing::warn!(error = %e, "reading the stored Subscriptions failed");
            self.fingerprint.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }

    /// Starts the workers and the refresher (every two seconds: what other nodes wrote, grants
    /// withdrawn, old delivered events).
    pub fn start(self: &Arc<Self>) {
        // this node restarted: what it held before it died is free at once (the name is this
        // process's own: a node name with its audit chain, which no live process shares)
        if let Err(e) = self.store.release_subscription_leases(&self.node) {
            tracing::warn!(error = %e, "releasing this node's subscription leases failed");
        }
        // (the node's set was read when its state was built, just before)
        for n in 0..self.config.subscription_workers {
            let me = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name(format!("subscriptions-{n}"))
                .spawn(move || {
                    let mut seen = 0;
                    loop {
                        let Some(me) = me.upgrade() else { return };
                        seen = me.subscriptions.wait(seen, std::time::Duration::from_millis(250));
                        if let Err(e) = me.round() {
                            tracing::warn!(error = %e, "subscription delivery round failed");
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "a subscription worker could not start");
            }
        }
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("subscriptions-refresh".into())
            .spawn(move || {
                let mut purged = std::time::Instant::now();
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(2));
                    let Some(me) = me.upgrade() else { return };
                    me.refresh_if_changed();
                    me.withdraw_lapsed_grants();
                    if purged.elapsed() > std::time::Duration::from_secs(3600) {
                        purged = std::time::Instant::now();
                        let before = crate::store::now() - Duration::days(KEEP_EVENTS_DAYS);
                        if let Err(e) = me.store.purge_delivered_events(before) {
                            tracing::warn!(error = %e, "removing old subscription events failed");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "the subscription refresher could not start");
        }
    }

    /// One pass over the subscriptions that may have work.
    fn round(&self) -> Result<(), crate::store::StoreError> {
        let now = crate::store::now();
        let heartbeats: Vec<String> = {
            let active = self.subscriptions.active.read().unwrap_or_else(|p| p.into_inner());
            active
                .by_id
                .values()
                .filter(|s| s.heartbeat_secs.is_some())
                .map(|s| s.id.clone())
                .collect()
        };
        for due in self.store.due_subscriptions(&self.node, 100, &heartbeats)? {
            let Some(spec) = self.subscriptions.get(&due.id) else {
                continue;
            };
            if spec.end.is_some_and(|end| end <= now) {
                continue;
            }
            let heartbeat = due.status == "active"
                && spec.heartbeat_secs.is_some_and(|secs| {
                    due.last_sent_at
                        .is_none_or(|at| now - at >= Duration::seconds(secs as i64))
                });
            if !(due.status == "requested" || due.pending || heartbeat) {
                continue;
            }
            // one worker of this node at a time per subscription (the lease keeps other nodes off)
            if !self
                .serving
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(due.id.clone())
            {
                continue;
            }
            let until = now + Duration::seconds(spec.timeout_secs as i64 * 2 + 5);
            let result = match self.store.claim_subscription(&due.id, &self.node, until) {
                Ok(true) => {
                    let served = self.serve(&spec);
                    // a lease not given back is taken again by this node's next round
                    let released = self.store.release_subscription(&due.id, &self.node);
                    served.and(released)
                }
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            };
            self.serving.lock().unwrap_or_else(|p| p.into_inner()).remove(&due.id);
            result?;
        }
        Ok(())
    }

    /// Whether the owner's grant still stands: the token not revoked, the client and the user
    /// (of the built-in authorization server) not disabled.
    fn grant_holds(&self, grant: &Grant) -> Result<bool, crate::store::StoreError> {
        if self.revoked.as_ref().is_some_and(|r| r.is_revoked(&grant.token_id)) {
            return Ok(false);
        }
        if let Some(client) = &grant.client_id {
            if self.store.auth_client(client)?.is_some_and(|c| c.disabled) {
                return Ok(false);
            }
        }
        if self.store.auth_user(&grant.subject)?.is_some_and(|u| u.disabled) {
            return Ok(false);
        }
        Ok(true)
    }

    /// Turns off the subscriptions whose owners' grants were withdrawn (also checked before
    /// every delivery; this catches a revocation before it leaves the revocation list). One
    /// query for the states, one per distinct owner.
    fn withdraw_lapsed_grants(&self) {
        let states = match self.store.subscription_states() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "reading the subscriptions' states failed");
                return;
            }
        };
        let mut verdicts: HashMap<String, bool> = HashMap::new();
        for state in states {
            if state.status != "requested" && state.status != "active" {
                continue;
            }
            let holds = match verdicts.get(&state.owner) {
                Some(h) => *h,
                None => {
                    let h = match Grant::from_json(&state.owner).map(|g| self.grant_holds(&g)) {
                        Some(Ok(h)) => h,
                        Some(Err(_)) => continue,
                        None => false,
                    };
                    verdicts.insert(state.owner.clone(), h);
                    h
                }
            };
            if !holds {
                self.withdraw(&state.subscription_id);
            }
        }
    }

    fn withdraw(&self, id: &str) {
        tracing::info!(subscription = %id, "the owner's access was withdrawn: subscription off");
        if let Err(e) = self
            .store
            .set_subscription_status(id, "off", Some("the owner's access was withdrawn"))
        {
            tracing::warn!(error = %e, "turning a subscription off failed");
        }
        self.set_resource_status(id, "off");
    }

    /// Delivers what the subscription waits for: the handshake, its events, or a heartbeat.
    fn serve(&self, spec: &Spec) -> Result<(), crate::store::StoreError> {
        let Some(state) = self.store.subscription_state(&spec.id)? else {
            return Ok(());
        };
        let Some(grant) = Grant::from_json(&state.owner) else {
            self.withdraw(&spec.id);
            return Ok(());
        };
        if !self.grant_holds(&grant)? {
            self.withdraw(&spec.id);
            return Ok(());
        }
        let registry = self.search.current();
        let principal = grant.principal(&registry, |t| self.validator.is_resource_type(t));
        if state.status == "requested" {
            let sent = self.send(spec, Kind::Handshake, "requested", state.events_since_start, &[]);
            self.audit(&grant, spec, &[], &sent, Kind::Handshake);
            return self.settle(spec, state.failures, sent, &[], true);
        }
        let pending = self.store.pending_events(&spec.id, spec.max_count as i64)?;
        if pending.is_empty() {
            // what looked due may have been delivered by another worker meanwhile: a heartbeat
            // only when one is due by the state as it stands now
            let now = crate::store::now();
            let beat_due = spec.heartbeat_secs.is_some_and(|secs| {
                state
                    .last_sent_at
                    .is_none_or(|at| now - at >= Duration::seconds(secs as i64))
            });
            if !beat_due {
                return Ok(());
            }
            let sent = self.send(spec, Kind::Heartbeat, "active", state.events_since_start, &[]);
            self.audit(&grant, spec, &[], &sent, Kind::Heartbeat);
            return self.settle(spec, state.failures, sent, &[], false);
        }
        // the grant as it stands now decides: events it does not reach are left out before
        // they get a number; those numbered before stay, without their resource
        let mut kept: Vec<(OutboxEvent, Option<Seen>)> = Vec::new();
        let mut dropped = Vec::new();
        for e in pending {
            let seen = self.visible(&principal, spec, &e)?;
            if seen.is_none() && e.event_number.is_none() {
                dropped.push(e.id);
            } else {
                kept.push((e, seen));
            }
        }
        self.store.drop_events(&dropped)?;
        if kept.is_empty() {
            return Ok(());
        }
        let mut outbox: Vec<OutboxEvent> = kept.iter().map(|(e, _)| e.clone()).collect();
        let counter = self.store.number_events(&spec.id, &mut outbox)?;
        let events: Vec<Event> = outbox
            .iter()
            .zip(kept)
            .map(|(e, (_, seen))| event_of(e, seen))
            .collect();
        let sent = self.send(spec, Kind::EventNotification, "active", counter, &events);
        self.audit(&grant, spec, &events, &sent, Kind::EventNotification);
        let ids: Vec<i64> = outbox.iter().map(|e| e.id).collect();
        self.settle(spec, state.failures, sent, &ids, false)
    }

    /// Records the outcome: delivered (active), or a retry after a backoff, or, after too many
    /// failures in a row, `error`.
    fn settle(
        &self,
        spec: &Spec,
        failures: i32,
        sent: Sent,
        ids: &[i64],
        handshake: bool,
    ) -> Result<(), crate::store::StoreError> {
        match sent {
            Sent::Ok => {
                self.store.delivered(&spec.id, ids)?;
                if handshake {
                    self.set_resource_status(&spec.id, "active");
                }
            }
            Sent::Failed(reason) => {
                let failures = failures + 1;
                if failures as u32 >= self.config.subscription_max_failures {
                    self.store.delivery_failed(&spec.id, failures, None, &reason)?;
                    self.set_resource_status(&spec.id, "error");
                } else {
                    let base = self.config.subscription_retry_base_ms as i64;
                    let wait = (base << (failures - 1).min(20)).min(MAX_BACKOFF_SECS * 1000);
                    let at = crate::store::now() + Duration::milliseconds(wait);
                    self.store.delivery_failed(&spec.id, failures, Some(at), &reason)?;
                }
            }
        }
        Ok(())
    }

    fn visible(&self, p: &Principal, spec: &Spec, e: &OutboxEvent) -> Result<Option<Seen>, StoreError> {
        let viewer = Viewer {
            store: &self.store,
            compartment: &self.compartment,
            attributes: &self.attributes,
            registry: &self.search.current(),
        };
        viewer.visible(p, spec, e)
    }

    /// A client for the endpoint: its name resolved here, every address checked (internal
    /// ones refused unless allowed) and the connection pinned to the address checked, so a
    /// name cannot be re-resolved to another between check and connect; no redirects.
    fn client(&self, spec: &Spec) -> Result<(reqwest::blocking::Client, openidconnect::url::Url), String> {
        let allowed = &self.config.subscription_allowed_networks;
        check_endpoint(&spec.endpoint, allowed).map_err(str::to_string)?;
        let url =
            openidconnect::url::Url::parse(&spec.endpoint).map_err(|_| "the endpoint is not a URL".to_string())?;
        let host = url.host_str().ok_or("the endpoint needs a host")?.to_string();
        let port = url.port_or_known_default().ok_or("the endpoint needs a port")?;
        let bare = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let addrs: Vec<std::net::SocketAddr> = (bare.as_str(), port)
            .to_socket_addrs()
            .map_err(|_| "the endpoint's name does not resolve".to_string())?
            .collect();
        let first = *addrs.first().ok_or("the endpoint's name does not resolve")?;
        if addrs.iter().any(|a| !address_allowed(a.ip(), allowed)) {
            return Err("the endpoint resolves to an internal address this server does not send to".into());
        }
        if url.scheme() == "http" && addrs.iter().any(|a| !a.ip().is_loopback()) {
            return Err("plain http is sent to loopback only".into());
        }
        let mut builder = reqwest::blocking::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(spec.timeout_secs))
            .connect_timeout(std::time::Duration::from_secs(spec.timeout_secs.min(10)))
            .pool_max_idle_per_host(0);
        if matches!(url.host(), Some(openidconnect::url::Host::Domain(_))) {
            builder = builder.resolve(&host, first);
        }
        for root in &self.roots {
            builder = builder.add_root_certificate(root.clone());
        }
        let client = builder.build().map_err(|_| "no HTTP client".to_string())?;
        Ok((client, url))
    }

    /// Sends one notification (R4: a ping, or a PUT per resource; Backport: a Bundle).
    fn send(&self, spec: &Spec, kind: Kind, status: &str, since_start: i64, events: &[Event]) -> Sent {
        let (client, url) = match self.client(spec) {
            Ok(c) => c,
            Err(reason) => return Sent::Failed(reason),
        };
        let with_headers = |mut rb: reqwest::blocking::RequestBuilder| {
            for (name, value) in &spec.headers {
                rb = rb.header(name.as_str(), value.as_str());
            }
            rb
        };
        let outcome = |r: Result<reqwest::blocking::Response, reqwest::Error>| match r {
            Ok(resp) if resp.status().is_success() => Sent::Ok,
            Ok(resp) => Sent::Failed(format!("the endpoint answered {}", resp.status().as_u16())),
            Err(e) if e.is_timeout() => Sent::Failed("the endpoint did not answer in time".into()),
            Err(_) => Sent::Failed("the endpoint could not be reached".into()),
        };
        match &spec.flavor {
            Flavor::Backport { topic } => {
                let base = self.base_url();
                let header = notification::Header {
                    base: &base,
                    spec,
                    topic,
                    status,
                    kind,
                    events_since_start: since_start,
                };
                let bundle = notification::bundle(&header, events, &crate::store::now());
                let body = serde_json::to_vec(&bundle).unwrap_or_default();
                outcome(
                    with_headers(client.post(url))
                        .header("Content-Type", "application/fhir+json")
                        .body(body)
                        .send(),
                )
            }
            // R4 with a payload: the resource PUT to [endpoint]/[type]/[id], a deletion DELETEd
            Flavor::R4 if spec.payload == Payload::FullResource && kind == Kind::EventNotification => {
                for e in events.iter().filter(|e| e.visible) {
                    let mut target = url.clone();
                    target.set_path(&format!(
                        "{}/{}/{}",
                        url.path().trim_end_matches('/'),
                        e.resource_type,
                        e.id
                    ));
                    let request = match (&e.resource, e.event) {
                        (_, ChangeEvent::Delete) => client.delete(target),
                        (Some(resource), _) => client
                            .put(target)
                            .header("Content-Type", "application/fhir+json")
                            .body(serde_json::to_vec(resource).unwrap_or_default()),
                        (None, _) => continue,
                    };
                    let sent = outcome(with_headers(request).send());
                    if let Sent::Failed(_) = sent {
                        return sent;
                    }
                }
                Sent::Ok
            }
            // R4 without payload: a POST without a body (also the handshake and heartbeat)
            Flavor::R4 => outcome(with_headers(client.post(url)).send()),
        }
    }

    /// Every attempt is an AuditEvent: who the notification was for (the owner), what it
    /// named, and how it ended.
    fn audit(&self, grant: &Grant, spec: &Spec, events: &[Event], sent: &Sent, kind: Kind) {
        let agent = Agent {
            user: grant.fhir_user.clone(),
            subject: Some(grant.subject.clone()),
            client_id: grant.client_id.clone(),
            roles: grant.roles.clone(),
            network: None,
            purpose_of_use: None,
            patient_context: grant.patient.clone(),
        };
        let mut record = AuditRecord::new(AuditKind::Notify, Action::Execute, agent);
        record.resource_type = Some(crate::store::subscription::SUBSCRIPTION.into());
        record.entities.push(format!("Subscription/{}", spec.id));
        for e in events.iter().filter(|e| e.visible) {
            record.entities.push(format!("{}/{}", e.resource_type, e.id));
            record.patients.extend(e.patients.iter().cloned());
        }
        match sent {
            Sent::Ok => {
                record.outcome = Outcome::Success;
                record.outcome_desc = Some(kind.code().into());
            }
            Sent::Failed(reason) => {
                record.outcome = Outcome::SeriousFailure;
                record.outcome_desc = Some(format!("{}: {reason}", kind.code()));
            }
        }
        if let Err(e) = self.auditor.record_blocking(&record) {
            tracing::error!(error = %e, "the audit event of a notification was not recorded");
        }
    }

    /// Sets the Subscription resource's status (a new version written by the server, which
    /// does not change its owner).
    fn set_resource_status(&self, id: &str, status: &str) {
        let access = crate::store::Access::All;
        let Ok(current) = self.store.read(&access, crate::store::subscription::SUBSCRIPTION, id) else {
            return;
        };
        let Some(mut value) = current
            .content
            .as_deref()
            .and_then(|c| serde_json::from_slice::<Value>(c).ok())
        else {
            return;
        };
        if value["status"] == status {
            return;
        }
        value["status"] = Value::String(status.into());
        let Value::Object(body) = value else { return };
        let agent = Agent {
            subject: Some(format!("fhirvault-subscriptions@{}", self.node)),
            ..Agent::default()
        };
        let template = AuditRecord::new(AuditKind::Rest("update"), Action::Update, agent);
        let mut template = template;
        template.resource_type = Some(crate::store::subscription::SUBSCRIPTION.into());
        let mut tx = self.auditor.for_write(template);
        let registry = self.search.current();
        let written = self.store.update(
            &access,
            crate::store::subscription::SUBSCRIPTION,
            id,
            Some(current.version_id),
            false,
            |v, ts| {
                let mut b = body.clone();
                let json = crate::fhir::resource::stamp(&mut b, id, v, &ts);
                let value = Value::Object(b);
                crate::store::Content {
                    json,
                    compartments: self
                        .compartment
                        .patients_of(crate::store::subscription::SUBSCRIPTION, &value)
                        .into_iter()
                        .collect(),
                    search: crate::search::index_rows(
                        &registry,
                        self.store.cipher(),
                        crate::store::subscription::SUBSCRIPTION,
                        &value,
                    ),
                }
            },
            &mut tx,
        );
        match written {
            Ok(_) => {
                self.auditor.link_committed(tx);
                // requested and active are matched alike: only a subscription leaving them
                // changes what this node matches
                if status != "active" {
                    self.refresh();
                }
            }
            Err(e) => tracing::warn!(error = %e, "updating a Subscription's status failed"),
        }
    }
}

/// An outbox event as a notification carries it, given what its recipient may see of it.
pub fn event_of(e: &OutboxEvent, seen: Option<Seen>) -> Event {
    Event {
        number: e.event_number.unwrap_or_default(),
        resource_type: e.resource_type.clone(),
        id: e.logical_id.clone(),
        event: ChangeEvent::parse(&e.event),
        recorded: e.recorded,
        visible: seen.is_some(),
        patients: seen.as_ref().map(|s| s.patients.clone()).unwrap_or_default(),
        resource: seen.and_then(|s| s.resource),
    }
}

/// What the owner may see of an event's resource.
pub struct Seen {
    pub resource: Option<Value>,
    pub patients: Vec<String>,
}

/// Decides what a principal may see of an event (deliveries: the owner; `$events`: the caller).
pub struct Viewer<'a> {
    pub store: &'a Store,
    pub compartment: &'a crate::fhir::compartment::PatientCompartment,
    pub attributes: &'a crate::auth::attributes::AttributePolicy,
    pub registry: &'a crate::search::Registry,
}

impl Viewer<'_> {
    /// Whether `p` may see the event's resource now, and what of it a notification carries;
    /// `None` when not (or when a deletion's filter does not hold for the version deleted, or
    /// an identifying parameter's blind match is not confirmed).
    /// A failure of the database is an error (the event waits for the next attempt), never a
    /// reason to leave the event out.
    pub fn visible(&self, p: &Principal, spec: &Spec, e: &OutboxEvent) -> Result<Option<Seen>, StoreError> {
        let Ok(decision) = authorize(p, &e.resource_type, Permission::Read) else {
            return Ok(None);
        };
        let deleted = e.event == ChangeEvent::Delete.as_str();
        let version = if deleted { e.version_id - 1 } else { e.version_id };
        let stored = match self
            .store
            .vread(&decision.access(), &e.resource_type, &e.logical_id, version)
        {
            Ok(v) => v,
            // outside the grant's compartment (row-level security), or gone
            Err(StoreError::NotFound | StoreError::Gone { .. }) => return Ok(None),
            Err(other) => return Err(other),
        };
        let Some(mut value) = stored
            .content
            .as_deref()
            .and_then(|c| serde_json::from_slice::<Value>(c).ok())
        else {
            return Ok(None);
        };
        if !decision.admits(self.compartment, &e.resource_type, &e.logical_id, Some(&value))
            || !self.attributes.labels_allow(p, &value)
        {
            return Ok(None);
        }
        if deleted {
            let rows = crate::search::index_rows(self.registry, self.store.cipher(), &e.resource_type, &value);
            if !super::matcher::holds(&spec.clauses, &e.resource_type, &e.logical_id, &rows) {
                return Ok(None);
            }
        }
        if !spec.rechecks.iter().all(|r| r.holds(&value, self.store.cipher())) {
            return Ok(None);
        }
        let resource = (spec.payload == Payload::FullResource && !deleted).then(|| {
            self.attributes.mask(p, &e.resource_type, &mut value);
            value
        });
        Ok(Some(Seen {
            resource,
            patients: stored.patients,
        }))
    }
}
