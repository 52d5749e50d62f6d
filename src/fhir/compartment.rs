//! The Patient compartment (official R4 CompartmentDefinition): which patients a resource
//! belongs to, computed from the resource itself.
//!
//! Each compartment parameter names a search parameter whose FHIRPath expression, for these
//! parameters, is a plain element path, optionally narrowed by `.where(resolve() is Patient)`.
//! Only references of the form `Patient/{id}` (relative, absolute or versioned) count, so the
//! `where` narrowing holds by construction. An expression of any other shape is not used:
//! membership is then under-, never over-computed, and access fails closed.

use serde_json::Value;
use std::collections::{BTreeSet, HashMap};

const COMPARTMENT_JSON: &str = include_str!("../../fhir-schemas/CompartmentDefinition-patient.json");
const SEARCH_PARAMETERS_JSON: &str = include_str!("../../fhir-schemas/search-parameters.json");

#[derive(Debug, thiserror::Error)]
#[error("the bundled Patient CompartmentDefinition or search parameters are unreadable: {0}")]
pub struct CompartmentError(String);

/// For each resource type, the element paths (below the resource) that link it to a patient,
/// and the types patients share (readable in any patient's context, see [`Self::is_shared`]).
#[derive(Debug, Clone, Default)]
pub struct PatientCompartment {
    paths: HashMap<String, Vec<Vec<String>>>,
    shared: BTreeSet<String>,
}

/// The types outside the R4 Patient compartment that still carry, or point at, one patient's
/// data in elements the CompartmentDefinition leaves out (`Task.for`, `Binary.securityContext`,
/// a stored document `Bundle`, a claim's payment notices …): never shared by default, whatever
/// the definition says, since sharing them would show one patient's data to another.
pub const NEVER_SHARED_BY_DEFAULT: &[&str] = &[
    "Binary",
    "BiologicallyDerivedProduct",
    "Bundle",
    "Contract",
    "EnrollmentResponse",
    "GuidanceResponse",
    "Linkage",
    "MessageHeader",
    "OperationOutcome",
    "PaymentNotice",
    "PaymentReconciliation",
    "Subscription",
    "Task",
    "VerificationResult",
];

impl PatientCompartment {
    pub fn r4() -> Result<PatientCompartment, CompartmentError> {
        let def: Value = serde_json::from_str(COMPARTMENT_JSON).map_err(|e| CompartmentError(e.to_string()))?;
        let params: Value =
            serde_json::from_str(SEARCH_PARAMETERS_JSON).map_err(|e| CompartmentError(e.to_string()))?;
        let mut expressions: HashMap<(String, String), String> = HashMap::new();
        for entry in params["entry"].as_array().into_iter().flatten() {
            let r = &entry["resource"];
            let (Some(code), Some(expr)) = (r["code"].as_str(), r["expression"].as_str()) else {
                continue;
            };
            for base in r["base"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                expressions.insert((base.to_string(), code.to_string()), expr.to_string());
            }
        }
        let mut paths: HashMap<String, Vec<Vec<String>>> = HashMap::new();
        for res in def["resource"].as_array().into_iter().flatten() {
            let Some(t) = res["code"].as_str() else { continue };
            for p in res["param"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                let Some(expr) = expressions.get(&(t.to_string(), p.to_string())) else {
                    continue;
                };
                for part in expr.split('|').map(str::trim) {
                    if let Some(path) = element_path(t, part) {
                        paths.entry(t.to_string()).or_default().push(path);
                    }
                }
            }
        }
        // Device: R4 lists it without a parameter, so no Device was ever in a compartment. A
        // Device whose `patient` names a patient (US Core's implantable device) is that
        // patient's; one naming nobody is shared (see `is_shared`).
        paths.entry("Device".into()).or_default().push(vec!["patient".into()]);
        Ok(PatientCompartment {
            paths,
            shared: BTreeSet::new(),
        })
    }

    /// The default of `shared_resource_types`: the types the R4 Patient CompartmentDefinition
    /// leaves outside (lists without a parameter), Device included, less
    /// [`NEVER_SHARED_BY_DEFAULT`].
    pub fn r4_shared_default() -> Result<Vec<String>, CompartmentError> {
        let def: Value = serde_json::from_str(COMPARTMENT_JSON).map_err(|e| CompartmentError(e.to_string()))?;
        Ok(def["resource"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["param"].as_array().is_none_or(|p| p.is_empty()))
            .filter_map(|r| r["code"].as_str())
            .filter(|t| !NEVER_SHARED_BY_DEFAULT.contains(t))
            .map(str::to_string)
            .collect())
    }

