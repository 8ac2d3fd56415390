//! A remote service as the gateway routes to it: its registration, which
//! never changes, and its instances' liveness, which every heartbeat and
//! health check updates.
//!
//! The liveness state sits behind a mutex of its own, so a heartbeat
//! touches one service and never rewrites the service table. Health is
//! computed when asked, from the time of the last good signal, so a service
//! turns unhealthy exactly when its TTL runs out, however often the
//! liveness task looks.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use axum::http::uri::{Authority, InvalidUri};
use axum::http::{HeaderValue, Uri};
use serde::Serialize;

use crate::sync::lock;

mod spec;

pub use spec::{InstanceAddr, RemoteSpec, Reported};

/// Who registered a remote service, which decides who may change it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    /// The client address it was registered from; `None` for a
    /// registration stored before owners were recorded, which any address
    /// may claim.
    pub address: Option<IpAddr>,
    /// The id of the registry token that registered it, when the registry
    /// has tokens: only that token (or the admin token) may change it.
    pub token: Option<String>,
}

/// A registered out-of-process service.
#[derive(Debug)]
pub struct RemoteService {
    spec: RemoteSpec,
    registered_at: SystemTime,
    /// Who registered it.
    owner: Owner,
    /// Longest silence before the service is unhealthy.
    ttl: Duration,
    /// `/api/<name>`, where the gateway mounts it, as the header value the
    /// proxy sends with every request (`X-Forwarded-Prefix`): made once
    /// here rather than per request. `None` only for a name that is no
    /// header value, which the name rule excludes.
    mount: Option<HeaderValue>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// By `host:port`. One today: a registration from another address
    /// replaces the service (and so its instance); the map is where more
    /// instances per service will go.
    instances: BTreeMap<String, Instance>,
    /// The status last logged, so that each change is logged once, by
    /// whoever notices it first: a request, a heartbeat or a health check
    /// round. A TTL that lapses between two rounds is noticed by the
    /// request that is answered 503 for it.
    announced: Status,
}

#[derive(Debug)]
struct Instance {
    addr: InstanceAddr,
    authority: Authority,
    /// Last healthy heartbeat or passing health check (or the registration,
    /// or the restart that restored it): the TTL counts from here.
    last_ok: Instant,
    /// Last sign of life of any kind, an unhealthy heartbeat included: the
    /// eviction grace period counts from here.
    last_contact: Instant,
    last_heartbeat: Option<SystemTime>,
    last_check: Option<CheckOutcome>,
    /// The service said it is unhealthy; only a healthy heartbeat undoes
    /// that (a passing check does not overrule the service's own word).
    reported_unhealthy: bool,
}

/// Whether the gateway routes to a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
}

/// Where to send one request. Borrows the service's registration, which
/// never changes, so choosing a route copies nothing but the authority.
#[derive(Debug, Clone)]
pub struct Route<'a> {
    /// `host:port` of the chosen instance.
    pub authority: Authority,
    base_path: &'a str,
}

impl Route<'_> {
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
            .authority(self.authority.clone())
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
    /// `healthy` or `unhealthy`.
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
    /// Path prefix on the instance.
    pub base_path: String,
    /// When the service first registered.
    #[serde(serialize_with = "rfc3339")]
    pub registered_at: SystemTime,
    /// Latest heartbeat received since the host started, if any.
    #[serde(serialize_with = "rfc3339_opt")]
    pub last_heartbeat: Option<SystemTime>,
    /// Latest active health check, if any.
    pub last_health_check: Option<CheckOutcome>,
    /// Every instance.
    pub instances: Vec<InstanceLiveness>,
}

/// One instance's liveness as the registry lists it.
#[derive(Debug, Serialize)]
pub struct InstanceLiveness {
    /// `host:port`.
    pub id: String,
    /// `http://host:port/base_path`.
    pub url: String,
    /// `healthy` or `unhealthy`.
    pub status: Status,
    /// Latest heartbeat received since the host started, if any.
    #[serde(serialize_with = "rfc3339_opt")]
    pub last_heartbeat: Option<SystemTime>,
    /// Latest active health check, if any.
    pub last_health_check: Option<CheckOutcome>,
}

impl RemoteService {
    /// A service with `instances`, healthy for one TTL from now: a fresh
    /// registration, or one restored after a restart (its service will
    /// not register again, so it is routed at once and the health checks
    /// decide from there).
    pub fn new(
        spec: RemoteSpec,
        instances: Vec<InstanceAddr>,
        registered_at: SystemTime,
        owner: Owner,
        ttl: Duration,
    ) -> Result<Self, InvalidUri> {
        let now = Instant::now();
        let instances = instances
            .into_iter()
            .map(|addr| {
                let authority = addr.authority()?;
                let instance = Instance {
                    authority,
                    last_ok: now,
                    last_contact: now,
                    last_heartbeat: None,
                    last_check: None,
                    reported_unhealthy: false,
                    addr,
                };
                Ok((instance.addr.to_string(), instance))
            })
            .collect::<Result<_, InvalidUri>>()?;
        let mount = HeaderValue::try_from(format!("/api/{}", spec.info.name)).ok();
        Ok(Self {
            mount,
            spec,
            registered_at,
            owner: Owner {
                address: owner.address.map(|address| address.to_canonical()),
                token: owner.token,
            },
            ttl,
            state: Mutex::new(State {
                instances,
                announced: Status::Healthy,
            }),
        })
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.spec.info.name
    }

