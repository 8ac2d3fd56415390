//! Registry tokens (`[auth.registry]`): with tokens configured, writes need
//! one, a token writes only the names its patterns cover, a name belongs to
//! the token that registered it, the admin token writes anything, and the
//! listing can be closed. Ownership survives a restart.

use host_harness::http::{client, registration};
use host_harness::workspace::{host_builder, plugin_library};
use host_harness::{Dirs, Host};
use integration_tests::upstream::Upstream;
use serde_json::{Value, json};

/// SHA-256 digests of the tokens `admin`, `team-a`, `team-b` and
/// `team-b-rotated` (`printf %s admin | sha256sum`).
const TOKENS_CONFIG: &str = r#"
[auth.registry]
admin_token_sha256 = "8c6976e5b5410415bde908bd4dee15dfb167a9c873fc4bb8a81f6f2ab448a918"
listing = "token"

[[auth.registry.tokens]]
id = "team-a"
sha256 = "96c2886c51d1dfb4901d9feccff66213ce3e27406282ff6f602a4258a33dacec"
names = ["team-a-*"]

[[auth.registry.tokens]]
id = "team-b"
sha256 = "e618ceaa77728baaf382c3c58980d1ef1e75003e83dc2fe322caeea1abcc70d3"
names = ["team-b-*", "team-a-shared"]
"#;

struct Registry {
    host: Host,
    client: reqwest::Client,
    _config: tempfile::TempDir,
}

impl Registry {
    async fn start(config: &str, dirs: Dirs) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugin-host.toml");
        std::fs::write(&path, config).unwrap();
        let host = host_builder()
            .dirs(dirs)
            .args(["--config", path.to_str().unwrap()])
            .start()
            .await
            .unwrap();
        Self {
            host,
            client: client(),
            _config: dir,
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Option<String>, Value) {
        let mut request = self.client.request(method, self.host.registry_url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let challenge = response
            .headers()
            .get("www-authenticate")
            .map(|value| value.to_str().unwrap().to_owned());
        let body = response.json().await.unwrap_or(Value::Null);
        (status, challenge, body)
    }

    async fn register(&self, token: Option<&str>, name: &str, upstream: &Upstream) -> (u16, Value) {
        let body = registration(name, upstream.addr());
        let (status, _, answer) = self
            .send(
                reqwest::Method::POST,
                "/api/registry/register",
                token,
                Some(&body),
            )
            .await;
        (status, answer)
    }

    async fn heartbeat(&self, token: Option<&str>, name: &str) -> u16 {
        let body = json!({"service_id": name, "status": "healthy"});
        self.send(
            reqwest::Method::POST,
            "/api/registry/heartbeat",
            token,
            Some(&body),
        )
        .await
        .0
    }

    async fn deregister(&self, token: Option<&str>, name: &str) -> u16 {
        let path = format!("/api/registry/deregister/{name}");
        self.send(reqwest::Method::POST, &path, token, None).await.0
    }
}

#[tokio::test]
async fn with_tokens_a_write_needs_one_and_covers_only_its_names() {
    let registry = Registry::start(TOKENS_CONFIG, Dirs::new().unwrap()).await;
    let upstream = Upstream::start().await;

    for token in [None, Some("not-a-token")] {
        let body = registration("team-a-orders", upstream.addr());
        let (status, challenge, answer) = registry
            .send(
                reqwest::Method::POST,
                "/api/registry/register",
                token,
                Some(&body),
            )
            .await;
        assert_eq!(status, 401, "{token:?}: {answer}");
        let challenge = challenge.expect("a 401 names its scheme");
        assert!(challenge.starts_with("Bearer realm="), "{challenge}");
        assert!(
            answer["error"].as_str().unwrap().contains("token"),
            "{answer}"
        );
    }
    assert_eq!(registry.heartbeat(None, "team-a-orders").await, 401);
    assert_eq!(registry.deregister(None, "team-a-orders").await, 401);

    let (status, answer) = registry
        .register(Some("team-a"), "team-b-billing", &upstream)
        .await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("team-a-*"),
        "{answer}"
    );

    let (status, answer) = registry
        .register(Some("team-a"), "team-a-orders", &upstream)
        .await;
    assert_eq!(status, 201, "{answer}");
    let (status, body) =
        integration_tests::upstream::gateway_get(&registry.host, "/api/team-a-orders/hello").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        registry.heartbeat(Some("team-a"), "team-a-orders").await,
        200
    );
}

#[tokio::test]
async fn a_name_belongs_to_the_token_that_registered_it_across_a_restart() {
    let registry = Registry::start(TOKENS_CONFIG, Dirs::new().unwrap()).await;
    let upstream = Upstream::start().await;

    // `team-a-shared` is covered by both tokens: the first to register it
    // owns it.
    let (status, answer) = registry
        .register(Some("team-b"), "team-a-shared", &upstream)
        .await;
    assert_eq!(status, 201, "{answer}");
    let (status, answer) = registry
        .register(Some("team-a"), "team-a-shared", &upstream)
        .await;
    assert_eq!(status, 403, "takeover by another token: {answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("team-b"),
        "{answer}"
    );
    assert_eq!(
        registry.heartbeat(Some("team-a"), "team-a-shared").await,
        403
    );
    assert_eq!(
        registry.deregister(Some("team-a"), "team-a-shared").await,
        403
    );

    // The admin token manages any name without taking it.
    assert_eq!(
        registry.heartbeat(Some("admin"), "team-a-shared").await,
        200
    );
    let (status, answer) = registry
        .register(Some("admin"), "team-a-shared", &upstream)
        .await;
    assert_eq!(status, 200, "{answer}");

    // Ownership is stored with the registration, and the token's secret
    // can be rotated under the same id.
    let (_, dirs) = registry.host.stop_keeping_dirs();
    let rotated = TOKENS_CONFIG.replace(
        "e618ceaa77728baaf382c3c58980d1ef1e75003e83dc2fe322caeea1abcc70d3",
        "efce0aa0b9187d2967fc9766c75ec2cb4c6a7087f8b62c514ddfc6152df34f87",
    );
    let registry = Registry::start(&rotated, dirs).await;
    let (status, answer) = registry
        .register(Some("team-a"), "team-a-shared", &upstream)
        .await;
    assert_eq!(status, 403, "after a restart: {answer}");
    assert_eq!(
        registry
            .heartbeat(Some("team-b-rotated"), "team-a-shared")
            .await,
        200
    );
    assert_eq!(
        registry
            .deregister(Some("team-b-rotated"), "team-a-shared")
            .await,
        200
    );
}

