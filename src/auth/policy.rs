//! The decision for one interaction: which permission it needs and in which contexts the
//! token holds it. Handlers call [`authorize`] before touching storage, and
//! [`Decision::check_resource`] on what storage returns.

use super::scope::{Context, Permission};
use super::{AuthError, Principal};
use crate::fhir::compartment::PatientCompartment;
use crate::store::Access;
use serde_json::Value;

/// What a token may do for one interaction on one resource type.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Any resource of the type (a `user/` or `system/` scope grants it).
    pub unrestricted: bool,
    /// Only resources in this patient's compartment (a `patient/` scope grants it).
    pub patient: Option<String>,
}

/// Decides whether `principal` may perform an interaction needing `needed` on `resource_type`.
pub fn authorize(principal: &Principal, resource_type: &str, needed: Permission) -> Result<Decision, AuthError> {
    let contexts = principal.scopes.contexts_granting(resource_type, needed);
    // A user/ scope applies to the user's access; a system/ scope to a backend service. Both are
    // unrestricted by compartment here (user-level policy comes with attribute rules).
    let unrestricted = contexts.contains(&Context::User)
        || contexts.contains(&Context::System)
        // break-glass widens the compartment check, nothing else (scope letters and labels hold)
        || (principal.break_glass && contexts.contains(&Context::Patient));
    let patient = if contexts.contains(&Context::Patient) {
        principal.patient.clone()
    } else {
        None
    };
    if !unrestricted && patient.is_none() {
        return Err(AuthError::InsufficientScope);
    }
    Ok(Decision { unrestricted, patient })
}

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
    /// whose content places them in the patient's compartment. Without content (a deletion)
    /// only the Patient itself qualifies.
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
        let Some(patient) = self.patient.as_deref() else {
            return false;
        };
        if resource_type == "Patient" && id == patient {
            return true;
        }
        content.is_some_and(|c| compartment.patients_of(resource_type, c).contains(patient))
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
