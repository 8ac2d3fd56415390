//! Gateway auth, end to end: a host started with `--config` holding API
//! keys and one JWT issuer per algorithm, the `guarded` test plugin
//! (`requires_auth`, public and private routes), remote services declaring
//! the same, and what each service is told about its caller.

use std::path::PathBuf;

use base64::Engine as _;
use host_harness::Host;
use host_harness::http::client;
use host_harness::workspace::{host_builder, plugin_library};
use integration_tests::upstream::{Upstream, register};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};

/// Accepted for every service. `printf %s ci-secret | sha256sum`.
const CI_KEY: &str = "ci-secret";
const CI_SHA256: &str = "f82da6e2b2e51c046a2eaf10964ef184b69c0aee9892f10a2a7b657477d407e6";
/// Accepted for the service `billing` only.
const BILLING_KEY: &str = "billing-secret";
const BILLING_SHA256: &str = "12d043d4bd516bc34ea9e95648e9a12329d2d851840fb60b83822997f1382e17";

const HS_ISSUER: &str = "https://hs.test";
const RS_ISSUER: &str = "https://rs.test";
const ED_ISSUER: &str = "https://ed.test";
const AUDIENCE: &str = "plugin-host";

/// A test-only key pair or secret from `tests/fixtures/jwt/`.
fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/jwt")
        .join(name)
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("test fixture")
}

/// The `[auth]` section every test host here runs with.
fn auth_config() -> String {
    format!(
        r#"
[[auth.api_keys]]
id = "ci"
sha256 = "{CI_SHA256}"

[[auth.api_keys]]
id = "billing-only"
sha256 = "{BILLING_SHA256}"
services = ["billing"]

[[auth.jwt]]
issuer = "{HS_ISSUER}"
audiences = ["{AUDIENCE}"]
algorithm = "HS256"
secret_file = "{hs}"

[[auth.jwt]]
issuer = "{RS_ISSUER}"
audiences = ["{AUDIENCE}"]
algorithm = "RS256"
public_key_file = "{rs}"

[[auth.jwt]]
issuer = "{ED_ISSUER}"
audiences = ["{AUDIENCE}"]
algorithm = "EdDSA"
public_key_file = "{ed}"
leeway = "5s"
"#,
        hs = fixture("test-only-hs256-secret").display(),
        rs = fixture("test-only-rs256-public.pem").display(),
        ed = fixture("test-only-eddsa-public.pem").display(),
    )
}

/// A host started with `config` as its `--config` file (kept in a temp
/// dir that lives as long as the host).
async fn host_with_config(config: &str) -> (Host, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("plugin-host.toml");
    std::fs::write(&path, config).expect("write the config");
    let host = host_builder()
        .arg("--config")
        .arg(path.display().to_string())
        .start()
        .await
        .unwrap();
    (host, dir)
}

/// A host with [`auth_config`] and the `guarded` plugin mounted.
async fn guarded_host() -> (Host, tempfile::TempDir) {
    let (host, dir) = host_with_config(&auth_config()).await;
    host.mount_plugin(plugin_library("guarded"), "libguarded.so")
        .await
        .unwrap();
    (host, dir)
}

/// `GET url` with `headers`: status, `WWW-Authenticate` values, JSON body.
async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, Vec<String>, Value) {
    let mut request = client().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let answer = request.send().await.expect("an answer");
    let status = answer.status().as_u16();
    let challenges = answer
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|value| value.to_str().unwrap().to_owned())
        .collect();
    let body = answer.json().await.unwrap_or(Value::Null);
    (status, challenges, body)
}

fn claims(iss: &str) -> Value {
    let now = get_current_timestamp();
    json!({"iss": iss, "sub": "ada", "aud": AUDIENCE, "exp": now + 300, "nbf": now - 5, "role": "tester"})
}

fn mint(algorithm: Algorithm, claims: &Value) -> String {
    let key = match algorithm {
        Algorithm::HS256 => EncodingKey::from_secret(&read_fixture("test-only-hs256-secret")),
        Algorithm::RS256 => {
            EncodingKey::from_rsa_pem(&read_fixture("test-only-rs256-private.pem")).unwrap()
        }
        _ => EncodingKey::from_ed_pem(&read_fixture("test-only-eddsa-private.pem")).unwrap(),
    };
    encode(&Header::new(algorithm), claims, &key).expect("a token")
}

