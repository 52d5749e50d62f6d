//! The decision for one interaction: which permission it needs and in which contexts the
//! token holds it. Handlers call [`authorize`] before touching storage, and
//! [`Decision::check_resource`] on what storage returns.

use super::scope::{Context, Permission};
use super::{AuthError, Principal};

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
    let unrestricted = contexts.contains(&Context::User) || contexts.contains(&Context::System);
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
    /// Whether a resource identified by type and id may be touched. Until the patient
    /// compartment is stored with each resource, a patient-context decision admits only the
    /// patient's own Patient resource.
    pub fn admits(&self, resource_type: &str, id: &str) -> bool {
        self.unrestricted || (resource_type == "Patient" && self.patient.as_deref() == Some(id))
    }

    /// [`Decision::admits`] as an error answering "absent".
    pub fn check_resource(&self, resource_type: &str, id: &str) -> Result<(), AuthError> {
        if self.admits(resource_type, id) {
            Ok(())
        } else {
            Err(AuthError::Hidden)
        }
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
            token_id: "j".into(),
            expires_at: i64::MAX,
        }
    }

    #[test]
    fn system_scopes_are_by_type() {
        let p = principal("system/Patient.r", None);
        assert!(authorize(&p, "Patient", Permission::Read)
            .unwrap()
            .admits("Patient", "any"));
        assert!(matches!(
            authorize(&p, "Patient", Permission::Update),
            Err(AuthError::InsufficientScope)
        ));
        assert!(authorize(&p, "Observation", Permission::Read).is_err());
    }

    #[test]
    fn patient_scopes_admit_only_the_patient_until_compartments_exist() {
        let p = principal("patient/*.rs", Some("p1"));
        let d = authorize(&p, "Patient", Permission::Read).unwrap();
        assert!(d.admits("Patient", "p1"));
        assert!(!d.admits("Patient", "p2"));
        let d = authorize(&p, "Observation", Permission::Read).unwrap();
        assert!(!d.admits("Observation", "o1"));
        // a patient scope without a patient claim grants nothing
        let p = principal("patient/*.rs", None);
        assert!(authorize(&p, "Patient", Permission::Read).is_err());
    }
}
