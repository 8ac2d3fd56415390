//! `GET /api/registry/services`: the whole listing, answered from cached
//! JSON, and pages and filters of it.
//!
//! At 10,000 services the listing is about 10 MB of JSON, and building it
//! per request took tens of milliseconds of the registry's runtime. The
//! whole listing is kept as serialized entries in blocks of [`BLOCK`]
//! (each entry a slice of its block), each entry remembered with the table entry it was built from and a **stamp** of
//! the state it showed: every instance's liveness and status, last
//! heartbeat, last check, requests outstanding and ejections; a plugin's
//! last check; the traffic counters; and, for the whole listing, the live
//! instance policy. A read recomputes every stamp (atomic loads, no
//! allocation but a remote instance's last check) and serializes again
//! only the entries whose stamp changed (or whose table entry was
//! replaced), copying the others' bytes into a new block only where a
//! block holds a changed entry and sharing every other block; when none
//! changed it answers the listing as built. The body is the blocks in
//! turn ([`ListingBody`]): no read copies them, so a health-status change
//! costs that entry's serialization and a copy of its block, not of the
//! 10 MB.
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

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Instant, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};

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
    built: Mutex<Option<Arc<Built>>>,
}

/// The whole listing, as built for one read and shared by the reads after
/// it while nothing it shows changes.
#[derive(Debug)]
struct Built {
    /// The policy the entries were built under (load balancing, health
    /// thresholds).
    policy: Arc<InstancePolicy>,
    /// Its entries, in the listing's order (by name).
    entries: Vec<Entry>,
    /// The entries' JSON, [`BLOCK`] entries to a buffer: what the body
    /// sends, and what each entry's `json` is a slice of.
    blocks: Vec<Bytes>,
    /// The bytes of the JSON array they make.
    length: u64,
    /// How many entries were serialized to build it (the others were
    /// reused).
    rendered: usize,
}

#[derive(Debug)]
struct Entry {
    /// The table entry (a name's versions) it was built from. Weak: a
    /// removed entry is not kept, but its allocation is, so the pointer cannot be reused by
    /// another entry while this one is compared with it.
    service: Weak<Versions>,
    /// The state it showed; `None`: it depended on the moment.
    stamp: Option<u64>,
    /// Its JSON followed by a comma (the array's separator, dropped after
    /// the last entry): a slice of its block.
    json: Bytes,
}

