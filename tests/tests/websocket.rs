//! WebSocket (and any `Upgrade`) handshakes proxied to remote services: the
//! tunnel through the gateway, what the upstream receives, the idle
//! timeout, the tunnel cap, and the answers that are not a `101`.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use host_harness::http::registration;
use host_harness::workspace::{host_builder, plugin_library};
use host_harness::{Host, PATIENCE};
use integration_tests::raw_http;
use integration_tests::upstream::{Upstream, register};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Registers `upstream` as `name`, routing every method and path to it.
async fn register_remote(host: &Host, name: &str, upstream: &Upstream) {
    let mut body = registration(name, upstream.addr());
    body["endpoints"] = json!([]);
    let (status, answer) = register(host, &body).await;
    assert_eq!(status, 201, "{answer}");
}

/// Opens a WebSocket to `path` on the gateway, with `headers` added to the
/// handshake.
async fn connect(host: &Host, path: &str, headers: &[(&str, &str)]) -> Result<Socket, WsError> {
    let url = format!("ws://{}{path}", host.gateway_addr());
    let mut request = url.into_client_request().expect("a valid URL");
    for (name, value) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName =
            name.parse().expect("a valid header name");
        request
            .headers_mut()
            .insert(name, value.parse().expect("a valid header value"));
    }
    let (socket, response) =
        tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
            .await
            .expect("a handshake answer in time")?;
    assert_eq!(response.status(), 101);
    Ok(socket)
}

/// The status and JSON body of a handshake the gateway did not switch.
fn refused(result: Result<Socket, WsError>) -> (u16, Value) {
    match result {
        Err(WsError::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            let json = serde_json::from_slice(&body)
                .unwrap_or_else(|_| panic!("a JSON body: {}", String::from_utf8_lossy(&body)));
            (response.status().as_u16(), json)
        }
        Err(other) => panic!("handshake failed without an answer: {other}"),
        Ok(_) => panic!("the handshake was switched"),
    }
}

/// Sends `message` and returns the next data message the socket receives.
async fn round_trip(socket: &mut Socket, message: Message) -> Message {
    socket.send(message).await.expect("send");
    loop {
        let received = tokio::time::timeout(PATIENCE, socket.next())
            .await
            .expect("an echo in time")
            .expect("the socket still open")
            .expect("a message");
        if received.is_text() || received.is_binary() {
            return received;
        }
    }
}

/// Closes `socket` as a client should: a close frame, then reading until
/// the server has ended the connection, then dropping its end.
async fn close(mut socket: Socket) {
    socket.close(None).await.expect("send a close frame");
    tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await
    .expect("the server ends the connection in time");
}

async fn echoes(socket: &mut Socket, text: &str) {
    assert_eq!(
        round_trip(socket, Message::text(text)).await,
        Message::text(text)
    );
}

/// Hop-by-hop headers a client sends with its handshake: none but
/// `Connection: upgrade` and `Upgrade` may reach the upstream.
const HOP_BY_HOP: [(&str, &str); 5] = [
    ("connection", "Upgrade, X-Hop"),
    ("x-hop", "1"),
    ("keep-alive", "timeout=5"),
    ("te", "trailers"),
    ("proxy-authorization", "Basic dXNlcjpwYXNz"),
];

fn assert_only_the_upgrade_passed(headers: &serde_json::Map<String, Value>, protocol: &str) {
    assert_eq!(headers["upgrade"], json!([protocol]), "{headers:?}");
    assert_eq!(headers["connection"], json!(["upgrade"]), "{headers:?}");
    for name in ["x-hop", "keep-alive", "te", "proxy-authorization"] {
        assert!(
            !headers.contains_key(name),
            "{name} reached the upstream: {headers:?}"
        );
    }
    // Forwarded like any request.
    assert!(headers.contains_key("via"), "{headers:?}");
    assert!(headers.contains_key("x-forwarded-for"), "{headers:?}");
}

