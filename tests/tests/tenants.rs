//! Tenants (`docs/MULTI_TENANT.md`): two tenants registering one name are
//! routed apart and never see each other's services; a client's
//! `X-Tenant-ID` counts only when the config trusts it (and is removed
//! otherwise); an API key naming a tenant decides, and a header naming
//! another is refused; tenants survive `kill -9`, and a record stored
//! before tenants is read as the default tenant's; a tenant's plugin files
//! live in `plugins-dir/<tenant>/`, created at run time.

use host_harness::Host;
use host_harness::http::{client, registration};
use host_harness::workspace::{host_builder, plugin_library};
use integration_tests::upstream::Upstream;
use redb::{ReadableDatabase, ReadableTable};
use serde_json::Value;

const TRUSTED: &str = "[tenants]\ntrust_header = true\n";

/// `TRUSTED` plus an API key `acme-key` of tenant `acme`.
const KEYED: &str = r#"
[tenants]
trust_header = true

[[auth.api_keys]]
id = "acme-ci"
sha256 = "afacab3575137afa4e00d9cbcafcb14c9ae25f779d964eb0ea5b2c4eb5dfd163"
tenant = "acme"
"#;

/// Registers `name` at `upstream` as `tenant` (through `X-Tenant-ID`).
async fn register_as(host: &Host, tenant: Option<&str>, name: &str, upstream: &Upstream) -> Value {
    let mut request = client()
        .post(host.registry_url("/api/registry/register"))
        .json(&registration(name, upstream.addr()));
    if let Some(tenant) = tenant {
        request = request.header("X-Tenant-ID", tenant);
    }
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    let body: Value = answer.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    body
}

