//! The audit trail of one request: what the router and the handler learn about it (who, what
//! interaction, which resources and patients, the query), turned into its AuditEvent when the
//! response is ready. Writes record their event inside their own transaction and mark the trail
//! committed; everything else is recorded here, and the response leaves only once the event is
//! durable (fail closed: no event, no data).

use super::route::Interaction;
use super::{ApiError, AppState};
use crate::audit::{Action, Agent, AuditRecord, Kind, Outcome, TxAudit};
use crate::auth::Principal;
use actix_web::http::Method;
use actix_web::{HttpMessage, HttpRequest, HttpResponse, ResponseError};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;

#[derive(Debug)]
struct State {
    record: AuditRecord,
    /// The event was written in the request's own (committed) transaction.
    committed: bool,
    /// Tells the audit writer that this request's event is on its way.
    in_flight: Option<crate::audit::InFlight>,
    /// The token's grant, serialized, when the request may write a Subscription (it becomes
    /// the subscription's owner).
    owner: Option<String>,
}

/// Shared between the router and the handler through the request's extensions.
#[derive(Debug, Clone)]
pub struct Trail(Rc<RefCell<State>>);

/// The RESTful interaction code and action a request is audited as.
fn kind_of(method: &Method, interaction: Option<&Interaction>) -> (&'static str, Action) {
    match interaction {
        Some(i) => (i.name(), i.action()),
        None => match *method {
            Method::GET | Method::HEAD => ("read", Action::Read),
            Method::POST => ("create", Action::Create),
            Method::PUT | Method::PATCH => ("update", Action::Update),
            Method::DELETE => ("delete", Action::Delete),
            _ => ("operation", Action::Execute),
        },
    }
}

impl Trail {
    /// Starts the trail of a request under the FHIR base and attaches it to the request.
    pub fn start(req: &HttpRequest, state: &AppState, interaction: Option<&Interaction>) -> Trail {
        let (code, action) = kind_of(req.method(), interaction);
        let agent = Agent {
            network: req.peer_addr().map(|a| a.ip().to_string()),
            ..Agent::default()
        };
        let mut record = AuditRecord::new(Kind::Rest(code), action, agent);
        if let Some(i) = interaction {
            record.resource_type = i.resource_type().map(str::to_string);
            if let Some(r) = i.reference() {
                record.entities.push(r);
            }
        }
        let trail = Trail(Rc::new(RefCell::new(State {
            record,
            committed: false,
            in_flight: Some(state.auditor.in_flight()),
            owner: None,
        })));
        req.extensions_mut().insert(trail.clone());
        trail
    }

    /// The trail of this request (the router starts one for every FHIR request; a handler
    /// reached some other way gets an error, never a panic).
    pub fn of(req: &HttpRequest) -> Result<Trail, ApiError> {
        req.extensions().get::<Trail>().cloned().ok_or_else(|| {
            tracing::error!("a FHIR handler ran without an audit trail");
            ApiError::Internal
        })
    }

    /// The token the request was made with.
    pub fn principal(&self, p: &Principal) {
        let mut s = self.0.borrow_mut();
        let a = &mut s.record.agent;
        a.user = p.fhir_user.clone();
        a.subject = Some(p.subject.clone());
        a.client_id = p.client_id.clone();
        a.roles = p.roles.clone();
        // BTG marks the requests break-glass actually applied to (a user, within its window)
        a.purpose_of_use = if p.break_glass {
            Some("BTG".into())
        } else {
            p.purpose_of_use.clone().filter(|purpose| purpose != "BTG")
        };
        a.patient_context = p.patient.clone();
        // only a request that may write a Subscription (of that type, or a Bundle) needs it
        if matches!(
            s.record.resource_type.as_deref(),
            None | Some(crate::store::subscription::SUBSCRIPTION)
        ) {
            s.owner = Some(crate::auth::Grant::of(p).to_json());
        }
    }

    /// What the request touched, replacing the reference it named (a versioned reference once
    /// the version is known), and whose data it was.
    pub fn touched(&self, reference: String, patients: &[String]) {
        let mut s = self.0.borrow_mut();
        s.record.entities = vec![reference];
        s.record.patients.extend(patients.iter().cloned());
    }

    /// One more entity the request touched (after [`Trail::touched`]).
    pub fn also_touched(&self, reference: String, patients: &[String]) {
        let mut s = self.0.borrow_mut();
        s.record.entities.push(reference);
        s.record.patients.extend(patients.iter().cloned());
    }

