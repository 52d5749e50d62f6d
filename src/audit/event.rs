//! The AuditEvent a request produces, shaped after the IHE Basic Audit Log Patterns (BALP):
//! type and subtype, action, recorded, outcome, agents (user, client, this server), source and
//! entities. An event is built once, serialized canonically (the bytes the hash chain covers)
//! and sealed for storage; its search columns are taken from the same values.

use crate::crypto::{Aad, Cipher};
use crate::store::audit::{event_aad, AuditRow};
use chrono::NaiveDateTime;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;

use super::AuditError;

// The systems of type and subtype are the search's too: it answers `system|code` from the
// codes the derived rows hold (subtypes of our own for what FHIR and DICOM have no code for:
// token issue, CLI commands …).
pub use crate::store::audit::search::FHIRVAULT_SUBTYPES;
use crate::store::audit::search::{
    address_blind, AGENT_ROLE_ROW, AUDIT_EVENT_TYPE, DCM, ENTITY_ROLE_ROW, QUERY_ROLE, RESTFUL_INTERACTION,
};
const PARTICIPATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const SOURCE_TYPE: &str = "http://terminology.hl7.org/CodeSystem/security-source-type";
// Codings carry system and code only (displays are the code systems' to give): every byte is
// written, hashed and sealed once per request.

/// AuditEvent.action
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Read,
    Update,
    Delete,
    Execute,
}

impl Action {
    pub fn code(self) -> &'static str {
        match self {
            Action::Create => "C",
            Action::Read => "R",
            Action::Update => "U",
            Action::Delete => "D",
            Action::Execute => "E",
        }
    }
}

/// AuditEvent.outcome
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The request failed on the client's side (4xx: refused, invalid, absent …).
    MinorFailure,
    /// The server failed to perform the request (5xx).
    SeriousFailure,
    /// The server's integrity is in question (tampered data found, audit unavailable).
    MajorFailure,
}

impl Outcome {
    pub fn code(self) -> &'static str {
        match self {
            Outcome::Success => "0",
            Outcome::MinorFailure => "4",
            Outcome::SeriousFailure => "8",
            Outcome::MajorFailure => "12",
        }
    }

    pub fn of_status(status: u16) -> Outcome {
        match status {
            0..=399 => Outcome::Success,
            400..=499 => Outcome::MinorFailure,
            _ => Outcome::SeriousFailure,
        }
    }
}

/// AuditEvent.type and .subtype: what kind of event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A RESTful interaction (`read`, `search-type`, `create` …), or an operation (`operation`).
    Rest(&'static str),
    /// An authentication or token event (`token-issue`, `login`, `authentication-failure` …).
    Security(&'static str),
    /// Administration from the command line (`migrate`, `audit-verify`, `audit-export` …).
    Admin(&'static str),
    /// A subscription notification sent to an endpoint outside the server (`notify`): data
    /// leaving the server, recorded as an export.
    Notify,
}

impl Kind {
    fn type_coding(&self) -> (&'static str, &'static str, &'static str) {
        match self {
            Kind::Rest(_) => (AUDIT_EVENT_TYPE, "rest", "Restful Operation"),
            Kind::Security(_) => (DCM, "110114", "User Authentication"),
            Kind::Admin(_) => (DCM, "110100", "Application Activity"),
            Kind::Notify => (DCM, "110106", "Export"),
        }
    }

    fn subtype_coding(&self) -> (&'static str, &'static str) {
        match self {
            Kind::Rest(code) => (RESTFUL_INTERACTION, code),
            Kind::Security(code) | Kind::Admin(code) => (FHIRVAULT_SUBTYPES, code),
            Kind::Notify => (FHIRVAULT_SUBTYPES, "notify"),
        }
    }
}

/// Who acted: the user or system behind the token, and the client software.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Agent {
    /// `fhirUser` (Practitioner/1, Patient/2 …), when the token names one.
    pub user: Option<String>,
    /// The token's subject, issuer-qualified by the token source.
    pub subject: Option<String>,
    pub client_id: Option<String>,
    pub roles: Vec<String>,
    /// The client's network address.
    pub network: Option<String>,
    /// Declared purpose of use (`BTG` for break-glass, `TREAT` …).
    pub purpose_of_use: Option<String>,
    /// The token's launch patient, if any.
    pub patient_context: Option<String>,
}

impl Agent {
    /// The value AuditEvent's `agent` search parameter matches: the user's reference, else the
    /// client, else the subject.
    pub fn search_key(&self) -> String {
        self.user
            .clone()
            .or_else(|| self.client_id.clone())
            .or_else(|| self.subject.clone())
            .unwrap_or_else(|| "anonymous".into())
    }
}

/// One event, before it is serialized.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub id: String,
    pub recorded: NaiveDateTime,
    pub kind: Kind,
    pub action: Action,
    pub outcome: Outcome,
    /// A fixed text (never request data): why the request failed.
    pub outcome_desc: Option<String>,
    pub agent: Agent,
    /// What was touched: references, versioned where a version was read or written.
    pub entities: Vec<String>,
    /// The patients whose data was returned or changed.
    pub patients: BTreeSet<String>,
    /// A search's query string (may hold PHI: it is only ever stored sealed).
    pub query: Option<String>,
    /// The resource type the request named (for `search-type` and failures without an entity).
    pub resource_type: Option<String>,
}

