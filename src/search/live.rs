//! The search parameters as they stand now: R4 and the implementation guides of `profile_dir`
//! (fixed at start-up) plus the active SearchParameter resources stored through the API, which
//! an administrator on any node may add, change or retire at any time. Every node rebuilds its
//! registry from the stored definitions right after a write of one and every few seconds (what
//! another node wrote); searches and writes take the registry current when they start.

use super::registry::{Registry, RegistryError};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex, RwLock};

pub struct LiveRegistry {
    phi: Vec<String>,
    guides: Arc<Vec<Value>>,
    current: RwLock<Arc<Registry>>,
    /// A digest of the stored definitions the current registry was built from.
    built_from: Mutex<Vec<u8>>,
}

impl std::fmt::Debug for LiveRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveRegistry").finish_non_exhaustive()
    }
}

impl LiveRegistry {
    /// Starts from `base` (R4 and the guides, built from `phi`), before any stored definition
    /// is read.
    pub fn new(base: Arc<Registry>, phi: Vec<String>) -> LiveRegistry {
        LiveRegistry {
            phi,
            guides: base.guides().clone(),
            current: RwLock::new(base),
            built_from: Mutex::new(Sha256::digest(b"").to_vec()),
        }
    }

    /// The registry as it stands now.
    pub fn current(&self) -> Arc<Registry> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Rebuilds the registry from `stored` (the active SearchParameter resources of the
    /// database, as JSON) when they differ from those it was last built from. Returns whether
    /// the registry changed.
    pub fn update(&self, stored: &[Vec<u8>]) -> Result<bool, RegistryError> {
        let mut sorted: Vec<&Vec<u8>> = stored.iter().collect();
        sorted.sort();
        let mut h = Sha256::new();
        for s in &sorted {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s);
        }
        let digest = h.finalize().to_vec();
        let mut built_from = self.built_from.lock().unwrap_or_else(|p| p.into_inner());
        if *built_from == digest {
            return Ok(false);
        }
        let values: Vec<Value> = sorted.iter().filter_map(|s| serde_json::from_slice(s).ok()).collect();
        let registry = Registry::r4_with_stored(&self.phi, &self.guides, &values)?;
        for skipped in registry.skipped() {
            tracing::warn!(definition = %skipped, "a search parameter is not supported; left out");
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(registry);
        *built_from = digest;
        Ok(true)
    }
}