    /// The patients whose data a listing returned.
    pub fn returned_patients<'a>(&self, patients: impl IntoIterator<Item = &'a String>) {
        self.0
            .borrow_mut()
            .record
            .patients
            .extend(patients.into_iter().cloned());
    }

    /// The query of a search (kept only inside the sealed event).
    pub fn query(&self, query: &str) {
        if !query.is_empty() {
            self.0.borrow_mut().record.query = Some(query.to_string());
        }
    }

    /// The hook for a write transaction, prefilled with what is known so far.
    pub fn for_write(&self, state: &AppState) -> TxAudit {
        let s = self.0.borrow();
        state.auditor.for_write(s.record.clone()).with_owner(s.owner.clone())
    }

    /// What a Bundle turned out to be (`batch` or `transaction`): the request's own event's subtype.
    pub fn bundle_kind(&self, code: &'static str) {
        self.0.borrow_mut().record.kind = Kind::Rest(code);
    }

    /// The record of one entry of a Bundle: this request's agent, the entry's interaction.
    fn entry_record(&self, interaction: &Interaction) -> AuditRecord {
        let mut record = self.0.borrow().record.clone();
        record.kind = Kind::Rest(interaction.name());
        record.action = interaction.action();
        record.resource_type = interaction.resource_type().map(str::to_string);
        record.entities = interaction.reference().into_iter().collect();
        record.patients = BTreeSet::new();
        record.query = None;
        record
    }

    /// The write hook of one Bundle entry: its own AuditEvent, inside the entry's transaction.
    pub fn for_entry(&self, state: &AppState, interaction: &Interaction) -> TxAudit {
        let owner = match interaction.resource_type() {
            Some(crate::store::subscription::SUBSCRIPTION) => self.0.borrow().owner.clone(),
            _ => None,
        };
        state
            .auditor
            .for_write(self.entry_record(interaction))
            .with_owner(owner)
    }

    /// Records that a Bundle entry failed (its transaction, and the event in it, rolled back).
    pub async fn entry_failed(
        &self,
        state: &AppState,
        interaction: &Interaction,
        error: &ApiError,
    ) -> Result<(), ApiError> {
        let mut record = self.entry_record(interaction);
        record.id = uuid::Uuid::now_v7().to_string();
        record.outcome = Outcome::of_status(error.status_code().as_u16());
        record.outcome_desc = Some(error.audit_text());
        record.recorded = crate::store::now();
        state.auditor.record(&record).await.map_err(|e| {
            tracing::error!(error = %e, "audit event not recorded: the response is withheld");
            ApiError::AuditUnavailable
        })
    }

    /// After a Bundle's entries committed: their events go into the chain.
    pub fn entries_committed(&self, state: &AppState, txs: Vec<TxAudit>) {
        let search_parameters = txs.iter().any(|tx| tx.resource_type() == Some("SearchParameter"));
        let subscriptions = txs
            .iter()
            .any(|tx| tx.resource_type() == Some(crate::store::subscription::SUBSCRIPTION));
        for tx in txs {
            state.auditor.link_committed(tx);
        }
        if search_parameters {
            crate::server::refresh_search_parameters(&state.store, &state.search);
        }
        if subscriptions {
            state.refresh_subscriptions();
        }
    }

    /// The write committed with its event: nothing more to record for this request.
    pub fn committed(&self, state: &AppState, tx: TxAudit) {
        let mut s = self.0.borrow_mut();
        s.committed = true;
        s.in_flight = None;
        drop(s);
        let search_parameter = tx.resource_type() == Some("SearchParameter");
        let subscription = tx.resource_type() == Some(crate::store::subscription::SUBSCRIPTION);
        state.auditor.link_committed(tx);
        // a Subscription written here is matched against the next write at once
        if subscription {
            state.refresh_subscriptions();
        }
        // a SearchParameter written here is searchable, and indexed by the next write, at once
        if search_parameter {
            crate::server::refresh_search_parameters(&state.store, &state.search);
        }
    }

    /// Records the request's event with the outcome of `result` (unless a write transaction
    /// already did), and returns `result` only once it is durable.
    pub async fn finish(
        self,
        state: &AppState,
        result: Result<HttpResponse, ApiError>,
    ) -> Result<HttpResponse, ApiError> {
        let record = {
            let s = self.0.borrow();
            if s.committed {
                return result;
            }
            let mut record = s.record.clone();
            let status = match &result {
                Ok(r) => r.status().as_u16(),
                Err(e) => e.status_code().as_u16(),
            };
            record.outcome = Outcome::of_status(status);
            if let Err(e) = &result {
                record.outcome_desc = Some(e.audit_text());
                // a failed request returned nobody's data
                record.patients = BTreeSet::new();
            }
            record.recorded = crate::store::now();
            record
        };
        let in_flight = self.0.borrow_mut().in_flight.take();
        let recorded = state.auditor.record_releasing(&record, in_flight).await;
        match recorded {
            Ok(()) => result,
            Err(e) => {
                tracing::error!(error = %e, "audit event not recorded: the response is withheld");
                Err(ApiError::AuditUnavailable)
            }
        }
    }
}
