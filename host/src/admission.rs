//! What the gateway lets through before a request reaches a service:
//! CORS preflights and headers, request rates per API key and per client
//! address, and the number of requests in flight per service.
//!
//! It owns the rate limiters' and the in-flight counters' state, and
//! nothing else. It knows services only by name.
//!
//! An [`Admission`] is built whole from the config's settings
//! ([`Admission::from_settings`], which refuses anything invalid naming
//! its key) and is immutable; the gateway loads the current one per
//! request from an `ArcSwap`, so a reload is one `store`. What must outlive
//! a reload (requests in flight, the buckets of an unchanged rate) is
//! handed from one generation to the next by [`Admission::carrying_over`].

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::{Ready, poll_fn, ready};
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::Request;
use axum::http::uri::Authority;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use serde::Deserialize;
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, Any, Cors, ExposeHeaders};
use tower_service::Service;

use crate::http::ApiError;
use crate::remote::Balancing;
use crate::service::{HTTP_METHODS, validate_name};
use crate::settings::SettingsError;
use crate::sync::lock;

/// The `[cors]` section, or a service's `[service.<name>.cors]`: which
/// browser origins may call. Reloadable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSettings {
    /// Origins allowed, each `scheme://host[:port]` exactly as browsers
    /// send it (`https://app.example`), or `["*"]` for any. Empty: CORS is
    /// off and preflights reach the service.
    #[serde(default)]
    pub allow_origins: Vec<String>,
    /// Methods allowed in a preflight (`GET`, `POST`, ...), or `["*"]`;
    /// empty: every method the service routes.
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// Request headers allowed in a preflight, or `["*"]`; empty: only
    /// the CORS-safelisted ones.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers a script may read, or `["*"]`.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Whether credentials (cookies, `Authorization`) may be sent. Not
    /// allowed with `*` in any of the lists.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight's answer.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

/// A token bucket: `requests` per `per`, bursts up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSettings {
    /// Requests allowed per period.
    pub requests: u32,
    /// The period.
    #[serde(with = "humantime_serde")]
    pub per: Duration,
    /// Requests that may come at once; default `requests`.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// The `[rate_limit]` section. Reloadable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Per authenticated API key or JWT subject.
    #[serde(default)]
    pub per_key: Option<RateSettings>,
    /// Per client IP address (IPv6: per /64).
    #[serde(default)]
    pub per_client: Option<RateSettings>,
}

/// A service's own gateway settings, `[service.<name>]`. Reloadable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// Requests in flight to this service at once; beyond, 503. Default:
    /// `gateway.max_concurrent_per_service`.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Replaces the global `[cors]` for this service (with
    /// `allow_origins = []`: no CORS for it).
    #[serde(default)]
    pub cors: Option<CorsSettings>,
    /// How requests pick among a remote service's instances
    /// (`round_robin` or `least_outstanding`); overrides the
    /// registration's choice and `[load_balancing] policy`. Compiled by
    /// [`crate::remote::InstancePolicy`], not here.
    #[serde(default)]
    pub load_balancing: Option<Balancing>,
}

/// Per-service settings by service name.
pub type ServiceSettingsByName = BTreeMap<String, ServiceSettings>;

/// How often stale rate-limiter keys and idle in-flight counters are
/// dropped (see [`spawn_housekeeping`]).
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// One generation of the admission rules, compiled from the settings, with
/// the state the rules keep.
#[derive(Debug)]
pub struct Admission {
    /// `[cors]`; `None`: off.
    global_cors: Option<CorsPolicy>,
    /// Services with a `cors` table of their own (`None`: off for them).
    service_cors: HashMap<String, Option<CorsPolicy>>,
    per_client: Option<RateLimit<IpAddr>>,
    per_key: Option<RateLimit<String>>,
    default_max_concurrent: Option<u32>,
    /// Services with a `max_concurrent` of their own.
    service_max_concurrent: HashMap<String, u32>,
    in_flight: Arc<InFlightCounts>,
}