#[tokio::test]
async fn a_websocket_echoes_through_the_gateway_across_a_plugin_swap_and_a_registration() {
    let upstream = Upstream::start().await;
    let host = host_builder().start().await.unwrap();
    register_remote(&host, "ws", &upstream).await;
    host.mount_plugin(plugin_library("swap_a"), "swap.so")
        .await
        .unwrap();

    let mut socket = connect(&host, "/api/ws/ws", &HOP_BY_HOP).await.unwrap();
    let received = upstream
        .last_upgrade_headers()
        .expect("the upstream saw the handshake");
    let received: serde_json::Map<String, Value> = received.into_iter().collect();
    assert_only_the_upgrade_passed(&received, "websocket");
    assert!(received.contains_key("sec-websocket-key"), "{received:?}");

    echoes(&mut socket, "hello").await;
    // Larger than 64 KiB: many reads and writes each way.
    let large: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        round_trip(&mut socket, Message::binary(large.clone())).await,
        Message::binary(large)
    );

    let mark = host.log_mark();
    host.install_plugin(plugin_library("swap_b"), "swap.so")
        .unwrap();
    host.wait_for_log_since(mark, &["plugin mounted", "replaced=true"])
        .await
        .unwrap();
    echoes(&mut socket, "after the swap").await;

    register_remote(&host, "other", &upstream).await;
    echoes(&mut socket, "after a registration").await;

    // The gateway still routes new requests meanwhile.
    let (status, body) = host_harness::http::get_json(&host.gateway_url("/api/swap/"))
        .await
        .unwrap();
    assert_eq!((status, body["variant"].as_str()), (200, Some("swap-b")));

    close(socket).await;
    host.wait_for_log_since(mark, &["tunnel closed", "service=ws"])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_tunnel_with_nothing_moving_is_closed_after_the_tunnel_idle_timeout() {
    let idle = Duration::from_secs(1);
    let upstream = Upstream::start().await;
    let host = host_builder()
        .args(["--tunnel-idle-timeout", "1s"])
        .start()
        .await
        .unwrap();
    register_remote(&host, "ws", &upstream).await;
    let mut socket = connect(&host, "/api/ws/ws", &[]).await.unwrap();
    echoes(&mut socket, "still open").await;
    let quiet_since = Instant::now();
    // Nothing is sent: the next thing the client sees is the end.
    let ended = tokio::time::timeout(PATIENCE, socket.next())
        .await
        .expect("closed within the patience");
    assert!(
        matches!(ended, None | Some(Err(_))),
        "a message instead of the end: {ended:?}"
    );
    // The host's clock started at its last write of the echo, a little
    // before the client read it: half the timeout tells "timed out" from
    // "closed at once" without racing that difference.
    assert!(
        quiet_since.elapsed() >= idle / 2,
        "closed after {:?}",
        quiet_since.elapsed()
    );
    host.wait_for_log("tunnel closed: idle").await.unwrap();
}

#[tokio::test]
async fn upgrades_beyond_the_tunnel_cap_are_answered_503() {
    let upstream = Upstream::start().await;
    let host = host_builder()
        .args(["--max-tunnels", "1"])
        .start()
        .await
        .unwrap();
    register_remote(&host, "ws", &upstream).await;
    let mut first = connect(&host, "/api/ws/ws", &[]).await.unwrap();
    echoes(&mut first, "one").await;

    let (status, body) = refused(connect(&host, "/api/ws/ws", &[]).await);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["limit"], 1, "{body}");
    assert_eq!(body["service"], "ws", "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("tunnels"),
        "{body}"
    );
    // The refused handshake cost the open tunnel nothing.
    echoes(&mut first, "two").await;

    let mark = host.log_mark();
    close(first).await;
    host.wait_for_log_since(mark, &["tunnel closed"])
        .await
        .unwrap();
    let mut again = connect(&host, "/api/ws/ws", &[]).await.unwrap();
    echoes(&mut again, "three").await;
}

