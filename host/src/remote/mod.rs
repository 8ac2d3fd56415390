//! A remote service as the gateway routes to it: its registration, which
//! never changes, and its instances ([`InstanceSet`]), whose liveness,
//! load and ejection state every heartbeat, health check and proxied
//! request updates in place.
//!
//! Nothing here takes a lock on the request path: the set of instances is
//! an immutable snapshot (a change of membership is a new
//! `RemoteService`, swapped into the table by the registry), and each
//! instance's state is atomics. Health is computed when asked, from the
//! time of the last good signal, so an instance turns unhealthy exactly
//! when its TTL runs out, however often the liveness task looks.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use axum::http::uri::Authority;
use axum::http::{HeaderValue, Uri};
use serde::Serialize;

mod instances;
mod pool;
mod spec;

pub use instances::{
    Balancing, Ejection, HealthSettings, Instance, InstancePolicy, InstanceSet, InstanceStatus,
    LoadBalancingSettings, Outlier, OutlierSettings, Outstanding, Thresholds,
};
pub use pool::{Pool, Sender};
pub use spec::{InstanceAddr, RemoteSpec, Reported};

/// A registered out-of-process service.
#[derive(Debug)]
pub struct RemoteService {
    spec: RemoteSpec,
    registered_at: SystemTime,
    /// The id of the registry token that registered it, when the registry
    /// has tokens: only that token (or the admin token) may change it.
    owner_token: Option<String>,
    /// Longest silence before an instance is unhealthy.
    ttl: Duration,
    /// `/api/<name>`, where the gateway mounts it, as the header value the
    /// proxy sends with every request (`X-Forwarded-Prefix`): made once
    /// here rather than per request. `None` only for a name that is no
    /// header value, which the name rule excludes.
    mount: Option<HeaderValue>,
    instances: InstanceSet,
    /// The status last logged (healthy: true), so that each change is
    /// logged once, by whoever notices it first: a request, a heartbeat or
    /// a health check round.
    announced_healthy: AtomicBool,
}

/// Whether the gateway routes to a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Routed.
    Healthy,
    /// Answered 503.
    Unhealthy,
}

/// The result of one active health check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckOutcome {
    /// When it finished.
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    /// Whether the service answered 2xx in time.
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why the gateway does not route to a service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// No good heartbeat or health check within the TTL.
    #[error(
        "no heartbeat or passing health check for {} (TTL {})",
        seconds(*silent),
        seconds(*ttl)
    )]
    Silent {
        /// Since the last good signal.
        silent: Duration,
        /// The limit.
        ttl: Duration,
    },
    /// The service's last heartbeat said `"unhealthy"`.
    #[error("the service reported itself unhealthy in its last heartbeat")]
    Reported,
    /// Every alive instance is marked down by health checks or ejected,
    /// and the protect threshold is off.
    #[error(
        "all {instances} alive instances are marked down by health checks or ejected (the protect threshold is off)"
    )]
    Down {
        /// Alive instances.
        instances: usize,
    },
}

/// Where to send one request: the chosen instance, counted as outstanding
/// until the route is dropped. Borrows the service's base path, which
/// never changes.
#[derive(Debug)]
pub struct Route<'a> {
    instance: Outstanding,
    base_path: &'a str,
}

impl Route<'_> {
    /// `host:port` of the chosen instance.
    pub fn authority(&self) -> &Authority {
        self.instance.instance().authority()
    }

    /// The chosen instance.
    pub fn instance(&self) -> &Arc<Instance> {
        self.instance.instance()
    }

    /// The outstanding-request count it holds, to be kept until the
    /// answer's body ends.
    pub fn into_outstanding(self) -> Outstanding {
        self.instance
    }

    /// The path prefix on the instance that `/api/<name>` maps to.
    pub fn base_path(&self) -> &str {
        self.base_path
    }

    /// `http://<authority><base_path><rest>?<query>`. `rest` is the raw path
    /// below `/api/<name>`, already checked by the gateway; an empty `rest`
    /// is the base path itself.
    pub fn uri(&self, rest: &str, query: Option<&str>) -> Result<Uri, axum::http::Error> {
        // Built in one allocation: this runs for every proxied request.
        let base = if rest.is_empty() {
            self.base_path
        } else {
            self.base_path.trim_end_matches('/')
        };
        let mut path_and_query = String::with_capacity(
            base.len() + rest.len() + query.map_or(0, |query| query.len() + 1),
        );
        path_and_query.push_str(base);
        path_and_query.push_str(rest);
        if let Some(query) = query {
            path_and_query.push('?');
            path_and_query.push_str(query);
        }
        Uri::builder()
            .scheme("http")
            .authority(self.authority().clone())
            .path_and_query(path_and_query)
            .build()
    }
}

