//! etcd clusters for the cluster tests and the bench: Debian's `etcd-server` (3.4,
//! `/usr/bin/etcd`), one or three members on loopback ports picked at
//! random, each with its own temporary data directory; never a system
//! service. A member can be killed (SIGKILL) and started again on the same
//! ports and data, as a crash and a restart would.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use crate::http::post_json;
use crate::{PATIENCE, Proc, workspace};

/// The etcd binary Debian's `etcd-server` installs.
const ETCD: &str = "/usr/bin/etcd";

/// What etcd 3.4 logs once a member serves clients.
const READY: &str = "ready to serve client requests";

/// Whether a cluster test can run here: an etcd binary, and a host built
/// with its etcd store; otherwise why not, for `require_or_skip`.
pub fn available() -> Result<(), String> {
    if !Path::new(ETCD).is_file() {
        return Err(format!(
            "no {ETCD} (Debian's etcd-server; `.ci/run` installs it)"
        ));
    }
    workspace::etcd_feature()
}

/// One member: its name, ports, data directory and process (`None` while
/// killed).
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    proc: Option<Proc>,
}

/// A running etcd cluster; its members are stopped, and their data
/// removed, when it is dropped.
#[derive(Debug)]
pub struct Etcd {
    members: Vec<Member>,
    initial_cluster: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// One member.
    pub async fn single() -> Etcd {
        Etcd::start(1).await
    }

    /// Three members: a quorum survives the loss of any one.
    pub async fn three() -> Etcd {
        Etcd::start(3).await
    }

    async fn start(size: usize) -> Etcd {
        let dir = tempfile::tempdir().expect("a temporary directory for etcd");
        let members: Vec<Member> = (0..size)
            .map(|index| Member {
                name: format!("m{index}"),
                client_port: free_port(),
                peer_port: free_port(),
                data: dir.path().join(format!("m{index}")),
                proc: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|member| format!("{}=http://127.0.0.1:{}", member.name, member.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            members,
            initial_cluster,
            _dir: dir,
        };
        // A member of several waits for its peers before it is ready: start
        // them all, then wait.
        for index in 0..size {
            etcd.spawn(index);
        }
        for index in 0..size {
            etcd.wait_ready(index).await;
        }
        etcd
    }

    /// The client URLs, comma-separated: what `--etcd-endpoints` takes.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|member| format!("http://127.0.0.1:{}", member.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills member `index` with SIGKILL, as a crash would.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut proc) = self.members[index].proc.take() {
            proc.kill();
        }
    }

    /// Kills every member.
    pub fn kill_all(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }

    /// Starts every killed member again on its ports and data, and waits
    /// until each serves clients.
    pub async fn restart_killed(&mut self) {
        let killed: Vec<usize> = (0..self.members.len())
            .filter(|index| self.members[*index].proc.is_none())
            .collect();
        for index in &killed {
            self.spawn(*index);
        }
        for index in killed {
            self.wait_ready(index).await;
        }
    }

    /// Puts `value` at `key`, through etcd's JSON gateway (no host
    /// involved).
    pub async fn put(&self, key: &str, value: &[u8]) {
        self.call(
            "put",
            json!({"key": B64.encode(key), "value": B64.encode(value)}),
        )
        .await;
    }

    /// Deletes every key under `prefix`.
    pub async fn delete_prefix(&self, prefix: &str) {
        self.call(
            "deleterange",
            json!({"key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix))}),
        )
        .await;
    }

    /// Compacts etcd's history up to its current revision (a watch from an
    /// older one is then refused as compacted); returns that revision.
    pub async fn compact(&self) -> i64 {
        let answer = self.call("range", json!({"key": B64.encode("/")})).await;
        // The gateway writes 64-bit integers as strings.
        let revision: i64 = answer["header"]["revision"]
            .as_str()
            .and_then(|revision| revision.parse().ok())
            .unwrap_or_else(|| panic!("no revision in {answer}"));
        self.call(
            "compaction",
            json!({"revision": revision.to_string(), "physical": true}),
        )
        .await;
        revision
    }

    /// `POST /v3/kv/<method>` with `body` to the first running member;
    /// panics on a failure, which no test expects.
    async fn call(&self, method: &str, body: Value) -> Value {
        let member = self
            .members
            .iter()
            .find(|member| member.proc.is_some())
            .expect("a running member");
        let url = format!("http://127.0.0.1:{}/v3/kv/{method}", member.client_port);
        let (status, answer) = post_json(&url, &body).await.expect("etcd answers");
        assert_eq!(status, 200, "{method}: {answer}");
        answer
    }

    fn spawn(&mut self, index: usize) {
        let member = &self.members[index];
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let mut command = Command::new(ETCD);
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "plugin-host-tests"])
            // Short elections, so a lost leader is replaced within a
            // second on loopback.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"]);
        let name = format!("etcd {}", member.name);
        let proc = Proc::spawn(&name, command).expect("start etcd");
        self.members[index].proc = Some(proc);
    }

    async fn wait_ready(&self, index: usize) {
        let proc = self.members[index].proc.as_ref().expect("a running member");
        proc.wait_for_since(0, &[READY], PATIENCE)
            .await
            .expect("etcd serves clients");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut proc) = member.proc.take() {
                proc.kill();
            }
        }
    }
}

/// The end of the key range holding every key under `prefix`: the prefix
/// with its last byte increased (etcd's `--prefix`).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// A loopback port nothing listens on now. etcd takes ports, not a
/// listening socket, so there is a short window in which another process
/// could take it; a clash fails the start loudly rather than silently.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}
