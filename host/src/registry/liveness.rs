//! Liveness of remote services: the policy (heartbeat interval, TTL,
//! health checks, eviction) and the task that applies it; and, on the
//! same schedule, the checks of plugins' health routes
//! ([`Checker::check_plugins`]).
//!
//! The seed guide's client heartbeats every 30 s, ignores failed heartbeats
//! and never registers again, so heartbeats alone cannot be trusted either
//! way: the task also GETs every instance's `health_check_url` on an
//! interval, and either signal keeps a service healthy. A service silent
//! on both for its TTL is answered 503 (computed by [`RemoteService`] at
//! the moment of each request, and logged once by whichever of a request,
//! a heartbeat or a round notices the change first). Only a much longer
//! silence evicts it.
//!
//! Checks are per instance, and a heartbeat that names no instance speaks
//! for every instance its caller registered, so the checks are what tell
//! a dead instance from its live siblings: `[health] unhealthy_threshold`
//! failures in a row mark an instance down (not routed while the protect
//! threshold allows), `healthy_threshold` passes in a row bring it back,
//! so one blip does not flap it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::egress::{EgressPolicy, LoopGuard, Resolver};
use crate::http::{X_REQUEST_ID, error_chain, new_request_id};
use crate::plugin::PluginRequest;
use crate::remote::{CheckOutcome, InstancePolicy, RemoteService, Thresholds};
use crate::table::{Backend, Service};

/// How remote services are kept track of.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// What registrations are told to heartbeat at.
    pub heartbeat_interval: Duration,
    /// Silence after which a service is unhealthy.
    pub ttl: Duration,
    /// How often every instance's health endpoint is checked.
    pub check_interval: Duration,
    /// Longest wait for one check.
    pub check_timeout: Duration,
    /// Silence after which a service is removed.
    pub evict_after: Duration,
}

/// Why a [`Policy`] is refused at start-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPolicy {
    /// A duration that must be positive is zero.
    #[error("--{0} must be longer than zero")]
    Zero(&'static str),
    /// Eviction would come before the service is even unhealthy.
    #[error("--evict-after ({evict_after:?}) must be longer than --heartbeat-ttl ({ttl:?})")]
    EvictBeforeUnhealthy {
        /// The eviction grace period.
        evict_after: Duration,
        /// The TTL.
        ttl: Duration,
    },
}

impl Policy {
    /// Checks that the durations make sense together.
    pub fn validate(&self) -> Result<(), InvalidPolicy> {
        for (option, duration) in [
            ("heartbeat-interval", self.heartbeat_interval),
            ("heartbeat-ttl", self.ttl),
            ("health-check-interval", self.check_interval),
            ("health-check-timeout", self.check_timeout),
        ] {
            if duration.is_zero() {
                return Err(InvalidPolicy::Zero(option));
            }
        }
        if self.evict_after <= self.ttl {
            return Err(InvalidPolicy::EvictBeforeUnhealthy {
                evict_after: self.evict_after,
                ttl: self.ttl,
            });
        }
        Ok(())
    }
}

/// Largest health check answer read (and then discarded): enough for any
/// status document, small enough not to matter.
const MAX_HEALTH_BODY: usize = 64 * 1024;

/// Health checks in flight at once. A round is spread over its interval,
/// so this only binds when checks are slow (instances that time out): it
/// keeps such a round from holding a socket per instance.
const MAX_CONCURRENT_CHECKS: usize = 256;

/// Runs health check rounds on the policy's interval. It only observes:
/// what to do with a service silent past the eviction grace period is the
/// registry's to decide.
#[derive(Debug, Clone)]
pub(super) struct Checker {
    client: Client<HttpConnector<Resolver>, Empty<Bytes>>,
    policy: Policy,
    loop_guard: LoopGuard,
}