impl Admission {
    /// Compiles and checks every admission setting: the global `cors`, the
    /// `service` tables (`max_concurrent`, `cors`), `rate_limit` and
    /// `gateway.max_concurrent_per_service`. The first invalid one is
    /// refused naming its key; nothing is shared with a running
    /// generation, so a refusal changes nothing. A reload then takes over
    /// the running generation's state with [`Admission::carrying_over`]
    /// before storing the result.
    pub fn from_settings(
        cors: &CorsSettings,
        per_service: &ServiceSettingsByName,
        rates: &RateLimitSettings,
        default_max_concurrent: Option<u32>,
    ) -> Result<Admission, SettingsError> {
        let global_cors = CorsPolicy::compile(cors, "cors")?;
        let per_client = rates
            .per_client
            .map(|rate| RateLimit::new(rate, "rate_limit.per_client"))
            .transpose()?;
        let per_key = rates
            .per_key
            .map(|rate| RateLimit::new(rate, "rate_limit.per_key"))
            .transpose()?;
        if default_max_concurrent == Some(0) {
            return Err(SettingsError::new(
                "gateway.max_concurrent_per_service",
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        let mut service_cors = HashMap::new();
        let mut service_max_concurrent = HashMap::new();
        for (name, settings) in per_service {
            validate_name(name).map_err(|error| {
                SettingsError::new(format!("service.{name}"), error.to_string())
            })?;
            match settings.max_concurrent {
                Some(0) => {
                    return Err(SettingsError::new(
                        format!("service.{name}.max_concurrent"),
                        "must be at least 1 (leave it out for the gateway's default)",
                    ));
                }
                Some(limit) => {
                    service_max_concurrent.insert(name.clone(), limit);
                }
                None => {}
            }
            if let Some(cors) = &settings.cors {
                let policy = CorsPolicy::compile(cors, &format!("service.{name}.cors"))?;
                service_cors.insert(name.clone(), policy);
            }
        }
        Ok(Admission {
            global_cors,
            service_cors,
            per_client,
            per_key,
            default_max_concurrent,
            service_max_concurrent,
            in_flight: Arc::default(),
        })
    }

    /// This generation, taking over `previous`'s state: its in-flight
    /// counts (so a reload never lets a burst past a concurrency limit: a
    /// lowered limit refuses new requests until those in flight fall below
    /// it), and the buckets of a rate that did not change (a reload does
    /// not refill them). A changed rate starts with full buckets.
    /// `previous` itself is not changed.
    pub fn carrying_over(mut self, previous: &Admission) -> Admission {
        self.in_flight = previous.in_flight.clone();
        RateLimit::carry_over(&mut self.per_client, &previous.per_client);
        RateLimit::carry_over(&mut self.per_key, &previous.per_key);
        self
    }

    /// The CORS policy of `service`: its own `cors` table if it has one,
    /// else the global `[cors]`. `None`: CORS is off for it, and
    /// preflights go to the service.
    pub fn cors(&self, service: &str) -> Option<&CorsPolicy> {
        if self.service_cors.is_empty() {
            return self.global_cors.as_ref();
        }
        match self.service_cors.get(service) {
            Some(own) => own.as_ref(),
            None => self.global_cors.as_ref(),
        }
    }

    /// Takes one request from the client's bucket and, for an
    /// authenticated caller, from the bucket of `consumer` (its API key id
    /// or JWT subject). Refused: 429 naming the limit.
    pub fn check_rate(&self, client: IpAddr, consumer: Option<&str>) -> Result<(), Refusal> {
        if let Some(limit) = &self.per_client {
            limit.check(&client_key(client), "per_client")?;
        }
        if let (Some(limit), Some(consumer)) = (&self.per_key, consumer) {
            limit.check(&consumer.to_owned(), "per_key")?;
        }
        Ok(())
    }

    /// Counts one more request in flight to `service`, until the returned
    /// [`InFlight`] is dropped. Refused, never queued, when the service's
    /// limit is reached: 503 naming it.
    pub fn enter(&self, service: &str) -> Result<InFlight, Refusal> {
        let limit = match self.service_max_concurrent.get(service) {
            Some(limit) => *limit,
            None => match self.default_max_concurrent {
                Some(limit) => limit,
                None => return Ok(InFlight(None)),
            },
        };
        let counter = self.in_flight.counter(service);
        let entered = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |count| {
            (count < limit).then_some(count + 1)
        });
        match entered {
            Ok(_) => Ok(InFlight(Some(counter))),
            Err(_) => Err(Refusal::Busy {
                service: service.to_owned(),
                limit,
            }),
        }
    }

    /// Drops the rate-limiter keys whose bucket is full again (they are
    /// indistinguishable from a key never seen) and the in-flight counters
    /// of services with nothing in flight.
    fn sweep(&self) {
        if let Some(limit) = &self.per_client {
            limit.sweep();
        }
        if let Some(limit) = &self.per_key {
            limit.sweep();
        }
        self.in_flight.prune();
    }
}

/// Sweeps the live generation every [`SWEEP_INTERVAL`], so the keyed
/// state stays bounded: a rate-limiter key is kept only while its bucket
/// is not full again (at most the rate's period after its last request)
/// plus one interval, and a service's in-flight counter only while
/// something is in flight. Runs until aborted.
pub fn spawn_housekeeping(live: Arc<ArcSwap<Admission>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            live.load().sweep();
        }
    })
}

/// The key a client address is limited under: IPv4 addresses (also written
/// as IPv4-mapped IPv6) one by one, IPv6 addresses by their /64, which one
/// host usually holds whole: keyed one by one, a single client could pick a
/// fresh address, and a fresh bucket, for every request.
fn client_key(client: IpAddr) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

/// A request the admission rules refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A rate limit is exhausted: 429 with `Retry-After`.
    RateLimited {
        /// `per_client` or `per_key`.
        limit: &'static str,
        /// The rate.
        rate: RateSettings,
        /// When the bucket will hold a request again.
        retry_after: Duration,
    },
    /// The service has its limit of requests in flight: 503 with
    /// `Retry-After: 1`.
    Busy {
        /// The service.
        service: String,
        /// Its `max_concurrent`.
        limit: u32,
    },
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (error, retry_after_s) = match self {
            Refusal::RateLimited {
                limit,
                rate,
                retry_after,
            } => {
                // Whole seconds, rounded up: a client retrying on time must
                // find a request in the bucket.
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                let seconds = seconds.max(1);
                let per = humantime::format_duration(rate.per).to_string();
                let burst = rate.burst.unwrap_or(rate.requests);
                let error = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "rate limit `{limit}` exceeded: {} requests per {per} (burst {burst}); retry in {seconds} s",
                        rate.requests
                    ),
                )
                .with("limit", limit)
                .with("requests", rate.requests)
                .with("per", per)
                .with("burst", burst)
                .with("retry_after_s", seconds);
                (error, seconds)
            }
            Refusal::Busy { service, limit } => {
                let error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "service `{service}` has {limit} requests in flight, its `max_concurrent` limit; retry"
                    ),
                )
                .with("service", service)
                .with("limit", "max_concurrent")
                .with("max_concurrent", limit)
                .with("retry_after_s", 1);
                (error, 1)
            }
        };
        let mut response = error.into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
        response
    }
}

/// One rate limit: its settings and its buckets, one per key.
#[derive(Debug)]
struct RateLimit<K: std::hash::Hash + Eq + Clone> {
    rate: RateSettings,
    buckets: Arc<DefaultKeyedRateLimiter<K>>,
}

