//! Search (in progress, issue 3): the parameter registry loaded from the official R4 definitions
//! and index-value extraction through FHIRPath. The index tables, the query side and the HTTP
//! interaction come next; until then the CapabilityStatement lists no search for resource types
//! other than AuditEvent.

pub mod extract;
pub mod registry;

pub use extract::{extract, IndexValue};
pub use registry::{ParamType, Registry, SearchParam};