impl Checker {
    /// Checks connect only to addresses `egress` admits, and carry
    /// `loop_guard`'s `Via` entry like every request the host sends.
    pub(super) fn new(policy: Policy, egress: Arc<EgressPolicy>, loop_guard: LoopGuard) -> Self {
        let mut connector = HttpConnector::new_with_resolver(Resolver::new(egress));
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(policy.check_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(policy.check_interval.saturating_mul(2))
            .build(connector);
        Self {
            client,
            policy,
            loop_guard,
        }
    }

    /// Ticks every `check_interval`, the first at once (services restored
    /// after a restart are checked first thing).
    pub(super) fn ticks(&self) -> tokio::time::Interval {
        let mut ticks = tokio::time::interval(self.policy.check_interval);
        // A slow round delays the next one rather than starting a burst.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks
    }

    /// Checks every instance of `remotes`, spread evenly over the check
    /// interval (an instance changes state only after `policy`'s
    /// thresholds of consecutive results),
    /// logs the changes of status, and returns the services with an
    /// instance silent past the eviction grace period.
    pub(super) async fn round(
        &self,
        remotes: Vec<Arc<RemoteService>>,
        policy: &InstancePolicy,
    ) -> Vec<Arc<RemoteService>> {
        round(
            &remotes,
            self,
            policy.thresholds,
            self.policy.check_interval,
        )
        .await;
        remotes
            .into_iter()
            .filter(|remote| {
                remote.announce_health(policy.thresholds);
                !remote.silent_instances(self.policy.evict_after).is_empty()
            })
            .collect()
    }
}

impl Checker {
    /// Checks the health route of every plugin among `services` that
    /// declares it as one of its GET endpoints (a plugin's
    /// `health_check_url` defaults to `/health` whether it has one or
    /// not), all at once: a GET handed to the plugin's workers like a
    /// gateway request, healthy if answered 2xx within the check timeout.
    /// Plugin code runs on the plugin's threads; this task only awaits.
    pub(super) async fn check_plugins(&self, services: &[Arc<Service>]) {
        let timeout = self.policy.check_timeout;
        let mut checks = JoinSet::new();
        for service in services {
            let Backend::Plugin(plugin) = &service.backend else {
                continue;
            };
            let info = &service.info;
            if !info
                .endpoints
                .iter()
                .any(|endpoint| endpoint.method == "GET" && endpoint.path == info.health_check_url)
            {
                continue;
            }
            let plugin = plugin.clone();
            let name = info.name.clone();
            let mut headers = axum::http::HeaderMap::new();
            headers.insert(X_REQUEST_ID, new_request_id());
            let request = Arc::new(PluginRequest {
                method: axum::http::Method::GET,
                path: info.health_check_url.clone(),
                query: String::new(),
                headers,
                body: Bytes::new(),
                client_addr: "127.0.0.1:0".to_owned(),
                chain: None,
            });
            checks.spawn(async move {
                let error = match plugin.runtime.call(request, timeout).await {
                    Ok(response) if (200..300).contains(&response.status) => None,
                    Ok(response) => Some(format!("answered {}", response.status)),
                    Err(error) => Some(error.to_string()),
                };
                crate::metrics::host().health_check(error.is_none());
                plugin.health.record(
                    &name,
                    CheckOutcome {
                        at: SystemTime::now(),
                        ok: error.is_none(),
                        error,
                    },
                );
            });
        }
        checks.join_all().await;
    }
}

/// Checks every instance of `remotes` once, paced over `over` (see
/// [`paced`]): one task per check in flight, never one per service.
async fn round(
    remotes: &[Arc<RemoteService>],
    checker: &Checker,
    thresholds: Thresholds,
    over: Duration,
) {
    let checks: Vec<_> = remotes
        .iter()
        .flat_map(|remote| {
            remote
                .health_check_urls()
                .into_iter()
                .map(move |(instance, uri)| (remote.clone(), instance, uri))
        })
        .collect();
    paced(checks, over, MAX_CONCURRENT_CHECKS, |(remote, instance, uri)| {
        let checker = checker.clone();
        async move {
            let result = match uri {
                Ok(uri) => checker.check(uri).await,
                Err(error) => Err(format!("no valid health check URL: {error}")),
            };
            crate::metrics::host().health_check(result.is_ok());
            if let Err(error) = &result {
                tracing::debug!(service = %remote.name(), instance = %instance.id(), %error, "health check failed");
            }
            remote.record_check(
                &instance,
                CheckOutcome {
                    at: SystemTime::now(),
                    ok: result.is_ok(),
                    error: result.err(),
                },
                thresholds,
            );
        }
    })
    .await;
}

/// Runs `run` on every item, the k-th of n started `k * over / n` after
/// the call (so a round's work is spread evenly over its interval instead
/// of landing on the runtime at once, which stalled every other request
/// on a small machine), with at most `max_in_flight` running: a start
/// past its time waits for a slot. Returns once every one has finished.
/// One timer at a time, and only the runs in flight hold a task.
async fn paced<T, F, Fut>(items: Vec<T>, over: Duration, max_in_flight: usize, mut run: F)
where
    F: FnMut(T) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let count = items.len();
    let start = tokio::time::Instant::now();
    let mut running = JoinSet::new();
    for (index, item) in items.into_iter().enumerate() {
        // Finished runs are reaped as we go, so their results do not
        // pile up in the set until the round ends.
        while running.try_join_next().is_some() {}
        let due = start + over.mul_f64(index as f64 / count as f64);
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        while running.len() >= max_in_flight.max(1) {
            running.join_next().await;
        }
        running.spawn(run(item));
    }
    running.join_all().await;
}

