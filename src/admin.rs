//! `fhirvault admin`: users, clients and EHR launch values of the built-in authorization
//! server, and the first-run bootstrap `serve` prints. Every command is an audited event. No
//! command prints a secret it did not just generate for the operator.

use crate::{audit_now, cli_record};
use anyhow::Context;
use clap::Subcommand;
use fhirvault::audit::{Action, Kind};
use fhirvault::auth::server::{self as authz, OAuthError};
use fhirvault::config::Config;
use fhirvault::store::auth::ClientRow;
use fhirvault::store::Store;
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Subcommand)]
pub enum AdminCommand {
    /// User accounts (sign-in with password and TOTP).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// OAuth clients (SMART apps and backend services).
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
    /// Mint a launch value for an EHR launch: the app is opened with `?iss=<FHIR base>&launch=<value>`
    /// and gets the context given here. Single use.
    Launch {
        /// The patient in context (a FHIR id).
        #[arg(long, value_name = "ID")]
        patient: Option<String>,
        /// The encounter in context (a FHIR id).
        #[arg(long, value_name = "ID")]
        encounter: Option<String>,
        /// Only this client may use the launch.
        #[arg(long, value_name = "CLIENT_ID")]
        client: Option<String>,
        /// Seconds until the value expires.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        expires_in: i64,
    },
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Add a user. The password is read from standard input with --password-stdin, else one is
    /// generated and printed once. The user enrols a TOTP second factor at first sign-in.
    Add {
        username: String,
        /// The FHIR resource the user is (`fhirUser`): Practitioner/123, Patient/456 …
        #[arg(long, value_name = "TYPE/ID")]
        fhir_user: Option<String>,
        /// Roles (the token's `roles` claim), for the policy file's rules.
        #[arg(long, value_name = "ROLE")]
        role: Vec<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Enrol a TOTP secret now and print its otpauth:// URI (for scripted set-ups).
        #[arg(long)]
        with_totp: bool,
    },
    /// Disable a user: sign-ins refused, sessions ended, refresh tokens revoked.
    Disable { username: String },
    /// Enable a disabled user again.
    Enable { username: String },
    /// Remove a user's second factor (ends their sessions); they enrol again at next sign-in.
    ResetMfa { username: String },
    /// List users.
    List,
}

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Register a client. Public clients (browser and native apps) use PKCE and no secret;
    /// confidential ones authenticate with a generated secret (--secret, printed once) or a key
    /// (--jwks FILE or --jwks-uri URL, for private_key_jwt).
    Add {
        client_id: String,
        /// A name users see on the consent page.
        #[arg(long)]
        name: Option<String>,
        /// public or confidential.
        #[arg(long = "type", value_name = "TYPE", default_value = "public")]
        client_type: String,
        /// A redirect URI (repeatable; compared exactly).
        #[arg(long, value_name = "URI")]
        redirect_uri: Vec<String>,
        /// Space-separated scopes the client may be granted, for example "launch/patient openid
        /// fhirUser offline_access patient/*.rs".
        #[arg(long)]
        scope: String,
        /// Generate a client secret (printed once).
        #[arg(long)]
        secret: bool,
        /// The client's public keys, a JWK Set file (private_key_jwt).
        #[arg(long, value_name = "FILE")]
        jwks: Option<PathBuf>,
        /// Where the client publishes its JWK Set (private_key_jwt).
        #[arg(long, value_name = "URL")]
        jwks_uri: Option<String>,
    },
    /// List clients.
    List,
    /// Disable a client: its codes and refresh tokens stop working.
    Disable { client_id: String },
}

fn check_reference(r: &str) -> anyhow::Result<()> {
    let ok = r
        .split_once('/')
        .is_some_and(|(t, id)| !t.is_empty() && fhirvault::fhir::resource::is_valid_id(id));
    anyhow::ensure!(ok, "--fhir-user must be a reference such as Practitioner/123");
    Ok(())
}