/// A change of status, to be logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Healthy again.
    Recovered,
    /// No longer routed, and why.
    Failed(Unavailable),
}

/// A service's liveness as the registry lists it.
#[derive(Debug, Serialize)]
pub struct Liveness {
    /// `healthy` while one instance is routed, else `unhealthy`.
    pub status: Status,
    /// Why it is unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unhealthy_reason: Option<String>,
    /// `http://host:port/base_path` of the first instance.
    pub url: String,
    /// Its host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// Path prefix on the instances.
    pub base_path: String,
    /// How a request picks an instance.
    pub load_balancing: Balancing,
    /// When the service first registered.
    #[serde(serialize_with = "rfc3339")]
    pub registered_at: SystemTime,
    /// Latest heartbeat received since the host started, if any.
    #[serde(serialize_with = "rfc3339_opt")]
    pub last_heartbeat: Option<SystemTime>,
    /// Latest active health check of the first instance, if any.
    pub last_health_check: Option<CheckOutcome>,
    /// Every instance.
    pub instances: Vec<InstanceLiveness>,
}

/// One instance's liveness as the registry lists it.
#[derive(Debug, Serialize)]
pub struct InstanceLiveness {
    /// `host:port`.
    pub id: String,
    /// The version of the service it serves.
    pub version: String,
    /// `http://host:port/base_path`.
    pub url: String,
    /// `healthy`, `unhealthy` or `ejected`.
    pub status: InstanceStatus,
    /// When it registered.
    #[serde(serialize_with = "rfc3339")]
    pub registered_at: SystemTime,
    /// Latest heartbeat received since the host started, if any.
    #[serde(serialize_with = "rfc3339_opt")]
    pub last_heartbeat: Option<SystemTime>,
    /// Latest active health check, if any.
    pub last_health_check: Option<CheckOutcome>,
    /// Requests in flight to it.
    pub outstanding_requests: u32,
    /// Its ejections by the proxy.
    pub ejection: Ejection,
}

impl RemoteService {
    /// A service of `instances`. Each instance keeps its own state: a
    /// new one is alive for one TTL from its creation, one carried over
    /// from the service this one replaces keeps what it had.
    pub fn new(
        spec: RemoteSpec,
        instances: Vec<Arc<Instance>>,
        registered_at: SystemTime,
        owner_token: Option<String>,
        ttl: Duration,
    ) -> Self {
        let mount = HeaderValue::try_from(format!("/api/{}", spec.info.name)).ok();
        Self {
            mount,
            spec,
            registered_at,
            owner_token,
            ttl,
            instances: InstanceSet::new(instances),
            announced_healthy: AtomicBool::new(true),
        }
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.spec.info.name
    }

    /// What it registered with.
    pub fn spec(&self) -> &RemoteSpec {
        &self.spec
    }

    /// `/api/<name>`, where the gateway mounts it, as a header value.
    pub fn mount(&self) -> Option<&HeaderValue> {
        self.mount.as_ref()
    }

    /// When it first registered (kept across re-registrations).
    pub fn registered_at(&self) -> SystemTime {
        self.registered_at
    }

    /// Longest silence before an instance is unhealthy.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The registry token that owns it.
    pub fn owner_token(&self) -> Option<&str> {
        self.owner_token.as_deref()
    }

    /// Its instances.
    pub fn instances(&self) -> &InstanceSet {
        &self.instances
    }

    /// The instances a client at `caller` registered (every instance
    /// stored before owners were recorded counts as its).
    pub fn owned_by(&self, caller: IpAddr) -> Vec<Arc<Instance>> {
        self.instances
            .members()
            .iter()
            .filter(|instance| instance.is_owned_by(caller))
            .cloned()
            .collect()
    }

