//! The CRUD iteration of HealthSamurai's public FHIR server benchmark
//! (github.com/HealthSamurai/fhir-server-performance-benchmark, `k6/crud.js`): POST nine linked
//! resources (references set to the ones just created, as the script does), GET each, PUT each
//! with the script's change, DELETE each in reverse order: 36 requests. Seeds are the official R4
//! examples of those types (tests/data/r4-examples). Used by the crud and compare benches.

use super::LeanClient;
use serde_json::{json, Value};

pub const TYPES: [(&str, &str); 9] = [
    ("Patient", "Patient-ihe-pcd.json"),
    ("Location", "Location-ukp.json"),
    ("Organization", "Organization-hl7pay.json"),
    ("Practitioner", "Practitioner-xcda-author.json"),
    ("Encounter", "Encounter-example.json"),
    ("Observation", "Observation-eye-color.json"),
    ("MedicationRequest", "MedicationRequest-medrx002.json"),
    ("Claim", "Claim-860150.json"),
    ("ExplanationOfBenefit", "ExplanationOfBenefit-EB3501.json"),
];

fn seed(file: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/r4-examples")
        .join(file);
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let m = v.as_object_mut().unwrap();
    m.remove("id");
    m.remove("meta");
    v
}

/// Sets `path` (dotted, with list indexes) to a reference, creating nothing that is absent
/// beyond the last step (as the benchmark's `jsonPatch` does for its own seeds).
fn set_reference(v: &mut Value, path: &str, target: &str) {
    let mut node = v;
    for step in path.split('.') {
        node = match step.parse::<usize>() {
            Ok(i) => {
                let Some(a) = node.as_array_mut() else { return };
                if a.len() <= i {
                    return;
                }
                &mut a[i]
            }
            Err(_) => {
                let Some(m) = node.as_object_mut() else { return };
                m.entry(step.to_string()).or_insert_with(|| json!({}))
            }
        };
    }
    *node = json!(target);
}

/// The references crud.js sets on each seed: (type, path, referenced type).
const LINKS: &[(&str, &str, &str)] = &[
    ("Encounter", "subject.reference", "Patient"),
    ("Encounter", "serviceProvider.reference", "Organization"),
    ("Observation", "subject.reference", "Patient"),
    ("Observation", "encounter.reference", "Encounter"),
    ("MedicationRequest", "subject.reference", "Patient"),
    ("MedicationRequest", "encounter.reference", "Encounter"),
    ("MedicationRequest", "requester.reference", "Practitioner"),
    ("Claim", "patient.reference", "Patient"),
    ("Claim", "provider.reference", "Organization"),
    ("Claim", "prescription.reference", "MedicationRequest"),
    ("ExplanationOfBenefit", "patient.reference", "Patient"),
    ("ExplanationOfBenefit", "provider.reference", "Practitioner"),
    ("ExplanationOfBenefit", "claim.reference", "Claim"),
];

/// A minimal JSON HTTP client on the lean client's connection: the body of the last answer.
fn request(c: &mut LeanClient, method: &str, path: &str, body: Option<&Value>) -> (u16, Option<Value>) {
    let bytes = body.map(|b| b.to_string().into_bytes());
    c.request_body(method, path, bytes.as_deref())
}

/// The nine seeds, in [`TYPES`] order.
pub fn seeds() -> Vec<Value> {
    TYPES.iter().map(|(_, f)| seed(f)).collect()
}

/// One iteration of crud.js against the server at `base` (its FHIR base path, such as `/fhir`):
/// 36 requests. `Err` names the first request that did not succeed.
pub fn crud_iteration(c: &mut LeanClient, base: &str, seeds: &[Value]) -> Result<(), String> {
    let mut made: Vec<(String, Value)> = Vec::with_capacity(9);
    for (i, (t, _)) in TYPES.iter().enumerate() {
        let mut body = seeds[i].clone();
        for (src, path, target) in LINKS.iter().filter(|(src, _, _)| src == t) {
            let _ = src;
            if let Some((_, r)) = made.iter().find(|(mt, _)| mt == target) {
                set_reference(&mut body, path, &format!("{target}/{}", r["id"].as_str().unwrap()));
            }
        }
        let (status, created) = request(c, "POST", &format!("{base}/{t}"), Some(&body));
        match created {
            Some(r) if status == 201 && r["id"].is_string() => made.push((t.to_string(), r)),
            _ => return Err(format!("create {t}: {status}")),
        }
    }
    for (t, r) in &made {
        let (status, _) = request(
            c,
            "GET",
            &format!("{base}/{t}/{}", r["id"].as_str().unwrap_or("")),
            None,
        );
        if status != 200 {
            return Err(format!("read {t}: {status}"));
        }
    }
    for (t, r) in &mut made {
        // the change crud.js makes per type
        match t.as_str() {
            "Encounter" => {
                r["status"] = json!(if r["status"] == "planned" {
                    "in-progress"
                } else {
                    "planned"
                })
            }
            "Location" | "Organization" => r["name"] = json!(format!("{}-changed", r["name"].as_str().unwrap_or(""))),
            "MedicationRequest" => r["status"] = json!(if r["status"] == "on-hold" { "draft" } else { "on-hold" }),
            "Observation" => r["issued"] = json!("2024-01-02T03:04:05Z"),
            "Patient" | "Practitioner" => {
                r["gender"] = json!(if r["gender"] == "unknown" { "other" } else { "unknown" })
            }
            _ => r["created"] = json!("2024-01-02T03:04:05Z"),
        }
        let path = format!("{base}/{t}/{}", r["id"].as_str().unwrap_or(""));
        let (status, _) = request(c, "PUT", &path, Some(r));
        if status != 200 {
            return Err(format!("update {t}: {status}"));
        }
    }
    for (t, r) in made.iter().rev() {
        let (status, _) = request(
            c,
            "DELETE",
            &format!("{base}/{t}/{}", r["id"].as_str().unwrap_or("")),
            None,
        );
        // 200 with an outcome, or 204 without: both are a successful delete
        if status != 200 && status != 204 {
            return Err(format!("delete {t}: {status}"));
        }
    }
    Ok(())
}
