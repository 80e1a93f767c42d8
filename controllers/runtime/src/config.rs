//! Settings of the shared wiring: the sync loop and the leader Lease.
use std::time::Duration;

/// Lease-based leader election settings (client-go's defaults are 15s/10s/2s).
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// The coalescing sync job's timing.
#[derive(Clone, Copy, Debug)]
pub struct SyncSettings {
    /// At most one sync per this interval, however many events arrive.
    pub min_interval: Duration,
    /// A full sync at least this often, even with no events.
    pub resync_interval: Duration,
    /// First retry delay after a failed sync; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            min_interval: Duration::from_millis(100),
            resync_interval: Duration::from_secs(300),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            name: "palisade-allocator".into(),
            namespace: "palisade-system".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}
