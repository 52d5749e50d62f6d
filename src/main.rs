//! The `fhirvault` command line.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fhirvault::audit::export::export_ndjson;
use fhirvault::audit::{Action, Agent, AuditRecord, Kind, Outcome};
use fhirvault::config::{Config, ConfigLayer};
use fhirvault::store::Store;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod admin;

#[derive(Parser)]
#[command(
    name = "fhirvault",
    version,
    about = "A FHIR R4 server for protected health information: encrypted at rest, safe by default.",
    long_about = "A FHIR R4 server for protected health information.\n\n\
        Settings come from (lowest to highest precedence) built-in defaults, a TOML file given with --config, \
        FHIRVAULT_* environment variables, and the flags below. Key material never comes from any of them: it is \
        read from the key file (created with mode 0600 in the data directory on first run)."
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct CommonArgs {
    /// TOML configuration file.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, global = true, value_name = "ADDR")]
    listen: Option<String>,
    /// Data directory: SQLite database and key file [default: ./data].
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Database: postgres://… for PostgreSQL, sqlite://PATH for SQLite [default: sqlite://DATA_DIR/fhirvault.db].
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
    /// Key file [default: DATA_DIR/fhirvault.key].
    #[arg(long, global = true, value_name = "FILE")]
    key_file: Option<PathBuf>,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the FHIR server (applies pending migrations first).
    Serve {
        /// Allow plaintext HTTP on a non-loopback address because a TLS gateway terminates
        /// connections in front of fhirvault.
        #[arg(long)]
        behind_tls_proxy: bool,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print an access token from the built-in issuer (for development and scripts):
    /// `curl -H "Authorization: Bearer $(fhirvault token --scope 'system/*.cruds')" …`
    Token {
        /// Space-separated SMART scopes, for example "patient/*.rs", "system/Patient.cruds" or the
        /// granular "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory".
        #[arg(long)]
        scope: String,
        /// Launch patient (the `patient` claim): limits patient/ scopes to this patient.
        #[arg(long, value_name = "ID")]
        patient: Option<String>,
        /// The user (`fhirUser` claim), for example Practitioner/123.
        #[arg(long, value_name = "TYPE/ID")]
        user: Option<String>,
        /// Client id (`client_id` claim).
        #[arg(long, value_name = "ID")]
        client: Option<String>,
        /// Lifetime in seconds [default and maximum: max_token_lifetime_secs].
        #[arg(long, value_name = "SECS")]
        expires_in: Option<i64>,
        /// Authentication methods (`amr` claim), for example mfa.
        #[arg(long, value_name = "METHOD")]
        amr: Vec<String>,
        /// Roles (`roles` claim), for attribute-level rules in the policy file.
        #[arg(long, value_name = "ROLE")]
        role: Vec<String>,
        /// Purpose of use; `BTG` declares a break-glass access (needs --user and --reason).
        #[arg(long, value_name = "CODE")]
        purpose_of_use: Option<String>,
        /// Why break-glass access is needed (stored in the token, never logged).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Write a consistent, encrypted snapshot of the whole database (resources, history, audit
    /// ledger) to FILE, with a manifest of row counts and checksums. Restoring needs the same
    /// key file.
    Backup {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Restore a backup into an empty database (SQLite or PostgreSQL, whichever the backup came
    /// from), in one transaction; then run `fhirvault audit verify`. With --drill, a restore
    /// drill instead: the backup is restored into a throwaway SQLite database in the data
    /// directory, its audit chains verified against its signed checkpoints, the scratch database
    /// removed, and the drill (passed or failed) recorded in this deployment's audit log, where
    /// the compliance report finds it.
    Restore {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[arg(long)]
        drill: bool,
    },
    /// Rebuild the search indexes of every resource from its stored content (after an
    /// upgrade that changes search parameters, or a restore), with progress.
    Reindex,
    /// Encryption keys: status, rotation and re-encryption.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Evidence for the HIPAA Security Rule's technical safeguards, from this deployment.
    Compliance {
        #[command(subcommand)]
        command: ComplianceCommand,
    },
    /// The audit ledger: verify its chain, export it, archive what is past retention.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Import NDJSON files (plain or gzip; a Bulk Data export, Synthea) and Bundles (batch,
    /// transaction, collection) through the same write path as the API (validation, indexing,
    /// encryption, an AuditEvent per resource), with progress. May run beside a server.
    Import {
        /// Files, or directories of `.ndjson`, `.json` (and `.gz`) files.
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "auto")]
        format: fhirvault::import::Format,
        /// `stop`: a file with refused input is not applied, and the import stops; `skip`:
        /// refused lines are reported and the rest imported.
        #[arg(long, value_enum, default_value = "stop")]
        on_error: fhirvault::import::OnError,
        /// Continue an interrupted import of the same files after its last committed chunk.
        #[arg(long)]
        resume: bool,
    },
    /// The built-in authorization server's users, clients and EHR launches.
    Admin {
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// The active key version, each version's age, and the rows each protects.
    Status,
    /// Make a new key version current, re-encrypt every row under older versions (with
    /// progress; resumable with `keys reencrypt`), then retire the versions no row uses. Stop
    /// the servers first, or restart them afterwards: they load keys at start.
    Rotate,
    /// Continue an interrupted re-encryption, then retire the versions no row uses.
    Reencrypt,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check every node's hash chain, every record's content and the signed checkpoints (in the
    /// database and in the checkpoint files); name the first edited, inserted, deleted,
    /// reordered or truncated record of each chain, and any chain dropped whole. Exits 1 when
    /// the ledger fails.
    Verify {
        /// First sequence number to check in each chain [default: the start of the chain].
        #[arg(long, value_name = "N")]
        from: Option<i64>,
        /// Last sequence number to check in each chain [default: the end of the chain].
        #[arg(long, value_name = "M")]
        to: Option<i64>,
        /// Other nodes' checkpoint files to check too (this node's, `audit_checkpoint_file`,
        /// always is). Repeatable.
        #[arg(long = "checkpoint-file", value_name = "FILE")]
        checkpoint_files: Vec<std::path::PathBuf>,
    },
    /// Write the ledger as NDJSON, one AuditEvent per line with its chain position (queries
    /// stay sealed), for shipping to external immutable storage.
    Export {
        /// Only events recorded at or after this instant or date (2026-01-01 or 2026-01-01T00:00:00Z).
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// Output format (only ndjson).
        #[arg(long, default_value = "ndjson")]
        format: String,
        /// Output file [default: standard output].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Export to FILE, then remove, the events older than `audit_retention_days` (never younger
    /// ones). On PostgreSQL this runs as the tables' owner (`migration_database_url`).
    Archive {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ComplianceCommand {
    /// For each standard and implementation specification of 45 CFR 164.312, the live evidence
    /// and a verdict (pass, attention, fail) with its reason: row-level security, accounts,
    /// lifetimes, keys, the audit chains verified against the signed checkpoints, retention,
    /// the second factor, TLS. Read-only (it records its own AuditEvent). Exits 1 when a check
    /// fails.
    Report {
        /// The start of the period the report covers (2026-01-01 or an instant) [default: 30
        /// days ago].
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// `html` (one self-contained file that prints) or `json` (for GRC tools).
        #[arg(long, default_value = "html")]
        format: String,
        /// Output file [default: standard output].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

fn load_config(common: &CommonArgs, behind_tls_proxy: Option<bool>) -> anyhow::Result<Config> {
    let file = match &common.config {
        Some(path) => ConfigLayer::from_toml_file(path)?,
        None => ConfigLayer::default(),
    };
    let env = ConfigLayer::from_env(std::env::vars())?;
    let flags = ConfigLayer {
        listen: common.listen.clone(),
        data_dir: common.data_dir.clone(),
        database_url: common.database_url.clone(),
        key_file: common.key_file.clone(),
        behind_tls_proxy,
        ..Default::default()
    };
    Ok(Config::resolve(file.overlay(env).overlay(flags))?)
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // `{:#}` prints the cause chain on one line; no backtrace for operator errors.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { behind_tls_proxy } => {
            let config = load_config(&cli.common, behind_tls_proxy.then_some(true))?;
            fhirvault::telemetry::init(config.log_format);
            config.check_listen_safety()?;
            serve(config)
        }
        Command::Token {
            scope,
            patient,
            user,
            client,
            expires_in,
            amr,
            role,
            purpose_of_use,
            reason,
        } => {
            let config = load_config(&cli.common, None)?;
            if let Some(p) = &patient {
                anyhow::ensure!(fhirvault::fhir::resource::is_valid_id(p), "--patient must be a FHIR id");
            }
            if let Some(u) = &user {
                let ok = u
                    .split_once('/')
                    .is_some_and(|(t, id)| !t.is_empty() && fhirvault::fhir::resource::is_valid_id(id));
                anyhow::ensure!(ok, "--user must be a reference such as Practitioner/123");
            }
            // a granular scope the server cannot evaluate would grant nothing: say so now
            let mut parsed = fhirvault::auth::ScopeSet::parse(&scope, |_| true);
            parsed.compile_filters(&*fhirvault::server::shared_registry(&config)?);
            if let Some(bad) = parsed
                .resources
                .iter()
                .find(|s| !s.constraints.is_empty() && s.filter.is_none())
            {
                let (name, _) = &bad.constraints[0];
                anyhow::bail!(
                    "a granular scope (condition on `{name}`) grants nothing: conditions must be token \
                     search parameters of the scope's type (category, code, status …), not on `*`"
                );
            }
            let break_glass = purpose_of_use.as_deref() == Some("BTG");
            if break_glass {
                anyhow::ensure!(
                    user.is_some() && reason.as_deref().is_some_and(|r| !r.trim().is_empty()),
                    "a break-glass token (--purpose-of-use BTG) needs --user and a --reason"
                );
            }
            let issuer = fhirvault::server::open_issuer(&config)?;
            let (token_user, token_patient) = (user.clone(), patient.clone());
            let (btg_client, btg_reason) = (client.clone(), reason.clone());
            let expires_in = expires_in.unwrap_or(config.max_token_lifetime_secs);
            let (token, token_id) = issuer.issue_with_id(&fhirvault::auth::TokenRequest {
                scope,
                patient,
                fhir_user: user,
                client_id: client,
                subject: None,
                expires_in,
                amr,
                roles: role,
                purpose_of_use,
                btg_reason: reason,
            })?;
            let store = open_store(&config, false)?;
            let mut record = cli_record(Kind::Security("token-issue"), Action::Execute);
            if break_glass {
                // the use is listed for review with its reason, sealed; the token's own event
                // says only that it was a break-glass token
                let issued = fhirvault::store::now();
                let window = expires_in.min(config.break_glass_secs);
                let fhir_user = token_user.clone().unwrap_or_default();
                let sealed = fhirvault::store::break_glass::seal_reason(
                    store.cipher(),
                    &token_id,
                    btg_reason.as_deref().unwrap_or_default(),
                )?;
                store
                    .break_glass_add(&fhirvault::store::break_glass::BreakGlassRow {
                        token_id: token_id.clone(),
                        issued_at: issued,
                        expires_at: issued + chrono::Duration::seconds(window),
                        subject: fhir_user.clone(),
                        fhir_user,
                        client_id: btg_client,
                        reason: sealed,
                        reviewed_at: None,
                        reviewed_by: None,
                    })
                    .context("recording the break-glass use")?;
                record.outcome_desc = Some("break-glass token".into());
            }
            if let Some(u) = token_user {
                record.entities.push(u);
            }
            record.patients.extend(token_patient);
            audit_now(&config, &store, &record)?;
            println!("{token}");
            Ok(())
        }
        Command::Admin { command } => {
            let config = load_config(&cli.common, None)?;
            let store = open_store(&config, false)?;
            admin::run(&config, &store, command)
        }
        Command::Import {
            paths,
            format,
            on_error,
            resume,
        } => {
            let config = load_config(&cli.common, None)?;
            let state = fhirvault::server::build_command_state(config.clone())?;
            let store = state.store.clone();
            let auditor = state.auditor.clone();
            let opts = fhirvault::import::Options {
                paths,
                format,
                on_error,
                resume,
            };
            let result = fhirvault::import::run(state, opts);
            // every resource's event is in the ledger before the summary is
            auditor.flush_blocking().context("the audit ledger")?;
            auditor.shutdown();
            let mut record = cli_record(Kind::Admin("import"), Action::Create);
            let summary = match &result {
                Ok(summary) => summary,
                Err(e) => {
                    record.outcome_desc = Some("import stopped".into());
                    audit_now(&config, &store, &record)?;
                    anyhow::bail!("{e}");
                }
            };
            let created: u64 = summary.by_type.values().map(|t| t.created).sum();
            let updated: u64 = summary.by_type.values().map(|t| t.updated).sum();
            record.outcome_desc = Some(format!(
                "import of {} files: {created} created, {updated} updated, {} refused",
                summary.files,
                summary.refusals.len()
            ));
            audit_now(&config, &store, &record)?;
            print!("{}", summary.table());
            Ok(())
        }
        Command::Backup { out } => {
            let config = load_config(&cli.common, None)?;
            let store = open_store(&config, false)?;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            let mut w = std::io::BufWriter::new(file);
            let manifest = store
                .backup(&mut w, |table, rows| eprintln!("  {table}: {rows} rows"))
                .context("backup")?;
            w.into_inner()
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?
                .sync_all()?;
            let total: u64 = manifest.tables.values().map(|t| t.rows).sum();
            let mut record = cli_record(Kind::Admin("backup"), Action::Read);
            record.outcome_desc = Some(format!("backup {} of {total} rows", manifest.backup_id));
            audit_now(&config, &store, &record)?;
            println!(
                "backup {} written to {} ({total} rows)",
                manifest.backup_id,
                out.display()
            );
            Ok(())
        }
        Command::Restore { file, drill: true } => {
            let config = load_config(&cli.common, None)?;
            restore_drill(&config, &file)
        }
        Command::Restore { file, drill: false } => {
            let config = load_config(&cli.common, None)?;
            let store = open_store(&config, true)?;
            let f = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
            let mut r = std::io::BufReader::new(f);
            let manifest = store
                .restore(&mut r, |table, rows| eprintln!("  {table}: {rows} rows"))
                .context("restore")?;
            let total: u64 = manifest.tables.values().map(|t| t.rows).sum();
            // search indexes are derived data: rebuilt rather than carried in the backup
            reindex(&config, &store)?;
            let mut record = cli_record(Kind::Admin("restore"), Action::Create);
            record.outcome_desc = Some(format!("backup {} restored ({total} rows)", manifest.backup_id));
            audit_now(&config, &store, &record)?;
            println!(
                "restored backup {} of {} ({total} rows); now run `fhirvault audit verify`",
                manifest.backup_id, manifest.created
            );
            Ok(())
        }
        Command::Audit { command } => {
            let config = load_config(&cli.common, None)?;
            audit_command(&config, command)
        }
        Command::Reindex => {
            let config = load_config(&cli.common, None)?;
            let store = open_store(&config, false)?;
            let n = reindex(&config, &store)?;
            let mut record = cli_record(Kind::Admin("reindex"), Action::Update);
            record.outcome_desc = Some(format!("{n} resources reindexed"));
            audit_now(&config, &store, &record)?;
            println!("{n} resources reindexed");
            Ok(())
        }
        Command::Keys { command } => {
            let config = load_config(&cli.common, None)?;
            keys_command(&config, command)
        }
        Command::Compliance {
            command: ComplianceCommand::Report { since, format, out },
        } => {
            let config = load_config(&cli.common, None)?;
            compliance_report(&config, since.as_deref(), &format, out.as_deref())
        }
        Command::Migrate => {
            let config = load_config(&cli.common, None)?;
            fhirvault::telemetry::init(config.log_format);
            fhirvault::server::ensure_data_dir(&config)?;
            // Migrations run as the tables' owner when one is configured.
            let url = config.migration_database_url.as_deref().unwrap_or(&config.database_url);
            let manager = fhirvault::store::DbManager::new(url).context("database_url")?;
            let mut conn = manager.connect().context("connecting to the database")?;
            let applied = fhirvault::store::run_migrations(&mut conn)?;
            drop(conn);
            let store = open_store(&config, false)?;
            let mut record = cli_record(Kind::Admin("migrate"), Action::Execute);
            record.outcome_desc = Some(format!("{} migrations applied", applied.len()));
            audit_now(&config, &store, &record)?;
            if applied.is_empty() {
                println!("database is up to date");
            } else {
                for m in applied {
                    println!("applied {m}");
                }
            }
            Ok(())
        }
    }
}

/// The store, as the server's role, or as the tables' owner (`migration_database_url`) for
/// what only the owner may do.
fn open_store(config: &Config, as_owner: bool) -> anyhow::Result<Arc<Store>> {
    let cipher = fhirvault::server::open_cipher(config)?;
    if as_owner {
        if let Some(owner) = &config.migration_database_url {
            let store = Store::open(owner, None, 2, cipher).context("opening the database as its owner")?;
            return Ok(Arc::new(store));
        }
    }
    fhirvault::server::open_store(config, cipher)
}

/// `fhirvault restore --drill FILE`: the backup restored into a scratch SQLite database (in the
/// data directory: it holds PHI while it lives), its ledger verified, the scratch removed, and
/// the outcome recorded in this deployment's audit log (`restore-drill`).
fn restore_drill(config: &Config, file: &Path) -> anyhow::Result<()> {
    let store = open_store(config, false)?;
    let scratch = config.data_dir.join(format!("restore-drill-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let result = (|| -> anyhow::Result<String> {
        let cipher = fhirvault::server::open_cipher(config)?;
        let url = format!("sqlite://{}", scratch.join("drill.db").display());
        let drill = Store::open(&url, None, 2, cipher).context("opening the scratch database")?;
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        eprintln!("restoring into a scratch database");
        let manifest = drill
            .restore(&mut std::io::BufReader::new(f), |table, rows| {
                eprintln!("  {table}: {rows} rows")
            })
            .context("restore")?;
        let total: u64 = manifest.tables.values().map(|t| t.rows).sum();
        let (key, _) = fhirvault::server::audit_checkpointing(config)?;
        eprintln!("verifying the restored audit chains against their signed checkpoints");
        let report =
            fhirvault::audit::verify::verify(&drill, drill.cipher(), &key.verifying_key(), &[], None, None, |n| {
                eprintln!("  {n} records verified")
            })?;
        if let Some(f) = report.finding {
            anyhow::bail!(
                "backup {}: the restored audit log does not verify: {f}",
                manifest.backup_id
            );
        }
        Ok(format!(
            "backup {} of {}: {total} rows restored into a scratch database; {} chains, {} audit records and {} \
             signed checkpoints verified",
            manifest.backup_id, manifest.created, report.chains, report.checked, report.checkpoints
        ))
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    let mut record = cli_record(Kind::Admin("restore-drill"), Action::Execute);
    match &result {
        Ok(summary) => record.outcome_desc = Some(summary.clone()),
        Err(e) => {
            record.outcome = Outcome::MajorFailure;
            record.outcome_desc = Some(format!("restore drill failed: {e:#}"));
        }
    }
    audit_now(config, &store, &record)?;
    let summary = result?;
    println!("restore drill passed: {summary}");
    Ok(())
}

/// Rebuilds every search index row, with progress on stderr.
fn reindex(config: &Config, store: &Arc<Store>) -> anyhow::Result<u64> {
    let base = fhirvault::server::shared_registry(config)?;
    // the SearchParameters stored through the API are indexed too (they are not part of the
    // fingerprint: the server indexes them on new writes without asking for a reindex)
    let live = fhirvault::server::live_registry(config, base.clone())?;
    live.update(&fhirvault::server::stored_search_parameters(store, &base)?)?;
    let registry = live.current();
    let cipher = store.shared_cipher();
    // until every row is rebuilt, the index matches no settings (the server refuses it)
    store
        .set_search_fingerprint("reindex-in-progress")
        .context("recording the search index settings")?;
    let n = store
        .reindex(
            |t, json| fhirvault::search::index_rows(&registry, &cipher, t, json),
            |n| eprintln!("  {n} resources reindexed"),
        )
        .context("reindexing")?;
    // only once every row is rebuilt: an interrupted reindex leaves the server refusing
    store
        .set_search_fingerprint(registry.fingerprint())
        .context("recording the search index settings")?;
    Ok(n)
}

/// An event made by this command line, on behalf of the operating-system user running it.
pub(crate) fn cli_record(kind: Kind, action: Action) -> AuditRecord {
    let agent = Agent {
        subject: Some(format!(
            "os-user:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        )),
        client_id: Some("fhirvault-cli".into()),
        ..Agent::default()
    };
    AuditRecord::new(kind, action, agent)
}

/// Records one event and waits until it is in the ledger (and a checkpoint signed).
pub(crate) fn audit_now(config: &Config, store: &Arc<Store>, record: &AuditRecord) -> anyhow::Result<()> {
    let auditor = fhirvault::server::open_auditor(config, store, &fhirvault::server::cli_node_name(config))?;
    auditor
        .record_blocking(record)
        .context("recording the audit event (nothing else was changed)")?;
    auditor.shutdown();
    Ok(())
}

fn parse_since(s: &str) -> anyhow::Result<chrono::NaiveDateTime> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.naive_utc());
    }
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| anyhow::anyhow!("--since must be a date (2026-01-01) or an instant (2026-01-01T00:00:00Z)"))?;
    Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

fn compliance_report(config: &Config, since: Option<&str>, format: &str, out: Option<&Path>) -> anyhow::Result<()> {
    anyhow::ensure!(format == "html" || format == "json", "--format: html or json");
    let now = fhirvault::store::now();
    let since = match since {
        Some(s) => parse_since(s)?,
        None => now - chrono::Duration::days(30),
    };
    let store = open_store(config, false)?;
    let keys = fhirvault::server::open_keys(config)?;
    let (key, file) = fhirvault::server::audit_checkpointing(config)?;
    eprintln!("checking the technical safeguards (the audit chains are verified end to end)");
    let inputs = fhirvault::compliance::Inputs {
        config,
        store: &store,
        keys: &keys,
        checkpoint_key: &key,
        checkpoint_files: &[file],
        since,
        now,
    };
    let report = fhirvault::compliance::report(&inputs, |n| eprintln!("  {n} audit records verified"))?;
    let failed: Vec<String> = report
        .sections
        .iter()
        .flat_map(|s| s.checks.iter().map(move |c| (s, c)))
        .filter(|(_, c)| c.verdict == fhirvault::compliance::Verdict::Fail)
        .map(|(s, c)| format!("{} {}", s.citation, c.name))
        .collect();
    let bytes = match format {
        "json" => serde_json::to_vec_pretty(&report.to_json())?,
        _ => fhirvault::compliance::html::render(&report).into_bytes(),
    };
    let mut record = cli_record(Kind::Admin("compliance-report"), Action::Read);
    record.outcome_desc = Some(format!("{} checks failed", failed.len()));
    audit_now(config, &store, &record)?;
    match out {
        Some(path) => {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            eprintln!("report written to {}", path.display());
        }
        None => {
            use std::io::Write;
            std::io::stdout().write_all(&bytes)?;
        }
    }
    anyhow::ensure!(failed.is_empty(), "checks failed: {}", failed.join("; "));
    Ok(())
}

fn keys_command(config: &Config, command: KeysCommand) -> anyhow::Result<()> {
    use fhirvault::crypto::KeyProvider;
    let mut keyfile = fhirvault::server::open_keys(config)?;
    let rotated = match command {
        KeysCommand::Status => {
            let store = open_store(config, false)?;
            let usage = store.key_usage()?;
            println!("key file: {} ({})", config.key_file.display(), keyfile.provider());
            println!(
                "current version: {}   blind-index version: {}",
                keyfile.current_version(),
                keyfile.blind_index_version()
            );
            for (version, _) in keyfile.versions() {
                let v = version as i32;
                println!(
                    "  v{version}: created {}, resource versions {}, audit events {}",
                    keyfile.created(version).unwrap_or("unknown"),
                    usage.resource_versions.get(&v).copied().unwrap_or(0),
                    usage.audit_events.get(&v).copied().unwrap_or(0)
                );
            }
            let mut record = cli_record(Kind::Admin("key-status"), Action::Read);
            record.outcome_desc = Some(format!("current key version {}", keyfile.current_version()));
            audit_now(config, &store, &record)?;
            return Ok(());
        }
        KeysCommand::Rotate => {
            let version = keyfile.rotate().context("rotating")?;
            eprintln!("key version {version} is now current");
            Some(version)
        }
        KeysCommand::Reencrypt => None,
    };
    // the store (as the tables' owner: re-encryption updates rows) with the key file as it is now
    let store = open_store(config, true)?;
    let mut record = cli_record(Kind::Admin("key-rotate"), Action::Update);
    let result = store.reencrypt(|n| eprintln!("  {n} rows re-encrypted")).and_then(|n| {
        // the sign-in second factors and the break-glass reasons are sealed with the content key too
        Ok(n + fhirvault::auth::server::reencrypt_totp_secrets(&store)? + store.break_glass_reencrypt()?)
    });
    let usage = store.key_usage();
    let mut retired = Vec::new();
    if let (Ok(_), Ok(usage)) = (&result, &usage) {
        for (version, _) in keyfile.versions() {
            if version != keyfile.current_version() && version != keyfile.blind_index_version() && !usage.uses(version)
            {
                keyfile.retire(version).context("retiring a key version")?;
                retired.push(version);
            }
        }
    }
    record.outcome_desc = Some(match &result {
        Ok(n) => format!(
            "{}{n} rows re-encrypted to version {}; retired {retired:?}",
            rotated.map(|v| format!("new key version {v}; ")).unwrap_or_default(),
            keyfile.current_version()
        ),
        Err(_) => "re-encryption interrupted; run `fhirvault keys reencrypt`".into(),
    });
    if result.is_err() {
        record.outcome = Outcome::SeriousFailure;
    }
    audit_now(config, &store, &record)?;
    let n = result.context("re-encrypting (resume with `fhirvault keys reencrypt`)")?;
    println!(
        "{n} rows re-encrypted with key version {}; retired versions: {retired:?}; restart running servers to load the new key",
        keyfile.current_version()
    );
    Ok(())
}

fn audit_command(config: &Config, command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify {
            from,
            to,
            checkpoint_files,
        } => {
            let store = open_store(config, false)?;
            let (key, file) = fhirvault::server::audit_checkpointing(config)?;
            eprintln!("verifying the audit chain (checkpoint key {})", key.key_id());
            let mut files = vec![file];
            files.extend(
                checkpoint_files
                    .into_iter()
                    .map(fhirvault::audit::checkpoint::CheckpointFile::new),
            );
            let report = fhirvault::audit::verify::verify(
                &store,
                store.cipher(),
                &key.verifying_key(),
                &files,
                from,
                to,
                |n| eprintln!("  {n} records verified"),
            )?;
            let mut record = cli_record(Kind::Admin("audit-verify"), Action::Execute);
            if let Some(f) = &report.finding {
                record.outcome = Outcome::MajorFailure;
                record.outcome_desc = Some(f.to_string());
            }
            audit_now(config, &store, &record)?;
            match report.finding {
                None => {
                    println!(
                        "audit chains intact: {} chains, {} records checked, {} signed checkpoints verified",
                        report.chains, report.checked, report.checkpoints
                    );
                    Ok(())
                }
                Some(f) => {
                    for other in report.findings.iter().skip(1) {
                        eprintln!("  also: {other}");
                    }
                    anyhow::bail!("audit chain verification failed: {f}")
                }
            }
        }
        AuditCommand::Export { since, format, out } => {
            anyhow::ensure!(format == "ndjson", "--format: only ndjson is supported");
            let since = since.as_deref().map(parse_since).transpose()?;
            let store = open_store(config, false)?;
            let summary = match &out {
                Some(path) => {
                    let file = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    let mut w = std::io::BufWriter::new(file);
                    let s = export_ndjson(&store, store.cipher(), since, None, &mut w, |n| {
                        eprintln!("  {n} events exported")
                    })?;
                    w.into_inner()
                        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?
                        .sync_all()?;
                    s
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut lock = stdout.lock();
                    export_ndjson(&store, store.cipher(), since, None, &mut lock, |n| {
                        eprintln!("  {n} events exported")
                    })?
                }
            };
            let mut record = cli_record(Kind::Admin("audit-export"), Action::Read);
            record.outcome_desc = Some(format!("{} events exported", summary.events));
            audit_now(config, &store, &record)?;
            eprintln!(
                "exported {} events from {} chains",
                summary.events,
                summary.chains.len()
            );
            Ok(())
        }
        AuditCommand::Archive { out } => {
            let store = open_store(config, true)?;
            let result = fhirvault::audit::export::archive(
                &store,
                store.cipher(),
                fhirvault::audit::export::retention_cutoff(config.audit_retention_days),
                &out,
                |n| eprintln!("  {n} events archived"),
            )?;
            let mut record = cli_record(Kind::Admin("audit-archive"), Action::Delete);
            let describe = |runs: &[fhirvault::store::audit::ArchiveRun]| {
                runs.iter()
                    .map(|r| {
                        format!(
                            "chain {} up to record {} ({} events)",
                            r.chain_id, r.up_to_seq, r.events
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            record.outcome_desc = Some(match &result {
                Some((runs, removed)) => format!("{} archived, {removed} removed", describe(runs)),
                None => "nothing older than the retention period".into(),
            });
            audit_now(config, &store, &record)?;
            match result {
                Some((runs, removed)) => println!(
                    "archived {} (older than {}) to {}; removed {removed} from the database",
                    describe(&runs),
                    fhirvault::audit::export::retention_cutoff(config.audit_retention_days)
                        .and_utc()
                        .format("%Y-%m-%dT%H:%M:%SZ"),
                    out.display()
                ),
                None => println!(
                    "nothing to archive: no event is older than the retention period ({} days)",
                    config.audit_retention_days
                ),
            }
            Ok(())
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let workers = config.workers;
    let started = std::time::Instant::now();
    let state = actix_web::web::Data::new(fhirvault::server::build_state(config)?);
    let auditor = state.auditor.clone();
    // starting and stopping the service are configuration events an auditor asks about
    let mut started_event = cli_record(Kind::Admin("server-start"), Action::Execute);
    started_event.outcome_desc = Some(format!("listening on {listen}, backend {:?}", state.store.backend()));
    auditor
        .record_blocking(&started_event)
        .context("recording the start in the audit log")?;
    admin::bootstrap(&state.config, &state.store, &auditor)?;
    tracing::info!(
        %listen,
        backend = ?state.store.backend(),
        startup_ms = started.elapsed().as_millis() as u64,
        "fhirvault ready"
    );
    let tls = match &state.config.tls {
        Some(files) => Some(fhirvault::tls::ReloadableCert::load(&files.cert, &files.key).context("TLS")?),
        None => None,
    };
    let reload_auditor = auditor.clone();
    let exporter = state.exporter.clone();
    let (shutdown_timeout, request_timeout) = (state.config.shutdown_timeout_secs, state.config.request_timeout_secs);
    let (draining, drain_delay) = (state.draining.clone(), state.config.drain_delay_secs);
    let served = actix_web::rt::System::new().block_on(async move {
        let server = actix_web::HttpServer::new(move || fhirvault::api::app(state.clone()))
            .workers(workers)
            // a stop (SIGTERM, SIGINT) lets requests in flight finish, for this long at most
            .shutdown_timeout(shutdown_timeout)
            .client_request_timeout(std::time::Duration::from_secs(request_timeout));
        let server = match &tls {
            Some(cert) => {
                let config = cert.server_config()?;
                let cert = cert.clone();
                // SIGHUP: read the certificate and key again; new handshakes get them, open
                // connections keep theirs. A bad file leaves the current certificate in place.
                actix_web::rt::spawn(async move {
                    use tokio::signal::unix::{signal, SignalKind};
                    let Ok(mut hup) = signal(SignalKind::hangup()) else {
                        tracing::error!("cannot listen for SIGHUP: the TLS certificate will not be reloaded");
                        return;
                    };
                    while hup.recv().await.is_some() {
                        let mut event = cli_record(Kind::Admin("tls-reload"), Action::Execute);
                        match cert.reload() {
                            Ok(()) => tracing::info!("TLS certificate reloaded"),
                            Err(e) => {
                                tracing::error!(error = %e, "TLS certificate not reloaded; the current one stays");
                                event.outcome = Outcome::SeriousFailure;
                                event.outcome_desc = Some("the new certificate or key could not be loaded".into());
                            }
                        }
                        if let Err(e) = reload_auditor.record(&event).await {
                            tracing::error!(error = %e, "the certificate reload could not be recorded in the audit log");
                        }
                    }
                });
                server
                    .bind_rustls_0_23(listen, config)
                    .with_context(|| format!("binding {listen}"))?
            }
            None => server.bind(listen).with_context(|| format!("binding {listen}"))?,
        };
        // SIGTERM and SIGINT: readiness fails at once (`draining`), requests are still served
        // for `drain_delay_secs` (a load balancer notices and stops sending), then the listener
        // closes and requests in flight finish within `shutdown_timeout_secs`.
        let server = server.disable_signals().run();
        let handle = server.handle();
        actix_web::rt::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                tracing::error!("cannot listen for SIGTERM and SIGINT: the server will not drain on stop");
                return;
            };
            let _ = futures_util::future::select(Box::pin(term.recv()), Box::pin(int.recv())).await;
            draining.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(drain_delay_secs = drain_delay, "stopping: draining");
            actix_web::rt::time::sleep(std::time::Duration::from_secs(drain_delay)).await;
            handle.stop(true).await;
        });
        server.await.context("server stopped with an error")
    });
    // export runners take no new work (a job being written resumes after its lease, here or elsewhere)
    exporter.stop();
    // commit what is queued and sign a last checkpoint before exiting
    let stopped_event = cli_record(Kind::Admin("server-stop"), Action::Execute);
    if let Err(e) = auditor.record_blocking(&stopped_event) {
        tracing::error!(error = %e, "the stop could not be recorded in the audit log");
    }
    auditor.shutdown();
    tracing::info!("audit ledger closed");
    served
}
