//! Start-up: the one place that turns a [`Config`] into a running service, shared by the
//! binary and the tests so that both exercise the same wiring.

use crate::api::AppState;
use crate::config::Config;
use crate::crypto::{Cipher, KeyFile, Wrapping};
use crate::fhir::Validator;
use crate::store::Store;
use anyhow::Context;
use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::sync::{Arc, OnceLock};

/// The compiled R4 schema, shared by every state built in this process (tests build many).
pub fn shared_validator() -> anyhow::Result<Arc<Validator>> {
    static V: OnceLock<Arc<Validator>> = OnceLock::new();
    if let Some(v) = V.get() {
        return Ok(v.clone());
    }
    let v = Arc::new(Validator::r4().context("compiling the R4 JSON Schema")?);
    Ok(V.get_or_init(|| v).clone())
}

/// The search-parameter registry (R4, plus the SearchParameter resources of the implementation
/// guides under `profile_dir`), compiled once per process and configuration (tests build many
/// states).
pub fn shared_registry(config: &Config) -> anyhow::Result<Arc<crate::search::Registry>> {
    type Key = (Vec<String>, Option<std::path::PathBuf>);
    static R: OnceLock<std::sync::Mutex<HashMap<Key, Arc<crate::search::Registry>>>> = OnceLock::new();
    let map = R.get_or_init(Default::default);
    let key: Key = (config.search_phi_parameters.clone(), config.profile_dir.clone());
    if let Some(r) = map.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(r.clone());
    }
    let extra = match &config.profile_dir {
        Some(dir) => crate::search::registry::search_parameters_in(dir)
            .with_context(|| format!("reading the search parameters under {}", dir.display()))?,
        None => Vec::new(),
    };
    let r = crate::search::Registry::r4_with(&key.0, &extra).context("loading the R4 search parameters")?;
    for skipped in r.skipped() {
        tracing::warn!(definition = %skipped, "an implementation guide's search parameter is not supported; left out");
    }
    let r = Arc::new(r);
    Ok(map
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_insert(r)
        .clone())
}

/// The registry that follows the SearchParameter resources stored through the API, starting
/// from `base` (R4 and the guides of `profile_dir`).
pub fn live_registry(
    config: &Config,
    base: Arc<crate::search::Registry>,
) -> anyhow::Result<crate::search::live::LiveRegistry> {
    Ok(crate::search::live::LiveRegistry::new(
        base,
        config.search_phi_parameters.clone(),
    ))
}

/// The active SearchParameter resources stored through the API, as stored (JSON).
pub fn stored_search_parameters(store: &Store, registry: &crate::search::Registry) -> anyhow::Result<Vec<Vec<u8>>> {
    let pairs = vec![("status".to_string(), "active".to_string())];
    let parsed = crate::search::query::parse(registry, store.cipher(), "SearchParameter", &pairs, 500, true)
        .map_err(|e| anyhow::anyhow!("the search for SearchParameters: {e:?}"))?;
    let mut q = parsed.query;
    q.total = false;
    let mut out = Vec::new();
    loop {
        let page = store.search_contents(&crate::store::Access::All, &q)?;
        let full = page.len() == q.count as usize;
        if let Some((id, _)) = page.last() {
            q.after = Some(("SearchParameter".into(), id.clone()));
        }
        out.extend(page.into_iter().map(|(_, json)| json));
        if !full {
            return Ok(out);
        }
    }
}

/// Rebuilds `registry` from the SearchParameters stored now (after a write of one, and every
/// few seconds for those other nodes write). Failures are logged: the registry stays as it was.
pub fn refresh_search_parameters(store: &Store, registry: &crate::search::live::LiveRegistry) {
    let result = stored_search_parameters(store, &registry.current())
        .and_then(|stored| registry.update(&stored).map_err(anyhow::Error::from));
    match result {
        Ok(true) => tracing::info!(
            stored = registry.current().stored_codes().len(),
            "search parameters stored through the API changed: registry rebuilt"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "reading the stored SearchParameters failed"),
    }
}

/// How often each node looks for SearchParameters other nodes stored.
const SEARCH_PARAMETER_RELOAD: std::time::Duration = std::time::Duration::from_secs(5);