    /// With these types shared. A type a patient's compartment can hold is refused (sharing it
    /// would show one patient's data to another), Device excepted: its own rule holds.
    pub fn with_shared(mut self, types: &[String]) -> Result<PatientCompartment, String> {
        let def: Value = serde_json::from_str(COMPARTMENT_JSON).unwrap_or_default();
        let listed = |t: &str| def["resource"].as_array().into_iter().flatten().any(|r| r["code"] == t);
        for t in types {
            if !listed(t) {
                return Err(format!("{t} is not an R4 resource type"));
            }
            if t != "Device" && self.applies_to(t) {
                return Err(format!("{t} belongs to patients' compartments and cannot be shared"));
            }
        }
        self.shared = types.iter().cloned().collect();
        Ok(self)
    }

    /// Whether resources of this type that lie in no patient's compartment may be read and
    /// searched in any patient's context (a Practitioner, an Organization, a Medication, a
    /// Device implanted in nobody). A resource in some patient's compartment never is.
    pub fn is_shared(&self, resource_type: &str) -> bool {
        self.shared.contains(resource_type)
    }

    /// The shared types, sorted.
    pub fn shared_types(&self) -> Vec<String> {
        self.shared.iter().cloned().collect()
    }

    /// The resource types a patient compartment can hold (Patient itself among them), sorted.
    pub fn types(&self) -> Vec<String> {
        let mut out: Vec<String> = self.paths.keys().cloned().collect();
        out.push("Patient".into());
        out.sort();
        out.dedup();
        out
    }

    /// Whether resources of this type can be in a patient compartment at all.
    pub fn applies_to(&self, resource_type: &str) -> bool {
        resource_type == "Patient" || self.paths.contains_key(resource_type)
    }

    /// The ids of the patients whose compartment holds this resource.
    pub fn patients_of(&self, resource_type: &str, resource: &Value) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if resource_type == "Subscription" {
            return subscription_patients(resource);
        }
        if resource_type == "Patient" {
            if let Some(id) = resource.get("id").and_then(Value::as_str) {
                out.insert(id.to_string());
            }
        }
        for path in self.paths.get(resource_type).into_iter().flatten() {
            let mut nodes = vec![resource];
            for seg in path {
                let mut next = Vec::new();
                for n in nodes {
                    match n.get(seg.as_str()) {
                        Some(Value::Array(items)) => next.extend(items.iter()),
                        Some(v) => next.push(v),
                        None => {}
                    }
                }
                nodes = next;
            }
            for n in nodes {
                if let Some(id) = n.get("reference").and_then(Value::as_str).and_then(patient_id) {
                    out.insert(id);
                }
            }
        }
        out
    }
}

/// A Subscription belongs to the patients its search names (R4 `criteria`, or the Backport's
/// filter criteria): `patient=`, `subject=Patient/…`, and so on, or `Patient?_id=`. The R4
/// CompartmentDefinition leaves Subscription out; placing it with the patients it is about lets
/// a patient-context app subscribe to its own patient's data (and read its subscription back),
/// and nobody's else, through the same compartment rule as every write (and row-level security).
fn subscription_patients(resource: &Value) -> BTreeSet<String> {
    let mut searches: Vec<&str> = resource["criteria"].as_str().into_iter().collect();
    searches.extend(
        resource["_criteria"]["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| {
                e["url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with("/backport-filter-criteria"))
            })
            .filter_map(|e| e["valueString"].as_str()),
    );
    let mut out = BTreeSet::new();
    for search in searches {
        let Some((t, query)) = search.split_once('?') else {
            continue;
        };
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let code = key.split(':').next().unwrap_or("");
            for v in value.split(',') {
                let id = match code {
                    "_id" if t == "Patient" => Some(v.to_string()).filter(|v| super::resource::is_valid_id(v)),
                    "patient" if super::resource::is_valid_id(v) => Some(v.to_string()),
                    _ => patient_id(v),
                };
                out.extend(id);
            }
        }
    }
    out
}

/// `Observation.subject.where(resolve() is Patient)` → `["subject"]`, for the given type only.
fn element_path(resource_type: &str, expr: &str) -> Option<Vec<String>> {
    let rest = expr.strip_prefix(resource_type)?.strip_prefix('.')?;
    let rest = rest.strip_suffix(".where(resolve() is Patient)").unwrap_or(rest);
    let segs: Vec<String> = rest.split('.').map(str::to_string).collect();
    segs.iter()
        .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()))
        .then_some(segs)
}