fn b64(value: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn api_keys_accepted_missing_wrong_and_out_of_scope() {
    let (host, _config) = guarded_host().await;
    let url = host.gateway_url("/api/guarded/private");

    let (status, _, body) = get(&url, &[("X-API-Key", CI_KEY)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["consumer"], json!({"id": "ci", "claims": null}));
    assert_eq!(body["x-api-key"], json!([]), "the key is not passed on");

    let (status, challenges, body) = get(&url, &[]).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["service"], "guarded");
    assert!(
        body["error"].as_str().unwrap().contains("X-API-Key"),
        "{body}"
    );
    assert!(
        challenges
            .iter()
            .any(|c| c == "Bearer realm=\"plugin-host\""),
        "{challenges:?}"
    );
    assert!(
        challenges.iter().any(|c| c.contains("X-API-Key")),
        "{challenges:?}"
    );

    let (status, challenges, body) = get(&url, &[("X-API-Key", "wrong-secret")]).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "unknown API key");
    assert!(
        challenges
            .iter()
            .any(|c| c.contains("error=\"invalid_token\"")),
        "{challenges:?}"
    );

    let (status, challenges, body) = get(&url, &[("X-API-Key", BILLING_KEY)]).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["service"], "guarded");
    assert_eq!(body["consumer"], "billing-only");
    assert!(challenges.is_empty(), "{challenges:?}");
}

#[tokio::test]
async fn public_endpoints_are_open_and_undeclared_paths_protected() {
    let (host, _config) = guarded_host().await;
    let (status, _, body) = get(&host.gateway_url("/api/guarded/public"), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["consumer"], Value::Null);
    // A valid credential on a public endpoint still names the caller.
    let (status, _, body) = get(
        &host.gateway_url("/api/guarded/public"),
        &[("X-API-Key", CI_KEY)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["consumer"]["id"], "ci");

    for path in [
        "/api/guarded/items/7",
        "/api/guarded/nowhere",
        "/api/guarded/public/deeper",
        "/api/guarded/",
    ] {
        let (status, challenges, body) = get(&host.gateway_url(path), &[]).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(!challenges.is_empty(), "{path}");
    }
    let (status, _, body) = get(
        &host.gateway_url("/api/guarded/nowhere"),
        &[("X-API-Key", CI_KEY)],
    )
    .await;
    assert_eq!(status, 404, "authenticated, the plugin answers: {body}");

    let head = client()
        .head(host.gateway_url("/api/guarded/private"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 401, "HEAD is GET");
    let post = client()
        .post(host.gateway_url("/api/guarded/private"))
        .header("X-API-Key", CI_KEY)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);

    // A CORS preflight never carries credentials and is not refused for
    // it; a plain OPTIONS is an undeclared method, so protected.
    let preflight = client()
        .request(
            reqwest::Method::OPTIONS,
            host.gateway_url("/api/guarded/private"),
        )
        .header("Origin", "https://app.test")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .unwrap();
    assert_ne!(preflight.status(), 401, "a preflight needs no credential");
    let options = client()
        .request(
            reqwest::Method::OPTIONS,
            host.gateway_url("/api/guarded/private"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(options.status(), 401);
}

#[tokio::test]
async fn jwts_of_each_algorithm_are_accepted_and_bad_ones_refused() {
    let (host, _config) = guarded_host().await;
    let url = host.gateway_url("/api/guarded/private");
    for (algorithm, iss) in [
        (Algorithm::HS256, HS_ISSUER),
        (Algorithm::RS256, RS_ISSUER),
        (Algorithm::EdDSA, ED_ISSUER),
    ] {
        let token = mint(algorithm, &claims(iss));
        let (status, _, body) = get(&url, &[("Authorization", &bearer(&token))]).await;
        assert_eq!(status, 200, "{algorithm:?}: {body}");
        assert_eq!(body["consumer"]["id"], format!("jwt:{iss}#ada"));
        assert_eq!(body["consumer"]["claims"]["role"], "tester");
        assert_eq!(body["consumer"]["claims"]["sub"], "ada");
        assert_eq!(
            body["authorization"],
            json!([]),
            "the token is not passed on"
        );
    }

    let now = get_current_timestamp();
    let with = |field: &str, value: Value| {
        let mut claims = claims(RS_ISSUER);
        claims[field] = value;
        mint(Algorithm::RS256, &claims)
    };
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(RS_ISSUER))
    );
    // Algorithm confusion: an HS256 token keyed with the RS256 issuer's
    // public key, which anyone may hold.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims(RS_ISSUER),
        &EncodingKey::from_secret(&read_fixture("test-only-rs256-public.pem")),
    )
    .unwrap();
    for (what, token, reason) in [
        ("expired", with("exp", json!(now - 120)), "expired"),
        (
            "not yet valid",
            with("nbf", json!(now + 120)),
            "not valid yet",
        ),
        (
            "wrong audience",
            with("aud", json!("elsewhere")),
            "audience",
        ),
        (
            "wrong issuer",
            with("iss", json!("https://evil.test")),
            "issuer",
        ),
        ("alg none", alg_none, "malformed"),
        ("HS256 with the RS256 public key", confused, "algorithm"),
    ] {
        let (status, challenges, body) = get(&url, &[("Authorization", &bearer(&token))]).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(reason),
            "{what}: {body}"
        );
        assert!(
            challenges.iter().any(|c| c.contains("invalid_token")),
            "{what}: {challenges:?}"
        );
    }
}