fn start_search_parameter_reloader(registry: &Arc<crate::search::live::LiveRegistry>, store: &Arc<Store>) {
    let (registry, store) = (Arc::downgrade(registry), Arc::downgrade(store));
    let spawned = std::thread::Builder::new()
        .name("search-parameters".into())
        .spawn(move || loop {
            std::thread::sleep(SEARCH_PARAMETER_RELOAD);
            let (Some(registry), Some(store)) = (registry.upgrade(), store.upgrade()) else {
                return;
            };
            refresh_search_parameters(&store, &registry);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "the search parameter reloader could not start");
    }
}

/// Refuses a search index built under other settings than `registry`'s (another list of
/// identifying parameters, another version's row format): its rows would disagree with the
/// queries. An empty database is simply marked as built under them.
pub fn check_search_index(store: &Store, registry: &crate::search::Registry) -> anyhow::Result<()> {
    let stored = store
        .search_fingerprint()
        .context("reading the search index settings")?;
    if stored.as_deref() == Some(registry.fingerprint()) {
        return Ok(());
    }
    if store.has_resources().context("reading the database")? {
        anyhow::bail!(
            "the search index was built under other search settings (search_phi_parameters, or an earlier \
             fhirvault version): run `fhirvault reindex` with this configuration first"
        );
    }
    store
        .set_search_fingerprint(registry.fingerprint())
        .context("recording the search index settings")
}

/// Creates the data directory (mode 0700) if needed.
pub fn ensure_data_dir(config: &Config) -> anyhow::Result<()> {
    if !config.data_dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    }
    Ok(())
}

/// Opens the key file through the configured key provider (with AWS KMS, every key version is
/// unwrapped by KMS here: without KMS, fhirvault does not start).
pub fn open_keys(config: &Config) -> anyhow::Result<KeyFile> {
    ensure_data_dir(config)?;
    let wrapping = match &config.key_provider {
        crate::config::KeyProviderConfig::Local => Wrapping::Local,
        crate::config::KeyProviderConfig::AwsKms {
            key_id,
            region,
            endpoint,
        } => Wrapping::Kms(
            crate::crypto::kms::KmsClient::from_env(endpoint.as_deref(), region, key_id)
                .context("configuring AWS KMS")?,
        ),
    };
    KeyFile::open_with(&config.key_file, wrapping).context("opening the key file")
}

/// Opens the key provider and derives the cipher.
pub fn open_cipher(config: &Config) -> anyhow::Result<Arc<Cipher>> {
    let provider = open_keys(config)?;
    Ok(Arc::new(Cipher::from_provider(&provider).context("deriving keys")?))
}

/// Opens the store (applying migrations).
pub fn open_store(config: &Config, cipher: Arc<Cipher>) -> anyhow::Result<Arc<Store>> {
    ensure_data_dir(config)?;
    let store = Store::open(
        &config.database_url,
        config.migration_database_url.as_deref(),
        config.pool_size,
        cipher,
    )
    .context("opening the database")?;
    let store = store.with_shared_types(&shared_types(config)?);
    let store = match &config.replica_database_url {
        Some(url) => store
            .with_replica(
                url,
                config.pool_size,
                std::time::Duration::from_millis(config.replica_max_wait_ms),
            )
            .context("configuration setting `replica_database_url`")?,
        None => store,
    };
    Ok(Arc::new(store))
}

/// The types patients share: `shared_resource_types`, or its default from the R4 definitions
/// (checked by `PatientCompartment::with_shared` when the server state is built).
pub fn shared_types(config: &Config) -> anyhow::Result<Vec<String>> {
    Ok(match &config.shared_resource_types {
        Some(list) => list.clone(),
        None => crate::fhir::compartment::PatientCompartment::r4_shared_default()?,
    })
}

/// Opens the built-in token issuer (creating its signing key on first use).
pub fn open_issuer(config: &Config) -> anyhow::Result<crate::auth::Issuer> {
    ensure_data_dir(config)?;
    crate::auth::Issuer::open_or_create(
        &config.signing_key_file,
        &config.token_issuer,
        &config.token_audience,
        config.max_token_lifetime_secs,
        config.break_glass_secs,
    )
    .context("opening the token signing key")
}

/// Everything `serve` needs, built from the configuration.
pub fn build_state(config: Config) -> anyhow::Result<AppState> {
    build_state_as(config, true)
}