fn oauth(e: OAuthError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Adds a user; returns their TOTP secret when one was enrolled.
fn add_user(
    store: &Store,
    username: &str,
    password: &str,
    fhir_user: Option<String>,
    roles: &[String],
    with_totp: bool,
) -> anyhow::Result<Option<zeroize::Zeroizing<Vec<u8>>>> {
    let mut user = authz::new_user(username, password, fhir_user, roles).map_err(oauth)?;
    let secret = with_totp.then(authz::new_totp_secret);
    if let Some(s) = &secret {
        user.totp_secret = Some(authz::seal_totp(store.cipher(), &user.id, s).map_err(oauth)?);
    }
    match store.auth_user_add(&user) {
        Ok(()) => Ok(secret),
        Err(e) if e.is_unique_violation() => anyhow::bail!("a user named {username} exists already"),
        Err(e) => Err(e).context("adding the user"),
    }
}

pub fn run(config: &Config, store: &Arc<Store>, command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::User { command } => user(config, store, command),
        AdminCommand::Client { command } => client(config, store, command),
        AdminCommand::Launch {
            patient,
            encounter,
            client,
            expires_in,
        } => {
            for id in patient.iter().chain(encounter.iter()) {
                anyhow::ensure!(fhirvault::fhir::resource::is_valid_id(id), "{id} is not a FHIR id");
            }
            anyhow::ensure!(
                (10..=86_400).contains(&expires_in),
                "--expires-in must be between 10 and 86400"
            );
            let (value, row) = authz::new_launch(patient.clone(), encounter, client, expires_in);
            let mut record = cli_record(Kind::Admin("launch"), Action::Create);
            record.patients.extend(patient);
            audit_now(config, store, &record)?;
            store.auth_launch_add(&row).context("storing the launch")?;
            println!("{value}");
            eprintln!("launch value valid for {expires_in} s, once: open the app with ?iss=<FHIR base URL>&launch=<this value>");
            Ok(())
        }
    }
}

fn user(config: &Config, store: &Arc<Store>, command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Add {
            username,
            fhir_user,
            role,
            password_stdin,
            with_totp,
        } => {
            anyhow::ensure!(
                !username.is_empty() && username.len() <= 128 && !username.chars().any(char::is_control),
                "the username must be 1 to 128 printable characters"
            );
            if let Some(f) = &fhir_user {
                check_reference(f)?;
            }
            let (password, generated) = if password_stdin {
                let mut line = zeroize::Zeroizing::new(String::new());
                std::io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .context("reading the password")?;
                let p = zeroize::Zeroizing::new(line.trim_end_matches(['\r', '\n']).to_string());
                anyhow::ensure!(p.chars().count() >= 12, "the password must be at least 12 characters");
                (p, false)
            } else {
                (zeroize::Zeroizing::new(authz::generate_password()), true)
            };
            let mut record = cli_record(Kind::Admin("user-add"), Action::Create);
            record.outcome_desc = Some(format!("user {username}"));
            audit_now(config, store, &record)?;
            let secret = add_user(store, &username, &password, fhir_user.clone(), &role, with_totp)?;
            println!(
                "user {username} added{}",
                fhir_user.map(|f| format!(" as {f}")).unwrap_or_default()
            );
            if generated {
                println!("password (shown once): {}", password.as_str());
            }
            match secret {
                Some(s) => {
                    let (_, uri) = authz::totp_enrolment(&username, &s);
                    println!("TOTP (shown once): {uri}");
                }
                None => println!("the user sets up a TOTP second factor at first sign-in"),
            }
            Ok(())
        }
        UserCommand::Disable { username } => set_user(config, store, &username, "user-disable", |s| {
            s.auth_user_set_disabled(&username, true)
        }),
        UserCommand::Enable { username } => set_user(config, store, &username, "user-enable", |s| {
            s.auth_user_set_disabled(&username, false)
        }),
        UserCommand::ResetMfa { username } => set_user(config, store, &username, "user-reset-mfa", |s| {
            s.auth_user_reset_mfa(&username)
        }),
        UserCommand::List => {
            let mut record = cli_record(Kind::Admin("user-list"), Action::Read);
            record.outcome_desc = Some("users listed".into());
            audit_now(config, store, &record)?;
            let users = store.auth_users().context("listing users")?;
            println!(
                "{:<24} {:<28} {:<9} {:<5} ROLES",
                "USERNAME", "FHIR USER", "STATUS", "MFA"
            );
            let now = fhirvault::store::now();
            for u in users {
                let status = if u.disabled {
                    "disabled"
                } else if u.locked_until.is_some_and(|t| t > now) {
                    "locked"
                } else {
                    "active"
                };
                println!(
                    "{:<24} {:<28} {:<9} {:<5} {}",
                    u.username,
                    u.fhir_user.as_deref().unwrap_or("-"),
                    status,
                    if u.totp_secret.is_some() { "yes" } else { "no" },
                    u.roles
                );
            }
            Ok(())
        }
    }
}