#[tokio::test]
async fn spoofed_identity_headers_never_reach_a_service() {
    let (host, _config) = guarded_host().await;
    host.mount_plugin(plugin_library("echo"), "libecho.so")
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    let mut protected = registration_for("remote-guarded", &upstream);
    protected["requires_auth"] = json!(true);
    protected["endpoints"] = json!([
        {"path": "echo/{what}", "method": "GET", "description": "echo", "is_public": false},
    ]);
    assert_eq!(register(&host, &protected).await.0, 201);
    let open = registration_for("remote-open", &upstream);
    assert_eq!(register(&host, &open).await.0, 201);
    let spoofed = [
        ("X-Consumer-Id", "admin"),
        ("X-Consumer-Claims", "eyJzdWIiOiJyb290In0"),
    ];

    // A plugin that asked for auth: the gateway's values only.
    let mut headers = spoofed.to_vec();
    headers.push(("X-API-Key", CI_KEY));
    let (status, _, body) = get(&host.gateway_url("/api/guarded/private"), &headers).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["x-consumer-id"], json!(["ci"]));
    assert_eq!(body["x-consumer-claims"], json!([]));
    // Its public route, anonymous: nothing at all.
    let (_, _, body) = get(&host.gateway_url("/api/guarded/public"), &spoofed).await;
    assert_eq!(body["x-consumer-id"], json!([]), "{body}");
    assert_eq!(body["consumer"], Value::Null);

    // A plugin that did not ask for auth: stripped all the same.
    let (status, _, body) = get(&host.gateway_url("/api/echo/x"), &spoofed).await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<&str> = body["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| pair[0].as_str().unwrap())
        .collect();
    assert!(
        !names.contains(&"x-consumer-id") && !names.contains(&"x-consumer-claims"),
        "{names:?}"
    );

    // A remote that asked for auth, with a token: the gateway's values.
    let token = mint(Algorithm::EdDSA, &claims(ED_ISSUER));
    let mut headers = spoofed.to_vec();
    let authorization = bearer(&token);
    headers.push(("Authorization", authorization.as_str()));
    let (status, _, body) = get(&host.gateway_url("/api/remote-guarded/echo/x"), &headers).await;
    assert_eq!(status, 200, "{body}");
    let seen = &body["headers"];
    assert_eq!(
        seen["x-consumer-id"],
        json!([format!("jwt:{ED_ISSUER}#ada")])
    );
    let payload = token.split('.').nth(1).unwrap();
    assert_eq!(seen["x-consumer-claims"], json!([payload]));
    let decoded: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(decoded["sub"], "ada");
    assert!(seen.get("authorization").is_none(), "{seen}");

    // A remote that did not: identity stripped, its own credentials kept.
    let mut headers = spoofed.to_vec();
    headers.push(("Authorization", "Bearer its-own-token"));
    let (status, _, body) = get(&host.gateway_url("/api/remote-open/echo/x"), &headers).await;
    assert_eq!(status, 200, "{body}");
    let seen = &body["headers"];
    assert!(seen.get("x-consumer-id").is_none(), "{seen}");
    assert!(seen.get("x-consumer-claims").is_none(), "{seen}");
    assert_eq!(seen["authorization"], json!(["Bearer its-own-token"]));
}

/// The seed guide's registration for `upstream`, with `GET /echo/{what}`
/// and `GET /hello` declared.
fn registration_for(name: &str, upstream: &Upstream) -> Value {
    let mut body = host_harness::http::registration(name, upstream.addr());
    body["endpoints"] = json!([
        {"path": "hello", "method": "GET", "description": "greeting", "is_public": true},
        {"path": "echo/{what}", "method": "GET", "description": "echo", "is_public": true},
    ]);
    body
}