    /// `/api/<name>`, where the gateway mounts it, as a header value.
    pub fn mount(&self) -> Option<&HeaderValue> {
        self.mount.as_ref()
    }

    /// When it first registered (kept across re-registrations).
    pub fn registered_at(&self) -> SystemTime {
        self.registered_at
    }

    /// Who registered it.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// Whether a client at `caller` may change, heartbeat or remove it
    /// when the registry has no tokens: only the address that registered
    /// it may.
    pub fn is_owned_by(&self, caller: IpAddr) -> bool {
        self.owner
            .address
            .is_none_or(|owner| owner == caller.to_canonical())
    }

    /// Its instances' addresses.
    pub fn instances(&self) -> Vec<InstanceAddr> {
        self.state()
            .instances
            .values()
            .map(|instance| instance.addr.clone())
            .collect()
    }

    /// A healthy instance to send a request to.
    pub fn route(&self) -> Result<Route<'_>, Unavailable> {
        let now = Instant::now();
        let mut state = self.state();
        let mut unavailable = None;
        let mut chosen = None;
        for instance in state.instances.values() {
            match instance.health(now, self.ttl) {
                Ok(()) => {
                    chosen = Some(instance.authority.clone());
                    break;
                }
                Err(why) => unavailable = Some(why),
            }
        }
        let routed = match chosen {
            Some(authority) => Ok(Route {
                authority,
                base_path: &self.spec.base_path,
            }),
            // A service always has an instance; an empty map would read as
            // "never heard from".
            None => Err(unavailable.unwrap_or(Unavailable::Silent {
                silent: Duration::MAX,
                ttl: self.ttl,
            })),
        };
        state.announce(
            self.name(),
            routed.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        routed
    }

