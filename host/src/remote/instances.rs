//! The instances of one remote service, and how a request picks one: load
//! balancing, passive outlier ejection, active health check thresholds and
//! the protect threshold.
//!
//! An [`InstanceSet`] is immutable: the registry builds a new one for every
//! change of membership (an instance added, deregistered or evicted) and
//! the table swaps it in with its service, so the request path reads a
//! snapshot without a lock. What changes per request lives in each
//! [`Instance`] as atomics (liveness times, outstanding requests, the
//! consecutive failure count, the ejection deadline), and a new set keeps
//! the `Arc<Instance>` of every member it carries over, so no membership
//! change forgets an instance's state. A service holds one set today; a
//! version will hold one when versions land.
//!
//! What decides whether an instance is routed:
//! - **alive**: its last healthy heartbeat or passing check is within the
//!   TTL and it did not report itself unhealthy. These are the service's
//!   own word and the registry's lease: an instance that is not alive is
//!   never routed.
//! - **up**: alive, not marked down by `unhealthy_threshold` consecutive
//!   failed health checks (until `healthy_threshold` consecutive passes),
//!   and not ejected by the proxy after `consecutive_failures` connect
//!   errors or 5xx answers in a row.
//! - the **protect threshold**: when more than `protect_threshold_percent`
//!   of the alive instances are not up, those suspicions are set aside and
//!   every alive instance is routed (logged once, WARN, when it starts).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::uri::{Authority, InvalidUri};
use serde::{Deserialize, Serialize};

use super::pool::Pool;
use super::{CheckOutcome, InstanceAddr, Unavailable};
use crate::settings::SettingsError;
use crate::sync::{lock, random_below};

/// How a request picks among a service's routable instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancing {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// Of two instances drawn at random, the one with fewer requests in
    /// flight (power of two choices).
    LeastOutstanding,
}

/// `[load_balancing]`. Reloadable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancingSettings {
    /// The policy of a service that names none (`[service.<name>]
    /// load_balancing` or the registration's `load_balancing`). Default
    /// `round_robin`.
    #[serde(default)]
    pub policy: Option<Balancing>,
}

/// `[outlier]`: passive ejection by the proxy. Reloadable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierSettings {
    /// Connect errors, failed answers or 5xx in a row that eject an
    /// instance; 0 turns ejection off. Default 5.
    #[serde(default)]
    pub consecutive_failures: Option<u32>,
    /// The first ejection's length; the n-th lasts n times it. Default 30s.
    #[serde(default, with = "humantime_serde")]
    pub base_ejection_time: Option<Duration>,
    /// The longest ejection, however often an instance was ejected.
    /// Default 300s.
    #[serde(default, with = "humantime_serde")]
    pub max_ejection_time: Option<Duration>,
    /// Most instances of a service ejected at once, in percent (at least
    /// one is always ejectable). Default 10.
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
}

/// `[health]`: how active health checks change an instance's state, and
/// the protect threshold. Reloadable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// Consecutive passing checks that bring an instance marked down back.
    /// Default 2.
    #[serde(default)]
    pub healthy_threshold: Option<u32>,
    /// Consecutive failing checks that mark an instance down. Default 3.
    #[serde(default)]
    pub unhealthy_threshold: Option<u32>,
    /// When more than this share (percent) of a service's alive instances
    /// is marked down or ejected, route to all of them. 100 turns it off.
    /// Default 50.
    #[serde(default)]
    pub protect_threshold_percent: Option<u32>,
}

/// Passive outlier ejection, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outlier {
    /// Failures in a row that eject; 0: never.
    pub consecutive_failures: u32,
    /// The first ejection's length.
    pub base_ejection_time: Duration,
    /// The cap on an ejection's length.
    pub max_ejection_time: Duration,
    /// Most instances ejected at once, percent.
    pub max_ejection_percent: u32,
}

impl Outlier {
    /// How long the `ejections`-th ejection (counting from 1) lasts: base
    /// times the count, capped.
    pub fn ejection_time(&self, ejections: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(ejections.max(1))
            .min(self.max_ejection_time)
    }