/// Entries per block: enough that the body is a few hundred frames (hyper
/// writes at most 16 buffers a `writev`), few enough that a change copies
/// little beside the entry it re-serializes.
const BLOCK: usize = 64;

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
            return self
                .whole(services, policy)
                .map(|body| json(Body::new(body)))
                .map_err(unwritable);
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
        body.map(|body| json(Body::from(body))).map_err(unwritable)
    }

    /// The whole listing: as last built if nothing it shows changed,
    /// else made of the unchanged entries' buffers and the changed ones
    /// serialized again.
    fn whole(
        &self,
        services: &[Arc<Versions>],
        policy: &Arc<InstancePolicy>,
    ) -> Result<ListingBody, serde_json::Error> {
        let now = Instant::now();
        let mut built = lock(&self.built);
        let previous = built
            .as_ref()
            .filter(|previous| Arc::ptr_eq(&previous.policy, policy));
        // Each service with its stamp and, if its bytes can be reused,
        // its previous buffer.
        let mut old = previous.map_or(&[][..], |previous| &previous.entries[..]);
        let plan: Vec<Planned<'_>> = services
            .iter()
            .map(|service| {
                let stamp = stamp(service, now);
                let reused = reusable(&mut old, service)
                    .filter(|entry| stamp.is_some() && entry.stamp == stamp)
                    .map(|entry| entry.json.clone());
                (service, stamp, reused)
            })
            .collect();
        if let Some(previous) = previous
            && plan.len() == previous.entries.len()
            && plan.iter().all(|(_, _, reused)| reused.is_some())
        {
            return Ok(ListingBody::new(previous.clone()));
        }
        let mut entries = Vec::with_capacity(plan.len());
        let mut blocks = Vec::with_capacity(plan.len().div_ceil(BLOCK));
        let mut rendered = 0;
        for (index, block) in plan.chunks(BLOCK).enumerate() {
            let kept = previous.and_then(|previous| previous.blocks.get(index));
            if let Some(kept) = kept.filter(|kept| is_block(kept, block)) {
                for (service, stamp, reused) in block {
                    entries.push(Entry {
                        service: Arc::downgrade(service),
                        stamp: *stamp,
                        json: reused.clone().expect("a kept block's entries are reused"),
                    });
                }
                blocks.push(kept.clone());
                continue;
            }
            let mut json = Vec::with_capacity(kept.map_or(BLOCK * ENTRY_CAPACITY, Bytes::len));
            let mut ranges = Vec::with_capacity(block.len());
            for (service, _, reused) in block {
                let begin = json.len();
                match reused {
                    Some(reused) => json.extend_from_slice(reused),
                    None => {
                        serde_json::to_writer(&mut json, &describe(service, policy))?;
                        json.push(b',');
                        rendered += 1;
                    }
                }
                ranges.push(begin..json.len());
            }
            json.shrink_to_fit();
            let json = Bytes::from(json);
            for ((service, stamp, _), range) in block.iter().zip(ranges) {
                entries.push(Entry {
                    service: Arc::downgrade(service),
                    stamp: *stamp,
                    json: json.slice(range),
                });
            }
            blocks.push(json);
        }
        let blocks_length: usize = blocks.iter().map(Bytes::len).sum();
        // `[` and `]`, less the last entry's comma.
        let length = (blocks_length + 2 - usize::from(!blocks.is_empty())) as u64;
        let fresh = Arc::new(Built {
            policy: policy.clone(),
            entries,
            blocks,
            length,
            rendered,
        });
        tracing::debug!(
            entries = fresh.entries.len(),
            rendered = fresh.rendered,
            "listing cache rebuilt"
        );
        *built = Some(fresh.clone());
        Ok(ListingBody::new(fresh))
    }
}

/// Whether `block`'s entries are all reused and are, in order, exactly the
/// block `kept` of the previous listing (so it can be sent as it is).
fn is_block(kept: &Bytes, block: &[Planned<'_>]) -> bool {
    let mut at = kept.as_ptr();
    let mut length = 0;
    for (_, _, reused) in block {
        let Some(reused) = reused else {
            return false;
        };
        if reused.as_ptr() != at {
            return false;
        }
        at = at.wrapping_add(reused.len());
        length += reused.len();
    }
    length == kept.len()
}

/// Room first given to an entry's JSON in a new block: about what one
/// remote service with one instance takes.
const ENTRY_CAPACITY: usize = 1024;

/// The body of the whole listing: `[`, each block (the last without its
/// last entry's comma), `]`, each a frame of its own, with its exact
/// length known (so it is sent with a `Content-Length`).
#[derive(Debug)]
struct ListingBody {
    built: Arc<Built>,
    /// The next frame: 0 is `[`, 1 to n the blocks, n + 1 `]`.
    next: usize,
    /// Bytes not yet sent.
    remaining: u64,
}

impl ListingBody {
    fn new(built: Arc<Built>) -> Self {
        Self {
            remaining: built.length,
            built,
            next: 0,
        }
    }
}

impl http_body::Body for ListingBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let body = self.get_mut();
        let blocks = &body.built.blocks;
        let frame = match body.next {
            0 => Bytes::from_static(b"["),
            next if next < blocks.len() => blocks[next - 1].clone(),
            next if next == blocks.len() => {
                let last = &blocks[next - 1];
                last.slice(..last.len() - 1)
            }
            next if next == blocks.len() + 1 => Bytes::from_static(b"]"),
            _ => return Poll::Ready(None),
        };
        body.next += 1;
        body.remaining -= frame.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.next > self.built.blocks.len() + 1
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// A service of a listing being built: its stamp, and its previous
/// buffer if it can be reused.
type Planned<'a> = (&'a Arc<Versions>, Option<u64>, Option<Bytes>);

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

