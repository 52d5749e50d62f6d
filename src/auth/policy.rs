//! The decision for one interaction: which permission it needs and in which contexts the
//! token holds it. Handlers call [`authorize`] before touching storage, and
//! [`Decision::check_resource`] on what storage returns.

use super::scope::{Context, Permission, ResourceScope};
use super::{AuthError, Principal};
use crate::fhir::compartment::PatientCompartment;
use crate::search::granular::ScopeFilter;
use crate::store::Access;
use serde_json::Value;
use std::sync::Arc;

/// What a token may do for one interaction on one resource type.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Any resource of the type (a `user/` or `system/` scope without conditions grants it).
    pub unrestricted: bool,
    /// Only resources in this patient's compartment (a `patient/` scope grants it).
    pub patient: Option<String>,
    /// The interaction only reads (read, search, includes): in a patient's context it also
    /// reaches the shared resources (see [`Decision::admits`]). Writes never do.
    pub reads: bool,
    /// SMART v2 granular scopes: only resources one of these filters admits (none: no such
    /// condition). Never set together with `unrestricted`.
    pub filters: Vec<Arc<ScopeFilter>>,
}

/// Decides whether `principal` may perform an interaction needing `needed` on `resource_type`.
///
/// Where scopes of several kinds grant it, the widest one without conditions decides (`user/`
/// or `system/`, then break-glass, then `patient/`); only where every granting scope is
/// granular do their filters apply, as alternatives (any may admit), those of `user/` and
/// `system/` scopes before those of `patient/` ones. A combination is never widened into
/// "this context or that one": the decision may be narrower than the union, never wider.
pub fn authorize(principal: &Principal, resource_type: &str, needed: Permission) -> Result<Decision, AuthError> {
    // a SearchParameter changes what the server indexes and answers: written by admins only
    if resource_type == "SearchParameter"
        && !matches!(needed, Permission::Read | Permission::Search)
        && !principal.roles.iter().any(|r| r == ADMIN_ROLE)
    {
        return Err(AuthError::InsufficientScope);
    }
    let granting: Vec<&ResourceScope> = principal
        .scopes
        .resources
        .iter()
        .filter(|s| s.grants(resource_type, needed))
        .collect();
    let plain = |c: Context| granting.iter().any(|s| s.context == c && s.filter.is_none());
    let filters = |contexts: &[Context]| -> Vec<Arc<ScopeFilter>> {
        granting
            .iter()
            .filter(|s| contexts.contains(&s.context))
            .filter_map(|s| s.filter.clone())
            .collect()
    };
    let reads = matches!(needed, Permission::Read | Permission::Search);
    let decision = |unrestricted: bool, patient: Option<String>, filters: Vec<Arc<ScopeFilter>>| Decision {
        unrestricted,
        patient,
        reads,
        filters,
    };
    // A user/ scope applies to the user's access; a system/ scope to a backend service. Both are
    // unrestricted by compartment here (user-level policy comes with attribute rules).
    if plain(Context::User) || plain(Context::System) {
        return Ok(decision(true, None, Vec::new()));
    }
    // break-glass widens the compartment check, nothing else (scope letters and labels hold)
    if plain(Context::Patient) && principal.break_glass {
        return Ok(decision(true, None, Vec::new()));
    }
    if let (true, Some(p)) = (plain(Context::Patient), &principal.patient) {
        return Ok(decision(false, Some(p.clone()), Vec::new()));
    }
    let broad = filters(&[Context::User, Context::System]);
    if !broad.is_empty() {
        return Ok(decision(false, None, broad));
    }
    let in_patient = filters(&[Context::Patient]);
    if !in_patient.is_empty() {
        if principal.break_glass {
            return Ok(decision(false, None, in_patient));
        }
        if let Some(p) = &principal.patient {
            return Ok(decision(false, Some(p.clone()), in_patient));
        }
    }
    Err(AuthError::InsufficientScope)
}

/// The role a token needs (besides its scopes) to create, change or delete SearchParameter
/// resources, which change what the server indexes.
pub const ADMIN_ROLE: &str = "admin";

/// The role a user token needs (besides a `user/` scope on AuditEvent) to read the audit log.
pub const AUDITOR_ROLE: &str = "auditor";