/// The server's own identity in every event (`source`, and the destination agent).
#[derive(Debug, Clone)]
pub struct Source {
    pub site: String,
    pub observer: String,
}

/// `Observation/1/_history/2` → `Observation/1`
pub fn versionless(reference: &str) -> &str {
    match reference.find("/_history/") {
        Some(i) => &reference[..i],
        None => reference,
    }
}

impl AuditRecord {
    pub fn new(kind: Kind, action: Action, agent: Agent) -> AuditRecord {
        AuditRecord {
            id: uuid::Uuid::now_v7().to_string(),
            recorded: crate::store::now(),
            kind,
            action,
            outcome: Outcome::Success,
            outcome_desc: None,
            agent,
            entities: Vec::new(),
            patients: BTreeSet::new(),
            query: None,
            resource_type: None,
        }
    }

    /// The AuditEvent resource. A search's query is carried sealed (base64 of its ciphertext,
    /// bound to this event), so that not even an export of the log holds it in plaintext;
    /// [`reveal_query`] opens it for an authorized reader.
    pub fn to_resource(&self, source: &Source, cipher: &Cipher) -> Result<Value, AuditError> {
        let (tsys, tcode, tdisplay) = self.kind.type_coding();
        let (ssys, scode) = self.kind.subtype_coding();
        let mut ev = Map::new();
        ev.insert("resourceType".into(), json!("AuditEvent"));
        ev.insert("id".into(), json!(self.id));
        ev.insert(
            "type".into(),
            json!({"system": tsys, "code": tcode, "display": tdisplay}),
        );
        ev.insert("subtype".into(), json!([{"system": ssys, "code": scode}]));
        ev.insert("action".into(), json!(self.action.code()));
        ev.insert(
            "recorded".into(),
            json!(self.recorded.and_utc().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()),
        );
        ev.insert("outcome".into(), json!(self.outcome.code()));
        if let Some(desc) = &self.outcome_desc {
            ev.insert("outcomeDesc".into(), json!(desc));
        }
        let purpose = self
            .agent
            .purpose_of_use
            .as_ref()
            .map(|p| json!([{"coding": [{"system": ACT_REASON, "code": p}]}]));
        if let Some(p) = &purpose {
            ev.insert("purposeOfEvent".into(), p.clone());
        }
        let mut agents = Vec::new();
        // the human or system the token stands for
        let mut who = Map::new();
        if let Some(u) = &self.agent.user {
            who.insert("reference".into(), json!(u));
        }
        if let Some(s) = &self.agent.subject {
            who.insert(
                "identifier".into(),
                json!({"system": "urn:fhirvault:token-subject", "value": s}),
            );
        }
        if who.is_empty() {
            who.insert("display".into(), json!("unauthenticated"));
        }
        let mut user = Map::new();
        user.insert(
            "type".into(),
            json!({"coding": [{"system": PARTICIPATION, "code": "IRCP"}]}),
        );
        if !self.agent.roles.is_empty() {
            let roles: Vec<Value> = self.agent.roles.iter().map(|r| json!({"text": r})).collect();
            user.insert("role".into(), Value::Array(roles));
        }
        user.insert("who".into(), Value::Object(who));
        user.insert("requestor".into(), json!(true));
        if let Some(p) = &purpose {
            user.insert("purposeOfUse".into(), p.clone());
        }
        agents.push(Value::Object(user));
        // the client software, where the request came from
        let mut client = Map::new();
        client.insert("type".into(), json!({"coding": [{"system": DCM, "code": "110153"}]}));
        client.insert(
            "who".into(),
            match &self.agent.client_id {
                Some(c) => json!({"identifier": {"system": "urn:fhirvault:client-id", "value": c}}),
                None => json!({"display": "unidentified client"}),
            },
        );
        client.insert("requestor".into(), json!(false));
        if let Some(addr) = &self.agent.network {
            client.insert("network".into(), json!({"address": addr, "type": "2"}));
        }
        agents.push(Value::Object(client));
        // this server
        agents.push(json!({
            "type": {"coding": [{"system": DCM, "code": "110152"}]},
            "who": {"display": source.observer},
            "requestor": false
        }));
        ev.insert("agent".into(), Value::Array(agents));
        ev.insert(
            "source".into(),
            json!({
                "site": source.site,
                "observer": {"display": source.observer},
                "type": [{"system": SOURCE_TYPE, "code": "4"}]
            }),
        );
        let mut entities = Vec::new();
        for p in &self.patients {
            entities.push(json!({
                "what": {"reference": format!("Patient/{p}")},
                "type": {"system": ENTITY_TYPE, "code": "1"},
                "role": {"system": OBJECT_ROLE, "code": "1"}
            }));
        }
        for e in &self.entities {
            entities.push(json!({
                "what": {"reference": e},
                "type": {"system": ENTITY_TYPE, "code": "2"}
            }));
        }
        if let Some(q) = &self.query {
            use base64::Engine;
            let sealed = cipher
                .seal_stable(&query_aad(&self.id), q.as_bytes())
                .map_err(|_| AuditError::Seal)?;
            let mut query = json!({
                "type": {"system": ENTITY_TYPE, "code": "2"},
                "role": {"system": OBJECT_ROLE, "code": "24"},
                "query": base64::engine::general_purpose::STANDARD.encode(sealed.as_bytes())
            });
            if let Some(t) = &self.resource_type {
                query["description"] = json!(format!("search of {t}"));
            }
            entities.push(query);
        }
        if !entities.is_empty() {
            ev.insert("entity".into(), Value::Array(entities));
        }
        Ok(Value::Object(ev))
    }

