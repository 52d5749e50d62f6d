//! One typed configuration, assembled from (lowest to highest precedence) built-in defaults,
//! a TOML file (`--config FILE`), `FHIRVAULT_*` environment variables and command-line flags.
//!
//! Every value is checked at start-up; an error names the setting it came from. Key material is
//! never part of the configuration: only the path of the key file is.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// An error naming the setting at fault.
#[derive(Debug, thiserror::Error)]
#[error("configuration setting `{setting}`: {message}")]
pub struct ConfigError {
    pub setting: String,
    pub message: String,
}

fn cerr(setting: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: setting.into(),
        message: message.into(),
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" | "" => Ok(false),
        _ => Err(cerr(key, "expected true or false")),
    }
}

/// The settings as given by one source; `None` means "not set here".
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    pub listen: Option<String>,
    pub base_path: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub key_file: Option<PathBuf>,
    pub key_provider: Option<String>,
    pub kms_key_id: Option<String>,
    pub kms_region: Option<String>,
    pub kms_endpoint: Option<String>,
    pub public_url: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub max_bundle_entries: Option<usize>,
    pub export_workers: Option<usize>,
    pub profile_dir: Option<PathBuf>,
    pub validate_profiles_on_write: Option<bool>,
    pub export_retention_secs: Option<u64>,
    pub export_file_resources: Option<u64>,
    pub export_lease_secs: Option<u64>,
    pub pool_size: Option<u32>,
    pub behind_tls_proxy: Option<bool>,
    pub log_format: Option<String>,
    pub default_page_size: Option<u32>,
    pub max_page_size: Option<u32>,
    pub token_issuer: Option<String>,
    pub token_audience: Option<String>,
    pub signing_key_file: Option<PathBuf>,
    pub max_token_lifetime_secs: Option<u64>,
    pub workers: Option<usize>,
    pub require_mfa: Option<bool>,
    pub auth_failure_limit: Option<u32>,
    pub migration_database_url: Option<String>,
    pub replica_database_url: Option<String>,
    pub policy_file: Option<PathBuf>,
    pub break_glass_secs: Option<u64>,
    pub break_glass_webhook: Option<String>,
    pub audit_signing_key_file: Option<PathBuf>,
    pub audit_checkpoint_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub rate_limit_per_minute: Option<u64>,
    pub request_timeout_secs: Option<u64>,
    pub shutdown_timeout_secs: Option<u64>,
    pub drain_delay_secs: Option<u64>,
    pub replica_max_wait_ms: Option<u64>,
    pub audit_checkpoint_events: Option<u64>,
    pub audit_checkpoint_secs: Option<u64>,
    pub audit_retention_days: Option<u64>,
    pub audit_site: Option<String>,
    /// This node's name in the audit ledger (its chain).
    pub node_name: Option<String>,
    /// Search parameters stored only as blind indexes, as `Type.code` (`*.code`: on every type).
    pub search_phi_parameters: Option<Vec<String>>,
    /// Types readable and searchable in any patient's context (see `Config::shared_resource_types`).
    pub shared_resource_types: Option<Vec<String>>,
    /// External OpenID Connect providers (TOML `[[oidc_provider]]` tables only).
    pub oidc_provider: Option<Vec<crate::auth::oidc::ProviderConfig>>,
    pub auth_server: Option<bool>,
    pub auth_mfa_required: Option<bool>,
    pub session_idle_secs: Option<u64>,
    pub refresh_idle_secs: Option<u64>,
    pub refresh_absolute_secs: Option<u64>,
    pub login_max_failures: Option<u32>,
    pub login_lockout_secs: Option<u64>,
    pub subscription_workers: Option<usize>,
    /// Networks (CIDR) where subscription endpoints may be although they are internal.
    pub subscription_allowed_networks: Option<Vec<String>>,
    pub subscription_full_resource: Option<bool>,
    pub subscription_ca_file: Option<PathBuf>,
    pub subscription_max_failures: Option<u32>,
    pub subscription_retry_base_ms: Option<u64>,
}