#[tokio::test]
async fn a_closed_listing_needs_a_token() {
    let registry = Registry::start(TOKENS_CONFIG, Dirs::new().unwrap()).await;
    for path in ["/api/registry/services", "/api/registry/services/team-a-x"] {
        let (status, challenge, answer) =
            registry.send(reqwest::Method::GET, path, None, None).await;
        assert_eq!(status, 401, "{path}: {answer}");
        assert!(challenge.is_some(), "{path}");
    }
    let (status, _, listing) = registry
        .send(
            reqwest::Method::GET,
            "/api/registry/services",
            Some("team-b"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{listing}");
    assert!(listing.is_array(), "{listing}");
}

#[tokio::test]
async fn an_invalid_token_section_stops_the_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plugin-host.toml");
    std::fs::write(
        &path,
        "[[auth.registry.tokens]]\nid = \"x\"\nsha256 = \"not hex\"\nnames = [\"x\"]\n",
    )
    .unwrap();
    let error = host_builder()
        .args(["--config", path.to_str().unwrap()])
        .start()
        .await
        .expect_err("an invalid digest refuses the start");
    let message = format!("{error:?}");
    assert!(
        message.contains("auth.registry.tokens[0].sha256"),
        "{message}"
    );
}

/// The admin endpoints add and revoke gateway API keys without a restart:
/// a key added works at once and after a restart (only its digest is
/// kept), a revoked one stops working, and only the admin token may do
/// either.
#[tokio::test]
async fn api_keys_are_added_and_revoked_at_run_time_by_the_admin_token() {
    // `printf %s ci-secret | sha256sum`
    let config = format!(
        "{TOKENS_CONFIG}\n[[auth.api_keys]]\nid = \"ci\"\nsha256 = \"f82da6e2b2e51c046a2eaf10964ef184b69c0aee9892f10a2a7b657477d407e6\"\n"
    );
    let registry = Registry::start(&config, Dirs::new().unwrap()).await;
    registry
        .host
        .mount_plugin(plugin_library("guarded"), "libguarded.so")
        .await
        .unwrap();
    let keys = "/api/registry/admin/api-keys";
    let new_key = json!({"id": "robot", "services": ["guarded"]});

    let (status, _, answer) = registry
        .send(reqwest::Method::POST, keys, None, Some(&new_key))
        .await;
    assert_eq!(status, 401, "{answer}");
    let (status, _, answer) = registry
        .send(reqwest::Method::POST, keys, Some("team-a"), Some(&new_key))
        .await;
    assert_eq!(
        status, 403,
        "a registration token is not the admin token: {answer}"
    );

    let (status, _, answer) = registry
        .send(reqwest::Method::POST, keys, Some("admin"), Some(&new_key))
        .await;
    assert_eq!(status, 201, "{answer}");
    let key = answer["key"]
        .as_str()
        .expect("a generated key is answered once")
        .to_owned();
    let guarded = |host: &Host| host.gateway_url("/api/guarded/private");
    let with_key = |key: &str| {
        let key = key.to_owned();
        move |host: &Host| client().get(guarded(host)).header("x-api-key", key)
    };
    let status = with_key(&key)(&registry.host)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200, "the added key works at once");

    let (status, _, answer) = registry
        .send(
            reqwest::Method::POST,
            keys,
            Some("admin"),
            Some(&json!({"id": "ci"})),
        )
        .await;
    assert_eq!(status, 409, "the config defines `ci`: {answer}");
    let (status, _, listing) = registry
        .send(reqwest::Method::GET, keys, Some("admin"), None)
        .await;
    assert_eq!(status, 200, "{listing}");
    assert_eq!(
        listing["api_keys"],
        json!([{"id": "robot", "services": ["guarded"]}])
    );
    let stored = std::fs::read(registry.host.data_dir().join("registry.redb")).unwrap();
    assert!(
        !stored
            .windows(key.len())
            .any(|window| window == key.as_bytes()),
        "the key itself is never stored"
    );

    let (_, dirs) = registry.host.stop_keeping_dirs();
    // The plugin file stayed in the plugins directory: mounted at start.
    let registry = Registry::start(&config, dirs).await;
    let status = with_key(&key)(&registry.host)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200, "the added key survives a restart");

    let (status, _, answer) = registry
        .send(
            reqwest::Method::DELETE,
            &format!("{keys}/ci"),
            Some("admin"),
            None,
        )
        .await;
    assert_eq!(
        status, 409,
        "a configured key is revoked in the file: {answer}"
    );
    let (status, _, answer) = registry
        .send(
            reqwest::Method::DELETE,
            &format!("{keys}/robot"),
            Some("admin"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let status = with_key(&key)(&registry.host)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401, "a revoked key is refused at once");
    let (status, _, answer) = registry
        .send(
            reqwest::Method::DELETE,
            &format!("{keys}/robot"),
            Some("admin"),
            None,
        )
        .await;
    assert_eq!(status, 404, "{answer}");
}