/// Whether `principal` may read and search the audit log (`needed`: Read or Search): a backend
/// service with a `system/` scope on AuditEvent, or a user with the auditor role and a `user/`
/// scope on it. Patient-context tokens see the log only through `$access-report`.
pub fn authorize_audit_log(principal: &Principal, needed: Permission) -> Result<(), AuthError> {
    let contexts = principal.scopes.contexts_granting("AuditEvent", needed);
    let system = contexts.contains(&Context::System);
    let auditor = contexts.contains(&Context::User) && principal.roles.iter().any(|r| r == AUDITOR_ROLE);
    if system || auditor {
        Ok(())
    } else {
        Err(AuthError::InsufficientScope)
    }
}

/// The decision for searching the audit log with the common search engine: whoever may read
/// the log ([`authorize_audit_log`]) reads all of it; nobody else any of it (a patient's own
/// accesses are `$access-report`'s).
pub fn authorize_audit_search(principal: &Principal, needed: Permission) -> Result<Decision, AuthError> {
    authorize_audit_log(principal, needed)?;
    Ok(Decision {
        unrestricted: true,
        patient: None,
        reads: true,
        filters: Vec::new(),
    })
}

/// Whether `principal` may see who accessed `patient_id`'s record (`Patient/{id}/$access-report`):
/// the patient themself (a `patient/AuditEvent.rs` scope in that patient's context), or whoever
/// may read the audit log.
pub fn authorize_access_report(principal: &Principal, patient_id: &str) -> Result<(), AuthError> {
    if authorize_audit_log(principal, Permission::Search).is_ok() {
        return Ok(());
    }
    let contexts = principal.scopes.contexts_granting("AuditEvent", Permission::Search);
    if contexts.contains(&Context::Patient) && principal.patient.as_deref() == Some(patient_id) {
        return Ok(());
    }
    // A patient asking about another patient: answered like an absent record.
    if contexts.contains(&Context::Patient) {
        return Err(AuthError::Hidden);
    }
    Err(AuthError::InsufficientScope)
}

impl Decision {
    /// Whether a resource is inside the token's rights: any resource for an unrestricted
    /// decision; for a patient-context one, the patient's own Patient resource and resources
    /// whose content places them in the patient's compartment, and, to read, resources of a
    /// shared type that lie in no patient's compartment (a Device naming another patient is
    /// that patient's, never shared). Without content (a deletion) only the Patient itself
    /// qualifies.
    pub fn admits(
        &self,
        compartment: &PatientCompartment,
        resource_type: &str,
        id: &str,
        content: Option<&Value>,
    ) -> bool {
        if self.unrestricted {
            return true;
        }
        let in_context = match self.patient.as_deref() {
            // granular scopes of user/ or system/ context (or break-glass): any patient's
            None => !self.filters.is_empty(),
            Some(patient) if resource_type == "Patient" && id == patient => true,
            Some(patient) => content.is_some_and(|c| {
                let patients = compartment.patients_of(resource_type, c);
                patients.contains(patient)
                    || (self.reads && patients.is_empty() && compartment.is_shared(resource_type))
            }),
        };
        // granular scopes: one of the filters admits the content (a deletion, without content,
        // only where no filter binds)
        in_context && (self.filters.is_empty() || content.is_some_and(|c| self.filters.iter().any(|f| f.matches(c))))
    }

    /// Whether the decision reaches resources of any patient (no compartment): unrestricted, or
    /// limited only by granular scopes' filters (Bulk export's condition).
    pub fn reaches_every_patient(&self) -> bool {
        self.unrestricted || (self.patient.is_none() && !self.filters.is_empty())
    }

    /// The search condition of the granular scopes on `resource_type` (one clause: the type is
    /// another, or one filter's conditions all hold); `None` where no filter binds.
    pub fn filter_clause(&self, resource_type: &str) -> Option<Vec<crate::store::search_query::Cond>> {
        use crate::store::search_query::Cond;
        if self.filters.is_empty() {
            return None;
        }
        let mut clause = vec![Cond::TypeNotIn(vec![resource_type.to_string()])];
        clause.extend(self.filters.iter().map(|f| Cond::All(f.conditions())));
        Some(clause)
    }

    /// The shared types a patient-context search of `types` may also return (resources of
    /// them in no patient's compartment); none for an unrestricted or a writing decision.
    pub fn shared_among(&self, compartment: &PatientCompartment, types: &[String]) -> Vec<String> {
        if self.unrestricted || !self.reads || self.patient.is_none() {
            return Vec::new();
        }
        types.iter().filter(|t| compartment.is_shared(t)).cloned().collect()
    }

