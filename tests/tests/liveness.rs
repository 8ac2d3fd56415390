//! A TTL that lapses between two health check rounds: the request that is
//! answered 503 for it is what notices, and says so in the log.

use host_harness::http::registration;
use host_harness::workspace::host_builder;
use integration_tests::upstream::{Upstream, gateway_get, heartbeat, register};

#[tokio::test]
async fn a_ttl_lapse_between_rounds_is_logged_by_the_request_that_meets_it() {
    // One round at start-up, then none for an hour: only requests and
    // heartbeats can notice the lapse.
    let host = host_builder()
        .args(["--heartbeat-ttl", "1s", "--health-check-interval", "1h"])
        .start()
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    assert_eq!(
        register(&host, &registration("lapsing", upstream.addr()))
            .await
            .0,
        201
    );
    let mark = host.log_mark();
    // The TTL runs out with no event to wait on; the request after it is
    // the stimulus under test.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (status, body) = gateway_get(&host, "/api/lapsing/hello").await;
    assert_eq!(status, 503, "{body}");
    host.wait_for_log_since(mark, &["remote service unhealthy", "service=lapsing"])
        .await
        .unwrap();

    let mark = host.log_mark();
    assert_eq!(heartbeat(&host, "lapsing").await.0, 200);
    host.wait_for_log_since(mark, &["remote service healthy again", "service=lapsing"])
        .await
        .unwrap();
    let (status, body) = gateway_get(&host, "/api/lapsing/hello").await;
    assert_eq!(status, 200, "{body}");
}