impl<K: std::hash::Hash + Eq + Clone> RateLimit<K> {
    fn new(rate: RateSettings, key: &str) -> Result<Self, SettingsError> {
        let requests = NonZeroU32::new(rate.requests)
            .ok_or_else(|| SettingsError::new(format!("{key}.requests"), "must be at least 1"))?;
        if rate.per.is_zero() {
            return Err(SettingsError::new(
                format!("{key}.per"),
                "must be longer than zero",
            ));
        }
        let burst = match rate.burst {
            None => requests,
            Some(burst) => NonZeroU32::new(burst).ok_or_else(|| {
                SettingsError::new(
                    format!("{key}.burst"),
                    "must be at least 1 (leave it out for `requests`)",
                )
            })?,
        };
        let quota = Quota::with_period(rate.per / requests.get())
            .ok_or_else(|| {
                SettingsError::new(
                    format!("{key}.per"),
                    format!(
                        "{} requests per {} is more than one per nanosecond",
                        requests,
                        humantime::format_duration(rate.per)
                    ),
                )
            })?
            .allow_burst(burst);
        Ok(Self {
            rate,
            buckets: Arc::new(DefaultKeyedRateLimiter::keyed(quota)),
        })
    }

    fn check(&self, key: &K, limit: &'static str) -> Result<(), Refusal> {
        self.buckets
            .check_key(key)
            .map_err(|not_until| Refusal::RateLimited {
                limit,
                rate: self.rate,
                retry_after: not_until.wait_time_from(self.buckets.clock().now()),
            })
    }

    fn sweep(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }

    /// Keeps `previous`'s buckets in `next` if the rate is the same.
    fn carry_over(next: &mut Option<Self>, previous: &Option<Self>) {
        if let (Some(next), Some(previous)) = (next, previous)
            && next.rate == previous.rate
        {
            next.buckets = previous.buckets.clone();
        }
    }
}

/// Requests in flight per service name, shared by every generation of
/// [`Admission`]: the limit is the generation's, the count is not, so a
/// reload or a swap of the service neither resets nor forgets it.
#[derive(Debug, Default)]
struct InFlightCounts(Mutex<HashMap<Box<str>, Arc<AtomicU32>>>);

impl InFlightCounts {
    fn counter(&self, service: &str) -> Arc<AtomicU32> {
        let mut counters = lock(&self.0);
        if let Some(counter) = counters.get(service) {
            return counter.clone();
        }
        counters.entry(service.into()).or_default().clone()
    }

    /// Forgets the counters nobody holds: nothing in flight, and no
    /// request between lookup and increment (it would hold a clone).
    fn prune(&self) {
        lock(&self.0).retain(|_, counter| Arc::strong_count(counter) > 1);
    }
}

/// One request counted in flight to a service (or, without a limit,
/// nothing); the count drops with it.
#[derive(Debug)]
#[must_use = "the request is counted in flight only while this is held"]
pub struct InFlight(Option<Arc<AtomicU32>>);

