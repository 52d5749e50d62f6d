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
            token_id: "j".into(),
            expires_at: i64::MAX,
        }
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