    /// Whether one more instance may be ejected while `ejected` of `total`
    /// are: at most `max_ejection_percent` of them, and always at least one
    /// (as Envoy), the protect threshold covering the rest.
    pub fn may_eject(&self, ejected: usize, total: usize) -> bool {
        let allowed = (total * self.max_ejection_percent as usize / 100).max(1);
        ejected < allowed
    }
}

/// Active health check thresholds and the protect threshold, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Passing checks in a row to come back.
    pub healthy: u32,
    /// Failing checks in a row to be marked down.
    pub unhealthy: u32,
    /// Share of alive instances (percent) that may be down before all are
    /// routed.
    pub protect_percent: u32,
}

impl Thresholds {
    /// Whether `down` of `alive` instances not routable is past the protect
    /// threshold, so that all `alive` ones are routed.
    pub fn protects(&self, down: usize, alive: usize) -> bool {
        down > 0 && down * 100 > self.protect_percent as usize * alive
    }
}

/// Balancing, ejection and health check settings, checked: the reloadable
/// piece the proxy and the health checks load per use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstancePolicy {
    balancing: Balancing,
    /// `[service.<name>] load_balancing`.
    per_service: BTreeMap<String, Balancing>,
    /// Passive ejection.
    pub outlier: Outlier,
    /// Active checks and the protect threshold.
    pub thresholds: Thresholds,
}

impl Default for InstancePolicy {
    fn default() -> Self {
        Self::from_settings(
            &LoadBalancingSettings::default(),
            &OutlierSettings::default(),
            &HealthSettings::default(),
            std::iter::empty(),
        )
        .expect("the defaults are valid")
    }
}

impl InstancePolicy {
    /// Checks the sections and compiles them; `per_service` are the
    /// `[service.<name>] load_balancing` keys.
    pub fn from_settings<'a>(
        balancing: &LoadBalancingSettings,
        outlier: &OutlierSettings,
        health: &HealthSettings,
        per_service: impl IntoIterator<Item = (&'a String, Balancing)>,
    ) -> Result<Self, SettingsError> {
        let outlier = Outlier {
            consecutive_failures: outlier.consecutive_failures.unwrap_or(5),
            base_ejection_time: outlier
                .base_ejection_time
                .unwrap_or(Duration::from_secs(30)),
            max_ejection_time: outlier
                .max_ejection_time
                .unwrap_or(Duration::from_secs(300)),
            max_ejection_percent: outlier.max_ejection_percent.unwrap_or(10),
        };
        if outlier.consecutive_failures > 0 && outlier.base_ejection_time.is_zero() {
            return Err(SettingsError::new(
                "outlier.base_ejection_time",
                "must be longer than zero (set outlier.consecutive_failures = 0 to turn ejection off)",
            ));
        }
        if outlier.max_ejection_time < outlier.base_ejection_time {
            return Err(SettingsError::new(
                "outlier.max_ejection_time",
                format!(
                    "must be at least outlier.base_ejection_time ({})",
                    humantime::format_duration(outlier.base_ejection_time)
                ),
            ));
        }
        if outlier.max_ejection_percent > 100 {
            return Err(SettingsError::new(
                "outlier.max_ejection_percent",
                "is a percentage: 0 to 100",
            ));
        }
        let thresholds = Thresholds {
            healthy: health.healthy_threshold.unwrap_or(2),
            unhealthy: health.unhealthy_threshold.unwrap_or(3),
            protect_percent: health.protect_threshold_percent.unwrap_or(50),
        };
        for (key, value) in [
            ("health.healthy_threshold", thresholds.healthy),
            ("health.unhealthy_threshold", thresholds.unhealthy),
        ] {
            if value == 0 {
                return Err(SettingsError::new(key, "must be at least 1"));
            }
        }
        if thresholds.protect_percent > 100 {
            return Err(SettingsError::new(
                "health.protect_threshold_percent",
                "is a percentage: 0 to 100",
            ));
        }
        Ok(Self {
            balancing: balancing.policy.unwrap_or_default(),
            per_service: per_service
                .into_iter()
                .map(|(name, balancing)| (name.clone(), balancing))
                .collect(),
            outlier,
            thresholds,
        })
    }