impl InFlight {
    /// `response` with this count held until its body has been sent or
    /// dropped: a streamed answer is in flight until its last byte.
    pub fn hold_until_body_ends(self, response: Response) -> Response {
        if self.0.is_none() {
            return response;
        }
        response.map(|body| {
            Body::new(HeldBody {
                body,
                in_flight: Some(self),
            })
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(counter) = &self.0 {
            counter.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A response body that keeps its request counted in flight until the
/// body ends (or is dropped, e.g. when the client goes away).
#[derive(Debug)]
struct HeldBody {
    body: Body,
    in_flight: Option<InFlight>,
}

impl HttpBody for HeldBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(_))) => self.body.is_end_stream(),
            Poll::Ready(_) => true,
            Poll::Pending => false,
        };
        if ended {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Whether `request` is a CORS preflight: `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`. A plain `OPTIONS` is not one.
pub fn is_preflight(request: &Request) -> bool {
    request.method() == Method::OPTIONS
        && request.headers().contains_key(header::ORIGIN)
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The CORS rules of a service (or the global ones), as `tower-http`'s
/// CORS middleware applies them.
///
/// The gateway routes each request itself, so the middleware wraps a
/// service that answers nothing ([`NoAnswer`]): what the gateway takes from
/// it are the headers it computes, the whole answer to a preflight, the
/// headers that [`CorsHeaders`] adds to the answer of any other request.
#[derive(Debug, Clone)]
pub struct CorsPolicy {
    middleware: Cors<NoAnswer>,
}

impl CorsPolicy {
    /// Checks `settings` (at key path `key`) and builds the middleware;
    /// `None` when no origin is allowed (CORS off).
    fn compile(settings: &CorsSettings, key: &str) -> Result<Option<Self>, SettingsError> {
        if settings.allow_origins.is_empty() {
            let set = [
                ("allow_methods", !settings.allow_methods.is_empty()),
                ("allow_headers", !settings.allow_headers.is_empty()),
                ("expose_headers", !settings.expose_headers.is_empty()),
                ("allow_credentials", settings.allow_credentials),
                ("max_age", settings.max_age.is_some()),
            ];
            if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
                return Err(SettingsError::new(
                    format!("{key}.{field}"),
                    "has no effect: `allow_origins` is empty, so CORS is off; list the origins allowed",
                ));
            }
            return Ok(None);
        }
        let credentials = settings.allow_credentials;
        let wildcard_refused = |field: &str, index: usize| {
            SettingsError::new(
                format!("{key}.{field}[{index}]"),
                "`*` cannot be combined with `allow_credentials = true` (browsers refuse it)",
            )
        };
        let origins = match wildcard(&settings.allow_origins, key, "allow_origins")? {
            Some(index) if credentials => return Err(wildcard_refused("allow_origins", index)),
            Some(_) => AllowOrigin::any(),
            None => AllowOrigin::list(parse_each(
                &settings.allow_origins,
                key,
                "allow_origins",
                parse_origin,
            )?),
        };
        let methods = match wildcard(&settings.allow_methods, key, "allow_methods")? {
            Some(index) if credentials => return Err(wildcard_refused("allow_methods", index)),
            Some(_) => AllowMethods::any(),
            // The methods the service routes: the preflight's own is sent
            // back once the gateway checked it (see `preflight`).
            None if settings.allow_methods.is_empty() => AllowMethods::mirror_request(),
            None => AllowMethods::list(parse_each(
                &settings.allow_methods,
                key,
                "allow_methods",
                parse_method,
            )?),
        };
        let allow_headers = match wildcard(&settings.allow_headers, key, "allow_headers")? {
            Some(index) if credentials => return Err(wildcard_refused("allow_headers", index)),
            Some(_) => AllowHeaders::from(Any),
            None => AllowHeaders::list(parse_each(
                &settings.allow_headers,
                key,
                "allow_headers",
                parse_header_name,
            )?),
        };
        let expose_headers = match wildcard(&settings.expose_headers, key, "expose_headers")? {
            Some(index) if credentials => return Err(wildcard_refused("expose_headers", index)),
            Some(_) => ExposeHeaders::from(Any),
            None => ExposeHeaders::list(parse_each(
                &settings.expose_headers,
                key,
                "expose_headers",
                parse_header_name,
            )?),
        };
        let mut middleware = Cors::new(NoAnswer)
            .allow_origin(origins)
            .allow_methods(methods)
            .allow_headers(allow_headers)
            .expose_headers(expose_headers)
            .allow_credentials(credentials);
        if let Some(max_age) = settings.max_age {
            middleware = middleware.max_age(max_age);
        }
        Ok(Some(Self { middleware }))
    }

    /// The gateway's answer to a preflight (see [`is_preflight`]): the
    /// CORS headers if the origin is allowed and `routable` says the
    /// service takes the method asked for; otherwise none, which the
    /// browser takes as a refusal. Never reaches the service.
    pub async fn preflight(
        &self,
        request: Request,
        routable: impl FnOnce(&Method) -> bool,
    ) -> Response {
        let (parts, _body) = request.into_parts();
        let requested = parts
            .headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|method| Method::from_bytes(method.as_bytes()).ok());
        let routable = requested.as_ref().is_some_and(routable);
        let mut headers = self.evaluate(Request::from_parts(parts, ())).await;
        if !routable {
            headers = only_vary(&headers);
        }
        let mut response = Response::new(Body::empty());
        *response.headers_mut() = headers;
        response
    }

    /// The CORS headers for the answer to a request that is not a
    /// preflight, from its headers.
    pub async fn actual(&self, request_headers: &HeaderMap) -> CorsHeaders {
        // Only the `Origin` decides an actual request's CORS headers. The
        // head is a GET's whatever the request's method: the middleware
        // takes any OPTIONS for a preflight, and a plain OPTIONS is not.
        let mut head = Request::new(());
        if let Some(origin) = request_headers.get(header::ORIGIN) {
            head.headers_mut().insert(header::ORIGIN, origin.clone());
        }
        CorsHeaders(self.evaluate(head).await)
    }

    /// Runs the middleware on a request head: the CORS headers it answers
    /// with, only `Vary` for an origin it does not allow.
    async fn evaluate(&self, head: Request<()>) -> HeaderMap {
        let mut middleware = self.middleware.clone();
        let Ok(()) = poll_fn(|cx| middleware.poll_ready(cx)).await;
        let Ok(response) = middleware.call(head).await;
        let headers = response.into_parts().0.headers;
        if headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
            headers
        } else {
            only_vary(&headers)
        }
    }
}

/// The `Vary` headers of `headers`, and nothing else: an origin that is
/// not allowed gets no CORS header at all, but a cache must still know the
/// answer depends on the `Origin`.
fn only_vary(headers: &HeaderMap) -> HeaderMap {
    let mut vary = HeaderMap::new();
    for value in headers.get_all(header::VARY) {
        vary.append(header::VARY, value.clone());
    }
    vary
}

/// The CORS headers for one answer.
#[derive(Debug)]
pub struct CorsHeaders(HeaderMap);

impl CorsHeaders {
    /// Adds the headers to `response`. The gateway speaks for the service:
    /// CORS headers the service set itself are replaced (or removed, for
    /// an origin the gateway does not allow); `Vary` is added to.
    pub fn apply_to(self, response: &mut Response) {
        let answer = response.headers_mut();
        for name in [
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
        ] {
            answer.remove(name);
        }
        let mut name = None;
        for (next, value) in self.0 {
            name = next.or(name);
            let Some(name) = &name else { continue };
            if *name == header::VARY {
                answer.append(name, value);
            } else {
                answer.insert(name, value);
            }
        }
    }
}

/// The service tower-http's CORS middleware wraps in the gateway: an
/// empty answer for the middleware to add its headers to.
#[derive(Debug, Clone, Copy)]
struct NoAnswer;

impl Service<Request<()>> for NoAnswer {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        ready(Ok(Response::new(())))
    }
}

/// The index of `*` in a list, if it is there; `*` must then be alone.
fn wildcard(list: &[String], key: &str, field: &str) -> Result<Option<usize>, SettingsError> {
    let Some(index) = list.iter().position(|item| item == "*") else {
        return Ok(None);
    };
    if list.len() > 1 {
        return Err(SettingsError::new(
            format!("{key}.{field}[{index}]"),
            "`*` allows everything and must be the only entry",
        ));
    }
    Ok(Some(index))
}

