//! The listeners' edges against misbehaving clients: partial headers sent
//! slowly (slowloris), a registry body trickled in, a client that never
//! reads its answer, idle keep-alive connections, and the connection cap.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use host_harness::http::client;
use host_harness::workspace::{host_builder, plugin_library};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Reads until the host closes the connection (EOF or reset), at most
/// `limit`; returns what was read and when the connection ended.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = tokio::time::timeout_at((started + limit).into(), stream.read(&mut buffer))
            .await
            .unwrap_or_else(|_| panic!("connection still open after {limit:?}"));
        match read {
            Ok(0) | Err(_) => return (answer, started.elapsed()),
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
        }
    }
}

/// Opens a connection that sends a request line and then one header line
/// every 200 ms, never finishing its head; returns what it was answered and
/// how long after connecting the host closed it.
async fn slowloris(addr: SocketAddr) -> (String, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /api/registry/services HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("request line");
    let mut answer = Vec::new();
    let mut buffer = [0; 1024];
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    let deadline = tokio::time::sleep(Duration::from_secs(15));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            read = stream.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            },
            _ = ticks.tick() => {
                // The host may already have closed its side.
                let _ = stream.write_all(b"X-Slow: 1\r\n").await;
            }
            _ = &mut deadline => panic!("slow connection to {addr} still open after 15 s"),
        }
    }
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn slow_partial_headers_are_cut_off_and_others_are_still_answered() {
    let host = host_builder()
        .args(["--header-read-timeout", "1s"])
        .start()
        .await
        .unwrap();
    let slow: Vec<_> = [host.gateway_addr(), host.registry_addr()]
        .into_iter()
        .flat_map(|addr| (0..50).map(move |_| tokio::spawn(slowloris(addr))))
        .collect();

    // While 100 connections dribble headers, others are served at once.
    for _ in 0..5 {
        for url in [
            host.gateway_url("/api/none/x"),
            host.registry_url("/api/registry/services"),
        ] {
            let started = Instant::now();
            let answer = tokio::time::timeout(Duration::from_secs(2), client().get(&url).send())
                .await
                .unwrap_or_else(|_| panic!("{url} not answered within 2 s under slowloris"))
                .expect("request");
            assert!(
                answer.status() == 200 || answer.status() == 404,
                "{url}: {}",
                answer.status()
            );
            assert!(started.elapsed() < Duration::from_secs(2));
        }
    }

    for connection in slow {
        let (answer, closed_after) = connection.await.expect("slow connection task");
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "slow connection answered {answer:?}"
        );
        assert!(
            answer.contains("request headers not received within 1s"),
            "{answer}"
        );
        assert!(
            closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(5),
            "closed after {closed_after:?}, header timeout is 1 s"
        );
    }
}

#[tokio::test]
async fn a_trickled_registry_body_is_answered_408_within_the_request_timeout() {
    let host = host_builder()
        .args(["--request-timeout", "1s"])
        .start()
        .await
        .unwrap();
    let mut stream = TcpStream::connect(host.registry_addr())
        .await
        .expect("connect");
    stream
        .write_all(
            b"POST /api/registry/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n",
        )
        .await
        .expect("head");
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buffer = [0; 4096];
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    // One byte of the body every 200 ms (400 bytes would take 80 s) until
    // the host answers.
    while !answer.windows(4).any(|window| window == b"\r\n\r\n") {
        tokio::select! {
            read = stream.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            },
            _ = ticks.tick() => { let _ = stream.write_all(b" ").await; }
            _ = &mut deadline => panic!("no answer to a trickled body within 10 s"),
        }
    }
    let answered_after = started.elapsed();
    let (rest, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    answer.extend_from_slice(&rest);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("request body not received within 1s"),
        "{answer}"
    );
    assert!(
        answered_after >= Duration::from_millis(900) && answered_after < Duration::from_secs(4),
        "answered after {answered_after:?}, the body timeout is 1 s"
    );
}

#[tokio::test]
async fn a_client_that_never_reads_its_answer_is_disconnected_after_the_write_stall_timeout() {
    let host = host_builder()
        .args(["--write-stall-timeout", "1s"])
        .start()
        .await
        .unwrap();
    host.mount_plugin(plugin_library("echo"), "libecho.so")
        .await
        .unwrap();
    let mark = host.log_mark();

    // `echo` answers the body back inside JSON: 8 MiB in, a little more
    // out, far more than the socket buffers hold with a small receive
    // buffer.
    const BODY: usize = 8 * 1024 * 1024;
    let body = vec![b'a'; BODY];
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
        let mut stream = socket.connect(host.gateway_addr()).await.expect("connect");
        let head =
            format!("POST /api/echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.expect("head");
        stream.write_all(&body).await.expect("body");
        stalled.push(stream);
    }

    // Nothing is read until the host reports each connection dropped.
    for stream in &stalled {
        let peer = format!("peer={}", stream.local_addr().expect("local addr"));
        host.wait_for_log_since(mark, &["the client stopped reading the response", &peer])
            .await
            .unwrap();
    }
    for mut stream in stalled {
        let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
        assert!(answer.starts_with(b"HTTP/1.1 200"), "an answer was started");
        assert!(
            answer.len() < BODY,
            "the connection was closed before the whole answer ({} bytes read)",
            answer.len()
        );
    }
    let answer = client()
        .post(host.gateway_url("/api/echo/x"))
        .body("still here")
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_not_the_header_timeout() {
    let host = host_builder()
        .args(["--header-read-timeout", "1s", "--idle-timeout", "3s"])
        .start()
        .await
        .unwrap();
    let idle = |addr: SocketAddr, path: &'static str| async move {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("request");
        let mut answer = Vec::new();
        let mut buffer = [0; 4096];
        // The whole answer: its head and `content-length` bytes of body.
        let complete = |answer: &[u8]| {
            let text = String::from_utf8_lossy(answer);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                return false;
            };
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .and_then(|value| value.trim().parse().ok())
                .expect("content-length");
            body.len() >= length
        };
        while !complete(&answer) {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
                .await
                .expect("answer within 5 s")
                .expect("read");
            assert!(n > 0, "closed before the answer was complete");
            answer.extend_from_slice(&buffer[..n]);
        }
        let (rest, closed_after) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
        assert!(rest.is_empty(), "nothing is sent to an idle connection");
        closed_after
    };
    let (gateway, registry) = tokio::join!(
        idle(host.gateway_addr(), "/api/none/x"),
        idle(host.registry_addr(), "/api/registry/services"),
    );
    for closed_after in [gateway, registry] {
        assert!(
            closed_after >= Duration::from_millis(2800) && closed_after < Duration::from_secs(6),
            "idle connection closed after {closed_after:?}: idle timeout 3 s, header timeout 1 s"
        );
    }
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let host = host_builder()
        .args(["--max-connections", "2"])
        .start()
        .await
        .unwrap();
    let addr = host.registry_addr();
    let first = TcpStream::connect(addr).await.expect("connect");
    let _second = TcpStream::connect(addr).await.expect("connect");
    host.wait_for_log("connection limit reached").await.unwrap();

    let url = host.registry_url("/api/registry/services");
    let waiting = tokio::spawn(async move { client().get(&url).send().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a third connection was served while two were open"
    );
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a slot freed")
        .expect("task")
        .expect("request");
    assert_eq!(answer.status(), 200);
}
