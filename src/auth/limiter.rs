//! Counts failed authentications per client address and refuses an address (429) once it has
//! failed more than the limit within a minute, until that minute is over. In memory, per node:
//! enough to stop token guessing against one server; a shared limit belongs in the gateway.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
const MAX_TRACKED: usize = 100_000;

#[derive(Debug)]
pub struct FailureLimiter {
    limit: u32,
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    pub fn new(limit: u32) -> FailureLimiter {
        FailureLimiter {
            limit,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(seconds to wait)` when the address is over its limit.
    pub fn blocked(&self, addr: IpAddr) -> Option<u64> {
        let map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let (start, count) = map.get(&addr)?;
        let elapsed = start.elapsed();
        (elapsed < WINDOW && *count > self.limit).then(|| (WINDOW - elapsed).as_secs().max(1))
    }

    /// Records one failure; returns the failures of this address in the current window.
    pub fn record_failure(&self, addr: IpAddr) -> u32 {
        let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED {
            map.retain(|_, (start, _)| start.elapsed() < WINDOW);
        }
        let entry = map.entry(addr).or_insert((Instant::now(), 0));
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
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            l.record_failure(a);
        }
        assert_eq!(l.blocked(a), None);
        l.record_failure(a);
        assert!(l.blocked(a).is_some());
        assert_eq!(l.blocked(b), None);
    }
}
