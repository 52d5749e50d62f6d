//! Counts failed authentications and authorizations per client address and per client id, and
//! refuses a key (429) once it has failed more than the limit within a minute, until that minute
//! is over. In memory, per node: enough to stop token guessing and scope probing against one
//! server; a shared limit belongs in the gateway.

use std::collections::HashMap;
use std::net::IpAddr;

/// What failures are counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FailureKey {
    Address(IpAddr),
    Client(String),
}
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
const MAX_TRACKED: usize = 100_000;

#[derive(Debug)]
pub struct FailureLimiter {
    limit: u32,
    windows: Mutex<HashMap<FailureKey, (Instant, u32)>>,
}

impl FailureLimiter {
    pub fn new(limit: u32) -> FailureLimiter {
        FailureLimiter {
            limit,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(seconds to wait)` when the address is over its limit.
    pub fn blocked(&self, key: &FailureKey) -> Option<u64> {
        let map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let (start, count) = map.get(key)?;
        let elapsed = start.elapsed();
        (elapsed < WINDOW && *count > self.limit).then(|| (WINDOW - elapsed).as_secs().max(1))
    }

    /// Counts one request against `key`; `Some(seconds to wait)` once it is over the limit.
    pub fn hit(&self, key: FailureKey) -> Option<u64> {
        let n = self.record_failure(key.clone());
        (n > self.limit).then(|| self.blocked(&key).unwrap_or(1))
    }

    /// Records one failure; returns the failures of this address in the current window.
    pub fn record_failure(&self, key: FailureKey) -> u32 {
        let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED {
            map.retain(|_, (start, _)| start.elapsed() < WINDOW);
        }
        let entry = map.entry(key).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
        entry.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_per_address() {
        let l = FailureLimiter::new(3);
        let a = FailureKey::Address("10.0.0.1".parse().unwrap());
        let b = FailureKey::Address("10.0.0.2".parse().unwrap());
        let c = FailureKey::Client("app".into());
        for _ in 0..3 {
            l.record_failure(a.clone());
        }
        assert_eq!(l.blocked(&a), None);
        l.record_failure(a.clone());
        assert!(l.blocked(&a).is_some());
        assert_eq!(l.blocked(&b), None);
        assert_eq!(l.blocked(&c), None);
    }
}