/// A gateway GET of `path` with `headers`: status and JSON body.
async fn get_as(host: &Host, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = client().get(host.gateway_url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

/// The listing as `tenant` sees it: (name, tenant) pairs.
async fn listed_as(host: &Host, tenant: Option<&str>) -> Vec<(String, String)> {
    let mut request = client().get(host.registry_url("/api/registry/services"));
    if let Some(tenant) = tenant {
        request = request.header("X-Tenant-ID", tenant);
    }
    let listed: Value = request.send().await.unwrap().json().await.unwrap();
    listed
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            (
                entry["name"].as_str().unwrap().to_owned(),
                entry["tenant"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(name, tenant)| ((*name).to_owned(), (*tenant).to_owned()))
        .collect()
}

/// The values of header `name` an upstream's echo received.
fn upstream_saw(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_array()
        .map(|values| {
            values
                .iter()
                .map(|value| value.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The values of header `name` the echo plugin received.
fn plugin_saw(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|pair| pair[0] == name)
        .map(|pair| pair[1].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn two_tenants_with_one_name_are_routed_apart_and_see_only_their_own() {
    let host = host_builder().config(TRUSTED).start().await.unwrap();
    let (acme, globex, shared) = (
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
    );
    assert_eq!(
        register_as(&host, Some("acme"), "svc", &acme).await["tenant"],
        "acme"
    );
    register_as(&host, Some("globex"), "svc", &globex).await;
    assert_eq!(
        register_as(&host, None, "common", &shared).await["tenant"],
        "default"
    );

    let (status, echo) = get_as(&host, "/api/svc/echo", &[("X-Tenant-ID", "acme")]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(upstream_saw(&echo, "x-tenant-id"), ["acme"]);
    assert_eq!((acme.echoes(), globex.echoes()), (1, 0));
    let (status, echo) = get_as(&host, "/api/svc/echo", &[("X-Tenant-ID", "globex")]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(upstream_saw(&echo, "x-tenant-id"), ["globex"]);
    assert_eq!((acme.echoes(), globex.echoes()), (1, 1));

    // Neither the default tenant nor a third tenant reaches a tenant's svc.
    for headers in [&[][..], &[("X-Tenant-ID", "initech")][..]] {
        let (status, refused) = get_as(&host, "/api/svc/echo", headers).await;
        assert_eq!(status, 404, "{refused}");
    }
    assert_eq!((acme.echoes(), globex.echoes()), (1, 1));

    // The shared (default) services serve every tenant, told which.
    let (status, echo) = get_as(&host, "/api/common/echo", &[("X-Tenant-ID", "acme")]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(upstream_saw(&echo, "x-tenant-id"), ["acme"]);

    let (status, refused) =
        get_as(&host, "/api/svc/echo", &[("X-Tenant-ID", "Not/A/Tenant")]).await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["field"], "X-Tenant-ID");

    assert_eq!(
        listed_as(&host, Some("acme")).await,
        pairs(&[("common", "default"), ("svc", "acme")])
    );
    assert_eq!(
        listed_as(&host, Some("globex")).await,
        pairs(&[("common", "default"), ("svc", "globex")])
    );
    assert_eq!(
        listed_as(&host, None).await,
        pairs(&[("common", "default")])
    );

    // The API catalogue is the caller's view too.
    let catalogue = |tenant: &'static str| {
        let url = host.registry_url("/api/registry/openapi.json");
        async move {
            let document: Value = client()
                .get(url)
                .header("X-Tenant-ID", tenant)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let mut paths: Vec<String> = document["paths"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            paths.sort();
            paths
        }
    };
    assert_eq!(
        catalogue("acme").await,
        ["/api/common/hello", "/api/svc/hello"]
    );
    assert_eq!(catalogue("initech").await, ["/api/common/hello"]);
    // Metrics keep the two tenants' `svc` apart.
    let metrics = client()
        .get(host.registry_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for label in [r#"service="acme/svc""#, r#"service="globex/svc""#] {
        assert!(metrics.contains(label), "{label} in:\n{metrics}");
    }

    // A tenant's deregistration acts in its own tenant only.
    let answer = client()
        .post(host.registry_url("/api/registry/deregister/svc"))
        .header("X-Tenant-ID", "globex")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let (status, _) = get_as(&host, "/api/svc/echo", &[("X-Tenant-ID", "globex")]).await;
    assert_eq!(status, 404);
    let (status, _) = get_as(&host, "/api/svc/echo", &[("X-Tenant-ID", "acme")]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_untrusted_tenant_header_is_ignored_and_stripped() {
    let host = host_builder().start().await.unwrap();
    let upstream = Upstream::start().await;
    // Registered in the default tenant whatever the header says.
    let answer = register_as(&host, Some("acme"), "svc", &upstream).await;
    assert_eq!(answer["tenant"], "default", "{answer}");
    host.mount_plugin(plugin_library("echo"), "libecho.so")
        .await
        .unwrap();

    let (status, echo) = get_as(&host, "/api/svc/echo", &[("X-Tenant-ID", "acme")]).await;
    assert_eq!(status, 200, "{echo}");
    assert!(upstream_saw(&echo, "x-tenant-id").is_empty(), "{echo}");
    let (status, echo) = get_as(&host, "/api/echo/x", &[("X-Tenant-ID", "acme")]).await;
    assert_eq!(status, 200, "{echo}");
    assert!(plugin_saw(&echo, "x-tenant-id").is_empty(), "{echo}");
    assert_eq!(echo["tenant"], "default");
    assert_eq!(
        listed_as(&host, Some("acme")).await,
        pairs(&[("echo", "default"), ("svc", "default")])
    );
}

#[tokio::test]
async fn an_api_key_names_the_tenant_and_a_conflicting_header_is_refused() {
    let host = host_builder().config(KEYED).start().await.unwrap();
    let (acme, shared) = (Upstream::start().await, Upstream::start().await);
    register_as(&host, Some("acme"), "svc", &acme).await;
    register_as(&host, None, "svc", &shared).await;
    host.mount_plugin(plugin_library("echo"), "libecho.so")
        .await
        .unwrap();
    let key = ("X-API-Key", "acme-key");

    let (status, echo) = get_as(&host, "/api/svc/echo", &[key]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(upstream_saw(&echo, "x-tenant-id"), ["acme"]);
    assert_eq!((acme.echoes(), shared.echoes()), (1, 0));
    let (status, _) = get_as(&host, "/api/svc/echo", &[key, ("X-Tenant-ID", "acme")]).await;
    assert_eq!(status, 200);

    let (status, refused) = get_as(&host, "/api/svc/echo", &[key, ("X-Tenant-ID", "globex")]).await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["tenant"], "acme");
    assert_eq!(refused["x_tenant_id"], "globex");
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.contains("acme") && error.contains("globex"),
        "{error}"
    );
    assert_eq!((acme.echoes(), shared.echoes()), (2, 0));

    // Without the key, the default tenant's svc.
    let (status, _) = get_as(&host, "/api/svc/echo", &[]).await;
    assert_eq!(status, 200);
    assert_eq!((acme.echoes(), shared.echoes()), (2, 1));

    // A plugin reads the tenant through `Request::tenant()`.
    let (status, echo) = get_as(&host, "/api/echo/x", &[key]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["tenant"], "acme");
    assert_eq!(plugin_saw(&echo, "x-tenant-id"), ["acme"]);
}

#[tokio::test]
async fn tenants_survive_kill_9_and_records_from_before_tenants_are_the_defaults() {
    let host = host_builder().config(TRUSTED).start().await.unwrap();
    let (acme, shared) = (Upstream::start().await, Upstream::start().await);
    register_as(&host, Some("acme"), "svc", &acme).await;
    register_as(&host, None, "old", &shared).await;
    let dirs = host.kill9();

    // `old` as the release before tenants stored it: under its bare name.
    let database = dirs.data().join("registry.redb");
    {
        let db = redb::Database::open(&database).unwrap();
        let table: redb::TableDefinition<&str, &[u8]> =
            redb::TableDefinition::new("remote_services");
        let write = db.begin_write().unwrap();
        {
            let mut table = write.open_table(table).unwrap();
            let record = table
                .remove("t/default/s/old")
                .unwrap()
                .expect("the default tenant's record")
                .value()
                .to_vec();
            table.insert("old", record.as_slice()).unwrap();
        }
        write.commit().unwrap();
        let read = db.begin_read().unwrap();
        let keys: Vec<String> = read
            .open_table(table)
            .unwrap()
            .iter()
            .unwrap()
            .map(|entry| entry.unwrap().0.value().to_owned())
            .collect();
        assert_eq!(keys, ["old", "t/acme/s/svc"]);
    }

    let host = host_builder()
        .dirs(dirs)
        .config(TRUSTED)
        .start()
        .await
        .unwrap();
    let (status, echo) = get_as(&host, "/api/svc/echo", &[("X-Tenant-ID", "acme")]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(acme.echoes(), 1);
    let (status, _) = get_as(&host, "/api/svc/echo", &[]).await;
    assert_eq!(status, 404, "acme's svc is still acme's alone");
    let (status, echo) = get_as(&host, "/api/old/echo", &[]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(
        listed_as(&host, Some("acme")).await,
        pairs(&[("old", "default"), ("svc", "acme")])
    );
    let admin_view = client()
        .get(host.registry_url("/api/registry/services?tenant=acme"))
        .header("X-Tenant-ID", "globex")
        .send()
        .await
        .unwrap();
    assert_eq!(
        admin_view.status().as_u16(),
        403,
        "only the admin lists another tenant"
    );
}

/// Creates `plugins-dir/<name>/`, mode 0755 whatever the umask.
fn tenant_dir(host: &Host, name: &str) {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(host.plugins_dir().join(name))
        .unwrap();
}

#[tokio::test]
async fn a_tenants_plugins_live_in_its_subdirectory() {
    let host = host_builder().config(TRUSTED).start().await.unwrap();
    // Created after the start: the watcher picks the directory up.
    tenant_dir(&host, "acme");
    let mounted = host
        .mount_plugin(plugin_library("echo"), "acme/libecho.so")
        .await
        .unwrap();
    assert!(mounted.contains("tenant=acme"), "{mounted}");

    let (status, echo) = get_as(&host, "/api/echo/x", &[("X-Tenant-ID", "acme")]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["tenant"], "acme");
    for headers in [&[][..], &[("X-Tenant-ID", "globex")][..]] {
        let (status, refused) = get_as(&host, "/api/echo/x", headers).await;
        assert_eq!(status, 404, "{refused}");
    }
    assert_eq!(
        listed_as(&host, Some("acme")).await,
        pairs(&[("echo", "acme")])
    );
    assert!(listed_as(&host, None).await.is_empty());

    // The same file in the default tenant too: both mounted, each its own.
    host.mount_plugin(plugin_library("echo"), "libecho.so")
        .await
        .unwrap();
    let (status, echo) = get_as(&host, "/api/echo/x", &[]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["tenant"], "default");

    // A directory that is no tenant id: its file is refused and listed.
    let mark = host.log_mark();
    tenant_dir(&host, "Not_A_Tenant");
    host.install_plugin(plugin_library("echo"), "Not_A_Tenant/libecho.so")
        .unwrap();
    host.wait_for_log_since(mark, &["plugin file refused", "Not_A_Tenant/libecho.so"])
        .await
        .unwrap();
    let files: Value = client()
        .get(host.registry_url("/api/registry/plugins/files"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let refused = files["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|file| file["file"] == "Not_A_Tenant/libecho.so")
        .unwrap_or_else(|| panic!("listed: {files}"));
    assert_eq!(refused["state"], "refused");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("not a tenant id"),
        "{refused}"
    );

    // A tenant directory others may write is refused, as the plugins
    // directory would be.
    let mark = host.log_mark();
    tenant_dir(&host, "lax");
    std::fs::set_permissions(
        host.plugins_dir().join("lax"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    host.install_plugin(plugin_library("echo"), "lax/libecho.so")
        .unwrap();
    let refused = host
        .wait_for_log_since(mark, &["plugin file refused", "lax/libecho.so"])
        .await
        .unwrap();
    assert!(
        refused.contains("writable by group and others"),
        "{refused}"
    );
    let (status, _) = get_as(&host, "/api/echo/x", &[("X-Tenant-ID", "lax")]).await;
    assert_eq!(status, 200, "lax reaches the shared echo only");

    // Removing the tenant's directory unmounts its plugin, not the default's.
    let mark = host.log_mark();
    std::fs::remove_dir_all(host.plugins_dir().join("acme")).unwrap();
    host.wait_for_log_since(mark, &["plugin unmounted", "file=acme/libecho.so"])
        .await
        .unwrap();
    let (status, echo) = get_as(&host, "/api/echo/x", &[("X-Tenant-ID", "acme")]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["tenant"], "acme", "the shared echo, told the tenant");
    assert_eq!(
        listed_as(&host, Some("acme")).await,
        pairs(&[("echo", "default")])
    );
}

#[tokio::test]
async fn a_plugins_calls_are_resolved_in_its_requests_tenant() {
    let config = format!("{TRUSTED}\n[plugin.caller-a.settings]\npeer = \"svc\"\n");
    let host = host_builder().config(&config).start().await.unwrap();
    let (acme, shared) = (Upstream::start().await, Upstream::start().await);
    register_as(&host, Some("acme"), "svc", &acme).await;
    register_as(&host, None, "svc", &shared).await;
    // A shared plugin, calling `svc` for whoever called it.
    host.mount_plugin(plugin_library("caller_a"), "libcaller_a.so")
        .await
        .unwrap();
    let call = "/api/caller-a/call?service=svc&path=/echo";

    let (status, echo) = get_as(&host, call, &[("X-Tenant-ID", "acme")]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(upstream_saw(&echo, "x-tenant-id"), ["acme"]);
    assert_eq!((acme.echoes(), shared.echoes()), (1, 0));
    let (status, echo) = get_as(&host, call, &[]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(upstream_saw(&echo, "x-tenant-id"), ["default"]);
    assert_eq!((acme.echoes(), shared.echoes()), (1, 1));
    let (status, refused) = get_as(&host, call, &[("X-Tenant-ID", "globex")]).await;
    assert_eq!(status, 200, "{refused}");
    assert_eq!(
        (acme.echoes(), shared.echoes()),
        (1, 2),
        "globex reaches the shared svc"
    );
}

/// Registry tokens `admin`, and `team-a` (of tenant `acme`); the header is
/// not trusted.
const TOKENS: &str = r#"
[auth.registry]
admin_token_sha256 = "8c6976e5b5410415bde908bd4dee15dfb167a9c873fc4bb8a81f6f2ab448a918"

[[auth.registry.tokens]]
id = "team-a"
sha256 = "96c2886c51d1dfb4901d9feccff66213ce3e27406282ff6f602a4258a33dacec"
names = ["*"]
tenant = "acme"
"#;

/// A registry request with `token` and `headers`: status and JSON body.
async fn registry_as(
    host: &Host,
    method: reqwest::Method,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, Value) {
    let mut request = client()
        .request(method, host.registry_url(path))
        .bearer_auth(token);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_registry_token_and_an_admin_added_key_name_their_tenant() {
    let host = host_builder().config(TOKENS).start().await.unwrap();
    let (acme, shared) = (Upstream::start().await, Upstream::start().await);
    let post = reqwest::Method::POST;
    let register = "/api/registry/register";
    let (status, answer) = registry_as(
        &host,
        post.clone(),
        register,
        "team-a",
        &[],
        Some(&registration("svc", acme.addr())),
    )
    .await;
    assert_eq!(
        (status, &answer["tenant"]),
        (201, &Value::from("acme")),
        "{answer}"
    );
    let (status, answer) = registry_as(
        &host,
        post.clone(),
        register,
        "admin",
        &[],
        Some(&registration("svc", shared.addr())),
    )
    .await;
    assert_eq!(
        (status, &answer["tenant"]),
        (201, &Value::from("default")),
        "{answer}"
    );
    // The header is not trusted: the token's tenant decides.
    let (status, answer) = registry_as(
        &host,
        post.clone(),
        register,
        "team-a",
        &[("X-Tenant-ID", "globex")],
        Some(&registration("svc", acme.addr())),
    )
    .await;
    assert_eq!(
        (status, &answer["tenant"]),
        (200, &Value::from("acme")),
        "{answer}"
    );

    let listed = |token: &'static str, query: &'static str| {
        let host = &host;
        async move {
            let (status, listed) = registry_as(
                host,
                reqwest::Method::GET,
                &format!("/api/registry/services{query}"),
                token,
                &[],
                None,
            )
            .await;
            assert_eq!(status, 200, "{listed}");
            listed
                .as_array()
                .unwrap()
                .iter()
                .map(|entry| {
                    (
                        entry["name"].as_str().unwrap().to_owned(),
                        entry["tenant"].as_str().unwrap().to_owned(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let both = pairs(&[("svc", "acme"), ("svc", "default")]);
    assert_eq!(listed("team-a", "").await, both);
    assert_eq!(listed("admin", "").await, both);
    assert_eq!(
        listed("admin", "?tenant=acme").await,
        pairs(&[("svc", "acme")])
    );

    let (status, added) = registry_as(
        &host,
        post,
        "/api/registry/admin/api-keys",
        "admin",
        &[],
        Some(&serde_json::json!({"id": "acme-robot", "tenant": "acme"})),
    )
    .await;
    assert_eq!(status, 201, "{added}");
    let key = added["key"].as_str().unwrap();
    let (status, echo) = get_as(&host, "/api/svc/echo", &[("X-API-Key", key)]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(upstream_saw(&echo, "x-tenant-id"), ["acme"]);
    // The header is not trusted here: it changes nothing.
    let (status, _) = get_as(&host, "/api/svc/echo", &[("X-Tenant-ID", "acme")]).await;
    assert_eq!(status, 200);
    assert_eq!((acme.echoes(), shared.echoes()), (1, 1));
}

/// Registers version `version` of `name` at `upstream` as `tenant`.
async fn register_version_as(host: &Host, tenant: &str, version: &str, upstream: &Upstream) {
    let mut body = registration("svc", upstream.addr());
    body["version"] = version.into();
    let answer = client()
        .post(host.registry_url("/api/registry/register"))
        .header("X-Tenant-ID", tenant)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 201);
}

#[tokio::test]
async fn a_tenants_traffic_split_is_its_own_and_survives_kill_9() {
    let host = host_builder().config(TRUSTED).start().await.unwrap();
    let upstreams = [
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
    ];
    let [acme_1, acme_2, shared_1, shared_2] = &upstreams;
    register_version_as(&host, "acme", "1.0.0", acme_1).await;
    register_version_as(&host, "acme", "2.0.0", acme_2).await;
    register_version_as(&host, "default", "1.0.0", shared_1).await;
    register_version_as(&host, "default", "2.0.0", shared_2).await;
    let split = |tenant: &'static str, name: &'static str| {
        let url = host.registry_url(&format!("/api/registry/services/{name}/traffic"));
        async move {
            let answer = client()
                .put(url)
                .header("X-Tenant-ID", tenant)
                .json(&serde_json::json!({"weights": {"1.0.0": 100}}))
                .send()
                .await
                .unwrap();
            let status = answer.status().as_u16();
            (status, answer.json::<Value>().await.unwrap())
        }
    };
    let (status, answer) = split("acme", "svc").await;
    assert_eq!(status, 200, "{answer}");
    // A tenant never sets the split of a name it does not hold itself.
    let (status, refused) = split("globex", "svc").await;
    assert_eq!(status, 404, "{refused}");
    assert_eq!(refused["tenant"], "globex");

    let echoes = || upstreams.iter().map(Upstream::echoes).collect::<Vec<_>>();
    get_as(&host, "/api/svc/echo", &[("X-Tenant-ID", "acme")]).await;
    get_as(&host, "/api/svc/echo", &[]).await;
    assert_eq!(
        echoes(),
        [1, 0, 0, 1],
        "acme's split, the default's highest"
    );

    let dirs = host.kill9();
    let host = host_builder()
        .dirs(dirs)
        .config(TRUSTED)
        .start()
        .await
        .unwrap();
    get_as(&host, "/api/svc/echo", &[("X-Tenant-ID", "acme")]).await;
    get_as(&host, "/api/svc/echo", &[]).await;
    assert_eq!(echoes(), [2, 0, 0, 2], "the split survived the restart");
}
