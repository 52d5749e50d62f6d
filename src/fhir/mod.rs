//! FHIR R4 knowledge that does not depend on HTTP or the database: the resource-type registry,
//! validation against the official JSON Schema plus the rules it cannot express, the envelope
//! helpers (ids, meta) and OperationOutcome.

pub mod compartment;
pub mod fhirpath;
pub mod json;
pub mod outcome;
pub mod patch;
pub mod resource;
pub mod structure;
pub mod summary;
pub mod validate;

pub use outcome::{Issue, IssueSeverity, IssueType, OperationOutcome};
pub use validate::{SchemaError, Validator};

/// The FHIR version this server implements.
pub const FHIR_VERSION: &str = "4.0.1";

/// The official R4 JSON Schema (HL7, CC0), compiled into the binary; see fhir-schemas/SOURCES.md.
pub const R4_SCHEMA_JSON: &str = include_str!("../../fhir-schemas/fhir.schema.json");