    /// A heartbeat: it speaks for every instance, since the seed guide's
    /// heartbeat does not say which one sent it.
    pub fn heartbeat(&self, reported: Reported) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut state = self.state();
        for instance in state.instances.values_mut() {
            instance.last_contact = now;
            instance.last_heartbeat = Some(wall);
            instance.reported_unhealthy = reported == Reported::Unhealthy;
            if reported == Reported::Healthy {
                instance.last_ok = now;
            }
        }
    }

    /// The URL the liveness task GETs for each instance.
    pub fn health_check_urls(&self) -> Vec<(InstanceAddr, Result<Uri, axum::http::Error>)> {
        let state = self.state();
        state
            .instances
            .values()
            .map(|instance| {
                let uri = Uri::builder()
                    .scheme("http")
                    .authority(instance.authority.clone())
                    // Relative to the service, like any path the gateway
                    // routes: the check and `/api/<name>/health` reach the
                    // same handler.
                    .path_and_query(join(&self.spec.base_path, &self.spec.info.health_check_url))
                    .build();
                (instance.addr.clone(), uri)
            })
            .collect()
    }

    /// Records an active health check of `addr`.
    pub fn record_check(&self, addr: &InstanceAddr, outcome: CheckOutcome) {
        let now = Instant::now();
        let mut state = self.state();
        if let Some(instance) = state.instances.get_mut(&addr.to_string()) {
            if outcome.ok {
                instance.last_ok = now;
                instance.last_contact = now;
            }
            instance.last_check = Some(outcome);
        }
    }

    /// Logs the status now if it changed since it was last logged, and
    /// returns the change.
    pub fn announce_health(&self) -> Option<Transition> {
        let mut state = self.state();
        let health = state.health(Instant::now(), self.ttl);
        state.announce(self.name(), health)
    }

    /// Whether the gateway routes to it now.
    pub fn status(&self) -> Status {
        match self.state().health(Instant::now(), self.ttl) {
            Ok(()) => Status::Healthy,
            Err(_) => Status::Unhealthy,
        }
    }

    /// Time since any instance last gave a sign of life.
    pub fn silent_for(&self) -> Duration {
        let now = Instant::now();
        self.state()
            .instances
            .values()
            .map(|instance| now.saturating_duration_since(instance.last_contact))
            .min()
            .unwrap_or(Duration::MAX)
    }

    /// Its liveness, for the registry's listing.
    pub fn liveness(&self) -> Liveness {
        let now = Instant::now();
        let state = self.state();
        let health = state.health(now, self.ttl);
        let instances: Vec<InstanceLiveness> = state
            .instances
            .values()
            .map(|instance| InstanceLiveness {
                id: instance.addr.to_string(),
                url: format!("http://{}{}", instance.authority, self.spec.base_path),
                status: if instance.health(now, self.ttl).is_ok() {
                    Status::Healthy
                } else {
                    Status::Unhealthy
                },
                last_heartbeat: instance.last_heartbeat,
                last_health_check: instance.last_check.clone(),
            })
            .collect();
        let first = state.instances.values().next();
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
            host: first.map(|i| i.addr.host.clone()).unwrap_or_default(),
            port: first.map(|i| i.addr.port).unwrap_or_default(),
            base_path: self.spec.base_path.clone(),
            registered_at: self.registered_at,
            last_heartbeat: instances.iter().filter_map(|i| i.last_heartbeat).max(),
            last_health_check: first.and_then(|i| i.last_check.clone()),
            instances,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl State {
    /// Logs a change of status once, and returns it.
    fn announce(&mut self, service: &str, health: Result<(), Unavailable>) -> Option<Transition> {
        let status = if health.is_ok() {
            Status::Healthy
        } else {
            Status::Unhealthy
        };
        if status == self.announced {
            return None;
        }
        self.announced = status;
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

    /// Healthy if any instance is.
    fn health(&self, now: Instant, ttl: Duration) -> Result<(), Unavailable> {
        let mut unavailable = Unavailable::Silent {
            silent: Duration::MAX,
            ttl,
        };
        for instance in self.instances.values() {
            match instance.health(now, ttl) {
                Ok(()) => return Ok(()),
                Err(why) => unavailable = why,
            }
        }
        Err(unavailable)
    }
}

impl Instance {
    fn health(&self, now: Instant, ttl: Duration) -> Result<(), Unavailable> {
        if self.reported_unhealthy {
            return Err(Unavailable::Reported);
        }
        let silent = now.saturating_duration_since(self.last_ok);
        if silent > ttl {
            return Err(Unavailable::Silent { silent, ttl });
        }
        Ok(())
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
            info,
            base_path: base_path.to_owned(),
        };
        let addr = InstanceAddr {
            host: "::1".to_owned(),
            port: 8010,
        };
        RemoteService::new(spec, vec![addr], SystemTime::now(), Owner::default(), ttl).unwrap()
    }

    #[test]
    fn routes_join_the_base_path() {
        let remote = service("/", Duration::from_secs(60));
        let route = remote.route().unwrap();
        assert_eq!(
            route.uri("/hello", Some("name=x")).unwrap().to_string(),
            "http://[::1]:8010/hello?name=x"
        );
        assert_eq!(
            route.uri("", None).unwrap().to_string(),
            "http://[::1]:8010/"
        );
        let remote = service("/v1/", Duration::from_secs(60));
        let route = remote.route().unwrap();
        assert_eq!(route.uri("/a/b", None).unwrap().path(), "/v1/a/b");
        assert_eq!(route.uri("", None).unwrap().path(), "/v1/");
        let (_, health) = &remote.health_check_urls()[0];
        assert_eq!(
            health.as_ref().unwrap().to_string(),
            "http://[::1]:8010/v1/health"
        );
    }

    #[test]
    fn silence_past_the_ttl_is_unhealthy_until_a_heartbeat() {
        // A TTL long enough that a stalled test thread does not expire it
        // before the first checks.
        let remote = service("/", Duration::from_secs(1));
        assert!(remote.route().is_ok());
        assert_eq!(remote.announce_health(), None);
        std::thread::sleep(Duration::from_millis(1300));
        assert!(matches!(
            remote.announce_health(),
            Some(Transition::Failed(Unavailable::Silent { .. }))
        ));
        assert!(matches!(remote.route(), Err(Unavailable::Silent { .. })));
        assert_eq!(remote.announce_health(), None);
        remote.heartbeat(Reported::Healthy);
        assert_eq!(remote.announce_health(), Some(Transition::Recovered));
        assert!(remote.route().is_ok());
        assert_eq!(remote.announce_health(), None);
    }

    #[test]
    fn a_reported_unhealthy_service_stays_so_until_it_says_otherwise() {
        let remote = service("/", Duration::from_secs(60));
        remote.heartbeat(Reported::Unhealthy);
        assert_eq!(remote.route().unwrap_err(), Unavailable::Reported);
        let addr = remote.instances().remove(0);
        remote.record_check(
            &addr,
            CheckOutcome {
                at: SystemTime::now(),
                ok: true,
                error: None,
            },
        );
        assert_eq!(remote.route().unwrap_err(), Unavailable::Reported);
        remote.heartbeat(Reported::Healthy);
        assert!(remote.route().is_ok());
    }
}