impl ConfigLayer {
    /// Reads a TOML file. Unknown keys are refused so that a typo does not silently fall back to a default.
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| cerr("--config", format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            // Name the key on the line the error points at (the span may cover only the value).
            let setting = e
                .span()
                .map(|s| {
                    let line_start = text[..s.start].rfind('\n').map(|i| i + 1).unwrap_or(0);
                    let line = text[line_start..].lines().next().unwrap_or("");
                    line.split('=')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .trim_matches('"')
                        .to_string()
                })
                .filter(|k| !k.is_empty())
                .unwrap_or_else(|| "--config".into());
            cerr(setting, format!("in {}: {}", path.display(), e.message()))
        })
    }

    /// Reads `FHIRVAULT_<SETTING>` variables from the given environment.
    pub fn from_env(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut layer = ConfigLayer::default();
        for (key, value) in vars {
            let Some(name) = key.strip_prefix("FHIRVAULT_") else {
                continue;
            };
            let parse_num = |v: &str| v.parse::<u64>().map_err(|_| cerr(&key, "expected a whole number"));
            match name {
                "LISTEN" => layer.listen = Some(value),
                "BASE_PATH" => layer.base_path = Some(value),
                "DATA_DIR" => layer.data_dir = Some(value.into()),
                "DATABASE_URL" => layer.database_url = Some(value),
                "KEY_FILE" => layer.key_file = Some(value.into()),
                "KEY_PROVIDER" => layer.key_provider = Some(value),
                "KMS_KEY_ID" => layer.kms_key_id = Some(value),
                "KMS_REGION" => layer.kms_region = Some(value),
                "KMS_ENDPOINT" => layer.kms_endpoint = Some(value),
                "PUBLIC_URL" => layer.public_url = Some(value),
                "MAX_BODY_BYTES" => layer.max_body_bytes = Some(parse_num(&value)? as usize),
                "MAX_BUNDLE_ENTRIES" => layer.max_bundle_entries = Some(parse_num(&value)? as usize),
                "EXPORT_WORKERS" => layer.export_workers = Some(parse_num(&value)? as usize),
                "PROFILE_DIR" => layer.profile_dir = Some(value.into()),
                "VALIDATE_PROFILES_ON_WRITE" => layer.validate_profiles_on_write = Some(parse_bool(&key, &value)?),
                "EXPORT_RETENTION_SECS" => layer.export_retention_secs = Some(parse_num(&value)?),
                "EXPORT_FILE_RESOURCES" => layer.export_file_resources = Some(parse_num(&value)?),
                "EXPORT_LEASE_SECS" => layer.export_lease_secs = Some(parse_num(&value)?),
                "POOL_SIZE" => {
                    layer.pool_size = Some(parse_num(&value)?.try_into().map_err(|_| cerr(&key, "too large"))?)
                }
                "DEFAULT_PAGE_SIZE" => {
                    layer.default_page_size = Some(parse_num(&value)?.try_into().map_err(|_| cerr(&key, "too large"))?)
                }
                "MAX_PAGE_SIZE" => {
                    layer.max_page_size = Some(parse_num(&value)?.try_into().map_err(|_| cerr(&key, "too large"))?)
                }
                "BEHIND_TLS_PROXY" => layer.behind_tls_proxy = Some(parse_bool(&key, &value)?),
                "LOG_FORMAT" => layer.log_format = Some(value),
                "TOKEN_ISSUER" => layer.token_issuer = Some(value),
                "TOKEN_AUDIENCE" => layer.token_audience = Some(value),
                "SIGNING_KEY_FILE" => layer.signing_key_file = Some(value.into()),
                "MAX_TOKEN_LIFETIME_SECS" => layer.max_token_lifetime_secs = Some(parse_num(&value)?),
                "WORKERS" => layer.workers = Some(parse_num(&value)? as usize),
                "REQUIRE_MFA" => layer.require_mfa = Some(parse_bool(&key, &value)?),
                "MIGRATION_DATABASE_URL" => layer.migration_database_url = Some(value),
                "REPLICA_DATABASE_URL" => layer.replica_database_url = Some(value),
                "POLICY_FILE" => layer.policy_file = Some(value.into()),
                "BREAK_GLASS_SECS" => layer.break_glass_secs = Some(parse_num(&value)?),
                "BREAK_GLASS_WEBHOOK" => layer.break_glass_webhook = Some(value),
                "AUDIT_SIGNING_KEY_FILE" => layer.audit_signing_key_file = Some(value.into()),
                "TLS_CERT_FILE" => layer.tls_cert_file = Some(value.into()),
                "TLS_KEY_FILE" => layer.tls_key_file = Some(value.into()),
                "RATE_LIMIT_PER_MINUTE" => layer.rate_limit_per_minute = Some(parse_num(&value)?),
                "REQUEST_TIMEOUT_SECS" => layer.request_timeout_secs = Some(parse_num(&value)?),
                "SHUTDOWN_TIMEOUT_SECS" => layer.shutdown_timeout_secs = Some(parse_num(&value)?),
                "DRAIN_DELAY_SECS" => layer.drain_delay_secs = Some(parse_num(&value)?),
                "REPLICA_MAX_WAIT_MS" => layer.replica_max_wait_ms = Some(parse_num(&value)?),
                "AUDIT_CHECKPOINT_FILE" => layer.audit_checkpoint_file = Some(value.into()),
                "AUDIT_CHECKPOINT_EVENTS" => layer.audit_checkpoint_events = Some(parse_num(&value)?),
                "AUDIT_CHECKPOINT_SECS" => layer.audit_checkpoint_secs = Some(parse_num(&value)?),
                "AUDIT_RETENTION_DAYS" => layer.audit_retention_days = Some(parse_num(&value)?),
                "AUDIT_SITE" => layer.audit_site = Some(value),
                "NODE_NAME" => layer.node_name = Some(value),
                "SUBSCRIPTION_WORKERS" => layer.subscription_workers = Some(parse_num(&value)? as usize),
                "SUBSCRIPTION_ALLOWED_NETWORKS" => {
                    layer.subscription_allowed_networks = Some(
                        value
                            .split(',')
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .collect(),
                    )
                }
                "SUBSCRIPTION_FULL_RESOURCE" => layer.subscription_full_resource = Some(parse_bool(&key, &value)?),
                "SUBSCRIPTION_CA_FILE" => layer.subscription_ca_file = Some(value.into()),
                "SUBSCRIPTION_MAX_FAILURES" => layer.subscription_max_failures = Some(parse_num(&value)? as u32),
                "SUBSCRIPTION_RETRY_BASE_MS" => layer.subscription_retry_base_ms = Some(parse_num(&value)?),
                "SEARCH_PHI_PARAMETERS" => {
                    layer.search_phi_parameters = Some(
                        value
                            .split(',')
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .collect(),
                    )
                }
                "SHARED_RESOURCE_TYPES" => {
                    layer.shared_resource_types = Some(
                        value
                            .split(',')
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .collect(),
                    )
                }
                "AUTH_SERVER" => layer.auth_server = Some(parse_bool(&key, &value)?),
                "AUTH_MFA_REQUIRED" => layer.auth_mfa_required = Some(parse_bool(&key, &value)?),
                "SESSION_IDLE_SECS" => layer.session_idle_secs = Some(parse_num(&value)?),
                "REFRESH_IDLE_SECS" => layer.refresh_idle_secs = Some(parse_num(&value)?),
                "REFRESH_ABSOLUTE_SECS" => layer.refresh_absolute_secs = Some(parse_num(&value)?),
                "LOGIN_LOCKOUT_SECS" => layer.login_lockout_secs = Some(parse_num(&value)?),
                "LOGIN_MAX_FAILURES" => {
                    layer.login_max_failures = Some(parse_num(&value)?.try_into().map_err(|_| cerr(&key, "too large"))?)
                }
                "AUTH_FAILURE_LIMIT" => {
                    layer.auth_failure_limit = Some(parse_num(&value)?.try_into().map_err(|_| cerr(&key, "too large"))?)
                }
                // Key material must never come from the environment.
                "KEY" | "MASTER_KEY" | "ENCRYPTION_KEY" => {
                    return Err(cerr(
                        &key,
                        "key material is never read from the environment; use key_file",
                    ))
                }
                "LOG" => {} // tracing filter, read by the logger
                _ => return Err(cerr(&key, "unknown setting")),
            }
        }
        Ok(layer)
    }

    /// Overlays `other` on `self`: values set in `other` win.
    pub fn overlay(mut self, other: ConfigLayer) -> Self {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        take!(
            listen,
            base_path,
            data_dir,
            database_url,
            key_file,
            key_provider,
            kms_key_id,
            kms_region,
            kms_endpoint,
            public_url,
            max_body_bytes,
            max_bundle_entries,
            export_workers,
            profile_dir,
            validate_profiles_on_write,
            export_retention_secs,
            export_file_resources,
            export_lease_secs,
            pool_size,
            behind_tls_proxy,
            log_format,
            default_page_size,
            max_page_size,
            token_issuer,
            token_audience,
            signing_key_file,
            max_token_lifetime_secs,
            workers,
            require_mfa,
            auth_failure_limit,
            migration_database_url,
            replica_database_url,
            policy_file,
            break_glass_secs,
            break_glass_webhook,
            audit_signing_key_file,
            audit_checkpoint_file,
            audit_checkpoint_events,
            audit_checkpoint_secs,
            audit_retention_days,
            audit_site,
            node_name,
            tls_cert_file,
            tls_key_file,
            rate_limit_per_minute,
            request_timeout_secs,
            shutdown_timeout_secs,
            drain_delay_secs,
            replica_max_wait_ms,
            search_phi_parameters,
            shared_resource_types,
            oidc_provider,
            auth_server,
            auth_mfa_required,
            session_idle_secs,
            refresh_idle_secs,
            refresh_absolute_secs,
            login_max_failures,
            login_lockout_secs,
            subscription_workers,
            subscription_allowed_networks,
            subscription_full_resource,
            subscription_ca_file,
            subscription_max_failures,
            subscription_retry_base_ms
        );
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The key provider: the local key file (embedded default), or AWS KMS wrapping the key file's
/// data keys (credentials from the standard AWS environment variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProviderConfig {
    Local,
    AwsKms {
        key_id: String,
        region: String,
        /// Default: the region's public endpoint; plain http only on loopback (emulators).
        endpoint: Option<String>,
    },
}