    /// The balancing of `service`: its `[service.<name>]` key, else what
    /// it `declared` when it registered, else `[load_balancing] policy`.
    pub fn balancing(&self, service: &str, declared: Option<Balancing>) -> Balancing {
        if !self.per_service.is_empty()
            && let Some(own) = self.per_service.get(service)
        {
            return *own;
        }
        declared.unwrap_or(self.balancing)
    }
}

/// An instance's state as the registry lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceStatus {
    /// Routed.
    Healthy,
    /// Not alive, or marked down by health checks.
    Unhealthy,
    /// Ejected by the proxy for a while.
    Ejected,
}

/// One instance of a remote service: where it listens, who registered it,
/// and its liveness and load, all updated in place.
#[derive(Debug)]
pub struct Instance {
    addr: InstanceAddr,
    id: String,
    authority: Authority,
    owner: Option<IpAddr>,
    registered_at: SystemTime,
    /// The origin of the microsecond timestamps below.
    born: Instant,
    /// Last healthy heartbeat, passing check or registration: the TTL
    /// counts from here.
    last_ok_us: AtomicU64,
    /// Last sign of life of any kind: the eviction grace period counts
    /// from here.
    last_contact_us: AtomicU64,
    /// Unix milliseconds of the last heartbeat; 0: none since the start.
    last_heartbeat_ms: AtomicU64,
    /// The instance said it is unhealthy; only a healthy heartbeat undoes
    /// that.
    reported_unhealthy: AtomicBool,
    /// Marked down by consecutive failed health checks.
    checked_down: AtomicBool,
    checks: Mutex<Checks>,
    outstanding: AtomicU32,
    /// Failures in a row since the last success.
    failures: AtomicU32,
    /// Ejections so far (the multiplier of the next one's length).
    ejections: AtomicU32,
    /// End of the current or last ejection; 0: never ejected.
    ejected_until_us: AtomicU64,
    /// The proxy's idle connections to it.
    pool: Pool,
}

#[derive(Debug, Default)]
struct Checks {
    last: Option<CheckOutcome>,
    passed_in_a_row: u32,
    failed_in_a_row: u32,
}

impl Instance {
    /// A new instance at `addr`, registered by `owner` (`None`: a record
    /// from before owners were recorded, which any address may claim),
    /// alive for one TTL from now.
    pub fn new(
        addr: InstanceAddr,
        owner: Option<IpAddr>,
        registered_at: SystemTime,
    ) -> Result<Self, InvalidUri> {
        let authority = addr.authority()?;
        Ok(Self {
            pool: Pool::new(&authority),
            authority,
            id: addr.to_string(),
            addr,
            owner: owner.map(|owner| owner.to_canonical()),
            registered_at,
            born: Instant::now(),
            last_ok_us: AtomicU64::new(0),
            last_contact_us: AtomicU64::new(0),
            last_heartbeat_ms: AtomicU64::new(0),
            reported_unhealthy: AtomicBool::new(false),
            checked_down: AtomicBool::new(false),
            checks: Mutex::default(),
            outstanding: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_us: AtomicU64::new(0),
        })
    }

    /// `host:port`: unique within a service, stable across restarts.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where it listens.
    pub fn addr(&self) -> &InstanceAddr {
        &self.addr
    }

    /// Its authority, for request URIs.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The proxy's idle connections to it.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The address that registered it.
    pub fn owner(&self) -> Option<IpAddr> {
        self.owner
    }

    /// When it registered.
    pub fn registered_at(&self) -> SystemTime {
        self.registered_at
    }

    /// Whether a client at `caller` may change or remove it without
    /// registry tokens: the address that registered it, or anyone for an
    /// instance stored before owners were recorded.
    pub fn is_owned_by(&self, caller: IpAddr) -> bool {
        self.owner
            .is_none_or(|owner| owner == caller.to_canonical())
    }