    /// An instance to send a request to, chosen by `policy`'s balancing
    /// for this service among the routable ones, other than `excluded`
    /// (the one a retry failed on).
    pub fn route(
        &self,
        policy: &InstancePolicy,
        excluded: Option<&Instance>,
    ) -> Result<Route<'_>, Unavailable> {
        let balancing = policy.balancing(self.name(), self.spec.load_balancing);
        let picked = self.instances.pick(
            self.name(),
            Instant::now(),
            self.ttl,
            balancing,
            policy.thresholds,
            excluded,
        );
        if excluded.is_none() {
            self.announce(picked.as_ref().map(|_| ()).map_err(Clone::clone));
        }
        Ok(Route {
            instance: picked?.enter(),
            base_path: &self.spec.base_path,
        })
    }

    /// Records how a request to `instance` went, for outlier ejection.
    pub fn record_outcome(&self, instance: &Instance, succeeded: bool, policy: &InstancePolicy) {
        self.instances
            .record(self.name(), instance, succeeded, policy.outlier);
    }

    /// The URL the liveness task GETs for each instance.
    pub fn health_check_urls(&self) -> Vec<(Arc<Instance>, Result<Uri, axum::http::Error>)> {
        self.instances
            .members()
            .iter()
            .map(|instance| {
                let uri = Uri::builder()
                    .scheme("http")
                    .authority(instance.authority().clone())
                    // Relative to the service, like any path the gateway
                    // routes: the check and `/api/<name>/health` reach the
                    // same handler.
                    .path_and_query(join(&self.spec.base_path, &self.spec.info.health_check_url))
                    .build();
                (instance.clone(), uri)
            })
            .collect()
    }

    /// Records an active health check of `instance`, logging a change of
    /// its checked state.
    pub fn record_check(&self, instance: &Instance, outcome: CheckOutcome, thresholds: Thresholds) {
        let error = outcome.error.clone();
        match instance.record_check(outcome, thresholds) {
            Some(true) => tracing::warn!(
                service = %self.name(),
                instance = %instance.id(),
                failed_checks = thresholds.unhealthy,
                error = error.as_deref().unwrap_or(""),
                "instance marked down by consecutive failed health checks"
            ),
            Some(false) => tracing::info!(
                service = %self.name(),
                instance = %instance.id(),
                passed_checks = thresholds.healthy,
                "instance back up after consecutive passing health checks"
            ),
            None => {}
        }
    }

    /// Logs the status now if it changed since it was last logged, and
    /// returns the change.
    pub fn announce_health(&self, thresholds: Thresholds) -> Option<Transition> {
        self.announce(self.health(thresholds))
    }

    fn health(&self, thresholds: Thresholds) -> Result<(), Unavailable> {
        self.instances.health(Instant::now(), self.ttl, thresholds)
    }

    /// Whether the gateway routes to it now.
    pub fn status(&self, thresholds: Thresholds) -> Status {
        match self.health(thresholds) {
            Ok(()) => Status::Healthy,
            Err(_) => Status::Unhealthy,
        }
    }

    /// Time since any instance last gave a sign of life.
    pub fn silent_for(&self) -> Duration {
        let now = Instant::now();
        self.instances
            .members()
            .iter()
            .map(|instance| instance.silent_for(now))
            .min()
            .unwrap_or(Duration::MAX)
    }

    /// The instances silent for longer than `grace`.
    pub fn silent_instances(&self, grace: Duration) -> Vec<Arc<Instance>> {
        let now = Instant::now();
        self.instances
            .members()
            .iter()
            .filter(|instance| instance.silent_for(now) > grace)
            .cloned()
            .collect()
    }

    /// Its liveness, for the registry's listing.
    pub fn liveness(&self, policy: &InstancePolicy) -> Liveness {
        let now = Instant::now();
        let health = self.health(policy.thresholds);
        let instances: Vec<InstanceLiveness> = self
            .instances
            .members()
            .iter()
            .map(|instance| InstanceLiveness {
                id: instance.id().to_owned(),
                version: self.spec.info.version.clone(),
                url: format!("http://{}{}", instance.authority(), self.spec.base_path),
                status: instance.status(now, self.ttl),
                registered_at: instance.registered_at(),
                last_heartbeat: instance.last_heartbeat(),
                last_health_check: instance.last_check(),
                outstanding_requests: instance.outstanding(),
                ejection: instance.ejection(now),
            })
            .collect();
        let first = self.instances.members().first();
        Liveness {
            status: if health.is_ok() {
                Status::Healthy
            } else {
                Status::Unhealthy
            },
            unhealthy_reason: health.err().map(|why| why.to_string()),
            url: instances
                .first()
                .map(|instance| instance.url.clone())
                .unwrap_or_default(),
            host: first.map(|i| i.addr().host.clone()).unwrap_or_default(),
            port: first.map(|i| i.addr().port).unwrap_or_default(),
            base_path: self.spec.base_path.clone(),
            load_balancing: policy.balancing(self.name(), self.spec.load_balancing),
            registered_at: self.registered_at,
            last_heartbeat: instances.iter().filter_map(|i| i.last_heartbeat).max(),
            last_health_check: first.and_then(|i| i.last_check()),
            instances,
        }
    }

    /// Logs a change of status once, and returns it.
    fn announce(&self, health: Result<(), Unavailable>) -> Option<Transition> {
        let healthy = health.is_ok();
        if self.announced_healthy.load(Ordering::Relaxed) == healthy
            || self.announced_healthy.swap(healthy, Ordering::Relaxed) == healthy
        {
            return None;
        }
        let service = self.name();
        Some(match health {
            Ok(()) => {
                tracing::info!(service = %service, "remote service healthy again");
                Transition::Recovered
            }
            Err(reason) => {
                tracing::warn!(service = %service, %reason, "remote service unhealthy; answering 503 for it");
                Transition::Failed(reason)
            }
        })
    }
}