/// The validated configuration. Its `Debug` hides database passwords.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// FHIR base path, for example `/fhir` (no trailing slash).
    pub base_path: String,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub key_file: PathBuf,
    /// Where the key file's keys come from.
    pub key_provider: KeyProviderConfig,
    /// The externally visible base URL (scheme, host, port, base path) used in `Location` and
    /// `fullUrl`. When unset, it is derived from each request's `Host`.
    pub public_url: Option<String>,
    pub max_body_bytes: usize,
    /// The most entries a batch or transaction Bundle may hold (413 past it).
    pub max_bundle_entries: usize,
    /// Threads running Bulk Data export jobs on this node (0: this node only accepts jobs and
    /// serves their files; another node runs them).
    pub export_workers: usize,
    /// StructureDefinitions (profiles, with snapshots) and expanded ValueSets to validate
    /// against (`$validate?profile=`, `meta.profile`); `profiles/us-core-6.1.0` ships US Core.
    pub profile_dir: Option<PathBuf>,
    /// Create and update refuse (422) a resource that fails validation against a profile its
    /// `meta.profile` declares and the server knows.
    pub validate_profiles_on_write: bool,
    /// How long an export's files are kept after it completes (then deleted with the job).
    pub export_retention_secs: i64,
    /// Resources per NDJSON file of an export (a job resumes after its last complete file).
    pub export_file_resources: u64,
    /// How long a node's claim on a running export lasts without progress before another node
    /// (or this one, restarted) takes the job over.
    pub export_lease_secs: i64,
    pub pool_size: u32,
    pub behind_tls_proxy: bool,
    pub log_format: LogFormat,
    pub default_page_size: u32,
    pub max_page_size: u32,
    /// `iss` of the built-in issuer's tokens (default: the public URL, else `urn:fhirvault:local`).
    pub token_issuer: String,
    /// `aud` the server requires (default: the public URL, else `urn:fhirvault:local:fhir`).
    pub token_audience: String,
    /// The built-in issuer's ES256 signing key (created with mode 0600 on first use).
    pub signing_key_file: PathBuf,
    /// Longest lifetime of an access token from the built-in issuer (default 900 s).
    pub max_token_lifetime_secs: i64,
    /// HTTP worker threads. Reads by id run on them (see api::crud::read), so the default is
    /// four per CPU: a worker waiting on PostgreSQL then leaves others to use the core.
    pub workers: usize,
    /// User tokens (with `fhirUser`) must carry `amr` mfa, otp or hwk to touch PHI.
    pub require_mfa: bool,
    /// Failed authentications per client address per minute before it gets 429s.
    pub auth_failure_limit: u32,
    /// PostgreSQL: the table owner's URL, for migrations and grants; the server itself then
    /// connects with `database_url` as a role row-level security binds. Defaults to `database_url`.
    pub migration_database_url: Option<String>,
    /// PostgreSQL: a streaming-replication standby's URL; searches, history, `$everything` and
    /// Bulk export run there (a client's own writes seen: see `store::replica`), reads by id and
    /// every write on the primary. None: everything on `database_url`.
    pub replica_database_url: Option<String>,
    /// How long a read waits for the replica to replay the writes acknowledged before it,
    /// before it runs on the primary instead [default 200].
    pub replica_max_wait_ms: u64,
    /// Attribute-level access rules (see `auth::attributes`); none when unset.
    pub policy_file: Option<PathBuf>,
    /// How long after its issue a break-glass token widens access (default 3600 s).
    pub break_glass_secs: i64,
    /// URL that receives a JSON POST for every break-glass request (no PHI in it).
    pub break_glass_webhook: Option<String>,
    /// Ed25519 seed that signs audit checkpoints [default: DATA_DIR/audit-ed25519.key].
    pub audit_signing_key_file: PathBuf,
    /// Where signed checkpoints are appended outside the database (ideally on other, append-only
    /// storage) [default: DATA_DIR/audit-checkpoints.jsonl].
    pub audit_checkpoint_file: PathBuf,
    /// Sign a checkpoint after this many audit events [default 1000] …
    pub audit_checkpoint_events: u64,
    /// … or this many seconds after the last one, if events arrived since [default 60].
    pub audit_checkpoint_secs: u64,
    /// How long audit events are kept before `audit archive` may remove them [default 2192 days:
    /// six years, leap days included].
    pub audit_retention_days: u64,
    /// `AuditEvent.source.site` [default: fhirvault].
    pub audit_site: String,
    /// This node's stable name: its audit chain is registered under it, and a restarted node
    /// continues the chain of its name. Each node on one database needs its own [default: the
    /// host name and the listening port, `host:8080`; commands run from the shell use `cli@host`].
    pub node_name: String,
    /// Search parameters indexed only as blind indexes (`Type.code`, `*.code`); changing the
    /// list needs `fhirvault reindex` [default: `crate::search::registry::DEFAULT_PHI`].
    pub search_phi_parameters: Vec<String>,
    /// Types that belong to no patient and that a patient-context token whose scopes grant the
    /// type may read and search (and reach through `_include`): practitioners, organizations,
    /// locations, medications, a Device implanted in nobody. A resource of these types that lies
    /// in some patient's compartment (a Device naming a patient) stays that patient's alone.
    /// `None`: the types the R4 Patient CompartmentDefinition leaves outside, less those that
    /// carry one patient's data elsewhere (`fhir::compartment::NEVER_SHARED_BY_DEFAULT`).
    pub shared_resource_types: Option<Vec<String>>,
    /// TLS: certificate chain and private key (PEM), both or neither; reloaded on SIGHUP.
    pub tls: Option<TlsFiles>,
    /// Requests per minute one client (client id, else token subject) may make; 0 = no limit.
    pub rate_limit_per_minute: u64,
    /// The longest a request's own work may take before it is abandoned with 503 [default 60].
    pub request_timeout_secs: u64,
    /// How long a stopping server lets requests in flight finish [default 30].
    pub shutdown_timeout_secs: u64,
    /// After SIGTERM, how long `/readyz` fails while requests are still served (so that a load
    /// balancer stops sending before the listener closes) [default 0].
    pub drain_delay_secs: u64,
    /// External OpenID Connect providers whose access tokens are accepted beside the built-in issuer's.
    pub oidc_providers: Vec<crate::auth::oidc::ProviderConfig>,
    /// The built-in SMART authorization server (`/auth/…`) [default true]; off where an
    /// external OpenID Connect provider signs users in.
    pub auth_server: bool,
    /// Users sign in with a TOTP second factor, enrolled at their first sign-in [default true].
    pub auth_mfa_required: bool,
    /// A sign-in session ends after this long without use [default 900].
    pub session_idle_secs: i64,
    /// A refresh token unused for this long expires [default 604800: a week] …
    pub refresh_idle_secs: i64,
    /// … and no refresh token of a grant outlives this [default 7776000: 90 days].
    pub refresh_absolute_secs: i64,
    /// Wrong passwords or codes in a row before an account is locked [default 5] …
    pub login_max_failures: i32,
    /// … for this long [default 900].
    pub login_lockout_secs: i64,
    /// Threads delivering subscription notifications on this node [default 2: a slow endpoint
    /// holds one; 0: this node records matches and leaves delivery to others].
    pub subscription_workers: usize,
    /// Networks where subscription endpoints may be although they are internal (loopback,
    /// private, link-local …), which are otherwise refused (SSRF) [default: none].
    pub subscription_allowed_networks: Vec<IpNetwork>,
    /// Whether subscriptions may carry whole resources (`full-resource`, R4 payloads) rather
    /// than ids [default false].
    pub subscription_full_resource: bool,
    /// PEM certificates trusted for subscription endpoints besides the public roots.
    pub subscription_ca_file: Option<PathBuf>,
    /// Failed deliveries in a row before a subscription goes to `error` [default 10].
    pub subscription_max_failures: u32,
    /// The first retry's delay; each next one doubles, up to 5 minutes [default 1000].
    pub subscription_retry_base_ms: u64,
}