/// An origin as browsers send it: `scheme://host[:port]`, lower case, no
/// path, no default port.
fn parse_origin(origin: &str) -> Result<HeaderValue, String> {
    let shape = || format!("`{origin}` is not `*` or an origin `scheme://host[:port]`");
    let (scheme, authority) = origin.split_once("://").ok_or_else(shape)?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if authority.contains(['/', '?', '#']) {
        return Err(format!(
            "`{origin}` has a path; an origin is only `scheme://host[:port]`"
        ));
    }
    if authority.contains('@') {
        return Err(format!("`{origin}` has user info; an origin has none"));
    }
    if authority.contains('*') {
        return Err(format!(
            "`{origin}`: wildcards inside an origin are not supported; list each origin, or `*` alone"
        ));
    }
    let parsed: Authority = authority.parse().map_err(|_| shape())?;
    // Rebuilt from its parts, the authority must come out the same: no
    // empty or out-of-range port, no leading zeros.
    let rebuilt = match parsed.port_u16() {
        Some(port) => format!("{}:{port}", parsed.host()),
        None => parsed.host().to_owned(),
    };
    if !scheme_ok || rebuilt != authority || parsed.host().is_empty() {
        return Err(shape());
    }
    if origin != origin.to_ascii_lowercase() {
        return Err(format!(
            "`{origin}`: browsers send origins in lower case, write `{}`",
            origin.to_ascii_lowercase()
        ));
    }
    let default_port = match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    };
    if parsed.port_u16().is_some() && parsed.port_u16() == default_port {
        return Err(format!(
            "`{origin}`: browsers leave the default port out, write `{scheme}://{}`",
            parsed.host()
        ));
    }
    HeaderValue::from_str(origin).map_err(|_| shape())
}

/// A method the gateway routes (see [`HTTP_METHODS`]).
fn parse_method(method: &str) -> Result<Method, String> {
    if HTTP_METHODS.contains(&method) {
        return Method::from_bytes(method.as_bytes()).map_err(|error| error.to_string());
    }
    let upper = method.to_ascii_uppercase();
    if HTTP_METHODS.contains(&upper.as_str()) {
        return Err(format!(
            "`{method}`: methods are case-sensitive, write `{upper}`"
        ));
    }
    Err(format!(
        "`{method}` is not a method the gateway routes ({})",
        HTTP_METHODS.join(", ")
    ))
}