    /// Canonical bytes (what the chain hashes) and the sealed row.
    pub fn seal(&self, source: &Source, cipher: &Cipher) -> Result<(AuditRow, Vec<u8>), AuditError> {
        let canonical = canonical_json(&self.to_resource(source, cipher)?);
        let content = cipher
            .seal(&event_aad(&self.id), &canonical)
            .map_err(|_| AuditError::Seal)?;
        let (_, subtype) = self.kind.subtype_coding();
        let (_, type_code, _) = self.kind.type_coding();
        let entities: Vec<String> = self.entities.iter().map(|e| versionless(e).to_string()).collect();
        let row = AuditRow {
            id: self.id.clone(),
            recorded: self.recorded,
            chain_id: 0,
            type_code: type_code.to_string(),
            subtype: subtype.to_string(),
            action: self.action.code().to_string(),
            outcome: self.outcome.code().to_string(),
            agent: self.agent.search_key(),
            key_version: cipher.current_version() as i32,
            content,
            entities,
            patients: self.patients.iter().cloned().collect(),
            site: source.site.clone(),
            address: self.agent.network.as_deref().map(|a| address_blind(cipher, a)),
            facets: self
                .agent
                .roles
                .iter()
                .map(|r| (AGENT_ROLE_ROW.to_string(), r.clone()))
                .chain(
                    self.query
                        .as_ref()
                        .map(|_| (ENTITY_ROLE_ROW.to_string(), QUERY_ROLE.to_string())),
                )
                .collect(),
        };
        Ok((row, canonical))
    }
}

/// The AAD of a sealed query: bound to its event.
fn query_aad(event_id: &str) -> Aad<'_> {
    Aad {
        table: "audit_query",
        resource_type: "AuditEvent",
        logical_id: event_id,
        version_id: 1,
    }
}