#[tokio::test]
async fn an_upstream_answer_other_than_101_is_passed_back() {
    let upstream = Upstream::start().await;
    let host = host_builder()
        .args(["--max-tunnels", "1"])
        .start()
        .await
        .unwrap();
    register_remote(&host, "ws", &upstream).await;
    // `/echo` is no WebSocket endpoint: it answers 200 with what it got.
    let (status, body) = refused(connect(&host, "/api/ws/echo", &HOP_BY_HOP).await);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/echo", "{body}");
    assert_only_the_upgrade_passed(body["headers"].as_object().unwrap(), "websocket");
    // No tunnel followed, so none holds the one place under the cap.
    let (status, _) = refused(connect(&host, "/api/ws/echo", &[]).await);
    assert_eq!(status, 200);
    let mut socket = connect(&host, "/api/ws/ws", &[]).await.unwrap();
    echoes(&mut socket, "a tunnel after two refusals").await;
}

#[tokio::test]
async fn an_upgrade_to_a_plugin_is_answered_501() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();
    let (status, body) = refused(connect(&host, "/api/hello/hello", &[]).await);
    assert_eq!(status, 501, "{body}");
    assert_eq!(body["service"], "hello", "{body}");
    assert!(body["error"].as_str().unwrap().contains("plugin"), "{body}");
}

#[tokio::test]
async fn a_handshake_with_a_body_is_refused_400() {
    let upstream = Upstream::start().await;
    let host = host_builder().start().await.unwrap();
    register_remote(&host, "ws", &upstream).await;
    let (status, answer) = raw_http(
        host.gateway_addr(),
        "GET /api/ws/ws HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 3\r\n\r\nabc",
    );
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("must not have a body"), "{answer}");
    assert!(upstream.last_upgrade_headers().is_none());
}

#[tokio::test]
async fn a_shutdown_keeps_tunnels_open_for_the_drain_period_then_closes_them() {
    let drain = Duration::from_secs(1);
    let upstream = Upstream::start().await;
    let host = host_builder()
        .args(["--drain-timeout", "1s"])
        .start()
        .await
        .unwrap();
    register_remote(&host, "ws", &upstream).await;
    let mut socket = connect(&host, "/api/ws/ws", &[]).await.unwrap();
    echoes(&mut socket, "before the shutdown").await;

    let stopping = Instant::now();
    let stopped = tokio::task::spawn_blocking(move || {
        let mut host = host;
        let exit = host.stop();
        (host, exit)
    });
    let ended = tokio::time::timeout(PATIENCE, socket.next())
        .await
        .expect("closed within the patience");
    assert!(
        matches!(ended, None | Some(Err(_))),
        "a message instead of the end: {ended:?}"
    );
    assert!(
        stopping.elapsed() >= drain,
        "closed after {:?}",
        stopping.elapsed()
    );
    let (host, exit) = stopped.await.unwrap();
    assert!(exit.is_some_and(|exit| exit.success()), "{exit:?}");
    assert!(
        host.logs()
            .contains("requests still open after the drain timeout"),
        "{}",
        host.logs()
    );
}

#[tokio::test]
async fn a_tunnel_does_not_hold_its_services_place_among_requests_in_flight() {
    let upstream = Upstream::start().await;
    let host = host_builder()
        .config("[service.ws]\nmax_concurrent = 1\n")
        .start()
        .await
        .unwrap();
    register_remote(&host, "ws", &upstream).await;
    let mut socket = connect(&host, "/api/ws/ws", &[]).await.unwrap();
    echoes(&mut socket, "open").await;
    // The handshake counted until it was answered; the tunnel does not.
    let (status, body) = host_harness::http::get_json(&host.gateway_url("/api/ws/hello"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let mut second = connect(&host, "/api/ws/ws", &[]).await.unwrap();
    echoes(&mut second, "and another").await;
    echoes(&mut socket, "still open").await;
}