fn set_user(
    config: &Config,
    store: &Arc<Store>,
    username: &str,
    event: &'static str,
    change: impl FnOnce(&Store) -> Result<bool, fhirvault::store::StoreError>,
) -> anyhow::Result<()> {
    let mut record = cli_record(Kind::Admin(event), Action::Update);
    record.outcome_desc = Some(format!("user {username}"));
    audit_now(config, store, &record)?;
    anyhow::ensure!(change(store).context("updating the user")?, "no user named {username}");
    println!(
        "{}: {username} (sessions ended, refresh tokens revoked)",
        match event {
            "user-disable" => "disabled",
            "user-enable" => "enabled",
            _ => "second factor removed; enrolment at next sign-in",
        }
    );
    Ok(())
}

fn client(config: &Config, store: &Arc<Store>, command: ClientCommand) -> anyhow::Result<()> {
    match command {
        ClientCommand::Add {
            client_id,
            name,
            client_type,
            redirect_uri,
            scope,
            secret,
            jwks,
            jwks_uri,
        } => {
            anyhow::ensure!(
                client_id != fhirvault::auth::console::CONSOLE_CLIENT_ID,
                "the client id {} is the console's own; choose another",
                fhirvault::auth::console::CONSOLE_CLIENT_ID
            );
            anyhow::ensure!(
                !client_id.is_empty()
                    && client_id.len() <= 128
                    && client_id.chars().all(|c| c.is_ascii_graphic() && c != ':'),
                "the client id must be 1 to 128 printable ASCII characters without ':'"
            );
            anyhow::ensure!(
                matches!(client_type.as_str(), "public" | "confidential"),
                "--type must be public or confidential"
            );
            for uri in &redirect_uri {
                let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                    .iter()
                    .any(|p| uri.starts_with(p));
                anyhow::ensure!(
                    (uri.starts_with("https://") || loopback || (uri.contains(":/") && !uri.starts_with("http://")))
                        && !uri.contains('#')
                        && !uri.chars().any(char::is_whitespace),
                    "redirect URI {uri}: https (http only on loopback, or an app's own scheme), without a fragment"
                );
            }
            let confidential = client_type == "confidential";
            anyhow::ensure!(
                confidential || !(secret || jwks.is_some() || jwks_uri.is_some()),
                "public clients have no secret and no keys: use --type confidential"
            );
            anyhow::ensure!(
                !confidential || secret || jwks.is_some() || jwks_uri.is_some(),
                "a confidential client needs --secret, --jwks or --jwks-uri"
            );
            anyhow::ensure!(
                !(jwks.is_some() && jwks_uri.is_some()),
                "give --jwks or --jwks-uri, not both"
            );
            let jwks = match jwks {
                Some(path) => {
                    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                    let set: serde_json::Value =
                        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
                    let keys = set["keys"].as_array().filter(|k| !k.is_empty());
                    anyhow::ensure!(keys.is_some(), "{} is not a JWK Set with keys", path.display());
                    anyhow::ensure!(
                        text.find("\"d\"").is_none(),
                        "{} holds a private key: register only the public keys",
                        path.display()
                    );
                    Some(set.to_string())
                }
                None => None,
            };
            if let Some(uri) = &jwks_uri {
                let loopback = uri.starts_with("http://127.0.0.1") || uri.starts_with("http://localhost");
                anyhow::ensure!(
                    uri.starts_with("https://") || loopback,
                    "--jwks-uri must be https (http only on loopback)"
                );
            }
            let generated = secret.then(authz::new_secret);
            let secret_hash = match &generated {
                Some(s) => Some(authz::hash_password(s).map_err(oauth)?),
                None => None,
            };
            let row = ClientRow {
                client_id: client_id.clone(),
                name: name.unwrap_or_else(|| client_id.clone()),
                client_type,
                secret_hash,
                jwks,
                jwks_uri,
                redirect_uris: redirect_uri.join("\n"),
                scopes: scope.split_whitespace().collect::<Vec<_>>().join(" "),
                disabled: false,
                created_at: fhirvault::store::now(),
            };
            let mut record = cli_record(Kind::Admin("client-add"), Action::Create);
            record.outcome_desc = Some(format!("client {client_id}"));
            audit_now(config, store, &record)?;
            match store.auth_client_add(&row) {
                Ok(()) => {}
                Err(e) if e.is_unique_violation() => anyhow::bail!("a client {client_id} exists already"),
                Err(e) => return Err(e).context("adding the client"),
            }
            for (k, v) in authz::client_summary(&row) {
                println!("{k:<14} {v}");
            }
            if let Some(s) = generated {
                println!("client_secret  {s}   (shown once)");
            }
            Ok(())
        }
        ClientCommand::List => {
            let mut record = cli_record(Kind::Admin("client-list"), Action::Read);
            record.outcome_desc = Some("clients listed".into());
            audit_now(config, store, &record)?;
            let clients = store.auth_clients().context("listing clients")?;
            println!(
                "{:<24} {:<13} {:<9} {:<16} SCOPES",
                "CLIENT ID", "TYPE", "STATUS", "AUTH"
            );
            for c in &clients {
                let s = authz::client_summary(c);
                println!(
                    "{:<24} {:<13} {:<9} {:<16} {}",
                    s["client_id"], s["type"], s["status"], s["auth"], s["scopes"]
                );
            }
            Ok(())
        }
        ClientCommand::Disable { client_id } => {
            let mut record = cli_record(Kind::Admin("client-disable"), Action::Update);
            record.outcome_desc = Some(format!("client {client_id}"));
            audit_now(config, store, &record)?;
            anyhow::ensure!(
                store.auth_client_disable(&client_id).context("disabling the client")?,
                "no client {client_id}"
            );
            println!("disabled: {client_id} (codes and refresh tokens revoked)");
            Ok(())
        }
    }
}