/// Replaces the sealed query of a search event by the query itself (base64, as FHIR has it),
/// for a reader allowed to see it. A query that does not open is removed.
pub fn reveal_query(event: &mut Value, cipher: &Cipher) {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    let id = event.get("id").and_then(Value::as_str).unwrap_or("").to_string();
    let Some(entities) = event.get_mut("entity").and_then(Value::as_array_mut) else {
        return;
    };
    for e in entities.iter_mut() {
        let Some(obj) = e.as_object_mut() else { continue };
        let Some(sealed) = obj.get("query").and_then(Value::as_str) else {
            continue;
        };
        let plain = STANDARD.decode(sealed).ok().and_then(|b| {
            cipher
                .open_stable(&query_aad(&id), &crate::crypto::Sealed::from_stored(b))
                .ok()
        });
        match plain {
            Some(q) => {
                obj.insert("query".into(), Value::String(STANDARD.encode(q)));
            }
            None => {
                obj.remove("query");
            }
        }
    }
}

/// The search columns an event's content implies: what `audit verify` compares the stored
/// columns with, so that editing a column (not only the sealed content) is caught. The cipher
/// makes the address's blind index.
pub fn columns_of(event: &Value, cipher: &Cipher) -> Option<Columns> {
    let agent_key = {
        let user = event.pointer("/agent/0/who/reference").and_then(Value::as_str);
        let subject = event.pointer("/agent/0/who/identifier/value").and_then(Value::as_str);
        let client = event.pointer("/agent/1/who/identifier/value").and_then(Value::as_str);
        user.or(client).or(subject).unwrap_or("anonymous").to_string()
    };
    let type_code = event.pointer("/type/code")?.as_str()?.to_string();
    let subtype = event.pointer("/subtype/0/code")?.as_str()?.to_string();
    let action = event.get("action")?.as_str()?.to_string();
    let outcome = event.get("outcome")?.as_str()?.to_string();
    let mut refs = BTreeSet::new();
    for e in event.get("entity").and_then(Value::as_array).into_iter().flatten() {
        if let Some(r) = e.pointer("/what/reference").and_then(Value::as_str) {
            let role = if e.pointer("/role/code").and_then(Value::as_str) == Some("1") {
                "patient"
            } else {
                "entity"
            };
            refs.insert((role.to_string(), versionless(r).to_string()));
        }
        if e.pointer("/role/code").and_then(Value::as_str) == Some(QUERY_ROLE) {
            refs.insert((ENTITY_ROLE_ROW.to_string(), QUERY_ROLE.to_string()));
        }
    }
    let roles = event.pointer("/agent/0/role").and_then(Value::as_array);
    for text in roles.into_iter().flatten().filter_map(|r| r.get("text")?.as_str()) {
        refs.insert((AGENT_ROLE_ROW.to_string(), text.to_string()));
    }
    let site = event
        .pointer("/source/site")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let address = event
        .pointer("/agent/1/network/address")
        .and_then(Value::as_str)
        .map(|a| address_blind(cipher, a));
    Some(Columns {
        type_code,
        subtype,
        action,
        outcome,
        agent: agent_key,
        site,
        address,
        references: refs,
    })
}

/// The search columns of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    pub type_code: String,
    pub subtype: String,
    pub action: String,
    pub outcome: String,
    pub agent: String,
    pub site: String,
    /// The blind index of the client's network address.
    pub address: Option<Vec<u8>>,
    /// (role, versionless reference): `patient` for the patients, `entity` for the rest; and
    /// the facet rows (agent roles, a search's query entity).
    pub references: BTreeSet<(String, String)>,
}

