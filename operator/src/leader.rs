//! Leader election over a `coordination.k8s.io/v1` Lease, so the Deployment can run two
//! replicas: only the holder reconciles, the other waits to take over.
//!
//! Optimistic concurrency does the locking: every write carries the resourceVersion we
//! read, so two candidates can never both win the same round. A follower judges another
//! holder's lease expired by its own clock, from when it saw the lease record last change,
//! never from the holder's `renewTime`: node clocks that disagree cannot make a follower
//! take a lease its holder still renews (client-go does the same).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: LeaseTimings,
    observed: Mutex<Option<Observed>>,
}

/// What identifies one renewal of another holder's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renewed: Option<Timestamp>,
    duration_seconds: Option<i32>,
}

/// Another holder's record as last seen, and since when (on our clock) it is unchanged.
#[derive(Debug, Clone)]
struct Observed {
    record: Record,
    since: Instant,
    expires_after: Duration,
}

/// How long a lease lasts and how often candidates try for it and the holder renews it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// A lease not renewed for this long may be taken by another replica.
    pub duration: Duration,
    /// Pause between two rounds: a follower's attempts, the leader's renewals.
    pub retry: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseTimingsError {
    #[error("--lease-duration-seconds must be at least 1 (got {0})")]
    Duration(u64),
    #[error(
        "--lease-retry-seconds ({retry}) must be at least 1 and below two thirds of \
         --lease-duration-seconds ({duration}): the leader renews every retry period and gives \
         up leading when it could not renew for two thirds of the lease; raise the duration or \
         lower the retry period"
    )]
    Retry { retry: u64, duration: u64 },
}

impl LeaseTimings {
    /// Checked: the leader must get more than one renewal in before it gives up.
    pub fn new(duration_seconds: u64, retry_seconds: u64) -> Result<Self, LeaseTimingsError> {
        if duration_seconds == 0 {
            return Err(LeaseTimingsError::Duration(duration_seconds));
        }
        if retry_seconds == 0 || retry_seconds * 3 >= duration_seconds * 2 {
            return Err(LeaseTimingsError::Retry {
                retry: retry_seconds,
                duration: duration_seconds,
            });
        }
        Ok(LeaseTimings {
            duration: Duration::from_secs(duration_seconds),
            retry: Duration::from_secs(retry_seconds),
        })
    }

