//! The seed guide's FastAPI plugin (section 3, `main.py`) against the real
//! host, and every command of the guide's section 5.
//!
//! Needs `python3` with `venv` and pip access to PyPI: the test installs
//! fastapi, uvicorn, httpx and pydantic into a throwaway virtual
//! environment. Where that is impossible it says why on the terminal and
//! passes without checking anything; it never skips silently.
//!
//! Two runs: the guide's file byte for byte, on the guide's fixed ports
//! (gateway 8000, registry 8001, service 8010) when they are free, which
//! is the real compatibility proof; and a copy with only the registry URL
//! and the service port changed, on free ports, which always runs and also
//! survives a `kill -9` of the host.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use integration_tests::{Host, client};
use serde_json::{Value, json};

/// `main.py` from section 3 of `seed-plugin-guide.zh.md`, verbatim (the
/// test checks it against the guide when the guide is beside the
/// checkout).
const GUIDE_MAIN_PY: &str = r####""""
我的插件服务
"""
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
import httpx
import asyncio
from typing import Optional, List

# 创建 FastAPI 应用
app = FastAPI(
    title="My Plugin Service",
    description="我的自定义插件服务",
    version="1.0.0",
)

# ==================== 服务注册配置 ====================

# 配置注册中心地址
REGISTRY_URL = "http://localhost:8001"

# 服务配置
SERVICE_CONFIG = {
    "name": "my-plugin",              # 服务唯一标识
    "display_name": "我的插件服务",    # 显示名称
    "description": "这是我的第一个插件服务",
    "version": "1.0.0",
    "host": "localhost",              # 服务主机
    "port": 8010,                     # 服务端口
    "base_path": "/",                 # 基础路径
    "health_check_url": "/health",    # 健康检查端点
    "metadata": {
        "author": "Your Name",
        "category": "custom",
    },
    "tags": ["plugin", "custom"],
    "requires_auth": False,           # 是否需要认证
    "endpoints": [
        # 定义所有端点
        {
            "path": "hello",
            "method": "GET",
            "description": "问候端点",
            "is_public": True,
        },
        {
            "path": "data",
            "method": "GET",
            "description": "获取数据列表",
            "is_public": True,
        },
        {
            "path": "data",
            "method": "POST",
            "description": "创建数据",
            "is_public": True,
        },
    ],
}


# ==================== 服务注册逻辑 ====================

async def register_service():
    """向注册中心注册服务"""
    async with httpx.AsyncClient() as client:
        try:
            response = await client.post(
                f"{REGISTRY_URL}/api/registry/register",
                json=SERVICE_CONFIG,
            )
            if response.status_code in [200, 201]:
                print(f"✓ 服务注册成功: {SERVICE_CONFIG['name']}")
                return response.json()
            else:
                print(f"✗ 服务注册失败: {response.status_code}")
        except Exception as e:
            print(f"✗ 连接注册中心失败: {e}")
            print(f"  请确保注册中心运行在 {REGISTRY_URL}")


async def send_heartbeat():
    """定期发送心跳"""
    while True:
        await asyncio.sleep(30)  # 每30秒一次
        async with httpx.AsyncClient() as client:
            try:
                await client.post(
                    f"{REGISTRY_URL}/api/registry/heartbeat",
                    json={
                        "service_id": SERVICE_CONFIG["name"],
                        "status": "healthy",
                    },
                )
            except Exception:
                pass  # 忽略心跳失败


@app.on_event("startup")
async def startup_event():
    """启动时注册服务并开始心跳"""
    await register_service()
    asyncio.create_task(send_heartbeat())


@app.on_event("shutdown")
async def shutdown_event():
    """关闭时注销服务"""
    async with httpx.AsyncClient() as client:
        try:
            await client.post(
                f"{REGISTRY_URL}/api/registry/deregister/{SERVICE_CONFIG['name']}"
            )
            print("✓ 服务注销成功")
        except Exception as e:
            print(f"✗ 服务注销失败: {e}")


# ==================== 业务逻辑 ====================

# 数据模型
class DataItem(BaseModel):
    id: Optional[int] = None
    title: str
    content: str


# 内存存储
data_store: List[DataItem] = []
id_counter = 1


@app.get("/")
async def root():
    """根端点"""
    return {
        "service": SERVICE_CONFIG["display_name"],
        "version": SERVICE_CONFIG["version"],
        "status": "running",
    }


@app.get("/health")
async def health_check():
    """健康检查"""
    return {"status": "healthy"}


@app.get("/hello")
async def hello(name: str = "World"):
    """问候端点"""
    return {"message": f"Hello, {name}!"}


@app.get("/data")
async def get_data():
    """获取所有数据"""
    return {"data": data_store, "count": len(data_store)}


@app.post("/data")
async def create_data(item: DataItem):
    """创建新数据"""
    global id_counter
    item.id = id_counter
    data_store.append(item)
    id_counter += 1
    return {"status": "created", "item": item}


@app.get("/data/{item_id}")
async def get_data_item(item_id: int):
    """获取单个数据"""
    for item in data_store:
        if item.id == item_id:
            return item
    raise HTTPException(status_code=404, detail="Item not found")


# ==================== 启动服务 ====================

if __name__ == "__main__":
    import uvicorn
    uvicorn.run(
        app,
        host=SERVICE_CONFIG["host"],
        port=SERVICE_CONFIG["port"],
    )
"####;

/// Says why a test checked nothing, on the terminal even when the test
/// harness captures output (it captures `eprintln!`, not writes to the
/// stderr handle).
fn skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// The guide beside the checkout, as CI and the developers' machines lay
/// it out.
fn guide_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/seed-plugin-guide.zh.md")
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
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-guide-venv");
    let _ = std::fs::remove_dir_all(&venv);
    let created = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .map_err(|error| format!("cannot run python3: {error}"))?;
    if !created.status.success() {
        return Err(format!(
            "python3 -m venv failed: {}",
            String::from_utf8_lossy(&created.stderr).trim()
        ));
    }
    // The guide's own install line, bounded in time if PyPI is unreachable.
    let installed = Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--retries",
            "1",
            "--timeout",
            "20",
            "fastapi",
            "uvicorn",
            "httpx",
            "pydantic",
        ])
        .output()
        .map_err(|error| format!("cannot run pip: {error}"))?;
    if !installed.status.success() {
        let stderr = String::from_utf8_lossy(&installed.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(format!(
            "pip install fastapi uvicorn httpx pydantic failed: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    Ok(venv.join("bin/python"))
}

async fn python_or_skip(test: &str) -> Option<PathBuf> {
    match tokio::task::spawn_blocking(|| python().map(Path::to_owned)).await {
        Ok(Ok(python)) => Some(python),
        Ok(Err(reason)) => {
            skip(test, reason);
            None
        }
        Err(error) => panic!("setting up python: {error}"),
    }
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
    let answer = client().get(url).send().await.expect(url);
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
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
}

#[test]
fn the_embedded_main_py_is_the_guides() {
    let Ok(guide) = std::fs::read_to_string(guide_path()) else {
        skip(
            "python_guide::the_embedded_main_py_is_the_guides",
            &format!("{} not found", guide_path().display()),
        );
        return;
    };
    let section = guide.find("（main.py）").expect("section 3 of the guide");
    let start = guide[section..].find("```python\n").expect("code block") + section + 10;
    let end = guide[start..].find("```\n").expect("end of code block") + start;
    assert_eq!(&guide[start..end], GUIDE_MAIN_PY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_main_py_verbatim_on_the_guides_ports() {
    const TEST: &str = "python_guide::the_guides_main_py_verbatim_on_the_guides_ports";
    let busy: Vec<u16> = [8000, 8001, 8010]
        .into_iter()
        .filter(|port| !port_is_free(*port))
        .collect();
    if !busy.is_empty() {
        skip(
            TEST,
            &format!("127.0.0.1 ports {busy:?} are in use; the guide's ports are fixed"),
        );
        return;
    }
    let Some(python) = python_or_skip(TEST).await else {
        return;
    };
    let host = Host::builder()
        .addrs("127.0.0.1:8000", "127.0.0.1:8001")
        .start()
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut plugin = Plugin::start(&python, dir.path(), GUIDE_MAIN_PY);
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
async fn a_copy_on_free_ports_survives_a_host_kill_9() {
    const TEST: &str = "python_guide::a_copy_on_free_ports_survives_a_host_kill_9";
    let Some(python) = python_or_skip(TEST).await else {
        return;
    };
    let host = Host::start().await;
    let (gateway, registry) = (host.gateway_addr(), host.registry_addr());
    let port = free_port();
    let main_py = GUIDE_MAIN_PY
        .replacen(
            "REGISTRY_URL = \"http://localhost:8001\"",
            &format!("REGISTRY_URL = \"http://localhost:{}\"", registry.port()),
            1,
        )
        .replacen("\"port\": 8010,", &format!("\"port\": {port},"), 1);
    assert!(
        main_py.contains(&format!("\"http://localhost:{}\"", registry.port()))
            && main_py.contains(&format!("\"port\": {port},")),
        "both substitutions applied"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let mut plugin = Plugin::start(&python, dir.path(), &main_py);
    let direct = format!("http://localhost:{port}");
    wait_until_serving(&host, &plugin, &direct).await;
    section_5(&host.gateway_url(""), &host.registry_url(""), &direct).await;

    // The host dies; the plugin lives on and never registers again.
    let dirs = host.kill9();
    let host = Host::builder()
        .dirs(dirs)
        .addrs(&gateway.to_string(), &registry.to_string())
        .start()
        .await;
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