#[tokio::test]
async fn a_remote_service_requiring_auth_is_enforced_by_what_it_declares() {
    let (host, _config) = host_with_config(&auth_config()).await;
    let upstream = Upstream::start().await;
    let mut body = registration_for("remote-svc", &upstream);
    body["requires_auth"] = json!(true);
    body["endpoints"] = json!([
        {"path": "hello", "method": "GET", "description": "greeting", "is_public": true},
        {"path": "/echo/{what}", "method": "GET", "description": "echo", "is_public": true},
        {"path": "echo/secret", "method": "GET", "description": "echo", "is_public": false},
    ]);
    assert_eq!(register(&host, &body).await.0, 201);

    for path in ["/api/remote-svc/hello", "/api/remote-svc/echo/x"] {
        let (status, _, answer) = get(&host.gateway_url(path), &[]).await;
        assert_eq!(status, 200, "public {path}: {answer}");
    }
    let secret = host.gateway_url("/api/remote-svc/echo/secret");
    let (status, challenges, _) = get(&secret, &[]).await;
    assert_eq!(status, 401);
    assert!(!challenges.is_empty());
    let (status, _, answer) = get(&secret, &[("X-API-Key", CI_KEY)]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["headers"]["x-consumer-id"], json!(["ci"]));
    let (status, _, _) = get(&secret, &[("X-API-Key", BILLING_KEY)]).await;
    assert_eq!(status, 403);
    // An undeclared path is protected, and so is one the upstream decodes
    // into the private endpoint (`%73` is `s`), though as sent it matches
    // the public template.
    for path in ["/api/remote-svc/bytes/1", "/api/remote-svc/echo/%73ecret"] {
        let (status, _, answer) = get(&host.gateway_url(path), &[]).await;
        assert_eq!(status, 401, "{path}: {answer}");
    }
}

#[tokio::test]
async fn requires_auth_with_no_credential_configured_is_never_open() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("guarded"), "libguarded.so")
        .await
        .unwrap();
    let (status, challenges, body) = get(
        &host.gateway_url("/api/guarded/private"),
        &[("X-API-Key", CI_KEY)],
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(!challenges.is_empty());
    let (status, _, _) = get(&host.gateway_url("/api/guarded/private"), &[]).await;
    assert_eq!(status, 401);
    let (status, _, body) = get(&host.gateway_url("/api/guarded/public"), &[]).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn an_invalid_auth_section_stops_the_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plugin-host.toml");
    let missing = dir.path().join("missing.pem");
    std::fs::write(
        &path,
        format!(
            "[[auth.jwt]]\nissuer = \"{RS_ISSUER}\"\naudiences = [\"{AUDIENCE}\"]\n\
             algorithm = \"RS256\"\npublic_key_file = \"{}\"\n",
            missing.display()
        ),
    )
    .unwrap();
    let refused = host_builder()
        .arg("--config")
        .arg(path.display().to_string())
        .start()
        .await
        .expect_err("the host must not start");
    let expected = format!(
        "auth.jwt[0].public_key_file: cannot read {}",
        missing.display()
    );
    assert!(refused.to_string().contains(&expected), "{refused}");
}

/// Keys are added and revoked by editing the file and sending SIGHUP; a
/// file with a bad `[auth]` section is refused whole and the keys in force
/// stay.
#[tokio::test]
async fn a_reload_adds_and_revokes_keys_and_a_bad_one_keeps_them() {
    let key = |id: &str, sha256: &str| {
        format!("[[auth.api_keys]]\nid = \"{id}\"\nsha256 = \"{sha256}\"\n")
    };
    let host = host_builder()
        .config(&key("ci", CI_SHA256))
        .start()
        .await
        .unwrap();
    host.mount_plugin(plugin_library("guarded"), "libguarded.so")
        .await
        .unwrap();
    let private = host.gateway_url("/api/guarded/private");
    let status = |api_key: &'static str| {
        let private = private.clone();
        async move {
            client()
                .get(&private)
                .header("x-api-key", api_key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(BILLING_KEY).await, 401);

    let mark = host.log_mark();
    host.write_config(&key("billing", BILLING_SHA256)).unwrap();
    host.sighup().unwrap();
    host.wait_for_log_since(mark, &["config reloaded"])
        .await
        .unwrap();
    assert_eq!(status(BILLING_KEY).await, 200, "added by the reload");
    assert_eq!(status(CI_KEY).await, 401, "revoked by the reload");

    let mark = host.log_mark();
    host.write_config(&format!(
        "{}{}",
        key("billing", BILLING_SHA256),
        key("ci", "not hex")
    ))
    .unwrap();
    host.sighup().unwrap();
    let refused = host
        .wait_for_log_since(mark, &["config reload refused"])
        .await
        .unwrap();
    assert!(refused.contains("auth.api_keys[1].sha256"), "{refused}");
    assert_eq!(status(BILLING_KEY).await, 200, "the keys in force stay");
    assert_eq!(status(CI_KEY).await, 401);
}
