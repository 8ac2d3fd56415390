//! The registry API driven through its router, without a socket: whatever
//! a client sends, it never earns a 5xx, and nothing changes unless the
//! answer says it was accepted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode};
use proptest::prelude::*;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::egress::{DEFAULT_ALLOWED, EgressPolicy, LoopGuard};

fn open(dir: &std::path::Path) -> Router {
    open_on(dir, Arc::new(ServiceTable::new()))
}

/// A registry router writing to `services`.
fn open_on(dir: &std::path::Path, services: Arc<ServiceTable>) -> Router {
    unconnected_on(dir, services).layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))))
}

/// The registry's router on a fresh store in `dir`, before the layer that
/// says which address a request comes from.
fn unconnected(dir: &std::path::Path) -> Router {
    unconnected_on(dir, Arc::new(ServiceTable::new()))
}

/// [`unconnected`], writing to `services`.
fn unconnected_on(dir: &std::path::Path, services: Arc<ServiceTable>) -> Router {
    let registry = Registry::open(
        services,
        RegistryConfig {
            store: StoreSettings::embedded(dir.join("registry.redb")),
            policy: Policy {
                heartbeat_interval: Duration::from_secs(30),
                ttl: Duration::from_secs(90),
                check_interval: Duration::from_secs(10),
                check_timeout: Duration::from_secs(5),
                evict_after: Duration::from_secs(3600),
            },
            max_body_bytes: 64 * 1024,
            body_timeout: Duration::from_secs(5),
            max_stored_bytes: 1024 * 1024,
            max_instances: 8,
            max_versions: 4,
            instances: Arc::default(),
            egress: Arc::new(
                EgressPolicy::new(DEFAULT_ALLOWED.iter().map(|n| n.parse().unwrap()).collect())
                    .with_own_listeners(
                        "127.0.0.1:8000".parse().unwrap(),
                        "127.0.0.1:8001".parse().unwrap(),
                    ),
            ),
            loop_guard: LoopGuard::new(),
            tokens: Arc::default(),
            authenticator: Arc::new(ArcSwap::from_pointee(
                crate::auth::Authenticator::from_settings(&Default::default(), &Arc::default())
                    .expect("no credentials are valid settings"),
            )),
            managed_keys: Arc::default(),
            gateway_addr: "127.0.0.1:8000".parse().unwrap(),
            trust_tenant_header: false,
        },
    )
    .expect("registry opens");
    router(registry, Router::new())
}

async fn call(router: &Router, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
    call_with(router, "POST", path, body).await
}

async fn call_with(
    router: &Router,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::from(body))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn listing(router: &Router) -> Value {
    let request = Request::get("/api/registry/services")
        .body(Body::empty())
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let mut listed: Value = serde_json::from_slice(&bytes).unwrap();
    // Liveness timestamps move by themselves; what was registered does not.
    for service in listed.as_array_mut().into_iter().flatten() {
        if let Some(service) = service.as_object_mut() {
            service.retain(|key, _| !key.starts_with("last_") && key != "instances");
        }
    }
    listed
}