/// The state a command that drives the API in-process (`fhirvault import`) runs on: the same
/// store, validation, policies and audit as `serve`, appending to the command line's own audit
/// chain; it may run beside a server on the same database (SQLite too), and starts no export
/// runners, reloaders or authorization server.
pub fn build_command_state(config: Config) -> anyhow::Result<AppState> {
    build_state_as(config, false)
}

fn build_state_as(config: Config, serving: bool) -> anyhow::Result<AppState> {
    let config = Arc::new(config);
    let cipher = open_cipher(&config)?;
    let validator = shared_validator()?;
    let store = open_store(&config, cipher)?;
    let issuer = Arc::new(open_issuer(&config)?);
    let compartment = Arc::new(
        crate::fhir::compartment::PatientCompartment::r4()?
            .with_shared(&shared_types(&config)?)
            .map_err(|e| anyhow::anyhow!("configuration setting `shared_resource_types`: {e}"))?,
    );
    let attributes = Arc::new(match &config.policy_file {
        Some(path) => crate::auth::attributes::AttributePolicy::load(path, |t| validator.is_resource_type(t))
            .map_err(|e| anyhow::anyhow!("configuration setting `policy_file`: {e}"))?,
        None => Default::default(),
    });
    let providers = crate::auth::oidc::Providers::discover_all(&config.oidc_providers)
        .context("configuration setting `oidc_provider`")?;
    // SQLite serves one node: a second process serving the same database is refused
    let single_node = if serving {
        store
            .claim_single_node()
            .context("the SQLite database is in use by another server")?
    } else {
        None
    };
    let node = if serving {
        config.node_name.clone()
    } else {
        cli_node_name(&config)
    };
    let auditor = Arc::new(open_auditor(&config, &store, &node)?);
    let registry = shared_registry(&config)?;
    check_search_index(&store, &registry)?;
    let registry = Arc::new(live_registry(&config, registry)?);
    // the SearchParameters stored through the API, now and as any node changes them
    refresh_search_parameters(&store, &registry);
    if serving {
        start_search_parameter_reloader(&registry, &store);
    }
    let structures = shared_structures(&config)?;
    let state = AppState::new(
        config,
        store,
        validator,
        issuer,
        compartment,
        attributes,
        providers,
        auditor,
        registry,
        structures,
    );
    let mut state = state;
    state.single_node = single_node.map(Arc::new);
    // the subscriptions stored now: writes from here on are matched against them
    state.refresh_subscriptions();
    if !serving {
        return Ok(state);
    }
    if state.config.auth_server {
        if state.config.public_url.is_none() && !state.config.listen.ip().is_loopback() {
            // the token endpoint's own URL (the `aud` of client assertions) would come from each
            // request's Host header: an assertion made for another server could be replayed here
            tracing::warn!(
                "public_url is not set: the authorization server derives its URLs from the Host header; \
                 set public_url in production"
            );
        }
        let server = Arc::new(open_auth_server(&state.config, &state.store, &state.issuer)?);
        start_revocation_reloader(&server, &state.store);
        state.auth_server = Some(server);
    }
    state.exporter.start_runners();
    let delivery = Arc::new(crate::subscription::deliver::Delivery {
        store: state.store.clone(),
        search: state.search.clone(),
        compartment: state.compartment.clone(),
        attributes: state.attributes.clone(),
        auditor: state.auditor.clone(),
        config: state.config.clone(),
        validator: state.validator.clone(),
        subscriptions: state.subscriptions.clone(),
        revoked: state.auth_server.as_ref().map(|s| s.revoked.clone()),
        node: format!("{}#{}", state.config.node_name, state.auditor.chain_id()),
        roots: crate::subscription::deliver::Delivery::load_roots(&state.config)?,
        fingerprint: Default::default(),
        serving: Default::default(),
    });
    delivery.start();
    state.delivery = Some(delivery);
    Ok(state)
}

