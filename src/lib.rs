//! fhirvault: a FHIR R4 server built to hold protected health information.
//!
//! Module map (see ../shared/design.md): `api` (HTTP) ▸ `auth` (tokens, policy), `audit` (the
//! ledger) ▸ `store` (database), `fhir` (FHIR rules), `crypto` (encryption). `fhir` and `crypto` know nothing of HTTP or the database.

pub mod api;
pub mod audit;
pub mod auth;
pub mod bulk;
pub mod config;
pub mod crypto;
pub mod fhir;
pub mod search;
pub mod secret_file;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
