//! Leader election through a `coordination.k8s.io/v1` Lease, so two operator replicas never
//! reconcile at once (client-go's scheme). The holder renews every `duration / 3` and stops
//! leading when no renewal has gone through for `2/3 duration` (each attempt is cut off at
//! that deadline, so a hung request cannot keep it leading). Others take over once they have
//! seen the lease unchanged for `duration` by their own clock: never by comparing the
//! holder's `renewTime` with theirs, which clock skew would make early. A third of the
//! duration separates the old leader's last moment from the new one's first. A leader that
//! stops cleanly releases the lease (clears its holder), so the next takes over at its next
//! try rather than a whole duration later.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The lease's holder and renewal as last read, and when they last changed (our clock).
    seen: Mutex<Option<(Record, Instant)>>,
}

/// What a renewal changes: the holder and its renew time.
type Record = (Option<String>, Option<MicroTime>);

impl LeaseLock {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            seen: Mutex::new(None),
        }
    }

    /// How long the lease has been seen as it is now (zero when it just changed).
    fn unchanged_for(&self, record: Record) -> Duration {
        let Ok(mut seen) = self.seen.lock() else {
            return Duration::ZERO;
        };
        match seen.as_ref() {
            Some((r, at)) if *r == record => at.elapsed(),
            _ => {
                *seen = Some((record, Instant::now()));
                Duration::ZERO
            }
        }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Tries once to take or renew the lease; true if we hold it afterwards.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let current = match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(0, None)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            }
            Some(l) => l,
        };
        let spec = current.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(&self.identity);
        let held_for = spec
            .lease_duration_seconds
            .map_or(self.duration, |s| Duration::from_secs(s.max(0) as u64));
        let unchanged = self.unchanged_for((spec.holder_identity.clone(), spec.renew_time.clone()));
        // client-go releases by writing an empty holder; we write none.
        let released = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        let expired = released || unchanged > held_for;
        if !ours && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours { spec.acquire_time.clone() } else { None };
        let mut next = current;
        next.spec = Some(self.spec(transitions, acquired));
        // `replace` carries resourceVersion: a concurrent writer makes this fail with 409.
        match self.api.replace(&self.name, &PostParams::default(), &next).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up if this replica still holds it, so the next leader need not wait for
    /// it to expire. Call only once nothing of ours writes to the cluster any more.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        // `replace` carries resourceVersion: if another replica wrote it meanwhile, it is theirs.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Blocks until this replica holds the lease; returns when the winning request was sent
    /// (the renew time it wrote is no later).
    pub async fn acquire(&self) -> Instant {
        loop {
            let sent = Instant::now();
            match tokio::time::timeout(self.duration / 3, self.try_acquire()).await {
                Ok(Ok(true)) => return sent,
                Ok(Ok(false)) => tracing::info!(lease = %self.name, "another replica leads; waiting"),
                Ok(Err(e)) => tracing::warn!(lease = %self.name, "lease: {e}"),
                Err(_) => tracing::warn!(lease = %self.name, "lease: no answer in time"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renews the lease acquired at `since` until no renewal has gone through for the renew
    /// deadline (`2/3` of the duration); then returns: leadership is lost.
    pub async fn hold(&self, since: Instant) {
        let deadline = self.duration * 2 / 3;
        let mut last_ok = since;
        loop {
            tokio::time::sleep(self.duration / 3).await;
            let sent = Instant::now();
            let left = deadline.saturating_sub(last_ok.elapsed());
            match tokio::time::timeout(left, self.try_acquire()).await {
                Ok(Ok(true)) => last_ok = sent,
                Ok(Ok(false)) => return,
                Ok(Err(e)) => tracing::warn!(lease = %self.name, "renewing lease: {e}"),
                Err(_) => tracing::warn!(lease = %self.name, "renewing lease: no answer before the deadline"),
            }
            if last_ok.elapsed() >= deadline {
                return;
            }
        }
    }
}