impl Checker {
    /// One GET of a health endpoint: healthy if it answers 2xx in time.
    async fn check(&self, uri: axum::http::Uri) -> Result<(), String> {
        let timeout = self.policy.check_timeout;
        let mut request = axum::http::Request::get(uri)
            .header(axum::http::header::USER_AGENT, "plugin-host-health-check")
            .body(Empty::new())
            .map_err(|error| error.to_string())?;
        self.loop_guard.stamp(request.headers_mut());
        let client = &self.client;
        let attempt = async {
            let response = client
                .request(request)
                .await
                .map_err(|error| error_chain(&error))?;
            let status = response.status();
            // Read the (small) answer so that the connection goes back to the
            // pool for the next round.
            Limited::new(response.into_body(), MAX_HEALTH_BODY)
                .collect()
                .await
                .map_err(|error| format!("reading the answer: {error}"))?;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("answered {status}"))
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            heartbeat_interval: Duration::from_secs(30),
            ttl: Duration::from_secs(90),
            check_interval: Duration::from_secs(10),
            check_timeout: Duration::from_secs(5),
            evict_after: Duration::from_secs(3600),
        }
    }

    /// A round never has more than its bound of checks in flight, runs
    /// every one, and spreads their starts over the interval instead of
    /// starting them at once.
    #[tokio::test]
    async fn a_paced_round_bounds_its_checks_in_flight_and_spreads_them() {
        use std::sync::Mutex;
        use std::sync::atomic::{AtomicUsize, Ordering};
        const CHECKS: usize = 200;
        const BOUND: usize = 4;
        let over = Duration::from_millis(200);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let starts = Arc::new(Mutex::new(Vec::new()));
        let began = tokio::time::Instant::now();
        paced((0..CHECKS).collect(), over, BOUND, |index| {
            let (in_flight, most, starts) = (in_flight.clone(), most.clone(), starts.clone());
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                starts.lock().unwrap().push((index, began.elapsed()));
                // Slow checks: the bound, not the pacing, holds them back.
                tokio::time::sleep(Duration::from_millis(5)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        })
        .await;
        let starts = starts.lock().unwrap();
        assert_eq!(starts.len(), CHECKS, "every check ran");
        assert!(
            most.load(Ordering::SeqCst) <= BOUND,
            "at most {BOUND} in flight"
        );
        assert_eq!(in_flight.load(Ordering::SeqCst), 0, "all finished");
        // The k-th starts no earlier than k/n of the interval.
        for (index, start) in starts.iter() {
            let due = over.mul_f64(*index as f64 / CHECKS as f64);
            assert!(
                *start >= due,
                "check {index} started at {start:?}, before {due:?}"
            );
        }
        assert!(began.elapsed() >= over.mul_f64((CHECKS - 1) as f64 / CHECKS as f64));
    }

    #[test]
    fn policies() {
        assert_eq!(policy().validate(), Ok(()));
        let zero = Policy {
            check_interval: Duration::ZERO,
            ..policy()
        };
        assert_eq!(
            zero.validate(),
            Err(InvalidPolicy::Zero("health-check-interval"))
        );
        let early = Policy {
            evict_after: Duration::from_secs(90),
            ..policy()
        };
        assert!(matches!(
            early.validate(),
            Err(InvalidPolicy::EvictBeforeUnhealthy { .. })
        ));
    }
}
