//! The registry under many registrations: concurrent registrations share
//! commits and are each durable once answered, and the listing's pages,
//! filters and cached whole form.

use futures_util::future::join_all;
use host_harness::Host;
use host_harness::http::{get_json, post_json, registration};
use host_harness::workspace::{host_builder, plugin_library};
use integration_tests::upstream::{Upstream, heartbeat, register};
use serde_json::{Value, json};

/// The names in a listing (an array of entries).
fn names(listing: &Value) -> Vec<String> {
    listing
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {listing}"))
        .iter()
        .map(|entry| entry["name"].as_str().unwrap().to_owned())
        .collect()
}

async fn listing(host: &Host, query: &str) -> (u16, Value) {
    get_json(&host.registry_url(&format!("/api/registry/services{query}")))
        .await
        .unwrap()
}

#[tokio::test]
async fn concurrent_registrations_are_all_answered_and_all_survive_kill_9() {
    const SERVICES: usize = 48;
    let host = host_builder().start().await.unwrap();
    let upstream = Upstream::start().await;
    let registered: Vec<String> = (0..SERVICES)
        .map(|index| format!("many-{index:02}"))
        .collect();
    let bodies: Vec<Value> = registered
        .iter()
        .map(|name| registration(name, upstream.addr()))
        .collect();
    let answers = join_all(bodies.iter().map(|body| register(&host, body))).await;
    for (name, (status, answer)) in registered.iter().zip(&answers) {
        assert_eq!(*status, 201, "{name}: {answer}");
    }

    // Every answered registration was durable: none is lost to kill -9.
    let dirs = host.kill9();
    let host = host_builder().dirs(dirs).start().await.unwrap();
    host.wait_for_log(&format!("remote services restored restored={SERVICES}"))
        .await
        .unwrap();
    let (status, all) = listing(&host, "").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(names(&all), registered);
}

#[tokio::test]
async fn the_listing_pages_and_filters_and_its_whole_form_stays_current() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    let remotes = ["alpha-1", "alpha-2", "beta-1", "beta-2", "gamma"];
    for name in remotes {
        let (status, answer) = register(&host, &registration(name, upstream.addr())).await;
        assert_eq!(status, 201, "{answer}");
    }
    let everything = ["alpha-1", "alpha-2", "beta-1", "beta-2", "gamma", "hello"];

    // The whole listing, unchanged in form: an array of every service.
    let (status, whole) = listing(&host, "").await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(names(&whole), everything);

    // Pages of two, followed by their cursors, give the same list.
    let mut paged = Vec::new();
    let mut query = "?limit=2".to_owned();
    let mut pages = 0;
    loop {
        let (status, page) = listing(&host, &query).await;
        assert_eq!(status, 200, "{page}");
        let entries = names(&page["services"]);
        assert!(entries.len() <= 2, "{page}");
        paged.extend(entries);
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(cursor) => query = format!("?limit=2&cursor={cursor}"),
            None => break,
        }
        assert!(pages < 10, "the cursors never end");
    }
    assert_eq!(paged, everything);
    assert_eq!(pages, 3);

    // Filters, alone (an array) or together.
    assert_eq!(names(&listing(&host, "?kind=plugin").await.1), ["hello"]);
    assert_eq!(
        names(&listing(&host, "?kind=remote&name_prefix=beta").await.1),
        ["beta-1", "beta-2"]
    );
    let (status, page) = listing(&host, "?name_prefix=alpha&limit=1").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(names(&page["services"]), ["alpha-1"]);
    assert_eq!(page["next_cursor"], "alpha-1");

    // A status change shows in the filters and in the whole listing, which
    // was already built once.
    let (status, answer) = post_json(
        &host.registry_url("/api/registry/heartbeat"),
        &json!({"service_id": "gamma", "status": "unhealthy"}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        names(&listing(&host, "?status=unhealthy").await.1),
        ["gamma"]
    );
    assert_eq!(
        names(&listing(&host, "?status=healthy&kind=remote").await.1),
        ["alpha-1", "alpha-2", "beta-1", "beta-2"]
    );
    let entry = |listing: &Value, name: &str| {
        listing
            .as_array()
            .unwrap()
            .iter()
            .find(|entry| entry["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not listed: {listing}"))
    };
    let (_, whole) = listing(&host, "").await;
    assert_eq!(entry(&whole, "gamma")["status"], "unhealthy", "{whole}");
    assert_eq!(entry(&whole, "alpha-1")["last_heartbeat"], Value::Null);

    // So do a heartbeat, a deregistration and a new registration.
    assert_eq!(heartbeat(&host, "alpha-1").await.0, 200);
    let (status, _) = post_json(
        &host.registry_url("/api/registry/deregister/beta-2"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        register(&host, &registration("delta", upstream.addr()))
            .await
            .0,
        201
    );
    let (_, whole) = listing(&host, "").await;
    assert_eq!(
        names(&whole),
        ["alpha-1", "alpha-2", "beta-1", "delta", "gamma", "hello"]
    );
    assert!(
        entry(&whole, "alpha-1")["last_heartbeat"].is_string(),
        "{whole}"
    );

    // What the listing cannot read is refused, naming it.
    for (query, named) in [
        ("?limit=0", "limit"),
        ("?limit=5000", "limit"),
        ("?kind=robot", "robot"),
        ("?status=sleepy", "sleepy"),
        ("?sort=name", "sort"),
    ] {
        let (status, answer) = listing(&host, query).await;
        assert_eq!(status, 400, "{query}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(named), "{query}: {answer}");
    }
}