/// The built-in SMART authorization server, with the configured lifetimes and limits.
pub fn open_auth_server(
    config: &Config,
    store: &Arc<Store>,
    issuer: &Arc<crate::auth::Issuer>,
) -> anyhow::Result<crate::auth::server::AuthServer> {
    let settings = crate::auth::server::Settings {
        access_token_secs: config.max_token_lifetime_secs,
        session_idle_secs: config.session_idle_secs,
        refresh_idle_secs: config.refresh_idle_secs,
        refresh_absolute_secs: config.refresh_absolute_secs,
        login_max_failures: config.login_max_failures,
        login_lockout_secs: config.login_lockout_secs,
        mfa_required: config.auth_mfa_required,
    };
    crate::auth::server::AuthServer::new(store.clone(), issuer.clone(), settings)
        .map_err(|e| anyhow::anyhow!("starting the authorization server: {e}"))
}

/// How often each node reloads the access tokens revoked anywhere.
const REVOCATION_RELOAD: std::time::Duration = std::time::Duration::from_secs(5);

/// Loads the revoked access tokens now, then every few seconds on a thread of its own (the
/// thread ends with the server).
fn start_revocation_reloader(server: &Arc<crate::auth::server::AuthServer>, store: &Arc<Store>) {
    if let Err(e) = server.revoked.reload(store) {
        tracing::warn!(error = %e, "loading revoked tokens failed");
    }
    let (revoked, store) = (Arc::downgrade(&server.revoked), Arc::downgrade(store));
    let spawned = std::thread::Builder::new()
        .name("revocations".into())
        .spawn(move || loop {
            std::thread::sleep(REVOCATION_RELOAD);
            let (Some(revoked), Some(store)) = (revoked.upgrade(), store.upgrade()) else {
                return;
            };
            if let Err(e) = revoked.reload(&store) {
                tracing::warn!(error = %e, "reloading revoked tokens failed");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "the revocation reloader could not start");
    }
}

/// The R4 StructureDefinitions and the profiles of `profile_dir`; without profiles, compiled
/// once per process (tests build many states), as the schema and the registry are.
pub fn shared_structures(config: &Config) -> anyhow::Result<Arc<crate::fhir::structure::StructureValidator>> {
    use crate::fhir::structure::StructureValidator;
    static R4: OnceLock<Arc<StructureValidator>> = OnceLock::new();
    let Some(dir) = &config.profile_dir else {
        if let Some(v) = R4.get() {
            return Ok(v.clone());
        }
        let v = Arc::new(StructureValidator::r4().context("the R4 structure definitions")?);
        return Ok(R4.get_or_init(|| v).clone());
    };
    let mut v = StructureValidator::r4().context("the R4 structure definitions")?;
    let n = v
        .load_profiles(dir)
        .map_err(|e| anyhow::anyhow!("configuration setting `profile_dir`: {e}"))?;
    tracing::info!(profiles = n, "profiles loaded");
    Ok(Arc::new(v))
}

/// The audit ledger's identity in every event.
pub fn audit_source(config: &Config) -> crate::audit::Source {
    crate::audit::Source {
        site: config.audit_site.clone(),
        observer: format!("fhirvault {}", env!("CARGO_PKG_VERSION")),
    }
}

/// The checkpoint signing key and file of the audit ledger.
pub fn audit_checkpointing(
    config: &Config,
) -> anyhow::Result<(
    crate::audit::checkpoint::CheckpointKey,
    crate::audit::checkpoint::CheckpointFile,
)> {
    ensure_data_dir(config)?;
    let key = crate::audit::checkpoint::CheckpointKey::open_or_create(&config.audit_signing_key_file)
        .context("configuration setting `audit_signing_key_file`")?;
    Ok((
        key,
        crate::audit::checkpoint::CheckpointFile::new(config.audit_checkpoint_file.clone()),
    ))
}

/// The node name of commands run from the shell (they append to a chain of their own).
pub fn cli_node_name(config: &Config) -> String {
    format!("cli@{}", config.host_name())
}

/// Starts the audit writer on `node`'s chain (linking any events an interruption left unlinked).
pub fn open_auditor(config: &Config, store: &Arc<Store>, node: &str) -> anyhow::Result<crate::audit::Auditor> {
    let (key, file) = audit_checkpointing(config)?;
    crate::audit::Auditor::start(
        store.clone(),
        audit_source(config),
        key,
        file,
        crate::audit::CheckpointPolicy {
            every_events: config.audit_checkpoint_events,
            every: std::time::Duration::from_secs(config.audit_checkpoint_secs),
        },
        node,
    )
    .context("starting the audit ledger")
}