/// An address range, `10.0.0.0/8` or `::1/128` (a bare address is the one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNetwork {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl IpNetwork {
    pub fn parse(text: &str) -> Option<IpNetwork> {
        let (a, p) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(IpNetwork { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let bits = |ip: std::net::IpAddr| -> (u128, u32) {
            match ip {
                std::net::IpAddr::V4(v) => (u32::from(v) as u128, 32),
                std::net::IpAddr::V6(v) => match v.to_ipv4_mapped() {
                    Some(v4) => (u32::from(v4) as u128, 32),
                    None => (u128::from(v), 128),
                },
            }
        };
        let ((net, width), (addr, w2)) = (bits(self.addr), bits(ip));
        if width != w2 {
            return false;
        }
        let shift = width - self.prefix.min(width as u8) as u32;
        shift == width || (net >> shift) == (addr >> shift)
    }
}

/// The certificate chain and private key files of the server's TLS endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("base_path", &self.base_path)
            .field("data_dir", &self.data_dir)
            .field("database_url", &redact_url(&self.database_url))
            .field(
                "migration_database_url",
                &self.migration_database_url.as_deref().map(redact_url),
            )
            .field(
                "replica_database_url",
                &self.replica_database_url.as_deref().map(redact_url),
            )
            .field("key_file", &self.key_file)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

/// The kernel's host name (`localhost` where it cannot be read): default node names use it.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Config {
    /// The scheme, host and port of `public_url` (without its path), when one is configured.
    pub fn public_origin(&self) -> Option<&str> {
        let u = self.public_url.as_deref()?;
        let after_scheme = u.find("://").map_or(0, |i| i + 3);
        Some(&u[..u[after_scheme..].find('/').map_or(u.len(), |i| after_scheme + i)])
    }

    pub fn resolve(layer: ConfigLayer) -> Result<Config, ConfigError> {
        let listen_s = layer.listen.unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen: SocketAddr = listen_s
            .parse()
            .map_err(|_| cerr("listen", "expected an address and port, for example 127.0.0.1:8080"))?;
        let base_path = layer.base_path.unwrap_or_else(|| "/fhir".into());
        let base_path = base_path.trim_end_matches('/').to_string();
        if !base_path.starts_with('/')
            || base_path.len() < 2
            || !base_path[1..]
                .split('/')
                .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        {
            return Err(cerr("base_path", "expected a path such as /fhir"));
        }
        let data_dir = layer.data_dir.unwrap_or_else(|| PathBuf::from("./data"));
        if data_dir.as_os_str().is_empty() {
            return Err(cerr("data_dir", "must not be empty"));
        }
        let database_url = match layer.database_url {
            Some(url) => {
                if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                    url
                } else if let Some(path) = url.strip_prefix("sqlite://") {
                    if path.is_empty() {
                        return Err(cerr("database_url", "sqlite:// needs a file path"));
                    }
                    url
                } else {
                    return Err(cerr("database_url", "expected postgres://… or sqlite://PATH"));
                }
            }
            None => format!("sqlite://{}", data_dir.join("fhirvault.db").display()),
        };
        let key_file = layer.key_file.unwrap_or_else(|| data_dir.join("fhirvault.key"));
        let key_provider = match layer.key_provider.as_deref().unwrap_or("local") {
            "local" => KeyProviderConfig::Local,
            "aws-kms" => KeyProviderConfig::AwsKms {
                key_id: layer
                    .kms_key_id
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| cerr("kms_key_id", "required with key_provider = \"aws-kms\""))?,
                region: layer
                    .kms_region
                    .or_else(|| std::env::var("AWS_REGION").ok())
                    .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
                    .ok_or_else(|| cerr("kms_region", "required with key_provider = \"aws-kms\" (or AWS_REGION)"))?,
                endpoint: layer.kms_endpoint,
            },
            _ => return Err(cerr("key_provider", "must be \"local\" or \"aws-kms\"")),
        };
        let public_url = match layer.public_url {
            Some(u) if u.starts_with("https://") || u.starts_with("http://") => {
                Some(u.trim_end_matches('/').to_string())
            }
            Some(_) => return Err(cerr("public_url", "expected an http:// or https:// URL")),
            None => None,
        };
        let max_body_bytes = layer.max_body_bytes.unwrap_or(16 * 1024 * 1024);
        if !(1024..=1 << 30).contains(&max_body_bytes) {
            return Err(cerr("max_body_bytes", "must be between 1024 and 1073741824 (1 GiB)"));
        }
        let pool_size = layer.pool_size.unwrap_or(16);
        if !(1..=1024).contains(&pool_size) {
            return Err(cerr("pool_size", "must be between 1 and 1024"));
        }
        let log_format = match layer.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err(cerr("log_format", "expected text or json")),
        };
        let default_page_size = layer.default_page_size.unwrap_or(20);
        let max_bundle_entries = layer.max_bundle_entries.unwrap_or(10_000);
        if !(1..=1_000_000).contains(&max_bundle_entries) {
            return Err(cerr("max_bundle_entries", "must be between 1 and 1000000"));
        }
        let export_workers = layer.export_workers.unwrap_or(1);
        if export_workers > 16 {
            return Err(cerr("export_workers", "must be between 0 and 16"));
        }
        let export_retention_secs = layer.export_retention_secs.unwrap_or(86_400);
        if !(60..=30 * 86_400).contains(&export_retention_secs) {
            return Err(cerr(
                "export_retention_secs",
                "must be between 60 and 2592000 (30 days)",
            ));
        }
        let export_file_resources = layer.export_file_resources.unwrap_or(50_000);
        if !(1..=10_000_000).contains(&export_file_resources) {
            return Err(cerr("export_file_resources", "must be between 1 and 10000000"));
        }
        let export_lease_secs = layer.export_lease_secs.unwrap_or(30);
        if !(1..=3600).contains(&export_lease_secs) {
            return Err(cerr("export_lease_secs", "must be between 1 and 3600"));
        }
        let max_page_size = layer.max_page_size.unwrap_or(1000);
        if max_page_size == 0 || max_page_size > 10_000 {
            return Err(cerr("max_page_size", "must be between 1 and 10000"));
        }
        if default_page_size == 0 || default_page_size > max_page_size {
            return Err(cerr("default_page_size", "must be between 1 and max_page_size"));
        }
        let token_issuer = layer
            .token_issuer
            .or_else(|| public_url.clone())
            .unwrap_or_else(|| "urn:fhirvault:local".into());
        let token_audience = layer
            .token_audience
            .or_else(|| public_url.clone())
            .unwrap_or_else(|| "urn:fhirvault:local:fhir".into());
        if token_issuer.is_empty() {
            return Err(cerr("token_issuer", "must not be empty"));
        }
        if token_audience.is_empty() {
            return Err(cerr("token_audience", "must not be empty"));
        }
        let signing_key_file = layer
            .signing_key_file
            .unwrap_or_else(|| data_dir.join("issuer-es256.pem"));
        let max_token_lifetime_secs = layer.max_token_lifetime_secs.unwrap_or(900);
        if !(60..=86_400).contains(&max_token_lifetime_secs) {
            return Err(cerr("max_token_lifetime_secs", "must be between 60 and 86400"));
        }
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let workers = layer.workers.unwrap_or((4 * cpus).clamp(4, 64));
        if !(1..=256).contains(&workers) {
            return Err(cerr("workers", "must be between 1 and 256"));
        }
        let auth_failure_limit = layer.auth_failure_limit.unwrap_or(50);
        if auth_failure_limit == 0 {
            return Err(cerr("auth_failure_limit", "must be at least 1"));
        }
        let migration_database_url = match layer.migration_database_url {
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => Some(u),
            Some(_) => return Err(cerr("migration_database_url", "expected postgres://…")),
            None => None,
        };
        if migration_database_url.is_some() && !database_url.starts_with("postgres") {
            return Err(cerr("migration_database_url", "only applies to PostgreSQL"));
        }
        let replica_database_url = match layer.replica_database_url {
            Some(_) if !database_url.starts_with("postgres") => {
                return Err(cerr("replica_database_url", "only applies to PostgreSQL"))
            }
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => Some(u),
            Some(_) => return Err(cerr("replica_database_url", "expected postgres://…")),
            None => None,
        };
        let break_glass_secs = layer.break_glass_secs.unwrap_or(3600);
        if break_glass_secs > 86_400 {
            return Err(cerr("break_glass_secs", "must be at most 86400"));
        }
        let oidc_providers = layer.oidc_provider.unwrap_or_default();
        for p in &oidc_providers {
            let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                .iter()
                .any(|prefix| p.issuer.starts_with(prefix));
            if !(p.issuer.starts_with("https://") || loopback) {
                return Err(cerr(
                    "oidc_provider.issuer",
                    "must be an https:// URL (http only on loopback)",
                ));
            }
            if p.audience.is_empty() {
                return Err(cerr("oidc_provider.audience", "must not be empty"));
            }
            if p.issuer == token_issuer {
                return Err(cerr("oidc_provider.issuer", "must differ from token_issuer"));
            }
        }
        let break_glass_webhook = match layer.break_glass_webhook {
            Some(u)
                if u.starts_with("https://")
                    || u.starts_with("http://127.0.0.1")
                    || u.starts_with("http://localhost") =>
            {
                Some(u)
            }
            Some(_) => {
                return Err(cerr(
                    "break_glass_webhook",
                    "must be an https:// URL (http only on loopback)",
                ))
            }
            None => None,
        };
        let audit_checkpoint_events = layer.audit_checkpoint_events.unwrap_or(1000);
        if audit_checkpoint_events == 0 {
            return Err(cerr("audit_checkpoint_events", "must be at least 1"));
        }
        let audit_checkpoint_secs = layer.audit_checkpoint_secs.unwrap_or(60);
        if !(1..=86_400).contains(&audit_checkpoint_secs) {
            return Err(cerr("audit_checkpoint_secs", "must be between 1 and 86400"));
        }
        let audit_retention_days = layer.audit_retention_days.unwrap_or(2192);
        if audit_retention_days < 1 {
            return Err(cerr("audit_retention_days", "must be at least 1"));
        }
        let node_name = match layer.node_name {
            Some(n) if n.trim().is_empty() || n.len() > 200 || n.chars().any(char::is_control) => {
                return Err(cerr("node_name", "must be 1 to 200 printable characters"))
            }
            Some(n) => n,
            None => format!("{}:{}", host_name(), listen.port()),
        };
        let audit_signing_key_file = layer
            .audit_signing_key_file
            .unwrap_or_else(|| data_dir.join("audit-ed25519.key"));
        let audit_checkpoint_file = layer
            .audit_checkpoint_file
            .unwrap_or_else(|| data_dir.join("audit-checkpoints.jsonl"));
        let tls = match (layer.tls_cert_file, layer.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => return Err(cerr("tls_key_file", "is required with tls_cert_file")),
            (None, Some(_)) => return Err(cerr("tls_cert_file", "is required with tls_key_file")),
        };
        let request_timeout_secs = layer.request_timeout_secs.unwrap_or(60);
        if !(1..=3600).contains(&request_timeout_secs) {
            return Err(cerr("request_timeout_secs", "must be between 1 and 3600"));
        }
        let shutdown_timeout_secs = layer.shutdown_timeout_secs.unwrap_or(30);
        if shutdown_timeout_secs > 3600 {
            return Err(cerr("shutdown_timeout_secs", "must be at most 3600"));
        }
        let replica_max_wait_ms = layer.replica_max_wait_ms.unwrap_or(200);
        if replica_max_wait_ms > 60_000 {
            return Err(cerr("replica_max_wait_ms", "must be at most 60000"));
        }
        let drain_delay_secs = layer.drain_delay_secs.unwrap_or(0);
        if drain_delay_secs > 600 {
            return Err(cerr("drain_delay_secs", "must be at most 600"));
        }
        let search_phi_parameters = match layer.search_phi_parameters {
            Some(list) => {
                for entry in &list {
                    let ok = entry
                        .split_once('.')
                        .is_some_and(|(t, c)| !t.is_empty() && !c.is_empty() && !c.contains('.'));
                    if !ok {
                        return Err(cerr("search_phi_parameters", "entries are Type.code or *.code"));
                    }
                }
                list
            }
            None => crate::search::registry::default_phi(),
        };
        let session_idle_secs = layer.session_idle_secs.unwrap_or(900);
        if !(1..=86_400).contains(&session_idle_secs) {
            return Err(cerr("session_idle_secs", "must be between 1 and 86400"));
        }
        let refresh_absolute_secs = layer.refresh_absolute_secs.unwrap_or(90 * 86_400);
        if !(60..=365 * 86_400).contains(&refresh_absolute_secs) {
            return Err(cerr(
                "refresh_absolute_secs",
                "must be between 60 and 31536000 (a year)",
            ));
        }
        let refresh_idle_secs = layer.refresh_idle_secs.unwrap_or(7 * 86_400);
        if !(1..=refresh_absolute_secs).contains(&refresh_idle_secs) {
            return Err(cerr("refresh_idle_secs", "must be between 1 and refresh_absolute_secs"));
        }
        let login_max_failures = layer.login_max_failures.unwrap_or(5);
        if !(1..=100).contains(&login_max_failures) {
            return Err(cerr("login_max_failures", "must be between 1 and 100"));
        }
        let login_lockout_secs = layer.login_lockout_secs.unwrap_or(900);
        if !(1..=86_400).contains(&login_lockout_secs) {
            return Err(cerr("login_lockout_secs", "must be between 1 and 86400"));
        }
        let mut subscription_allowed_networks = Vec::new();
        for n in layer.subscription_allowed_networks.unwrap_or_default() {
            subscription_allowed_networks.push(
                IpNetwork::parse(&n)
                    .ok_or_else(|| cerr("subscription_allowed_networks", "entries are addresses or CIDR ranges"))?,
            );
        }
        let subscription_workers = layer.subscription_workers.unwrap_or(2);
        if subscription_workers > 16 {
            return Err(cerr("subscription_workers", "must be between 0 and 16"));
        }
        let subscription_max_failures = layer.subscription_max_failures.unwrap_or(10);
        if !(1..=100).contains(&subscription_max_failures) {
            return Err(cerr("subscription_max_failures", "must be between 1 and 100"));
        }
        let subscription_retry_base_ms = layer.subscription_retry_base_ms.unwrap_or(1000);
        if !(10..=60_000).contains(&subscription_retry_base_ms) {
            return Err(cerr("subscription_retry_base_ms", "must be between 10 and 60000"));
        }
        Ok(Config {
            subscription_workers,
            subscription_allowed_networks,
            subscription_full_resource: layer.subscription_full_resource.unwrap_or(false),
            subscription_ca_file: layer.subscription_ca_file,
            subscription_max_failures,
            subscription_retry_base_ms,
            auth_server: layer.auth_server.unwrap_or(true),
            auth_mfa_required: layer.auth_mfa_required.unwrap_or(true),
            session_idle_secs: session_idle_secs as i64,
            refresh_idle_secs: refresh_idle_secs as i64,
            refresh_absolute_secs: refresh_absolute_secs as i64,
            login_max_failures: login_max_failures as i32,
            login_lockout_secs: login_lockout_secs as i64,
            search_phi_parameters,
            shared_resource_types: layer.shared_resource_types,
            rate_limit_per_minute: layer.rate_limit_per_minute.unwrap_or(0),
            request_timeout_secs,
            shutdown_timeout_secs,
            drain_delay_secs,
            tls,
            audit_signing_key_file,
            audit_checkpoint_file,
            audit_checkpoint_events,
            audit_checkpoint_secs,
            audit_retention_days,
            audit_site: layer.audit_site.unwrap_or_else(|| "fhirvault".into()),
            node_name,
            break_glass_webhook,
            oidc_providers,
            break_glass_secs: break_glass_secs as i64,
            policy_file: layer.policy_file,
            migration_database_url,
            replica_database_url,
            replica_max_wait_ms,
            require_mfa: layer.require_mfa.unwrap_or(false),
            auth_failure_limit,
            workers,
            token_issuer,
            token_audience,
            signing_key_file,
            max_token_lifetime_secs: max_token_lifetime_secs as i64,
            listen,
            base_path,
            data_dir,
            database_url,
            key_file,
            key_provider,
            public_url,
            max_body_bytes,
            max_bundle_entries,
            export_workers,
            profile_dir: layer.profile_dir,
            validate_profiles_on_write: layer.validate_profiles_on_write.unwrap_or(false),
            export_retention_secs: export_retention_secs as i64,
            export_file_resources,
            export_lease_secs: export_lease_secs as i64,
            pool_size,
            behind_tls_proxy: layer.behind_tls_proxy.unwrap_or(false),
            log_format,
            default_page_size,
            max_page_size,
        })
    }

    /// The name of this machine, for default node names.
    pub fn host_name(&self) -> String {
        host_name()
    }

    /// True when the database URL names PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.database_url.starts_with("postgres")
    }

    /// Checks that the listening address is safe: plaintext HTTP is only for loopback, unless
    /// the operator says a TLS gateway sits in front (invariant 7).
    pub fn check_listen_safety(&self) -> Result<(), ConfigError> {
        if !self.listen.ip().is_loopback() && !self.behind_tls_proxy && self.tls.is_none() {
            return Err(cerr(
                "listen",
                format!(
                    "{} is not a loopback address and TLS is not configured; plaintext HTTP would expose PHI. \
                     Pass --behind-tls-proxy only if a TLS gateway terminates connections in front of fhirvault",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_networks_contain_their_addresses() {
        let n = IpNetwork::parse("10.0.0.0/8").unwrap();
        assert!(n.contains("10.255.1.2".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.1.1".parse().unwrap()));
        let one = IpNetwork::parse("::1").unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        assert!(IpNetwork::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(IpNetwork::parse("10.0.0.0/33").is_none());
        assert!(IpNetwork::parse("nonsense").is_none());
    }

    #[test]
    fn defaults() {
        let c = Config::resolve(ConfigLayer::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.base_path, "/fhir");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.database_url, "sqlite://./data/fhirvault.db");
        assert!(c.check_listen_safety().is_ok());
    }

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/a\"\npool_size = 3\n",
        )
        .unwrap();
        let from_file = ConfigLayer::from_toml_file(&file).unwrap();
        let from_env = ConfigLayer::from_env([("FHIRVAULT_DATA_DIR".to_string(), "/tmp/b".to_string())]).unwrap();
        let from_flags = ConfigLayer {
            pool_size: Some(5),
            ..Default::default()
        };
        let c = Config::resolve(from_file.overlay(from_env).overlay(from_flags)).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/b"));
        assert_eq!(c.pool_size, 5);
        assert_eq!(c.database_url, "sqlite:///tmp/b/fhirvault.db");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let e = Config::resolve(ConfigLayer {
            listen: Some("nope".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.setting, "listen");
        let e = ConfigLayer::from_env([("FHIRVAULT_POOL_SIZE".to_string(), "x".to_string())]).unwrap_err();
        assert_eq!(e.setting, "FHIRVAULT_POOL_SIZE");
        let e = ConfigLayer::from_env([("FHIRVAULT_KEY".to_string(), "secret".to_string())]).unwrap_err();
        assert!(!e.to_string().contains("secret"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "lisen = \"x\"\n").unwrap();
        let e = ConfigLayer::from_toml_file(&file).unwrap_err();
        assert!(e.to_string().contains("lisen"), "{e}");
        std::fs::write(&file, "listen = \"127.0.0.1:1\"\npool_size = \"many\"\n").unwrap();
        let e = ConfigLayer::from_toml_file(&file).unwrap_err();
        assert_eq!(e.setting, "pool_size");
        let e = Config::resolve(ConfigLayer {
            database_url: Some("mysql://x".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.setting, "database_url");
        // a replica is a PostgreSQL standby: refused beside SQLite, and as another scheme
        let e = Config::resolve(ConfigLayer {
            replica_database_url: Some("postgres://db2/fhir".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.setting, "replica_database_url");
        let e = Config::resolve(ConfigLayer {
            database_url: Some("postgres://db/fhir".into()),
            replica_database_url: Some("sqlite://x.db".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.setting, "replica_database_url");
        let e = ConfigLayer::from_env([("FHIRVAULT_DRAIN_DELAY_SECS".to_string(), "9999".to_string())])
            .and_then(Config::resolve)
            .unwrap_err();
        assert_eq!(e.setting, "drain_delay_secs");
    }

    #[test]
    fn debug_hides_database_passwords() {
        let c = Config::resolve(ConfigLayer {
            database_url: Some("postgres://app:s3cret@db/fhir".into()),
            migration_database_url: Some("postgres://owner:0wner-pw@db/fhir".into()),
            replica_database_url: Some("postgres://app:r3plica@db2/fhir".into()),
            ..Default::default()
        })
        .unwrap();
        let text = format!("{c:?}");
        assert!(
            !text.contains("s3cret") && !text.contains("0wner-pw") && !text.contains("r3plica"),
            "{text}"
        );
        assert!(text.contains("postgres://app:***@db/fhir"));
    }

    #[test]
    fn non_loopback_needs_tls_or_explicit_proxy() {
        let mut c = Config::resolve(ConfigLayer {
            listen: Some("0.0.0.0:8080".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(c.check_listen_safety().is_err());
        c.behind_tls_proxy = true;
        assert!(c.check_listen_safety().is_ok());
    }
}