    /// Past this without a renewal the leader stops (client-go's renew deadline): the lease
    /// may expire soon after, and then another replica leads.
    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timings: LeaseTimings,
    ) -> Self {
        LeaderElector {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timings,
            observed: Mutex::new(None),
        }
    }

    /// When the record was first seen as it is now: the start of its term on our clock.
    fn observe(&self, record: Record, expires_after: Duration) -> Instant {
        let mut observed = self
            .observed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match observed.as_ref() {
            Some(o) if o.record == record => o.since,
            _ => {
                let since = Instant::now();
                *observed = Some(Observed {
                    record,
                    since,
                    expires_after,
                });
                since
            }
        }
    }

    /// A follower's pause before its next round: the retry period, or less when the lease
    /// it watches expires sooner, so a takeover comes within lease duration + retry period.
    fn next_round(&self) -> Duration {
        let observed = self
            .observed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let until_expiry = observed.as_ref().map(|o| {
            (o.since + o.expires_after).saturating_duration_since(Instant::now())
                + Duration::from_millis(50)
        });
        until_expiry.map_or(self.timings.retry, |d| d.min(self.timings.retry))
    }

    /// One round: takes a free or expired lease, renews our own. `Ok(true)` while we lead.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let seconds = i32::try_from(self.timings.duration.as_secs()).unwrap_or(i32::MAX);
        let current = self.api.get_opt(&self.name).await?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !ours {
            let held = spec
                .holder_identity
                .as_deref()
                .is_some_and(|h| !h.is_empty());
            let expires_after = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(seconds)).unwrap_or(0),
            );
            let since = self.observe(
                Record {
                    holder: spec.holder_identity.clone(),
                    renewed: spec.renew_time.as_ref().map(|t| t.0),
                    duration_seconds: spec.lease_duration_seconds,
                },
                expires_after,
            );
            // A released lease (no holder) is free at once.
            if held && since.elapsed() <= expires_after {
                return Ok(false);
            }
        }
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Someone else wrote first: they lead this round.
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up on a clean shutdown, so the other replica takes over at once
    /// instead of waiting for it to expire. `Ok(false)` when it was not ours (any more).
    pub async fn release(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this process holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => tracing::debug!(lease = %self.name, "another operator leads; waiting"),
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "leader election failed; retrying")
                }
            }
            tokio::time::sleep(self.next_round()).await;
        }
    }

    /// Renews the lease until it is lost (or cannot be renewed within two thirds of its
    /// duration), then returns: the caller must stop reconciling at once.
    pub async fn hold(&self) {
        let deadline = self.timings.renew_deadline();
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.timings.retry).await;
            // A renewal hanging on a slow API server must not outlive the deadline either.
            let left = deadline.saturating_sub(last_renewal.elapsed());
            let round = tokio::time::timeout(left, self.try_acquire_or_renew()).await;
            match round {
                Ok(Ok(true)) => last_renewal = tokio::time::Instant::now(),
                Ok(Ok(false)) => {
                    tracing::warn!(lease = %self.name, "leadership lost");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.name, error = %e, "cannot renew the lease")
                }
                Err(_) => tracing::warn!(lease = %self.name, "lease renewal timed out"),
            }
            // Give up well before the lease can expire (client-go's renew deadline): once
            // it has, another replica may lead, and two must never reconcile.
            if last_renewal.elapsed() >= deadline {
                tracing::warn!(lease = %self.name, "lease not renewed within {deadline:?}; stepping down");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{self, Step, step};
    use serde_json::{Value, json};

    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/rtable-system/leases";

    fn lease_path() -> String {
        format!("{LEASES}/rtable-operator")
    }

    fn lease(holder: Option<&str>, renewed: &str, transitions: i32) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "rtable-operator", "namespace": "rtable-system", "resourceVersion": "41"},
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": 15,
                "acquireTime": "2000-01-01T00:00:00.000000Z",
                "renewTime": renewed,
                "leaseTransitions": transitions
            }
        })
    }

    fn get(answer: Value) -> Step {
        step("GET", &lease_path()).respond(move |_| (200, answer.clone()))
    }

    fn now() -> String {
        Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string()
    }

    const TIMINGS: LeaseTimings = LeaseTimings {
        duration: Duration::from_secs(15),
        retry: Duration::from_secs(5),
    };

    #[test]
    fn lease_timings_leave_the_leader_time_to_renew() {
        assert_eq!(
            LeaseTimings::new(15, 5),
            Ok(TIMINGS),
            "the defaults: renewed every 5 s, deadline 10 s"
        );
        assert!(LeaseTimings::new(6, 2).is_ok());
        assert_eq!(LeaseTimings::new(0, 1), Err(LeaseTimingsError::Duration(0)));
        for (duration, retry) in [(6, 4), (6, 0), (15, 10), (3, 5)] {
            let err = LeaseTimings::new(duration, retry).expect_err("refused");
            assert_eq!(err, LeaseTimingsError::Retry { retry, duration });
            assert!(err.to_string().contains("--lease-retry-seconds"), "{err}");
        }
    }

    const LONG_AGO: &str = "2000-01-01T00:00:00.000000Z";

    async fn round(steps: Vec<Step>) -> Result<bool, kube::Error> {
        let (client, verifier) = mock::server(steps);
        let elector =
            LeaderElector::new(client, "rtable-system", "rtable-operator", "op-a", TIMINGS);
        let result = elector.try_acquire_or_renew().await;
        drop(elector);
        mock::finish(verifier).await;
        result
    }

    impl LeaderElector {
        /// As if the record we watch had been unchanged for `by` longer.
        fn age_observation(&self, by: Duration) {
            let mut observed = self.observed.lock().expect("lock");
            let o = observed.as_mut().expect("a record was observed");
            o.since = o.since.checked_sub(by).expect("instant in range");
        }
    }

    /// Two rounds against the same record of op-b's: the first only observes it (its
    /// renewTime, long ago by our clock, says nothing); the second, a lease duration later
    /// on our clock, finds it expired. The result of the second round.
    async fn rounds_a_lease_duration_apart(steps: Vec<Step>) -> Result<bool, kube::Error> {
        let (client, verifier) = mock::server(steps);
        let elector =
            LeaderElector::new(client, "rtable-system", "rtable-operator", "op-a", TIMINGS);
        let first = elector.try_acquire_or_renew().await.expect("first round");
        assert!(!first, "a record seen for the first time is not expired");
        assert!(elector.next_round() <= TIMINGS.retry);
        elector.age_observation(TIMINGS.duration - Duration::from_secs(1));
        assert!(
            elector.next_round() <= Duration::from_millis(1050),
            "the next round comes when the lease expires, not a whole retry period later"
        );
        elector.age_observation(Duration::from_secs(2));
        let result = elector.try_acquire_or_renew().await;
        drop(elector);
        mock::finish(verifier).await;
        result
    }

    #[tokio::test]
    async fn a_missing_lease_is_created_and_held() {
        let won = round(vec![
            step("GET", &lease_path()).not_found(),
            step("POST", LEASES).check(|b| {
                assert_eq!(b["metadata"]["name"], "rtable-operator");
                assert_eq!(b["spec"]["holderIdentity"], "op-a");
                assert_eq!(b["spec"]["leaseDurationSeconds"], 15);
                assert_eq!(b["spec"]["leaseTransitions"], 0);
                assert!(b["spec"]["renewTime"].is_string(), "{b}");
            }),
        ])
        .await
        .expect("round");
        assert!(won);
    }

    #[tokio::test]
    async fn a_lease_created_by_someone_else_first_is_lost() {
        let won = round(vec![
            step("GET", &lease_path()).not_found(),
            step("POST", LEASES).respond(|_| {
                (
                    409,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "exists"}),
                )
            }),
        ])
        .await
        .expect("round");
        assert!(!won);
    }

    #[tokio::test]
    async fn a_fresh_lease_of_another_operator_is_left_alone() {
        // No write at all: the mock fails on any request beyond the GET.
        let won = round(vec![get(lease(Some("op-b"), &now(), 3))])
            .await
            .expect("round");
        assert!(!won);
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_with_the_read_resource_version() {
        let won = rounds_a_lease_duration_apart(vec![
            get(lease(Some("op-b"), LONG_AGO, 3)),
            get(lease(Some("op-b"), LONG_AGO, 3)),
            step("PUT", &lease_path()).check(|b| {
                assert_eq!(b["metadata"]["resourceVersion"], "41", "optimistic lock");
                assert_eq!(b["spec"]["holderIdentity"], "op-a");
                assert_eq!(b["spec"]["leaseTransitions"], 4);
                assert_ne!(b["spec"]["acquireTime"], LONG_AGO);
                assert_ne!(b["spec"]["renewTime"], LONG_AGO);
            }),
        ])
        .await
        .expect("round");
        assert!(won);
    }

    #[tokio::test]
    async fn our_own_lease_is_renewed_without_a_transition() {
        let won = round(vec![
            get(lease(Some("op-a"), LONG_AGO, 2)),
            step("PUT", &lease_path()).check(|b| {
                assert_eq!(b["spec"]["holderIdentity"], "op-a");
                assert_eq!(b["spec"]["leaseTransitions"], 2);
                assert_eq!(b["spec"]["acquireTime"], LONG_AGO, "still the same term");
                assert_ne!(b["spec"]["renewTime"], LONG_AGO);
            }),
        ])
        .await
        .expect("round");
        assert!(won);
    }

    #[tokio::test]
    async fn losing_the_write_race_means_not_leading() {
        let won = rounds_a_lease_duration_apart(vec![
            get(lease(Some("op-b"), LONG_AGO, 3)),
            get(lease(Some("op-b"), LONG_AGO, 3)),
            step("PUT", &lease_path()).conflict(),
        ])
        .await
        .expect("round");
        assert!(!won);
    }

    #[tokio::test]
    async fn a_renewal_restarts_the_term_on_our_clock() {
        let (client, verifier) = mock::server(vec![
            get(lease(Some("op-b"), LONG_AGO, 3)),
            get(lease(Some("op-b"), &now(), 3)),
        ]);
        let elector =
            LeaderElector::new(client, "rtable-system", "rtable-operator", "op-a", TIMINGS);
        assert!(!elector.try_acquire_or_renew().await.expect("first"));
        elector.age_observation(TIMINGS.duration + Duration::from_secs(1));
        // op-b renewed meanwhile: a new record, so a new term, and no write.
        assert!(!elector.try_acquire_or_renew().await.expect("second"));
        drop(elector);
        mock::finish(verifier).await;
    }

    #[tokio::test]
    async fn a_released_lease_is_taken_at_once() {
        let won = round(vec![
            get(lease(None, LONG_AGO, 3)),
            step("PUT", &lease_path()).check(|b| {
                assert_eq!(b["spec"]["holderIdentity"], "op-a");
                assert_eq!(b["spec"]["leaseTransitions"], 4);
            }),
        ])
        .await
        .expect("round");
        assert!(won);
    }

    #[tokio::test]
    async fn release_clears_the_holder_only_when_it_is_ours() {
        let (client, verifier) = mock::server(vec![
            get(lease(Some("op-a"), &now(), 2)),
            step("PUT", &lease_path()).check(|b| {
                assert!(b["spec"].get("holderIdentity").is_none(), "{b}");
                assert!(b["spec"].get("renewTime").is_none(), "{b}");
                assert_eq!(b["metadata"]["resourceVersion"], "41");
            }),
            get(lease(Some("op-b"), &now(), 3)),
        ]);
        let elector =
            LeaderElector::new(client, "rtable-system", "rtable-operator", "op-a", TIMINGS);
        assert!(elector.release().await.expect("released"));
        assert!(!elector.release().await.expect("not ours"));
        drop(elector);
        mock::finish(verifier).await;
    }
}
