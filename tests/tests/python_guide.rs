//! The seed guide's FastAPI plugin (section 3, `main.py`) against the real
//! host, and every command of the guide's section 5.
//!
//! The guide is the single source of `main.py`: the tests read it from
//! `../shared/seed-plugin-guide.zh.md` beside the checkout. They need it,
//! `python3` with `venv`, and pip access to PyPI (they install fastapi,
//! uvicorn, httpx and pydantic into a throwaway virtual environment), so
//! the ones that run `main.py` are `#[ignore]`d: `cargo xtask test` runs
//! them under `PLUGIN_HOST_REQUIRE_ALL=1`, where anything missing is a
//! failure; run alone with `--include-ignored`, a missing piece is a
//! printed `SKIPPED` line.
//!
//! Two runs: the guide's file byte for byte, on the guide's fixed ports
//! (gateway 8000, registry 8001, service 8010), which is the real
//! compatibility proof; and a copy with only the registry URL and the
//! service port changed, on free ports, which also survives a `kill -9` of
//! the host.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use host_harness::etcd::{self, Etcd};
use host_harness::http::{client, get_json};
use host_harness::workspace::{host_builder, plugin_library};
use host_harness::{Host, require_or_skip};
use integration_tests::python;
use serde_json::{Value, json};

/// The guide beside the checkout, as CI and the developers' machines lay
/// it out.
fn guide_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/seed-plugin-guide.zh.md")
}

/// The code of the first ```` ```python ```` block after the first heading
/// that names `main.py`: section 3, "编写主应用（main.py）".
fn main_py_block(guide: &str) -> Option<String> {
    let mut lines = guide
        .lines()
        .skip_while(|line| !(line.starts_with('#') && line.contains("main.py")))
        .skip_while(|line| line.trim_end() != "```python")
        .skip(1);
    let mut code = String::new();
    for line in lines.by_ref() {
        if line.trim_end() == "```" {
            return Some(code);
        }
        code.push_str(line);
        code.push('\n');
    }
    // No closing fence: not a block.
    None
}

/// The guide's `main.py`, or why there is none (no guide beside the
/// checkout). A guide without the block is a failure, not a skip.
fn guide_main_py() -> Result<String, String> {
    let path = guide_path();
    let guide = std::fs::read_to_string(&path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let code = main_py_block(&guide).unwrap_or_else(|| {
        panic!(
            "{}: no ```python block after a heading naming main.py",
            path.display()
        )
    });
    Ok(code)
}

/// The python of a fresh virtual environment with the guide's dependencies,
/// made once per test run, or why there is none.
fn python() -> Result<&'static Path, &'static str> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(make_venv)
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(String::as_str)
}

fn make_venv() -> Result<PathBuf, String> {
    // The guide's own install line.
    python::make_venv(
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-guide-venv"),
        &["fastapi", "uvicorn", "httpx", "pydantic"],
    )
}

/// [`python`] off the async runtime (it runs pip for a while).
async fn python_off_runtime() -> Result<PathBuf, String> {
    tokio::task::spawn_blocking(|| python().map(Path::to_owned).map_err(str::to_owned))
        .await
        .expect("setting up python panicked")
}

/// A running `python main.py`, killed when dropped; its output goes to a
/// file that is shown if the test fails.
struct Plugin {
    child: Option<Child>,
    log: PathBuf,
}

impl Plugin {
    fn start(python: &Path, dir: &Path, main_py: &str) -> Plugin {
        std::fs::write(dir.join("main.py"), main_py).expect("write main.py");
        let log = dir.join("plugin.log");
        let output = std::fs::File::create(&log).expect("plugin log");
        let child = Command::new(python)
            .arg("main.py")
            .current_dir(dir)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("plugin log"))
            .stderr(output)
            .spawn()
            .expect("start python main.py");
        Plugin {
            child: Some(child),
            log,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as Ctrl-C or `docker stop` would: uvicorn runs the
    /// guide's shutdown handler, which deregisters.
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("kill -TERM");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait().expect("try_wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "main.py did not stop on SIGTERM:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("main.py output:\n{}", self.output());
        }
    }
}