    /// Requests in flight to it now.
    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.born).as_micros()).unwrap_or(u64::MAX)
    }

    fn since(&self, now: Instant, micros: &AtomicU64) -> Duration {
        let at = self.born + Duration::from_micros(micros.load(Ordering::Relaxed));
        now.saturating_duration_since(at)
    }

    /// A registration of this instance again: alive from now, its own
    /// word taken back, its failure streak and check marks forgotten (an
    /// ejection runs its course).
    pub fn refresh(&self) {
        let now = self.micros(Instant::now());
        self.last_ok_us.store(now, Ordering::Relaxed);
        self.last_contact_us.store(now, Ordering::Relaxed);
        self.reported_unhealthy.store(false, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.checked_down.store(false, Ordering::Relaxed);
        let mut checks = lock(&self.checks);
        checks.passed_in_a_row = 0;
        checks.failed_in_a_row = 0;
    }

    /// A heartbeat for this instance.
    pub fn heartbeat(&self, healthy: bool) {
        let now = self.micros(Instant::now());
        self.last_contact_us.store(now, Ordering::Relaxed);
        if healthy {
            self.last_ok_us.store(now, Ordering::Relaxed);
        }
        self.reported_unhealthy.store(!healthy, Ordering::Relaxed);
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        self.last_heartbeat_ms.store(wall, Ordering::Relaxed);
    }

    /// Records an active health check; returns whether it changed the
    /// instance's checked state (`Some(true)`: marked down, `Some(false)`:
    /// back up).
    pub fn record_check(&self, outcome: CheckOutcome, thresholds: Thresholds) -> Option<bool> {
        let ok = outcome.ok;
        if ok {
            let now = self.micros(Instant::now());
            self.last_ok_us.store(now, Ordering::Relaxed);
            self.last_contact_us.store(now, Ordering::Relaxed);
        }
        let mut checks = lock(&self.checks);
        checks.last = Some(outcome);
        let down = self.checked_down.load(Ordering::Relaxed);
        if ok {
            checks.failed_in_a_row = 0;
            checks.passed_in_a_row = checks.passed_in_a_row.saturating_add(1);
            if down && checks.passed_in_a_row >= thresholds.healthy {
                self.checked_down.store(false, Ordering::Relaxed);
                return Some(false);
            }
        } else {
            checks.passed_in_a_row = 0;
            checks.failed_in_a_row = checks.failed_in_a_row.saturating_add(1);
            if !down && checks.failed_in_a_row >= thresholds.unhealthy {
                self.checked_down.store(true, Ordering::Relaxed);
                return Some(true);
            }
        }
        None
    }

    /// The last health check.
    pub fn last_check(&self) -> Option<CheckOutcome> {
        lock(&self.checks).last.clone()
    }

    /// When the last health check finished and whether it passed: what
    /// tells one check from the next without copying its error.
    pub fn last_check_at(&self) -> Option<(SystemTime, bool)> {
        lock(&self.checks)
            .last
            .as_ref()
            .map(|last| (last.at, last.ok))
    }

    /// The last heartbeat since the start.
    pub fn last_heartbeat(&self) -> Option<SystemTime> {
        match self.last_heartbeat_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// Whether it is alive (within its TTL, not reported unhealthy), and
    /// why not.
    pub fn alive(&self, now: Instant, ttl: Duration) -> Result<(), Unavailable> {
        if self.reported_unhealthy.load(Ordering::Relaxed) {
            return Err(Unavailable::Reported);
        }
        let silent = self.since(now, &self.last_ok_us);
        if silent > ttl {
            return Err(Unavailable::Silent { silent, ttl });
        }
        Ok(())
    }

    /// Time since its last sign of life.
    pub fn silent_for(&self, now: Instant) -> Duration {
        self.since(now, &self.last_contact_us)
    }

    /// Whether the proxy ejected it and the ejection still runs.
    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until_us.load(Ordering::Relaxed);
        until != 0 && self.micros(now) < until
    }

    /// When the current ejection ends.
    fn ejected_until(&self, now: Instant) -> Option<SystemTime> {
        let until = self.ejected_until_us.load(Ordering::Relaxed);
        let left = until
            .checked_sub(self.micros(now))
            .filter(|left| *left > 0)?;
        Some(SystemTime::now() + Duration::from_micros(left))
    }

    fn is_up(&self, now: Instant) -> bool {
        !self.checked_down.load(Ordering::Relaxed) && !self.is_ejected(now)
    }

    /// Its status for the listing.
    pub fn status(&self, now: Instant, ttl: Duration) -> InstanceStatus {
        if self.is_ejected(now) {
            InstanceStatus::Ejected
        } else if self.alive(now, ttl).is_err() || self.checked_down.load(Ordering::Relaxed) {
            InstanceStatus::Unhealthy
        } else {
            InstanceStatus::Healthy
        }
    }

    /// What the listing shows of its ejections.
    pub fn ejection(&self, now: Instant) -> Ejection {
        Ejection {
            count: self.ejections.load(Ordering::Relaxed),
            until: self.ejected_until(now),
            consecutive_failures: self.failures.load(Ordering::Relaxed),
        }
    }

    /// Counts one more request in flight, until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> Outstanding {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Outstanding(self.clone())
    }
}