fn parse_header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{name}` is not a valid header name"))
}

/// Every entry of `key.field` parsed, the first refused one named by its
/// index (`key.field[index]`).
fn parse_each<T>(
    list: &[String],
    key: &str,
    field: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, SettingsError> {
    list.iter()
        .enumerate()
        .map(|(index, entry)| {
            parse(entry)
                .map_err(|reason| SettingsError::new(format!("{key}.{field}[{index}]"), reason))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str]) -> CorsSettings {
        CorsSettings {
            allow_origins: origins.iter().map(|origin| (*origin).to_owned()).collect(),
            ..CorsSettings::default()
        }
    }

    fn build(
        cors: &CorsSettings,
        services: &ServiceSettingsByName,
        rates: &RateLimitSettings,
        default_max_concurrent: Option<u32>,
    ) -> Result<Admission, SettingsError> {
        Admission::from_settings(cors, services, rates, default_max_concurrent)
    }

    fn refused(cors_settings: &CorsSettings) -> SettingsError {
        build(
            cors_settings,
            &ServiceSettingsByName::new(),
            &RateLimitSettings::default(),
            None,
        )
        .expect_err("refused")
    }

    fn rate(requests: u32, per: Duration, burst: Option<u32>) -> RateSettings {
        RateSettings {
            requests,
            per,
            burst,
        }
    }

    fn request(method: Method, headers: &[(&str, &str)]) -> Request {
        let mut request = Request::new(Body::empty());
        *request.method_mut() = method;
        for (name, value) in headers {
            request.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        request
    }

    fn preflight_from(origin: &str) -> Request {
        request(
            Method::OPTIONS,
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
            ],
        )
    }

    #[test]
    fn the_documented_example_parses_and_compiles() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Sections {
            gateway: toml::Table,
            cors: CorsSettings,
            rate_limit: RateLimitSettings,
            service: ServiceSettingsByName,
        }
        let doc = include_str!("../../docs/GATEWAY_ADMISSION.md");
        let example = doc
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("a TOML example in GATEWAY_ADMISSION.md");
        let sections: Sections = toml::from_str(example).expect("the example parses");
        let default_max_concurrent = sections.gateway["max_concurrent_per_service"]
            .as_integer()
            .and_then(|limit| u32::try_from(limit).ok());
        let admission = build(
            &sections.cors,
            &sections.service,
            &sections.rate_limit,
            default_max_concurrent,
        )
        .expect("the example is valid");
        assert!(admission.cors("legacy").is_none());
        assert!(admission.cors("other").is_some());
        assert_eq!(admission.service_max_concurrent["hello"], 8);
        assert_eq!(
            sections.rate_limit.per_client,
            Some(rate(100, Duration::from_secs(60), Some(20)))
        );
    }

    #[test]
    fn nothing_configured_admits_everything() {
        let admission = build(
            &CorsSettings::default(),
            &ServiceSettingsByName::new(),
            &RateLimitSettings::default(),
            None,
        )
        .unwrap();
        assert!(admission.cors("hello").is_none());
        for _ in 0..1000 {
            assert_eq!(
                admission.check_rate([127, 0, 0, 1].into(), Some("k")),
                Ok(())
            );
        }
        let held: Vec<InFlight> = (0..1000)
            .map(|_| admission.enter("hello").unwrap())
            .collect();
        assert!(held.iter().all(|in_flight| in_flight.0.is_none()));
    }

    #[test]
    fn origins_must_be_exactly_what_browsers_send() {
        for (origin, why) in [
            ("https://app.example/", "has a path"),
            ("https://app.example/x", "has a path"),
            ("app.example", "is not `*` or an origin"),
            ("null", "is not `*` or an origin"),
            ("https://", "is not `*` or an origin"),
            ("https://App.example", "write `https://app.example`"),
            ("https://app.example:443", "write `https://app.example`"),
            ("http://app.example:80", "write `http://app.example`"),
            ("https://*.example", "wildcards inside an origin"),
            ("https://user@app.example", "user info"),
            ("https://app.example:99999", "is not `*` or an origin"),
        ] {
            let error = refused(&cors(&["https://ok.example", origin]));
            assert_eq!(error.key, "cors.allow_origins[1]", "{origin}");
            assert!(error.reason.contains(why), "{origin}: {error}");
        }
        for origin in [
            "https://app.example",
            "http://localhost:3000",
            "https://[::1]:8443",
            "chrome-extension://abcdef",
        ] {
            let admission = build(
                &cors(&[origin]),
                &ServiceSettingsByName::new(),
                &RateLimitSettings::default(),
                None,
            );
            assert!(admission.is_ok(), "{origin}: {admission:?}");
        }
    }

    #[test]
    fn a_wildcard_is_alone_and_never_with_credentials() {
        let error = refused(&cors(&["https://a.example", "*"]));
        assert_eq!(error.key, "cors.allow_origins[1]");
        assert!(error.reason.contains("only entry"), "{error}");
        let mut settings = cors(&["*"]);
        settings.allow_credentials = true;
        let error = refused(&settings);
        assert_eq!(error.key, "cors.allow_origins[0]");
        assert!(error.reason.contains("allow_credentials"), "{error}");
        let mut settings = cors(&["https://a.example"]);
        settings.allow_credentials = true;
        settings.allow_headers = vec!["*".to_owned()];
        assert_eq!(refused(&settings).key, "cors.allow_headers[0]");
        settings.allow_headers.clear();
        settings.expose_headers = vec!["*".to_owned()];
        assert_eq!(refused(&settings).key, "cors.expose_headers[0]");
        settings.expose_headers.clear();
        settings.allow_methods = vec!["*".to_owned()];
        assert_eq!(refused(&settings).key, "cors.allow_methods[0]");
    }

    #[test]
    fn methods_and_header_names_are_checked() {
        let mut settings = cors(&["https://a.example"]);
        settings.allow_methods = vec!["GET".to_owned(), "post".to_owned()];
        let error = refused(&settings);
        assert_eq!(error.key, "cors.allow_methods[1]");
        assert!(error.reason.contains("write `POST`"), "{error}");
        settings.allow_methods = vec!["TRACE".to_owned()];
        let error = refused(&settings);
        assert_eq!(error.key, "cors.allow_methods[0]");
        assert!(
            error.reason.contains("not a method the gateway routes"),
            "{error}"
        );
        settings.allow_methods.clear();
        settings.allow_headers = vec!["content-type".to_owned(), "bad header".to_owned()];
        let error = refused(&settings);
        assert_eq!(error.key, "cors.allow_headers[1]");
        settings.allow_headers.clear();
        settings.expose_headers = vec!["x:y".to_owned()];
        assert_eq!(refused(&settings).key, "cors.expose_headers[0]");
    }

    #[test]
    fn settings_without_origins_are_refused_as_ineffective() {
        let settings = CorsSettings {
            allow_methods: vec!["GET".to_owned()],
            ..CorsSettings::default()
        };
        let error = refused(&settings);
        assert_eq!(error.key, "cors.allow_methods");
        assert!(error.reason.contains("allow_origins"), "{error}");
    }

    #[test]
    fn service_tables_are_checked_with_their_key_path() {
        let with = |name: &str, settings: ServiceSettings| {
            build(
                &CorsSettings::default(),
                &ServiceSettingsByName::from([(name.to_owned(), settings)]),
                &RateLimitSettings::default(),
                None,
            )
        };
        let error = with("Hello", ServiceSettings::default()).unwrap_err();
        assert_eq!(error.key, "service.Hello");
        let error = with(
            "hello",
            ServiceSettings {
                max_concurrent: Some(0),
                cors: None,
                load_balancing: None,
            },
        )
        .unwrap_err();
        assert_eq!(error.key, "service.hello.max_concurrent");
        let error = with(
            "hello",
            ServiceSettings {
                max_concurrent: None,
                cors: Some(cors(&["https://a.example", "https://b.example", "ftp:/x"])),
                load_balancing: None,
            },
        )
        .unwrap_err();
        assert_eq!(error.key, "service.hello.cors.allow_origins[2]");
        assert_eq!(
            error.to_string(),
            "service.hello.cors.allow_origins[2]: `ftp:/x` is not `*` or an origin `scheme://host[:port]`"
        );
        let error = build(
            &CorsSettings::default(),
            &ServiceSettingsByName::new(),
            &RateLimitSettings::default(),
            Some(0),
        )
        .unwrap_err();
        assert_eq!(error.key, "gateway.max_concurrent_per_service");
    }

    #[test]
    fn rates_must_be_positive() {
        let with = |per_client| {
            build(
                &CorsSettings::default(),
                &ServiceSettingsByName::new(),
                &RateLimitSettings {
                    per_client: Some(per_client),
                    per_key: None,
                },
                None,
            )
        };
        let second = Duration::from_secs(1);
        assert_eq!(
            with(rate(0, second, None)).unwrap_err().key,
            "rate_limit.per_client.requests"
        );
        assert_eq!(
            with(rate(1, Duration::ZERO, None)).unwrap_err().key,
            "rate_limit.per_client.per"
        );
        assert_eq!(
            with(rate(1, second, Some(0))).unwrap_err().key,
            "rate_limit.per_client.burst"
        );
        let error = with(rate(10, Duration::from_nanos(5), None)).unwrap_err();
        assert_eq!(error.key, "rate_limit.per_client.per");
        assert!(error.reason.contains("per nanosecond"), "{error}");
        let error = build(
            &CorsSettings::default(),
            &ServiceSettingsByName::new(),
            &RateLimitSettings {
                per_client: None,
                per_key: Some(rate(0, second, None)),
            },
            None,
        )
        .unwrap_err();
        assert_eq!(error.key, "rate_limit.per_key.requests");
    }

    #[tokio::test]
    async fn a_preflight_from_an_allowed_origin_gets_the_configured_headers() {
        let mut settings = cors(&["https://app.example"]);
        settings.allow_methods = vec!["GET".to_owned(), "POST".to_owned()];
        settings.allow_headers = vec!["content-type".to_owned(), "x-api-key".to_owned()];
        settings.max_age = Some(Duration::from_secs(600));
        settings.allow_credentials = true;
        let admission = build(
            &settings,
            &ServiceSettingsByName::new(),
            &RateLimitSettings::default(),
            None,
        )
        .unwrap();
        let policy = admission.cors("any").expect("global CORS");
        let preflight = preflight_from("https://app.example");
        assert!(is_preflight(&preflight));
        let answer = policy.preflight(preflight, |_| true).await;
        let headers = answer.headers();
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://app.example"
        );
        assert_eq!(headers["access-control-allow-methods"], "GET,POST");
        assert_eq!(
            headers["access-control-allow-headers"],
            "content-type,x-api-key"
        );
        assert_eq!(headers["access-control-max-age"], "600");
        assert_eq!(headers["access-control-allow-credentials"], "true");
        assert!(headers["vary"].to_str().unwrap().contains("origin"));

        let refused = policy
            .preflight(preflight_from("https://evil.example"), |_| true)
            .await;
        assert!(
            refused.headers().keys().all(|name| name == header::VARY),
            "{:?}",
            refused.headers()
        );
    }

    #[tokio::test]
    async fn without_a_method_list_a_preflight_is_allowed_what_the_service_routes() {
        let admission = build(
            &cors(&["*"]),
            &ServiceSettingsByName::new(),
            &RateLimitSettings::default(),
            None,
        )
        .unwrap();
        let policy = admission.cors("svc").unwrap();
        let answer = policy
            .preflight(preflight_from("https://a.example"), |method| {
                method == Method::POST
            })
            .await;
        assert_eq!(answer.headers()["access-control-allow-origin"], "*");
        assert_eq!(answer.headers()["access-control-allow-methods"], "POST");
        let answer = policy
            .preflight(preflight_from("https://a.example"), |method| {
                method == Method::GET
            })
            .await;
        assert!(!answer.headers().contains_key("access-control-allow-origin"));
    }

    #[tokio::test]
    async fn a_service_table_replaces_the_global_cors() {
        let services = ServiceSettingsByName::from([
            (
                "own".to_owned(),
                ServiceSettings {
                    max_concurrent: None,
                    cors: Some(cors(&["https://own.example"])),
                    load_balancing: None,
                },
            ),
            (
                "off".to_owned(),
                ServiceSettings {
                    max_concurrent: None,
                    cors: Some(CorsSettings::default()),
                    load_balancing: None,
                },
            ),
            (
                "limited".to_owned(),
                ServiceSettings {
                    max_concurrent: Some(1),
                    cors: None,
                    load_balancing: None,
                },
            ),
        ]);
        let admission = build(
            &cors(&["https://global.example"]),
            &services,
            &RateLimitSettings::default(),
            None,
        )
        .unwrap();
        assert!(admission.cors("off").is_none());
        for (service, allowed, refused) in [
            ("own", "https://own.example", "https://global.example"),
            ("limited", "https://global.example", "https://own.example"),
            ("other", "https://global.example", "https://own.example"),
        ] {
            let policy = admission.cors(service).unwrap();
            let answer = policy.preflight(preflight_from(allowed), |_| true).await;
            assert_eq!(answer.headers()["access-control-allow-origin"], allowed);
            let answer = policy.preflight(preflight_from(refused), |_| true).await;
            assert!(!answer.headers().contains_key("access-control-allow-origin"));
        }
    }

    #[tokio::test]
    async fn an_answer_gets_the_gateways_cors_headers_in_place_of_the_services() {
        let mut settings = cors(&["https://app.example"]);
        settings.expose_headers = vec!["x-request-id".to_owned()];
        let admission = build(
            &settings,
            &ServiceSettingsByName::new(),
            &RateLimitSettings::default(),
            None,
        )
        .unwrap();
        let policy = admission.cors("svc").unwrap();
        let service_answer = || {
            let mut response = Response::new(Body::empty());
            response
                .headers_mut()
                .insert("access-control-allow-origin", HeaderValue::from_static("*"));
            response
                .headers_mut()
                .insert(header::VARY, HeaderValue::from_static("accept"));
            response
        };

        let get = request(Method::GET, &[("origin", "https://app.example")]);
        assert!(!is_preflight(&get));
        let headers = policy.actual(get.headers()).await;
        let mut answer = service_answer();
        headers.apply_to(&mut answer);
        assert_eq!(
            answer.headers()["access-control-allow-origin"],
            "https://app.example"
        );
        assert_eq!(
            answer.headers()["access-control-expose-headers"],
            "x-request-id"
        );
        let vary: Vec<_> = answer.headers().get_all(header::VARY).iter().collect();
        assert_eq!(vary.len(), 2, "{vary:?}");

        let headers = policy
            .actual(request(Method::GET, &[("origin", "https://evil.example")]).headers())
            .await;
        let mut answer = service_answer();
        headers.apply_to(&mut answer);
        assert!(!answer.headers().contains_key("access-control-allow-origin"));
        assert!(
            !answer
                .headers()
                .contains_key("access-control-expose-headers")
        );

        // A plain OPTIONS is no preflight: it goes to the service, and its
        // answer gets the headers of an actual request.
        let options = request(Method::OPTIONS, &[("origin", "https://app.example")]);
        assert!(!is_preflight(&options));
        let mut answer = service_answer();
        policy.actual(options.headers()).await.apply_to(&mut answer);
        assert_eq!(
            answer.headers()["access-control-allow-origin"],
            "https://app.example"
        );
        assert_eq!(
            answer.headers()["access-control-expose-headers"],
            "x-request-id"
        );
    }

    #[test]
    fn a_client_gets_its_burst_then_429_with_the_wait() {
        let admission = build(
            &CorsSettings::default(),
            &ServiceSettingsByName::new(),
            &RateLimitSettings {
                per_client: Some(rate(3, Duration::from_secs(60), None)),
                per_key: Some(rate(1, Duration::from_secs(60), Some(2))),
            },
            None,
        )
        .unwrap();
        let alice: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..3 {
            assert_eq!(admission.check_rate(alice, None), Ok(()));
        }
        let Err(Refusal::RateLimited {
            limit, retry_after, ..
        }) = admission.check_rate(alice, None)
        else {
            panic!("the 4th request must be refused");
        };
        assert_eq!(limit, "per_client");
        assert!(
            retry_after > Duration::from_secs(15) && retry_after <= Duration::from_secs(20),
            "{retry_after:?}"
        );
        // Another client has a bucket of its own; a key its own too.
        let bob: IpAddr = [10, 0, 0, 2].into();
        assert_eq!(admission.check_rate(bob, Some("ci")), Ok(()));
        assert_eq!(
            admission.check_rate([10, 0, 0, 3].into(), Some("ci")),
            Ok(())
        );
        let refused = admission.check_rate([10, 0, 0, 4].into(), Some("ci"));
        assert!(
            matches!(
                refused,
                Err(Refusal::RateLimited {
                    limit: "per_key",
                    ..
                })
            ),
            "{refused:?}"
        );

        let response = refused.unwrap_err().into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let seconds: u64 = response.headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&seconds), "{seconds}");
    }

    #[test]
    fn ipv6_clients_share_their_64_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        let retry = |retry_after| {
            Refusal::RateLimited {
                limit: "per_client",
                rate: rate(1, Duration::from_secs(1), None),
                retry_after,
            }
            .into_response()
            .headers()[header::RETRY_AFTER]
                .clone()
        };
        assert_eq!(retry(Duration::ZERO), "1");
        assert_eq!(retry(Duration::from_millis(1)), "1");
        assert_eq!(retry(Duration::from_millis(1001)), "2");
        assert_eq!(retry(Duration::from_secs(3)), "3");
    }

    fn limited(per_service: Option<u32>, default: Option<u32>) -> Admission {
        build(
            &CorsSettings::default(),
            &ServiceSettingsByName::from([(
                "svc".to_owned(),
                ServiceSettings {
                    max_concurrent: per_service,
                    cors: None,
                    load_balancing: None,
                },
            )]),
            &RateLimitSettings::default(),
            default,
        )
        .unwrap()
    }

    #[test]
    fn requests_in_flight_are_limited_per_service() {
        let admission = limited(Some(2), Some(1));
        let first = admission.enter("svc").unwrap();
        let _second = admission.enter("svc").unwrap();
        assert_eq!(
            admission.enter("svc").unwrap_err(),
            Refusal::Busy {
                service: "svc".to_owned(),
                limit: 2
            }
        );
        // Other services have the default, and counts of their own.
        let _other = admission.enter("other").unwrap();
        assert!(admission.enter("other").is_err());
        drop(first);
        let _third = admission.enter("svc").unwrap();
        let response = admission.enter("svc").unwrap_err().into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn a_reload_keeps_the_counts_in_flight_and_unchanged_buckets() {
        let rates = RateLimitSettings {
            per_client: Some(rate(1, Duration::from_secs(60), None)),
            per_key: None,
        };
        let services = |limit| {
            ServiceSettingsByName::from([(
                "svc".to_owned(),
                ServiceSettings {
                    max_concurrent: Some(limit),
                    cors: None,
                    load_balancing: None,
                },
            )])
        };
        let client: IpAddr = [10, 0, 0, 1].into();
        let old = build(&CorsSettings::default(), &services(3), &rates, None).unwrap();
        let held: Vec<InFlight> = (0..3).map(|_| old.enter("svc").unwrap()).collect();
        assert_eq!(old.check_rate(client, None), Ok(()));

        // Lowered to 2 with 3 in flight: refused until fewer than 2 remain.
        let new = build(&CorsSettings::default(), &services(2), &rates, None)
            .unwrap()
            .carrying_over(&old);
        drop(old);
        assert!(new.enter("svc").is_err());
        assert!(
            new.check_rate(client, None).is_err(),
            "the bucket was refilled"
        );
        let mut held = held;
        held.pop();
        assert!(new.enter("svc").is_err());
        held.pop();
        let _entered = new.enter("svc").unwrap();

        // A changed rate starts with full buckets.
        let faster = RateLimitSettings {
            per_client: Some(rate(2, Duration::from_secs(60), None)),
            per_key: None,
        };
        let newer = build(&CorsSettings::default(), &services(2), &faster, None)
            .unwrap()
            .carrying_over(&new);
        assert_eq!(newer.check_rate(client, None), Ok(()));
    }

    #[test]
    fn the_sweep_forgets_idle_counters_only() {
        let admission = limited(Some(1), None);
        let held = admission.enter("svc").unwrap();
        drop(admission.enter("svc"));
        admission.sweep();
        assert_eq!(lock(&admission.in_flight.0).len(), 1);
        assert!(admission.enter("svc").is_err(), "the count survived");
        drop(held);
        admission.sweep();
        assert!(lock(&admission.in_flight.0).is_empty());
        let _again = admission.enter("svc").unwrap();
    }

    #[tokio::test]
    async fn a_held_body_counts_until_it_ends() {
        use http_body_util::BodyExt as _;
        let admission = limited(Some(1), None);
        let in_flight = admission.enter("svc").unwrap();
        let response = in_flight.hold_until_body_ends(Response::new(Body::from("abc")));
        assert!(admission.enter("svc").is_err());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "abc");
        let in_flight = admission.enter("svc").unwrap();
        let response = in_flight.hold_until_body_ends(Response::new(Body::from("abc")));
        drop(response);
        assert!(admission.enter("svc").is_ok());
    }
}
