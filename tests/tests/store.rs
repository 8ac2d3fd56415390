//! A damaged registry database: refused at start with one ERROR line that
//! names the file and the way out, never a panic, never an empty registry
//! started over it; an edited record is reported and not routed.

use std::path::PathBuf;

use host_harness::http::{client, registration};
use host_harness::workspace::host_builder;
use host_harness::{Dirs, Refused};
use integration_tests::upstream::{Upstream, register};
use redb::{ReadableDatabase, ReadableTable};

/// Starts a host, registers one remote service per name, stops it, and
/// returns its directories and the database file.
async fn registered(names: &[&str], upstream: &Upstream) -> (Dirs, PathBuf) {
    let host = host_builder().start().await.unwrap();
    for name in names {
        let (status, answer) = register(&host, &registration(name, upstream.addr())).await;
        assert_eq!(status, 201, "{answer}");
    }
    let (exit, dirs) = host.stop_keeping_dirs();
    assert!(exit.is_some_and(|exit| exit.success()), "{exit:?}");
    let database = dirs.data().join("registry.redb");
    (dirs, database)
}

/// Starts a host on `dirs` expecting it to refuse to start: its exit
/// status and everything it logged. Fails if it starts listening instead.
async fn failed_start(dirs: Dirs) -> Refused {
    host_builder()
        .dirs(dirs)
        .log_filter("info")
        .start_refused()
        .await
        .unwrap()
}

/// The single ERROR line of a refused start.
fn refusal(log: &str) -> &str {
    let errors: Vec<&str> = log.lines().filter(|line| line.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one ERROR line expected:\n{log}");
    errors[0]
}

#[tokio::test]
async fn an_emptied_database_is_refused_not_started_empty() {
    let upstream = Upstream::start().await;
    let (dirs, database) = registered(&["svc"], &upstream).await;
    std::fs::File::create(&database).expect("truncate the database to 0 bytes");

    let Refused {
        status,
        output: log,
        dirs: _dirs,
    } = failed_start(dirs).await;
    assert_eq!(status.code(), Some(1), "{log}");
    let line = refusal(&log);
    assert!(line.contains(&database.display().to_string()), "{line}");
    assert!(line.contains("empty (0 bytes)"), "{line}");
    assert!(
        line.contains("move it aside to start with an empty registry, or restore it from a backup"),
        "{line}"
    );
    assert_eq!(
        std::fs::metadata(&database).expect("still there").len(),
        0,
        "left as it was"
    );
}

#[tokio::test]
async fn garbage_in_the_database_pages_is_refused_without_a_panic() {
    let upstream = Upstream::start().await;
    let names: Vec<String> = (0..20).map(|index| format!("svc-{index}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (dirs, database) = registered(&names, &upstream).await;
    let mut bytes = std::fs::read(&database).expect("read the database");
    let len = bytes.len();
    // Keep the file header, overwrite every page after it.
    for (offset, byte) in bytes[4096..len].iter_mut().enumerate() {
        *byte = (offset.wrapping_mul(31) ^ 0xA5) as u8;
    }
    std::fs::write(&database, &bytes).expect("write garbage");

    let Refused {
        status,
        output: log,
        ..
    } = failed_start(dirs).await;
    assert_eq!(status.code(), Some(1), "exit 1, not a panic's 101:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    let line = refusal(&log);
    assert!(line.contains(&database.display().to_string()), "{line}");
    assert!(line.contains("is damaged"), "{line}");
    assert!(line.contains("move it aside"), "{line}");
}

#[tokio::test]
async fn an_edited_record_fails_its_checksum_and_is_not_routed() {
    let upstream = Upstream::start().await;
    let (dirs, database) = registered(&["edited", "intact"], &upstream).await;
    {
        // Rewritten through redb itself, so only the record's own checksum
        // can tell.
        let table = redb::TableDefinition::<&str, &[u8]>::new("remote_services");
        let db = redb::Database::open(&database).expect("open the database");
        let write = db.begin_write().expect("write");
        {
            let mut services = write.open_table(table).expect("table");
            let edited = {
                // Keyed `t/<tenant>/s/<name>` (docs/MULTI_TENANT.md).
                let value = services
                    .get("t/default/s/edited")
                    .expect("get")
                    .expect("stored");
                let text = String::from_utf8(value.value().to_vec()).expect("utf-8");
                assert!(text.contains("Service edited"), "{text}");
                text.replace("Service edited", "Service EDITED")
            };
            services
                .insert("t/default/s/edited", edited.as_bytes())
                .expect("insert");
        }
        write.commit().expect("commit");
    }

    let host = host_builder().dirs(dirs).start().await.unwrap();
    let line = host
        .wait_for_log("stored registration fails its checksum")
        .await
        .unwrap();
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("service=edited"), "{line}");
    let status = |path: &str| {
        let url = host.gateway_url(path);
        async move { client().get(url).send().await.expect("request").status() }
    };
    assert_eq!(status("/api/edited/hello").await, 404);
    assert_eq!(status("/api/intact/hello").await, 200);
    let (exit, dirs) = host.stop_keeping_dirs();
    assert!(exit.is_some_and(|exit| exit.success()), "{exit:?}");

    // Kept in the database, as it was.
    let db = redb::Database::open(dirs.data().join("registry.redb")).expect("open");
    let read = db.begin_read().expect("read");
    let table = read
        .open_table(redb::TableDefinition::<&str, &[u8]>::new("remote_services"))
        .expect("table");
    let value = table
        .get("t/default/s/edited")
        .expect("get")
        .expect("still stored");
    assert!(String::from_utf8_lossy(value.value()).contains("Service EDITED"));
}
