//! fhirvault: a FHIR R4 server built to hold protected health information.
//!
//! Module map (see ../shared/design.md): `api` (HTTP) ▸ `auth` (tokens, policy), `audit` (the
//! ledger) ▸ `store` (database), `fhir` (FHIR rules), `crypto` (encryption). `fhir` and `crypto` know nothing of HTTP or the database.

pub mod api;
pub mod audit;
pub mod auth;
pub mod bulk;
pub mod compliance;
pub mod config;
pub mod crypto;
pub mod fhir;
pub mod import;
pub mod search;
pub mod secret_file;
pub mod server;
pub mod store;
pub mod subscription;
pub mod telemetry;
pub mod tls;

/// mimalloc instead of the system allocator, for the server binary and everything that links
/// this crate (tests, benches: they measure what the server runs). Every request allocates on
/// one worker thread and often frees on another (the audit writer drops the events it
/// commits); glibc's arenas paid for that in locking and consolidation, measured at about
/// 11 µs per audited read on two cores (benches/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
