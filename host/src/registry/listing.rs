//! `GET /api/registry/services`: the whole listing, answered from cached
//! JSON, and pages and filters of it.
//!
//! At 10,000 services the listing is about 10 MB of JSON, and building it
//! per request took tens of milliseconds of the registry's runtime. The
//! whole listing is kept as one buffer of serialized entries, each
//! remembered with the table entry it was built from and a **stamp** of
//! the state it showed: every instance's liveness and status, last
//! heartbeat, last check, requests outstanding and ejections; a plugin's
//! last check; the traffic counters; and, for the whole buffer, the live
//! instance policy. A read recomputes every stamp (atomic loads, no
//! allocation but a remote instance's last check) and serializes again
//! only the entries whose stamp changed (or whose table entry was
//! replaced), copying the others; when none changed it answers the buffer
//! itself without a copy.
//!
//! So every field is what a listing built on read would show: the cache
//! holds an entry's text only while the state it shows has not changed.
//! An entry whose text depends on the moment itself (an instance silent
//! past its TTL, whose reason counts the seconds, or an ejected one, whose
//! ejection end is computed from the clock) has no stamp and is built on
//! every read. A field added to an entry that can change without a new
//! table entry must be added to [`stamp`].
//!
//! Pages (`limit`, `cursor`) and filters (`kind`, `status`,
//! `name_prefix`) are built on read from the entries they select: they
//! serve clients that need less than everything, and cost what they
//! select.

use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::{Listed, describe};
use crate::http::ApiError;
use crate::remote::{InstancePolicy, Status, Unavailable};
use crate::sync::lock;
use crate::table::{Backend, Service, Versions};

/// Most entries one page may ask for.
pub const MAX_PAGE: usize = 1000;

/// The query of a listing: every parameter optional; none at all is the
/// whole listing, as a JSON array.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// Entries per page (1 to [`MAX_PAGE`]): the answer is a page object.
    limit: Option<usize>,
    /// The name the previous page ended with: this page starts after it.
    cursor: Option<String>,
    /// Only services of this kind.
    kind: Option<Kind>,
    /// Only services with this status.
    status: Option<Status>,
    /// Only services whose name starts with this.
    name_prefix: Option<String>,
    /// Only services of this tenant (the admin token's, or the caller's
    /// own tenant).
    tenant: Option<String>,
}

impl ListQuery {
    /// The tenant asked for, if any.
    pub(super) fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }
}

/// A service's kind, as a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Plugin,
    Remote,
}

/// A page of the listing.
#[derive(serde::Serialize)]
struct Page<'a> {
    services: Vec<Listed<'a>>,
    /// Where the next page starts (pass it as `cursor`); `null` on the
    /// last page.
    next_cursor: Option<&'a str>,
}

/// The listing's cache: the whole listing as last built.
#[derive(Debug, Default)]
pub(super) struct Listing {
    built: Mutex<Option<Built>>,
}

#[derive(Debug)]
struct Built {
    /// The policy the entries were built under (load balancing, health
    /// thresholds).
    policy: Arc<InstancePolicy>,
    /// The JSON array.
    json: Bytes,
    /// Its entries, in the listing's order (by name).
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    /// The table entry (a name's versions) it was built from. Weak: a
    /// removed entry is not kept, but its allocation is, so the pointer cannot be reused by
    /// another entry while this one is compared with it.
    service: Weak<Versions>,
    /// The state it showed; `None`: it depended on the moment.
    stamp: Option<u64>,
    /// Its bytes in `json`.
    range: Range<usize>,
}

