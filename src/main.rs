//! The `fhirvault` command line.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fhirvault::config::{Config, ConfigLayer};
use std::path::PathBuf;

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
        /// Space-separated SMART scopes, for example "patient/*.rs" or "system/Patient.cruds".
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
            let issuer = fhirvault::server::open_issuer(&config)?;
            let token = issuer.issue(&fhirvault::auth::TokenRequest {
                scope,
                patient,
                fhir_user: user,
                client_id: client,
                subject: None,
                expires_in: expires_in.unwrap_or(config.max_token_lifetime_secs),
                amr,
                roles: role,
                purpose_of_use,
                btg_reason: reason,
            })?;
            println!("{token}");
            Ok(())
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

fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let workers = config.workers;
    let started = std::time::Instant::now();
    let state = actix_web::web::Data::new(fhirvault::server::build_state(config)?);
    tracing::info!(
        %listen,
        backend = ?state.store.backend(),
        startup_ms = started.elapsed().as_millis() as u64,
        "fhirvault ready"
    );
    actix_web::rt::System::new().block_on(async move {
        actix_web::HttpServer::new(move || fhirvault::api::app(state.clone()))
            .workers(workers)
            .bind(listen)
            .with_context(|| format!("binding {listen}"))?
            .run()
            .await
            .context("server stopped with an error")
    })
}