/// `Patient/1`, `Patient/1/_history/2`, `https://x/fhir/Patient/1` → `1`.
fn patient_id(reference: &str) -> Option<String> {
    let segs: Vec<&str> = reference.split('/').collect();
    let i = segs.iter().rposition(|s| *s == "Patient")?;
    let id = segs.get(i + 1)?;
    let tail = &segs[i + 2..];
    let ok_tail = tail.is_empty() || (tail.len() == 2 && tail[0] == "_history");
    (ok_tail && super::resource::is_valid_id(id)).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscription_belongs_to_the_patients_its_search_names() {
        let c = PatientCompartment::r4().unwrap();
        let r4 = serde_json::json!({"resourceType": "Subscription", "criteria": "Observation?patient=1&code=x"});
        assert_eq!(
            c.patients_of("Subscription", &r4).into_iter().collect::<Vec<_>>(),
            ["1"]
        );
        let backport = serde_json::json!({"resourceType": "Subscription", "criteria": "https://t/x",
            "_criteria": {"extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria",
                "valueString": "Encounter?subject=Patient/2,Patient/3&status=finished"}]}});
        assert_eq!(
            c.patients_of("Subscription", &backport).into_iter().collect::<Vec<_>>(),
            ["2", "3"]
        );
        let own = serde_json::json!({"resourceType": "Subscription", "criteria": "Patient?_id=4"});
        assert_eq!(
            c.patients_of("Subscription", &own).into_iter().collect::<Vec<_>>(),
            ["4"]
        );
        let nobody = serde_json::json!({"resourceType": "Subscription", "criteria": "Observation?code=x"});
        assert!(c.patients_of("Subscription", &nobody).is_empty());
    }
    use serde_json::json;

    fn c() -> PatientCompartment {
        PatientCompartment::r4().unwrap()
    }

    #[test]
    fn official_definition_loads_for_many_types() {
        let c = c();
        for t in [
            "Observation",
            "Condition",
            "Encounter",
            "AllergyIntolerance",
            "Appointment",
            "Group",
            "Patient",
        ] {
            assert!(c.applies_to(t), "{t}");
        }
        assert!(!c.applies_to("Organization"));
    }

    #[test]
    fn devices_belong_to_the_patient_they_name_and_shared_types_exclude_compartments() {
        let c = c();
        let d = json!({"resourceType": "Device", "patient": {"reference": "Patient/p1"}});
        assert_eq!(c.patients_of("Device", &d), ["p1".to_string()].into_iter().collect());
        assert!(c.patients_of("Device", &json!({"resourceType": "Device"})).is_empty());
        let shared = PatientCompartment::r4_shared_default().unwrap();
        for t in [
            "Practitioner",
            "PractitionerRole",
            "Organization",
            "Location",
            "Medication",
            "Substance",
            "HealthcareService",
            "Endpoint",
            "Device",
        ] {
            assert!(shared.iter().any(|s| s == t), "{t}");
        }
        for t in NEVER_SHARED_BY_DEFAULT {
            assert!(!shared.iter().any(|s| s == t), "{t}");
        }
        let c = c.with_shared(&shared).unwrap();
        assert!(c.is_shared("Practitioner") && c.is_shared("Device") && !c.is_shared("Binary"));
        assert!(!c.is_shared("Observation"));
        // a type of the compartment cannot be made shared
        assert!(PatientCompartment::r4()
            .unwrap()
            .with_shared(&["Observation".to_string()])
            .is_err());
        assert!(PatientCompartment::r4()
            .unwrap()
            .with_shared(&["Nonsense".to_string()])
            .is_err());
    }

    #[test]
    fn references_place_resources_in_compartments() {
        let c = c();
        let o = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}, "performer": [{"reference": "https://h/fhir/Patient/p2/_history/3"}, {"reference": "Practitioner/x"}]});
        assert_eq!(
            c.patients_of("Observation", &o),
            ["p1", "p2"].iter().map(|s| s.to_string()).collect()
        );
        let g = json!({"resourceType": "Group", "member": [{"entity": {"reference": "Patient/g1"}}]});
        assert!(c.patients_of("Group", &g).contains("g1"));
        let p = json!({"resourceType": "Patient", "id": "me", "link": [{"other": {"reference": "Patient/other"}}]});
        assert!(c.patients_of("Patient", &p).contains("me"));
        let none = json!({"resourceType": "Observation", "subject": {"reference": "Group/1"}});
        assert!(c.patients_of("Observation", &none).is_empty());
    }

    #[test]
    fn reference_forms() {
        assert_eq!(patient_id("Patient/1").as_deref(), Some("1"));
        assert_eq!(patient_id("Patient/1/_history/2").as_deref(), Some("1"));
        assert_eq!(patient_id("http://x/fhir/Patient/a-b").as_deref(), Some("a-b"));
        assert_eq!(patient_id("Patient/1/extra"), None);
        assert_eq!(patient_id("Patient/"), None);
        assert_eq!(patient_id("#contained"), None);
    }
}