impl Listing {
    /// Answers a listing of the `services` (sorted by name) the caller
    /// sees (`visible`), under `policy`.
    pub(super) fn answer(
        &self,
        services: &[Arc<Versions>],
        policy: &Arc<InstancePolicy>,
        query: &ListQuery,
        visible: &dyn Fn(&Versions) -> bool,
    ) -> Result<Response, ApiError> {
        let paged = query.limit.is_some() || query.cursor.is_some();
        let filtered =
            query.kind.is_some() || query.status.is_some() || query.name_prefix.is_some();
        // The cache holds every name's entry: it answers a caller who
        // sees them all (the admin token, or any caller while there is no
        // tenant but the default one).
        if !paged && !filtered && services.iter().all(|versions| visible(versions)) {
            return self.whole(services, policy).map(json).map_err(unwritable);
        }
        let limit = match query.limit {
            Some(limit) if (1..=MAX_PAGE).contains(&limit) => limit,
            Some(limit) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("limit must be 1 to {MAX_PAGE}, not {limit}"),
                )
                .with("field", "limit")
                .with("max_limit", MAX_PAGE));
            }
            None if paged => MAX_PAGE,
            None => usize::MAX,
        };
        let start = query.cursor.as_deref().map_or(0, |cursor| {
            services.partition_point(|versions| versions.name() <= cursor)
        });
        let mut selected = services[start..]
            .iter()
            .filter(|versions| visible(versions) && selects(query, versions, policy));
        let page: Vec<&Arc<Versions>> = selected.by_ref().take(limit).collect();
        let listed: Vec<Listed<'_>> = page
            .iter()
            .map(|service| describe(service, policy))
            .collect();
        let body = if paged {
            let more = selected.next().is_some();
            serde_json::to_vec(&Page {
                services: listed,
                next_cursor: page.last().filter(|_| more).map(|last| last.name()),
            })
        } else {
            serde_json::to_vec(&listed)
        };
        body.map(|body| json(Bytes::from(body))).map_err(unwritable)
    }

    /// The whole listing: the cached buffer if nothing it shows changed,
    /// else a new one made of the unchanged entries' bytes and the
    /// changed ones serialized again.
    fn whole(
        &self,
        services: &[Arc<Versions>],
        policy: &Arc<InstancePolicy>,
    ) -> Result<Bytes, serde_json::Error> {
        let now = Instant::now();
        let mut built = lock(&self.built);
        let previous = built
            .as_ref()
            .filter(|previous| Arc::ptr_eq(&previous.policy, policy));
        // Each service with its stamp and, if its bytes can be reused,
        // where they are in the previous buffer.
        let mut old = previous.map_or(&[][..], |previous| &previous.entries[..]);
        let plan: Vec<Planned<'_>> = services
            .iter()
            .map(|service| {
                let stamp = stamp(service, now);
                let reused = reusable(&mut old, service)
                    .filter(|entry| stamp.is_some() && entry.stamp == stamp)
                    .map(|entry| entry.range.clone());
                (service, stamp, reused)
            })
            .collect();
        if let Some(previous) = previous
            && plan.len() == previous.entries.len()
            && plan.iter().all(|(_, _, reused)| reused.is_some())
        {
            return Ok(previous.json.clone());
        }
        let mut json = Vec::with_capacity(previous.map_or(0, |previous| previous.json.len()));
        let mut entries = Vec::with_capacity(plan.len());
        json.push(b'[');
        for (index, (service, stamp, reused)) in plan.into_iter().enumerate() {
            if index > 0 {
                json.push(b',');
            }
            let begin = json.len();
            match (reused, previous) {
                (Some(range), Some(previous)) => json.extend_from_slice(&previous.json[range]),
                _ => serde_json::to_writer(&mut json, &describe(service, policy))?,
            }
            entries.push(Entry {
                service: Arc::downgrade(service),
                stamp,
                range: begin..json.len(),
            });
        }
        json.push(b']');
        let json = Bytes::from(json);
        *built = Some(Built {
            policy: policy.clone(),
            json: json.clone(),
            entries,
        });
        Ok(json)
    }
}

/// A service of a listing being built: its stamp, and where its bytes
/// are in the previous buffer if they can be reused.
type Planned<'a> = (&'a Arc<Versions>, Option<u64>, Option<Range<usize>>);

/// The previous entry built from `service` itself, if any; skips, in
/// `old` (sorted by name, like the services asked for), the entries of
/// names before it.
fn reusable<'a>(old: &mut &'a [Entry], service: &Arc<Versions>) -> Option<&'a Entry> {
    while let Some((entry, rest)) = old.split_first() {
        let Some(held) = entry.service.upgrade() else {
            // Removed from the table since.
            *old = rest;
            continue;
        };
        if Arc::ptr_eq(&held, service) {
            *old = rest;
            return Some(entry);
        }
        match held.name().cmp(service.name()) {
            std::cmp::Ordering::Less => *old = rest,
            std::cmp::Ordering::Equal => {
                // Replaced by `service`.
                *old = rest;
                return None;
            }
            std::cmp::Ordering::Greater => return None,
        }
    }
    None
}