/// A copy of `main.py` registering with the registry on `registry_port`
/// and serving on a free port, which it answers.
fn on_free_port(main_py: &str, registry_port: u16) -> (String, u16) {
    let port = free_port();
    let main_py = main_py
        .replacen(
            "REGISTRY_URL = \"http://localhost:8001\"",
            &format!("REGISTRY_URL = \"http://localhost:{registry_port}\""),
            1,
        )
        .replacen("\"port\": 8010,", &format!("\"port\": {port},"), 1);
    assert!(
        main_py.contains(&format!("\"http://localhost:{registry_port}\""))
            && main_py.contains(&format!("\"port\": {port},")),
        "both substitutions applied"
    );
    (main_py, port)
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

async fn get(url: &str) -> (u16, Value) {
    get_json(url).await.unwrap()
}

/// Waits until the plugin registered and serves.
async fn wait_until_serving(host: &Host, plugin: &Plugin, direct: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let registered = host
            .logs()
            .contains("remote service registered service=my-plugin");
        let serving = client()
            .get(format!("{direct}/health"))
            .send()
            .await
            .is_ok_and(|answer| answer.status() == 200);
        if registered && serving {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "main.py did not register and serve within 30 s:\n{}\nhost:\n{}",
            plugin.output(),
            host.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every command of the guide's section 5 ("测试插件"), with the answers the
/// guide's `main.py` gives. `gateway`, `registry`, `direct`: the guide's
/// `http://localhost:8000`, `:8001`, `:8010` or their stand-ins.
async fn section_5(gateway: &str, registry: &str, direct: &str) {
    let hello = json!({"message": "Hello, Developer!"});
    // curl http://localhost:8010/hello?name=Developer
    assert_eq!(
        get(&format!("{direct}/hello?name=Developer")).await,
        (200, hello.clone())
    );
    // curl http://localhost:8000/api/my-plugin/hello?name=Developer
    assert_eq!(
        get(&format!("{gateway}/api/my-plugin/hello?name=Developer")).await,
        (200, hello)
    );
    // curl -X POST http://localhost:8000/api/my-plugin/data -H "Content-Type: application/json" -d '...'
    let created = client()
        .post(format!("{gateway}/api/my-plugin/data"))
        .header("Content-Type", "application/json")
        .body("{\n    \"title\": \"测试数据\",\n    \"content\": \"这是测试内容\"\n  }")
        .send()
        .await
        .expect("POST data");
    assert_eq!(created.status(), 200);
    let item = json!({"id": 1, "title": "测试数据", "content": "这是测试内容"});
    assert_eq!(
        created.json::<Value>().await.expect("JSON"),
        json!({"status": "created", "item": item})
    );
    // curl http://localhost:8000/api/my-plugin/data
    assert_eq!(
        get(&format!("{gateway}/api/my-plugin/data")).await,
        (200, json!({"data": [item], "count": 1}))
    );
    // curl http://localhost:8001/api/registry/services
    let (status, services) = get(&format!("{registry}/api/registry/services")).await;
    assert_eq!(status, 200);
    let plugin = services
        .as_array()
        .and_then(|all| all.iter().find(|service| service["name"] == "my-plugin"))
        .unwrap_or_else(|| panic!("my-plugin not listed: {services}"));
    assert_eq!(plugin["kind"], "remote");
    assert_eq!(plugin["status"], "healthy");
    assert_eq!(plugin["display_name"], "我的插件服务");
    assert_eq!(plugin["version"], "1.0.0");

    // Beyond section 5: the rest of main.py's routes through the gateway.
    assert_eq!(
        get(&format!("{gateway}/api/my-plugin/data/1")).await,
        (200, item)
    );
    assert_eq!(
        get(&format!("{gateway}/api/my-plugin/data/99")).await,
        (404, json!({"detail": "Item not found"}))
    );
    assert_eq!(
        get(&format!("{gateway}/api/my-plugin/")).await,
        (
            200,
            json!({"service": "我的插件服务", "version": "1.0.0", "status": "running"})
        )
    );
    // FastAPI redirects `/data/` to `http://<its Host>/data`: the client
    // must land back on the gateway, not on the plugin's private port.
    let redirected = client()
        .get(format!("{gateway}/api/my-plugin/data/"))
        .send()
        .await
        .expect("GET data/");
    assert_eq!(
        redirected.url().as_str(),
        format!("{gateway}/api/my-plugin/data")
    );
    assert_eq!(redirected.status(), 200);
}

#[test]
fn the_main_py_block_is_the_first_python_block_after_its_heading() {
    let guide = "## 2. 安装依赖\n```python\nnot this\n```\n\
                 ### 3. 编写主应用（main.py）\ntext\n```bash\nnor this\n```\n\
                 ```python\nREGISTRY_URL = 1\n\nprint(2)\n```\n```python\nnor this\n```\n";
    assert_eq!(
        main_py_block(guide).as_deref(),
        Some("REGISTRY_URL = 1\n\nprint(2)\n")
    );
    assert_eq!(main_py_block("### main.py\n```python\nunclosed\n"), None);
    assert_eq!(main_py_block("```python\nno heading\n```\n"), None);
}

#[test]
fn the_guides_main_py_has_what_the_tests_substitute() {
    let test = "python_guide::the_guides_main_py_has_what_the_tests_substitute";
    let Some(main_py) = require_or_skip(test, guide_main_py()) else {
        return;
    };
    for expected in [
        "REGISTRY_URL = \"http://localhost:8001\"",
        "\"port\": 8010,",
        "\"name\": \"my-plugin\"",
        "uvicorn.run(",
    ] {
        assert_eq!(main_py.matches(expected).count(), 1, "{expected}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 with venv, PyPI and ../shared/seed-plugin-guide.zh.md; run with --include-ignored, or PLUGIN_HOST_REQUIRE_ALL=1 cargo xtask test"]
async fn the_guides_main_py_verbatim_on_the_guides_ports() {
    const TEST: &str = "python_guide::the_guides_main_py_verbatim_on_the_guides_ports";
    let Some(main_py) = require_or_skip(TEST, guide_main_py()) else {
        return;
    };
    let busy: Vec<u16> = [8000, 8001, 8010]
        .into_iter()
        .filter(|port| !port_is_free(*port))
        .collect();
    let free = if busy.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "127.0.0.1 ports {busy:?} are in use; the guide's ports are fixed"
        ))
    };
    if require_or_skip(TEST, free).is_none() {
        return;
    }
    let Some(python) = require_or_skip(TEST, python_off_runtime().await) else {
        return;
    };
    let host = host_builder()
        .addrs("127.0.0.1:8000", "127.0.0.1:8001")
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut plugin = Plugin::start(&python, dir.path(), &main_py);
    wait_until_serving(&host, &plugin, "http://localhost:8010").await;
    assert!(
        plugin.output().contains("✓ 服务注册成功: my-plugin"),
        "{}",
        plugin.output()
    );

    section_5(
        "http://localhost:8000",
        "http://localhost:8001",
        "http://localhost:8010",
    )
    .await;

    plugin.stop().await;
    assert!(
        plugin.output().contains("✓ 服务注销成功"),
        "{}",
        plugin.output()
    );
    let (status, _) = get("http://localhost:8001/api/registry/services/my-plugin").await;
    assert_eq!(status, 404, "deregistered on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 with venv, PyPI and ../shared/seed-plugin-guide.zh.md; run with --include-ignored, or PLUGIN_HOST_REQUIRE_ALL=1 cargo xtask test"]
async fn a_copy_on_free_ports_survives_a_host_kill_9() {
    const TEST: &str = "python_guide::a_copy_on_free_ports_survives_a_host_kill_9";
    let Some(main_py) = require_or_skip(TEST, guide_main_py()) else {
        return;
    };
    let Some(python) = require_or_skip(TEST, python_off_runtime().await) else {
        return;
    };
    let host = host_builder().start().await.unwrap();
    let (gateway, registry) = (host.gateway_addr(), host.registry_addr());
    let (main_py, port) = on_free_port(&main_py, registry.port());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut plugin = Plugin::start(&python, dir.path(), &main_py);
    let direct = format!("http://localhost:{port}");
    wait_until_serving(&host, &plugin, &direct).await;
    section_5(&host.gateway_url(""), &host.registry_url(""), &direct).await;

    // The host dies; the plugin lives on and never registers again.
    let dirs = host.kill9();
    let host = host_builder()
        .dirs(dirs)
        .addrs(&gateway.to_string(), &registry.to_string())
        .start()
        .await
        .unwrap();
    let (status, data) = get(&host.gateway_url("/api/my-plugin/data")).await;
    assert_eq!(status, 200, "{data}");
    assert_eq!(data["count"], 1, "the same process, with its data: {data}");
    assert!(
        !host.logs().contains("remote service registered"),
        "{}",
        host.logs()
    );

    plugin.stop().await;
    let (status, _) = get(&host.registry_url("/api/registry/services/my-plugin")).await;
    assert_eq!(status, 404, "deregistered on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 with venv, PyPI and ../shared/seed-plugin-guide.zh.md; run with --include-ignored, or PLUGIN_HOST_REQUIRE_ALL=1 cargo xtask test"]
async fn the_catalogue_merges_the_guides_own_api_and_validates_as_openapi_3_1() {
    const TEST: &str =
        "python_guide::the_catalogue_merges_the_guides_own_api_and_validates_as_openapi_3_1";
    let Some(main_py) = require_or_skip(TEST, guide_main_py()) else {
        return;
    };
    let Some(python) = require_or_skip(TEST, python_off_runtime().await) else {
        return;
    };
    let tools =
        tokio::task::spawn_blocking(|| python::tools(Path::new(env!("CARGO_TARGET_TMPDIR"))))
            .await
            .expect("setting up python panicked");
    let Some(tools) = require_or_skip(TEST, tools) else {
        return;
    };
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();
    let (main_py, port) = on_free_port(&main_py, host.registry_addr().port());
    let dir = tempfile::tempdir().expect("temp dir");
    let mark = host.log_mark();
    let mut plugin = Plugin::start(&python, dir.path(), &main_py);
    wait_until_serving(&host, &plugin, &format!("http://localhost:{port}")).await;
    host.wait_for_log_since(
        mark,
        &["published API document merged", "service=my-plugin"],
    )
    .await
    .unwrap();

    let (status, catalogue) = get(&host.registry_url("/api/registry/openapi.json")).await;
    assert_eq!(status, 200, "{catalogue}");
    assert_eq!(catalogue["openapi"], "3.1.0");
    let paths = &catalogue["paths"];
    // FastAPI's own operations, at the gateway's paths, with their
    // parameters and schemas (prefixed with the service's name).
    let item = &paths["/api/my-plugin/data/{item_id}"]["get"];
    assert_eq!(item["parameters"][0]["name"], "item_id", "{catalogue}");
    assert!(
        item["operationId"]
            .as_str()
            .is_some_and(|id| id.starts_with("my-plugin.")),
        "{item}"
    );
    let create = &paths["/api/my-plugin/data"]["post"];
    let body_schema = &create["requestBody"]["content"]["application/json"]["schema"]["$ref"];
    assert_eq!(
        body_schema, "#/components/schemas/my-plugin.DataItem",
        "{create}"
    );
    assert!(catalogue["components"]["schemas"]["my-plugin.DataItem"].is_object());
    assert!(paths["/api/my-plugin/hello"]["get"].is_object());
    // The plugin's declared endpoints are there too.
    assert!(
        paths
            .as_object()
            .expect("paths")
            .keys()
            .any(|path| path.starts_with("/api/hello/")),
        "{paths}"
    );
    assert_eq!(catalogue["servers"][0]["url"], host.gateway_url(""));

    let file = dir.path().join("openapi.json");
    std::fs::write(&file, catalogue.to_string()).expect("write the catalogue");
    let validated = Command::new(&tools)
        .args([
            "-c",
            "import json, sys\n\
             from openapi_spec_validator import validate\n\
             validate(json.load(open(sys.argv[1])))\n",
        ])
        .arg(&file)
        .output()
        .expect("run the validator");
    assert!(
        validated.status.success(),
        "the catalogue is not valid OpenAPI 3.1: {}\n{catalogue}",
        String::from_utf8_lossy(&validated.stderr)
    );
    plugin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 with venv, PyPI, ../shared/seed-plugin-guide.zh.md, etcd and protoc; run with --include-ignored, or PLUGIN_HOST_REQUIRE_ALL=1 cargo xtask test"]
async fn a_copy_registered_with_one_host_is_reached_through_another_on_etcd() {
    const TEST: &str =
        "python_guide::a_copy_registered_with_one_host_is_reached_through_another_on_etcd";
    if require_or_skip(TEST, etcd::available()).is_none() {
        return;
    }
    let Some(main_py) = require_or_skip(TEST, guide_main_py()) else {
        return;
    };
    let Some(python) = require_or_skip(TEST, python_off_runtime().await) else {
        return;
    };
    let etcd = Etcd::single().await;
    let on_etcd =
        || host_builder().args(["--store", "etcd", "--etcd-endpoints", &etcd.endpoints()]);
    let a = on_etcd().start().await.unwrap();
    let b = on_etcd().start().await.unwrap();
    let (main_py, port) = on_free_port(&main_py, a.registry_addr().port());
    let dir = tempfile::tempdir().expect("temp dir");
    let mark = b.log_mark();
    let mut plugin = Plugin::start(&python, dir.path(), &main_py);
    let direct = format!("http://localhost:{port}");
    wait_until_serving(&a, &plugin, &direct).await;
    b.wait_for_log_since(
        mark,
        &["remote service changed in etcd", "service=my-plugin"],
    )
    .await
    .unwrap();
    // Every command of the guide's section 5, through the host it did
    // not register with.
    section_5(&b.gateway_url(""), &b.registry_url(""), &direct).await;

    let mark = b.log_mark();
    plugin.stop().await;
    b.wait_for_log_since(
        mark,
        &["remote service removed in etcd", "service=my-plugin"],
    )
    .await
    .unwrap();
    let (status, _) = get(&b.registry_url("/api/registry/services/my-plugin")).await;
    assert_eq!(status, 404, "deregistered through A, gone from B");
}