/// JSON values shaped like registrations: the real field names with
/// values of any type, some valid, most not. Host values are limited to
/// literals and `localhost`, so no case waits on DNS.
fn body() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u32..70000).prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "[a-z0-9-]{0,12}".prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::from),
        Just(json!("/health")),
        Just(json!("127.0.0.1")),
        Just(json!("localhost")),
        Just(json!("169.254.169.254")),
        Just(json!("1.0.0")),
        Just(json!("GET")),
    ];
    let value = leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    });
    let field = prop_oneof![
        Just("name"),
        Just("version"),
        Just("host"),
        Just("port"),
        Just("base_path"),
        Just("health_check_url"),
        Just("endpoints"),
        Just("tags"),
        Just("metadata"),
        Just("requires_auth"),
        Just("service_id"),
        Just("status"),
        Just("weights"),
        Just("sticky"),
    ];
    prop_oneof![
        prop::collection::btree_map(field, value.clone(), 0..10).prop_map(|map| Value::Object(
            map.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
        )),
        value,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn no_body_earns_a_5xx_or_changes_anything_unless_accepted(
        bodies in prop::collection::vec(
            prop_oneof![
                body().prop_map(|value| value.to_string().into_bytes()),
                prop::collection::vec(any::<u8>(), 0..64),
            ],
            1..6,
        ),
        endpoints in prop::collection::vec(
            prop_oneof![
                Just("/api/registry/register"),
                Just("/api/registry/heartbeat"),
                Just("/api/registry/deregister/x"),
            ],
            6,
        ),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let router = open(dir.path());
            for (body, path) in bodies.into_iter().zip(endpoints) {
                let before = listing(&router).await;
                let (status, answer) = call(&router, path, body).await;
                prop_assert!(!status.is_server_error(), "{path}: {status} {answer}");
                if !status.is_success() {
                    prop_assert!(answer["error"].is_string(), "{path}: {status} {answer}");
                    prop_assert_eq!(listing(&router).await, before, "{} refused with {} yet changed state", path, status);
                }
            }
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn no_split_body_earns_a_5xx_or_changes_anything_unless_accepted(
        bodies in prop::collection::vec(
            prop_oneof![
                body().prop_map(|value| value.to_string().into_bytes()),
                prop::collection::btree_map(
                    prop_oneof![Just("1.0.0"), Just("2.0.0"), Just("2"), Just("x"), Just("")],
                    prop_oneof![any::<i64>().prop_map(Value::from), any::<f64>().prop_map(|f| json!(f)), Just(json!("1"))],
                    0..3,
                )
                .prop_map(|weights| json!({"weights": weights}).to_string().into_bytes()),
                prop::collection::vec(any::<u8>(), 0..64),
            ],
            1..6,
        ),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let router = open(dir.path());
            for (version, port) in [("1.0.0", 9), ("2.0.0", 10)] {
                let registration = json!({"name": "x", "version": version, "host": "127.0.0.1", "port": port});
                let (status, answer) = call(&router, "/api/registry/register", registration.to_string().into_bytes()).await;
                prop_assert_eq!(status, StatusCode::CREATED, "{}", answer);
            }
            for body in bodies {
                let before = listing(&router).await;
                let (status, answer) = call_with(&router, "PUT", "/api/registry/services/x/traffic", body).await;
                prop_assert!(!status.is_server_error(), "{status} {answer}");
                if !status.is_success() {
                    prop_assert!(answer["error"].is_string(), "{status} {answer}");
                    prop_assert_eq!(listing(&router).await, before, "refused with {} yet changed state", status);
                }
            }
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn the_catalogue_lists_what_is_registered_and_names_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let router = open(dir.path());
    let registration = json!({
        "name": "shop", "version": "1", "host": "127.0.0.1", "port": 9,
        "requires_auth": true,
        "endpoints": [{"path": "items/{id}", "method": "GET", "is_public": false}],
    });
    let (status, answer) = call(
        &router,
        "/api/registry/register",
        registration.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let request = Request::get("/api/registry/openapi.json")
        .header("host", "registry.example:8001")
        .body(Body::empty())
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let document: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(
        document["servers"],
        json!([{"url": "http://registry.example:8000"}])
    );
    let operation = &document["paths"]["/api/shop/items/{id}"]["get"];
    assert_eq!(operation["parameters"][0]["name"], "id", "{document}");
    assert_eq!(
        operation["security"],
        json!([{"api_key": []}, {"bearer": []}])
    );
}

#[tokio::test]
async fn a_heartbeat_after_a_deregistration_says_when_and_names_the_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let unconnected = unconnected(dir.path());
    let from = |ip: [u8; 4]| {
        unconnected
            .clone()
            .layer(MockConnectInfo(SocketAddr::from((ip, 40000))))
    };
    let (router, stranger) = (from([127, 0, 0, 1]), from([127, 0, 0, 2]));
    let registration = json!({"name": "gone", "version": "1.0.0", "host": "127.0.0.1", "port": 9});
    let (status, answer) = call(
        &router,
        "/api/registry/register",
        registration.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let beat = json!({"service_id": "gone"}).to_string().into_bytes();
    let never = json!({"service_id": "never"}).to_string().into_bytes();
    let (status, answer) = call(&router, "/api/registry/heartbeat", never.clone()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(answer["removed"], Value::Null, "never registered: {answer}");
    assert_eq!(answer["tenant"], "default", "{answer}");
    let (status, answer) = call(&router, "/api/registry/deregister/gone", Vec::new()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // Still the guide's 404, now saying when and which instances.
    let (status, answer) = call(&router, "/api/registry/heartbeat", beat).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(answer["removed"], "deregistered", "{answer}");
    assert_eq!(answer["instance_ids"], json!(["127.0.0.1:9"]), "{answer}");
    assert_eq!(answer["tenant"], "default", "{answer}");
    assert!(answer["removed_at"].as_str().is_some(), "{answer}");
    // Another address may not take the instance: the 409 names the tenant.
    let (status, answer) = call(
        &router,
        "/api/registry/register",
        registration.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let (status, answer) = call(
        &stranger,
        "/api/registry/register",
        registration.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["tenant"], "default", "{answer}");
}

/// A registration of service `name` on port `port`, with a few endpoints
/// and tags, as a service of the guide's would send.
fn typical(name: &str, port: u16) -> Vec<u8> {
    json!({
        "name": name, "version": "1.2.0", "host": "127.0.0.1", "port": port,
        "description": "a service of the footprint measurement",
        "tags": ["bench", "registry"],
        "endpoints": [
            {"path": "/items", "method": "GET", "description": "list items"},
            {"path": "/items/{id}", "method": "GET", "description": "one item"},
            {"path": "/items", "method": "POST", "description": "add an item"},
        ],
    })
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn a_remote_service_holds_one_info_shared_by_its_table_entry_and_its_spec() {
    let dir = tempfile::tempdir().unwrap();
    let services = Arc::new(ServiceTable::new());
    let router = open_on(dir.path(), services.clone());
    let (status, answer) = call(&router, "/api/registry/register", typical("shop", 9)).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let shop = services.get("shop").expect("registered");
    let service = shop.default_version();
    let Backend::Remote(remote) = &service.backend else {
        panic!("a remote service");
    };
    assert!(Arc::ptr_eq(&service.info, &remote.spec().info));
    assert_eq!(service.info.version, "1.2.0");
}

/// The heap a remote service costs, counted with glibc's `mallinfo2`
/// around 1,000 registrations through the router, and where it stays: in
/// the registry (its store's cache, the catalogue's queue, the storage
/// accounting), in the table (entry, service, instance, shared info), and
/// in the declared info alone. A measurement, run on demand: other tests'
/// threads would blur the count.
/// `cargo test -p plugin-host --lib footprint -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run alone"]
#[allow(unsafe_code)]
async fn footprint_of_a_remote_service() {
    // Within `open`'s 1 MiB of stored registrations.
    const SERVICES: u16 = 1000;
    let per_service = |bytes: usize| bytes / usize::from(SERVICES);
    // SAFETY: `mallinfo2` only reads the allocator's statistics.
    let heap = || unsafe { libc::mallinfo2() }.uordblks;

    let before = heap();
    let infos: Vec<Arc<ServiceInfo>> = (0..SERVICES)
        .map(|i| {
            model::parse_registration(&typical(&format!("svc-{i}"), 10_000 + i))
                .unwrap()
                .spec
                .info
        })
        .collect();
    let info_bytes = per_service(heap() - before);
    drop(infos);

    let dir = tempfile::tempdir().unwrap();
    let services = Arc::new(ServiceTable::new());
    let router = open_on(dir.path(), services.clone());
    // Warm up: the store's first write and the router's first route.
    let (status, _) = call(&router, "/api/registry/register", typical("warm", 9)).await;
    assert_eq!(status, StatusCode::CREATED);
    let before = heap();
    let mut tasks = tokio::task::JoinSet::new();
    for batch in 0..SERVICES / 100 {
        let router = router.clone();
        tasks.spawn(async move {
            for i in batch * 100..(batch + 1) * 100 {
                let (status, answer) = call(
                    &router,
                    "/api/registry/register",
                    typical(&format!("svc-{i}"), 10_000 + i),
                )
                .await;
                assert_eq!(status, StatusCode::CREATED, "{answer}");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let registered = heap();
    drop(router);
    // The catalogue's workers end once they see it gone.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let without_registry = heap();
    drop(services);
    let without_table = heap();

    let total = per_service(registered - before);
    println!("heap per remote service: {total} bytes");
    println!(
        "  in the registry (store cache, catalogue queue, accounting): {} bytes",
        per_service(registered.saturating_sub(without_registry))
    );
    println!(
        "  in the table (entry, service, instance, info): {} bytes, of which the declared info {info_bytes} bytes",
        per_service(without_registry.saturating_sub(without_table))
    );
    println!(
        "  left after both are dropped: {} bytes",
        per_service(without_table.saturating_sub(before))
    );
    assert!(total < 8192, "{total} bytes per service");
}