/// JSON with object keys sorted and no whitespace (RFC 8785 for the values events hold:
/// strings, integers, booleans), so that anyone can recompute an event's bytes.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    fn write(v: &Value, out: &mut Vec<u8>) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
                out.push(b'{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    serde_json::to_writer(&mut *out, k).expect("writing to a Vec cannot fail");
                    out.push(b':');
                    write(&m[k], out);
                }
                out.push(b'}');
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(item, out);
                }
                out.push(b']');
            }
            other => serde_json::to_writer(&mut *out, other).expect("writing to a Vec cannot fail"),
        }
    }
    let mut out = Vec::with_capacity(1024);
    write(v, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_knows_the_system_of_every_type_recorded() {
        for kind in [Kind::Rest("read"), Kind::Security("login"), Kind::Admin("migrate")] {
            let (system, code, _) = kind.type_coding();
            assert_eq!(crate::store::audit::search::type_system(code), system);
        }
    }

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let v: Value = serde_json::from_str(r#"{ "b": [1, {"z": true, "a": null}], "a": "x\n" }"#).unwrap();
        assert_eq!(
            canonical_json(&v),
            br#"{"a":"x\n","b":[1,{"a":null,"z":true}]}"#.to_vec()
        );
    }

    #[test]
    fn an_event_is_a_balp_shaped_audit_event() {
        let mut r = AuditRecord::new(
            Kind::Rest("read"),
            Action::Read,
            Agent {
                user: Some("Practitioner/7".into()),
                subject: Some("u7".into()),
                client_id: Some("app".into()),
                roles: vec!["nurse".into()],
                network: Some("10.0.0.1".into()),
                purpose_of_use: Some("BTG".into()),
                patient_context: None,
            },
        );
        r.entities.push("Observation/1/_history/2".into());
        r.patients.insert("p1".into());
        r.query = Some("name=Zorblax".into());
        let source = Source {
            site: "test".into(),
            observer: "fhirvault".into(),
        };
        let cipher = crate::crypto::test_cipher();
        let mut v = r.to_resource(&source, &cipher).unwrap();
        assert_eq!(v["type"]["code"], "rest");
        assert_eq!(v["subtype"][0]["code"], "read");
        assert_eq!(v["action"], "R");
        assert_eq!(v["outcome"], "0");
        assert_eq!(v["agent"][0]["who"]["reference"], "Practitioner/7");
        assert_eq!(v["agent"][0]["purposeOfUse"][0]["coding"][0]["code"], "BTG");
        assert_eq!(v["agent"][1]["network"]["address"], "10.0.0.1");
        assert_eq!(v["entity"][0]["what"]["reference"], "Patient/p1");
        assert_eq!(v["entity"][1]["what"]["reference"], "Observation/1/_history/2");
        assert!(v["entity"][2]["query"].is_string());
        // the query is sealed inside the event: not even base64 of it appears
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode("name=Zorblax");
        let text = serde_json::to_string(&v).unwrap();
        assert!(!text.contains("Zorblax") && !text.contains(&b64));
        let c = columns_of(&v, &cipher).unwrap();
        assert_eq!(
            (
                c.type_code.as_str(),
                c.subtype.as_str(),
                c.action.as_str(),
                c.outcome.as_str()
            ),
            ("rest", "read", "R", "0")
        );
        assert_eq!(c.agent, r.agent.search_key());
        assert!(c.references.contains(&("patient".into(), "Patient/p1".into())));
        assert!(c.references.contains(&("entity".into(), "Observation/1".into())));
        // the rows the writer hands over without decrypting are those the content implies
        // (what the deriver stores after a restart, and what `audit verify` compares)
        let (row, _) = r.seal(&source, &cipher).unwrap();
        let handed = row.search_row();
        assert_eq!((&handed.site, &handed.address), (&c.site, &c.address));
        assert_eq!(handed.references, c.references);
        assert_eq!(c.site, "test");
        assert_eq!(c.address, Some(address_blind(&cipher, "10.0.0.1")));
        assert!(c.references.contains(&(AGENT_ROLE_ROW.into(), "nurse".into())));
        // entity-type and entity-role as the search answers them from these rows: a patient
        // is type 1 role 1, a resource type 2 without a role, the query type 2 role 24
        let coded: Vec<(String, String, Option<String>)> = v["entity"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let what = if e.get("query").is_some() {
                    "query".to_string()
                } else {
                    e["what"]["reference"]
                        .as_str()
                        .unwrap()
                        .split('/')
                        .next()
                        .unwrap()
                        .to_string()
                };
                let role = e["role"]["code"].as_str().map(str::to_string);
                (what, e["type"]["code"].as_str().unwrap().to_string(), role)
            })
            .collect();
        assert_eq!(
            coded,
            vec![
                ("Patient".into(), "1".into(), Some("1".into())),
                ("Observation".into(), "2".into(), None),
                ("query".into(), "2".into(), Some(QUERY_ROLE.into())),
            ]
        );
        assert!(c.references.contains(&(ENTITY_ROLE_ROW.into(), QUERY_ROLE.into())));
        // the resource validates against the R4 schema
        let validator = crate::fhir::Validator::r4().unwrap();
        assert!(
            validator.validate("AuditEvent", &v).is_empty(),
            "{:?}",
            validator.validate("AuditEvent", &v)
        );
        // an authorized reader gets the query back
        reveal_query(&mut v, &cipher);
        assert_eq!(v["entity"][2]["query"], b64);
    }
}