/// The ejection state of an instance, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct Ejection {
    /// Ejections since it registered.
    pub count: u32,
    /// When the current ejection ends; absent when it is not ejected.
    #[serde(
        serialize_with = "super::rfc3339_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub until: Option<SystemTime>,
    /// Failures in a row since its last success.
    pub consecutive_failures: u32,
}

/// A request in flight to an instance; dropping it ends the count.
#[derive(Debug)]
pub struct Outstanding(Arc<Instance>);

impl Outstanding {
    /// The instance.
    pub fn instance(&self) -> &Arc<Instance> {
        &self.0
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The instances of one service (or, later, of one version), with the
/// balancer's cursor and the protect threshold's state.
#[derive(Debug)]
pub struct InstanceSet {
    members: Vec<Arc<Instance>>,
    cursor: AtomicUsize,
    /// Whether the protect threshold is in force, so each change is logged
    /// once.
    protected: AtomicBool,
}

impl InstanceSet {
    /// A set of `members`, ordered by id.
    pub fn new(mut members: Vec<Arc<Instance>>) -> Self {
        members.sort_by(|a, b| a.id.cmp(&b.id));
        members.dedup_by(|a, b| a.id == b.id);
        Self {
            members,
            cursor: AtomicUsize::new(0),
            protected: AtomicBool::new(false),
        }
    }

    /// Every member, ordered by id.
    pub fn members(&self) -> &[Arc<Instance>] {
        &self.members
    }

    /// The member `id`.
    pub fn get(&self, id: &str) -> Option<&Arc<Instance>> {
        self.members.iter().find(|instance| instance.id == id)
    }

    /// How many members it has.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The instance a request should go to, skipping `excluded` (the one a
    /// retry failed on). `service` names the set in the protect
    /// threshold's log line.
    pub fn pick(
        &self,
        service: &str,
        now: Instant,
        ttl: Duration,
        balancing: Balancing,
        thresholds: Thresholds,
        excluded: Option<&Instance>,
    ) -> Result<&Arc<Instance>, Unavailable> {
        let usable = |instance: &&Arc<Instance>| {
            excluded.is_none_or(|excluded| !std::ptr::eq(Arc::as_ptr(instance), excluded))
        };
        let (alive, up) = self.census(now, ttl, excluded)?;
        let protect = thresholds.protects(alive - up, alive);
        if excluded.is_none() {
            self.announce_protection(service, protect, alive, alive - up);
        }
        let (count, needs_up) = if protect { (alive, false) } else { (up, true) };
        if count == 0 {
            return Err(Unavailable::Down { instances: alive });
        }
        let mut candidates = self
            .members
            .iter()
            .filter(usable)
            .filter(|instance| instance.alive(now, ttl).is_ok())
            .filter(|instance| !needs_up || instance.is_up(now));
        let chosen = match balancing {
            Balancing::RoundRobin => {
                let turn = self.cursor.fetch_add(1, Ordering::Relaxed) % count;
                candidates.nth(turn)
            }
            Balancing::LeastOutstanding if count == 1 => candidates.next(),
            Balancing::LeastOutstanding => {
                let first = random_below(count);
                let second = (first + 1 + random_below(count - 1)) % count;
                let (low, high) = (first.min(second), first.max(second));
                let at_low = candidates.nth(low);
                let at_high = candidates.nth(high - low - 1);
                // A tie goes to the one drawn first, not to the lower
                // index: the first registered must not win every tie.
                let (drawn_first, drawn_second) = if first < second {
                    (at_low, at_high)
                } else {
                    (at_high, at_low)
                };
                match (drawn_first, drawn_second) {
                    (Some(a), Some(b)) if b.outstanding() < a.outstanding() => Some(b),
                    (a, b) => a.or(b),
                }
            }
        };
        // A member that changed state between the two passes: any alive
        // one will do.
        chosen
            .or_else(|| {
                self.members
                    .iter()
                    .filter(usable)
                    .find(|instance| instance.alive(now, ttl).is_ok())
            })
            .ok_or(Unavailable::Silent {
                silent: Duration::MAX,
                ttl,
            })
    }

    /// Whether a request would be routed now, and why not.
    pub fn health(
        &self,
        now: Instant,
        ttl: Duration,
        thresholds: Thresholds,
    ) -> Result<(), Unavailable> {
        let (alive, up) = self.census(now, ttl, None)?;
        if up == 0 && !thresholds.protects(alive, alive) {
            return Err(Unavailable::Down { instances: alive });
        }
        Ok(())
    }

    /// How many members (but `excluded`) are alive, and how many of those
    /// are up; refused when none is alive.
    fn census(
        &self,
        now: Instant,
        ttl: Duration,
        excluded: Option<&Instance>,
    ) -> Result<(usize, usize), Unavailable> {
        let mut alive = 0;
        let mut up = 0;
        let mut unavailable = None;
        for instance in &self.members {
            if excluded.is_some_and(|excluded| std::ptr::eq(&**instance, excluded)) {
                continue;
            }
            match instance.alive(now, ttl) {
                Ok(()) => {
                    alive += 1;
                    up += usize::from(instance.is_up(now));
                }
                Err(why) => unavailable = Some(why),
            }
        }
        if alive == 0 {
            return Err(unavailable.unwrap_or(Unavailable::Silent {
                silent: Duration::MAX,
                ttl,
            }));
        }
        Ok((alive, up))
    }

    fn announce_protection(&self, service: &str, protect: bool, alive: usize, down: usize) {
        if self.protected.load(Ordering::Relaxed) == protect
            || self.protected.swap(protect, Ordering::Relaxed) == protect
        {
            return;
        }
        if protect {
            tracing::warn!(
                service,
                instances = alive,
                down,
                "protect threshold reached: routing to every alive instance, including those marked down or ejected"
            );
        } else {
            tracing::info!(
                service,
                instances = alive,
                down,
                "protect threshold no longer reached: routing to healthy instances only"
            );
        }
    }

    /// Records the outcome of a request to `instance`: a success ends its
    /// failure streak; a failure extends it, and ejects it once the streak
    /// reaches the policy's count, if the set may lose one more.
    pub fn record(&self, service: &str, instance: &Instance, succeeded: bool, outlier: Outlier) {
        if succeeded {
            if instance.failures.load(Ordering::Relaxed) != 0 {
                instance.failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        let failures = instance.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if outlier.consecutive_failures == 0 || failures < outlier.consecutive_failures {
            return;
        }
        let now = Instant::now();
        if instance.is_ejected(now) {
            return;
        }
        let ejected = self
            .members
            .iter()
            .filter(|member| member.is_ejected(now))
            .count();
        if !outlier.may_eject(ejected, self.members.len()) {
            return;
        }
        // An instance well behaved for a whole maximum ejection time since
        // its last one starts its count again.
        let last_end = instance.ejected_until_us.load(Ordering::Relaxed);
        let reformed = last_end != 0
            && instance.micros(now).saturating_sub(last_end)
                > u64::try_from(outlier.max_ejection_time.as_micros()).unwrap_or(u64::MAX);
        if reformed {
            instance.ejections.store(0, Ordering::Relaxed);
        }
        let count = instance.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = outlier.ejection_time(count);
        instance
            .ejected_until_us
            .store(instance.micros(now + length), Ordering::Relaxed);
        instance.failures.store(0, Ordering::Relaxed);
        tracing::warn!(
            service,
            instance = %instance.id,
            failures,
            ejections = count,
            ejected_ms = u64::try_from(length.as_millis()).unwrap_or(u64::MAX),
            "instance ejected after consecutive failures"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlier() -> Outlier {
        InstancePolicy::default().outlier
    }

    fn instance(port: u16) -> Arc<Instance> {
        let addr = InstanceAddr {
            host: "127.0.0.1".to_owned(),
            port,
        };
        Arc::new(Instance::new(addr, None, SystemTime::now()).unwrap())
    }

    fn set(n: u16) -> InstanceSet {
        InstanceSet::new((1..=n).map(instance).collect())
    }

    const TTL: Duration = Duration::from_secs(60);

    fn thresholds() -> Thresholds {
        InstancePolicy::default().thresholds
    }

    #[test]
    fn ejections_grow_with_their_count_up_to_the_cap() {
        let outlier = Outlier {
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(100),
            ..outlier()
        };
        assert_eq!(outlier.ejection_time(1), Duration::from_secs(30));
        assert_eq!(outlier.ejection_time(3), Duration::from_secs(90));
        assert_eq!(outlier.ejection_time(4), Duration::from_secs(100));
        assert_eq!(outlier.ejection_time(u32::MAX), Duration::from_secs(100));
    }

    #[test]
    fn the_ejected_share_is_capped_but_one_is_always_ejectable() {
        let outlier = Outlier {
            max_ejection_percent: 10,
            ..outlier()
        };
        assert!(outlier.may_eject(0, 3));
        assert!(!outlier.may_eject(1, 3));
        assert!(outlier.may_eject(1, 20));
        assert!(!outlier.may_eject(2, 20));
        let half = Outlier {
            max_ejection_percent: 50,
            ..outlier
        };
        assert!(half.may_eject(1, 4));
        assert!(!half.may_eject(2, 4));
    }

    #[test]
    fn the_protect_threshold_is_a_share_of_alive_instances() {
        let t = Thresholds {
            protect_percent: 50,
            ..thresholds()
        };
        assert!(!t.protects(0, 3));
        assert!(!t.protects(1, 3));
        assert!(!t.protects(1, 2));
        assert!(t.protects(2, 3));
        assert!(t.protects(1, 1));
        let off = Thresholds {
            protect_percent: 100,
            ..t
        };
        assert!(!off.protects(3, 3));
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_streak() {
        let set = set(3);
        let outlier = Outlier {
            consecutive_failures: 3,
            ..outlier()
        };
        let first = &set.members()[0];
        set.record("svc", first, false, outlier);
        set.record("svc", first, false, outlier);
        set.record("svc", first, true, outlier);
        set.record("svc", first, false, outlier);
        set.record("svc", first, false, outlier);
        assert!(!first.is_ejected(Instant::now()));
        set.record("svc", first, false, outlier);
        assert!(first.is_ejected(Instant::now()));
        assert_eq!(first.ejection(Instant::now()).count, 1);
        // 10% of 3 is one: the second is not ejected.
        let second = &set.members()[1];
        for _ in 0..3 {
            set.record("svc", second, false, outlier);
        }
        assert!(!second.is_ejected(Instant::now()));
        // The ejected one is skipped.
        for _ in 0..6 {
            let chosen = set
                .pick(
                    "svc",
                    Instant::now(),
                    TTL,
                    Balancing::RoundRobin,
                    thresholds(),
                    None,
                )
                .unwrap();
            assert_ne!(chosen.id(), first.id());
        }
    }

    #[test]
    fn an_ejection_ends_after_its_time() {
        let set = set(2);
        let outlier = Outlier {
            consecutive_failures: 1,
            base_ejection_time: Duration::from_millis(50),
            ..outlier()
        };
        let first = &set.members()[0];
        set.record("svc", first, false, outlier);
        assert!(first.is_ejected(Instant::now()));
        assert!(!first.is_ejected(Instant::now() + Duration::from_millis(60)));
    }

    #[test]
    fn round_robin_takes_each_in_turn() {
        let set = set(3);
        let mut counts = BTreeMap::new();
        for _ in 0..300 {
            let chosen = set
                .pick(
                    "svc",
                    Instant::now(),
                    TTL,
                    Balancing::RoundRobin,
                    thresholds(),
                    None,
                )
                .unwrap();
            *counts.entry(chosen.id().to_owned()).or_insert(0) += 1;
        }
        assert_eq!(
            counts.values().copied().collect::<Vec<_>>(),
            [100, 100, 100]
        );
    }

    #[test]
    fn least_outstanding_avoids_the_busy_instance() {
        let set = set(2);
        let busy = set.members()[0].clone();
        let _held: Vec<Outstanding> = (0..5).map(|_| busy.enter()).collect();
        for _ in 0..50 {
            let chosen = set
                .pick(
                    "svc",
                    Instant::now(),
                    TTL,
                    Balancing::LeastOutstanding,
                    thresholds(),
                    None,
                )
                .unwrap();
            assert_ne!(chosen.id(), busy.id());
        }
    }

    #[test]
    fn health_checks_need_consecutive_results_to_change_state() {
        let instance = instance(1);
        let t = Thresholds {
            healthy: 2,
            unhealthy: 3,
            ..thresholds()
        };
        let check = |ok| CheckOutcome {
            at: SystemTime::now(),
            ok,
            error: None,
        };
        assert_eq!(instance.record_check(check(false), t), None);
        assert_eq!(instance.record_check(check(false), t), None);
        assert_eq!(instance.record_check(check(true), t), None);
        assert_eq!(instance.record_check(check(false), t), None);
        assert_eq!(instance.record_check(check(false), t), None);
        assert_eq!(instance.record_check(check(false), t), Some(true));
        assert_eq!(
            instance.status(Instant::now(), TTL),
            InstanceStatus::Unhealthy
        );
        assert_eq!(instance.record_check(check(true), t), None);
        assert_eq!(instance.record_check(check(true), t), Some(false));
        assert_eq!(
            instance.status(Instant::now(), TTL),
            InstanceStatus::Healthy
        );
    }

    #[test]
    fn past_the_protect_threshold_every_alive_instance_is_routed() {
        let set = set(2);
        let t = thresholds();
        let down = CheckOutcome {
            at: SystemTime::now(),
            ok: false,
            error: None,
        };
        for instance in set.members() {
            for _ in 0..t.unhealthy {
                instance.record_check(down.clone(), t);
            }
        }
        let chosen = set.pick("svc", Instant::now(), TTL, Balancing::RoundRobin, t, None);
        assert!(chosen.is_ok());
        let strict = Thresholds {
            protect_percent: 100,
            ..t
        };
        let refused = set.pick(
            "svc",
            Instant::now(),
            TTL,
            Balancing::RoundRobin,
            strict,
            None,
        );
        assert_eq!(refused.unwrap_err(), Unavailable::Down { instances: 2 });
    }

    #[test]
    fn a_retry_skips_the_instance_that_failed() {
        let set = set(2);
        let first = set.members()[0].clone();
        for _ in 0..10 {
            let chosen = set
                .pick(
                    "svc",
                    Instant::now(),
                    TTL,
                    Balancing::RoundRobin,
                    thresholds(),
                    Some(&first),
                )
                .unwrap();
            assert_ne!(chosen.id(), first.id());
        }
        let single = InstanceSet::new(vec![first.clone()]);
        assert!(
            single
                .pick(
                    "svc",
                    Instant::now(),
                    TTL,
                    Balancing::RoundRobin,
                    thresholds(),
                    Some(&first)
                )
                .is_err()
        );
    }
}