/// `base` followed by `rest`, with one `/` between them.
fn join(base: &str, rest: &str) -> String {
    if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{}{rest}", base.trim_end_matches('/'))
    }
}

fn seconds(duration: Duration) -> String {
    if duration == Duration::MAX {
        "ever".to_owned()
    } else {
        format!("{:.1}s", duration.as_secs_f64())
    }
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_rfc3339_millis(*time))
}

fn rfc3339_opt<S: serde::Serializer>(
    time: &Option<SystemTime>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => rfc3339(time, serializer),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::ServiceInfo;

    fn service(base_path: &str, ttl: Duration) -> RemoteService {
        let info = ServiceInfo {
            name: "svc".to_owned(),
            display_name: "svc".to_owned(),
            description: String::new(),
            version: "1".to_owned(),
            health_check_url: "/health".to_owned(),
            metadata: Default::default(),
            tags: Vec::new(),
            requires_auth: false,
            endpoints: Vec::new(),
        };
        let spec = RemoteSpec {
            info: Arc::new(info),
            base_path: base_path.to_owned(),
            load_balancing: None,
        };
        let addr = InstanceAddr {
            host: "::1".to_owned(),
            port: 8010,
        };
        let instance = Arc::new(Instance::new(addr, None, SystemTime::now()).unwrap());
        RemoteService::new(spec, vec![instance], SystemTime::now(), None, ttl)
    }

    fn policy() -> InstancePolicy {
        InstancePolicy::default()
    }

    fn beat(remote: &RemoteService, healthy: bool) {
        for instance in remote.instances().members() {
            instance.heartbeat(healthy);
        }
    }

    #[test]
    fn routes_join_the_base_path() {
        let remote = service("/", Duration::from_secs(60));
        let route = remote.route(&policy(), None).unwrap();
        assert_eq!(
            route.uri("/hello", Some("name=x")).unwrap().to_string(),
            "http://[::1]:8010/hello?name=x"
        );
        assert_eq!(
            route.uri("", None).unwrap().to_string(),
            "http://[::1]:8010/"
        );
        let remote = service("/v1/", Duration::from_secs(60));
        let route = remote.route(&policy(), None).unwrap();
        assert_eq!(route.uri("/a/b", None).unwrap().path(), "/v1/a/b");
        assert_eq!(route.uri("", None).unwrap().path(), "/v1/");
        let (_, health) = &remote.health_check_urls()[0];
        assert_eq!(
            health.as_ref().unwrap().to_string(),
            "http://[::1]:8010/v1/health"
        );
    }

    #[test]
    fn a_route_counts_as_outstanding_until_dropped() {
        let remote = service("/", Duration::from_secs(60));
        let route = remote.route(&policy(), None).unwrap();
        let instance = route.instance().clone();
        assert_eq!(instance.outstanding(), 1);
        let held = route.into_outstanding();
        assert_eq!(instance.outstanding(), 1);
        drop(held);
        assert_eq!(instance.outstanding(), 0);
    }

    #[test]
    fn silence_past_the_ttl_is_unhealthy_until_a_heartbeat() {
        // A TTL long enough that a stalled test thread does not expire it
        // before the first checks.
        let thresholds = policy().thresholds;
        let remote = service("/", Duration::from_secs(1));
        assert!(remote.route(&policy(), None).is_ok());
        assert_eq!(remote.announce_health(thresholds), None);
        std::thread::sleep(Duration::from_millis(1300));
        assert!(matches!(
            remote.announce_health(thresholds),
            Some(Transition::Failed(Unavailable::Silent { .. }))
        ));
        assert!(matches!(
            remote.route(&policy(), None),
            Err(Unavailable::Silent { .. })
        ));
        assert_eq!(remote.announce_health(thresholds), None);
        beat(&remote, true);
        assert_eq!(
            remote.announce_health(thresholds),
            Some(Transition::Recovered)
        );
        assert!(remote.route(&policy(), None).is_ok());
        assert_eq!(remote.announce_health(thresholds), None);
    }

    #[test]
    fn a_reported_unhealthy_service_stays_so_until_it_says_otherwise() {
        let remote = service("/", Duration::from_secs(60));
        beat(&remote, false);
        assert_eq!(
            remote.route(&policy(), None).unwrap_err(),
            Unavailable::Reported
        );
        let instance = remote.instances().members()[0].clone();
        remote.record_check(
            &instance,
            CheckOutcome {
                at: SystemTime::now(),
                ok: true,
                error: None,
            },
            policy().thresholds,
        );
        assert_eq!(
            remote.route(&policy(), None).unwrap_err(),
            Unavailable::Reported
        );
        beat(&remote, true);
        assert!(remote.route(&policy(), None).is_ok());
    }
}