fn json(body: Body) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, SystemTime};

    use http_body_util::BodyExt;

    use super::*;
    use crate::remote::{Instance, InstanceAddr, RemoteService, RemoteSpec};
    use crate::service::{ServiceInfo, Version};
    use crate::table::ServiceTable;

    /// A remote service `name` of one instance, fresh.
    fn remote(name: &str, port: u16) -> Arc<Service> {
        let info = ServiceInfo {
            name: name.to_owned(),
            display_name: String::new(),
            description: String::new(),
            version: "1.0.0".to_owned(),
            health_check_url: "/health".to_owned(),
            metadata: BTreeMap::new(),
            tags: Vec::new(),
            requires_auth: false,
            endpoints: Vec::new(),
        };
        let addr = InstanceAddr {
            host: "127.0.0.1".to_owned(),
            port,
        };
        let instance = Instance::new(addr, None, SystemTime::now()).expect("a valid address");
        instance.refresh();
        let version = Version::parse("1.0.0").expect("a version");
        Arc::new(Service::new(
            info.clone(),
            version,
            Backend::Remote(Arc::new(RemoteService::new(
                RemoteSpec {
                    info: Arc::new(info),
                    base_path: "/".to_owned(),
                    load_balancing: None,
                },
                vec![Arc::new(instance)],
                SystemTime::now(),
                None,
                Duration::from_secs(90),
            ))),
        ))
    }

    async fn bytes(body: ListingBody) -> Bytes {
        let length = http_body::Body::size_hint(&body).exact();
        let bytes = body.collect().await.expect("infallible").to_bytes();
        assert_eq!(length, Some(bytes.len() as u64), "the length announced");
        bytes
    }

    /// The listing serialized from scratch, as the cache must answer it.
    fn fresh(services: &[Arc<Versions>], policy: &InstancePolicy) -> Vec<u8> {
        let listed: Vec<_> = services
            .iter()
            .map(|service| describe(service, policy))
            .collect();
        serde_json::to_vec(&listed).expect("serializable")
    }

    #[tokio::test]
    async fn a_change_re_renders_only_its_entry_and_the_body_equals_a_fresh_render() {
        let table = ServiceTable::new();
        let policy = Arc::new(InstancePolicy::default());
        let listing = Listing::default();
        let empty = listing.whole(&table.list(), &policy).expect("built");
        assert_eq!(bytes(empty).await, "[]");
        // Three blocks, the last of two entries.
        let count = 2 * BLOCK + 2;
        for index in 0..count {
            let name = format!("s{index:03}");
            let port = 10_000 + u16::try_from(index).expect("a port");
            table
                .update(&name, |_| Ok::<_, ()>(vec![remote(&name, port)]))
                .expect("inserted");
        }
        let services = table.list();
        let first = listing.whole(&services, &policy).expect("built");
        assert_eq!(first.built.rendered, count);
        let before: Vec<Bytes> = first.built.blocks.clone();
        assert_eq!(before.len(), 3);
        assert_eq!(bytes(first).await, fresh(&services, &policy));

        let unchanged = listing.whole(&services, &policy).expect("built");
        let kept = lock(&listing.built).clone().expect("cached");
        assert!(
            Arc::ptr_eq(&unchanged.built, &kept),
            "nothing changed: the same listing"
        );

        // One service of the middle block reports itself unhealthy.
        let changed = BLOCK + 1;
        let Backend::Remote(remote) = &services[changed].default_version().backend else {
            panic!("a remote service");
        };
        remote.instances().members()[0].heartbeat(false);
        let second = listing.whole(&services, &policy).expect("built");
        assert_eq!(
            second.built.rendered, 1,
            "only the changed entry is serialized again"
        );
        let shared: Vec<bool> = before
            .iter()
            .zip(&second.built.blocks)
            .map(|(before, after)| before.as_ptr() == after.as_ptr())
            .collect();
        assert_eq!(shared, [true, false, true], "only its block is made again");
        let body = bytes(second).await;
        assert_eq!(body, fresh(&services, &policy));
        let listed: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(
            listed[changed]["status"], "unhealthy",
            "{}",
            listed[changed]
        );
        assert_eq!(listed[changed - 1]["status"], "healthy");
    }
}