/// The first run of `serve` on an empty data directory with the built-in authorization server:
/// an `admin` user with a password generated now, printed once on standard output (never in the
/// log), and what to do next.
pub fn bootstrap(config: &Config, store: &Arc<Store>, auditor: &fhirvault::audit::Auditor) -> anyhow::Result<()> {
    if !config.auth_server || store.auth_user_count().context("counting users")? > 0 {
        return Ok(());
    }
    let password = zeroize::Zeroizing::new(authz::generate_password());
    let mut record = cli_record(Kind::Admin("bootstrap"), Action::Create);
    record.outcome_desc = Some("first-run administrator created".into());
    auditor
        .record_blocking(&record)
        .context("recording the bootstrap in the audit log")?;
    if let Err(e) = add_user(store, "admin", &password, None, &["admin".to_string()], false) {
        // several nodes starting at once on one database: another one created it first
        if store.auth_user_count().context("counting users")? > 0 {
            let mut record = cli_record(Kind::Admin("bootstrap"), Action::Create);
            record.outcome = fhirvault::audit::Outcome::MinorFailure;
            record.outcome_desc = Some("another node created the first-run administrator".into());
            auditor
                .record_blocking(&record)
                .context("recording the bootstrap in the audit log")?;
            tracing::info!("another node created the first-run administrator");
            return Ok(());
        }
        return Err(e);
    }
    println!(
        "\nfhirvault first run: no users yet, so one was created.\n\
         \n  username  admin\n  password  {}   (shown once: store it now)\n\
         \nAt first sign-in it sets up a TOTP second factor. Next steps:\n\
         \n  fhirvault admin user add alice --fhir-user Practitioner/123     # more users\
         \n  fhirvault admin client add my-app --redirect-uri http://localhost:3000/callback \\\
         \n      --scope \"launch/patient openid fhirUser offline_access patient/*.rs\"   # a SMART app\
         \n  fhirvault token --scope 'system/*.cruds'                         # a token for curl\n",
        password.as_str()
    );
    Ok(())
}
