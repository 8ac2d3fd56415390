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

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::egress::{EgressPolicy, LoopGuard, Resolver};
use crate::http::{X_REQUEST_ID, error_chain, new_request_id};
use crate::plugin::PluginRequest;
use crate::remote::{CheckOutcome, RemoteService};
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

/// Health checks in flight at once. With thousands of services a round
/// would otherwise hold a socket per instance, each until its timeout.
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

    /// Checks every instance of `remotes` at once, logs the changes of
    /// status, and returns the services silent past the eviction grace
    /// period.
    pub(super) async fn round(&self, remotes: Vec<Arc<RemoteService>>) -> Vec<Arc<RemoteService>> {
        round(&remotes, self).await;
        remotes
            .into_iter()
            .filter(|remote| {
                remote.announce_health();
                remote.silent_for() > self.policy.evict_after
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
    pub(super) async fn check_plugins(&self, services: Vec<Arc<Service>>) {
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

async fn round(remotes: &[Arc<RemoteService>], checker: &Checker) {
    let mut checks = JoinSet::new();
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_CHECKS));
    for remote in remotes {
        for (addr, uri) in remote.health_check_urls() {
            let remote = remote.clone();
            let checker = checker.clone();
            let slots = slots.clone();
            checks.spawn(async move {
                let Ok(_slot) = slots.acquire().await else {
                    return;
                };
                let result = match uri {
                    Ok(uri) => checker.check(uri).await,
                    Err(error) => Err(format!("no valid health check URL: {error}")),
                };
                crate::metrics::host().health_check(result.is_ok());
                if let Err(error) = &result {
                    tracing::debug!(service = %remote.name(), instance = %addr, %error, "health check failed");
                }
                remote.record_check(
                    &addr,
                    CheckOutcome {
                        at: SystemTime::now(),
                        ok: result.is_ok(),
                        error: result.err(),
                    },
                );
            });
        }
    }
    checks.join_all().await;
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