    /// The storage access context for this decision (row-level security on PostgreSQL).
    pub fn access(&self) -> Access {
        match (&self.patient, self.unrestricted) {
            (Some(p), false) => Access::Patient(p.clone()),
            _ => Access::All,
        }
    }

    /// [`Decision::admits`] on stored JSON.
    pub fn admits_stored(
        &self,
        compartment: &PatientCompartment,
        resource_type: &str,
        id: &str,
        content: Option<&[u8]>,
    ) -> bool {
        if self.unrestricted {
            return true;
        }
        let parsed = content.and_then(|c| serde_json::from_slice::<Value>(c).ok());
        self.admits(compartment, resource_type, id, parsed.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{PrincipalKind, ScopeSet};

    fn principal(scope: &str, patient: Option<&str>) -> Principal {
        Principal {
            subject: "s".into(),
            kind: if patient.is_some() {
                PrincipalKind::Patient
            } else {
                PrincipalKind::System
            },
            scopes: ScopeSet::parse(scope, |t| matches!(t, "Patient" | "Observation")),
            patient: patient.map(str::to_string),
            fhir_user: None,
            client_id: None,
            amr: vec![],
            roles: vec![],
            break_glass: false,
            purpose_of_use: None,
            token_id: "j".into(),
            expires_at: i64::MAX,
        }
    }

    #[test]
    fn the_audit_log_needs_a_system_scope_or_the_auditor_role() {
        let is_type = |t: &str| matches!(t, "AuditEvent" | "Patient");
        let with = |scope: &str, roles: &[&str], patient: Option<&str>| {
            let mut p = principal("", patient);
            p.scopes = ScopeSet::parse(scope, is_type);
            p.roles = roles.iter().map(|r| r.to_string()).collect();
            p
        };
        assert!(authorize_audit_log(&with("system/AuditEvent.rs", &[], None), Permission::Search).is_ok());
        assert!(authorize_audit_log(&with("user/AuditEvent.rs", &["auditor"], None), Permission::Search).is_ok());
        assert!(authorize_audit_log(&with("user/AuditEvent.rs", &["nurse"], None), Permission::Search).is_err());
        assert!(authorize_audit_log(&with("system/Patient.rs", &[], None), Permission::Search).is_err());
        let patient = with("patient/AuditEvent.rs", &[], Some("p1"));
        assert!(authorize_audit_log(&patient, Permission::Search).is_err());
        assert!(authorize_access_report(&patient, "p1").is_ok());
        assert!(matches!(
            authorize_access_report(&patient, "p2"),
            Err(AuthError::Hidden)
        ));
        let no_scope = with("patient/Patient.rs", &[], Some("p1"));
        assert!(authorize_access_report(&no_scope, "p1").is_err());
    }

    #[test]
    fn system_scopes_are_by_type() {
        let p = principal("system/Patient.r", None);
        let c = PatientCompartment::default();
        assert!(authorize(&p, "Patient", Permission::Read)
            .unwrap()
            .admits(&c, "Patient", "any", None));
        assert!(matches!(
            authorize(&p, "Patient", Permission::Update),
            Err(AuthError::InsufficientScope)
        ));
        assert!(authorize(&p, "Observation", Permission::Read).is_err());
    }

    #[test]
    fn patient_scopes_admit_the_patient_compartment() {
        let c = PatientCompartment::r4().unwrap();
        let p = principal("patient/*.rs", Some("p1"));
        let d = authorize(&p, "Patient", Permission::Read).unwrap();
        assert!(d.admits(&c, "Patient", "p1", None));
        assert!(!d.admits(&c, "Patient", "p2", None));
        let d = authorize(&p, "Observation", Permission::Read).unwrap();
        let mine = serde_json::json!({"subject": {"reference": "Patient/p1"}});
        let theirs = serde_json::json!({"subject": {"reference": "Patient/p2"}});
        assert!(d.admits(&c, "Observation", "o1", Some(&mine)));
        assert!(!d.admits(&c, "Observation", "o2", Some(&theirs)));
        assert!(!d.admits(&c, "Observation", "o1", None));
        // a patient scope without a patient claim grants nothing
        let p = principal("patient/*.rs", None);
        assert!(authorize(&p, "Patient", Permission::Read).is_err());
    }
}