/// A stamp of everything an entry shows that changes without a new table
/// entry, over all the name's versions; `None` when the entry's text
/// depends on the moment itself.
fn stamp(versions: &Versions, now: Instant) -> Option<u64> {
    let mut stamp = Stamp::default();
    for service in versions.all() {
        stamp_version(&mut stamp, service, now)?;
    }
    Some(stamp.0)
}

/// Adds to `stamp` what one version shows; `None` when that depends on
/// the moment itself.
fn stamp_version(stamp: &mut Stamp, service: &Service, now: Instant) -> Option<()> {
    let traffic = service.traffic();
    stamp.add(traffic.requests_total());
    stamp.add(traffic.errors_total());
    stamp.add(traffic.in_flight());
    match &service.backend {
        Backend::Plugin(plugin) => {
            stamp.add_check(plugin.health.last_check().map(|check| (check.at, check.ok)));
        }
        Backend::Remote(remote) => {
            let ttl = remote.ttl();
            for instance in remote.instances().members() {
                stamp.add(match instance.alive(now, ttl) {
                    Ok(()) => 0,
                    Err(Unavailable::Reported) => 1,
                    // Its reason counts the seconds of silence.
                    Err(_) => return None,
                });
                let ejection = instance.ejection(now);
                if ejection.until.is_some() {
                    // The end it shows is computed from the clock.
                    return None;
                }
                stamp.add(instance.status(now, ttl) as u64);
                stamp.add(instance.last_heartbeat().map_or(0, unix_nanos));
                stamp.add_check(instance.last_check_at());
                stamp.add(instance.outstanding().into());
                stamp.add(ejection.count.into());
                stamp.add(ejection.consecutive_failures.into());
            }
        }
    }
    Some(())
}

/// Values folded into one number. Each step is a bijection of the state
/// for a given value and of the value for a given state, so two sequences
/// that differ in one value always end in different stamps; and it costs
/// a multiply, where a general hasher's rounds were a third of a read of
/// the whole listing.
#[derive(Debug, Default)]
struct Stamp(u64);

impl Stamp {
    fn add(&mut self, value: u64) {
        self.0 = (self.0 ^ value).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 ^= self.0 >> 29;
    }

    fn add_check(&mut self, check: Option<(std::time::SystemTime, bool)>) {
        match check {
            None => self.add(0),
            Some((at, ok)) => {
                self.add(1 + u64::from(ok));
                self.add(unix_nanos(at));
            }
        }
    }
}

fn unix_nanos(at: std::time::SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    })
}

/// Whether the name `versions` passes the filters of `query`; its status
/// is healthy while one of its versions is, as its entry shows.
fn selects(query: &ListQuery, versions: &Versions, policy: &InstancePolicy) -> bool {
    if let Some(prefix) = &query.name_prefix
        && !versions.name().starts_with(prefix.as_str())
    {
        return false;
    }
    let kind = match versions.kind() {
        "plugin" => Kind::Plugin,
        _ => Kind::Remote,
    };
    if query.kind.is_some_and(|wanted| wanted != kind) {
        return false;
    }
    query.status.is_none_or(|wanted| {
        let healthy = versions.all().iter().any(|service| {
            let status = match &service.backend {
                Backend::Plugin(plugin) => plugin.health.status(),
                Backend::Remote(remote) => remote.status(policy.thresholds),
            };
            status == Status::Healthy
        });
        let status = if healthy {
            Status::Healthy
        } else {
            Status::Unhealthy
        };
        status == wanted
    })
}

/// A listing query the registry cannot read: 400 naming what was wrong.
pub(super) fn bad_query(rejection: QueryRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        format!(
            "{}; the listing takes limit (1 to {MAX_PAGE}), cursor, kind (plugin or remote), status (healthy or unhealthy), name_prefix and tenant",
            rejection.body_text()
        ),
    )
    .with("field", "query")
}

/// A listing that could not be serialized: the host's fault, not the
/// client's.
fn unwritable(error: serde_json::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("the listing could not be written: {error}"),
    )
}

fn json(body: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        Body::from(body),
    )
        .into_response()
}
