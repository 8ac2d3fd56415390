//! The real `plugin-host` on `127.0.0.1:0` with directories of its own.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use crate::process::Proc;
use crate::{Error, PATIENCE, Result};

/// The value of `key=value` in a log line of the host, or of
/// `"key":"value"` in a JSON one (`--log-format json`).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!(" {key}=");
    if let Some(start) = line.find(&needle) {
        return line[start + needle.len()..].split_whitespace().next();
    }
    let needle = format!("\"{key}\":\"");
    let start = line.find(&needle)? + needle.len();
    line[start..].split('"').next()
}

/// A plugins directory and a data directory, kept across restarts of a
/// host; deleted when dropped.
#[derive(Debug)]
pub struct Dirs {
    root: tempfile::TempDir,
}

impl Dirs {
    /// Fresh, empty directories.
    pub fn new() -> Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("plugin-host-")
            .tempdir()
            .map_err(|error| Error::new(format!("temp dir: {error}")))?;
        // Not group-writable whatever the umask: the host refuses the files
        // of such a directory.
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(root.path().join("plugins"))
            .map_err(|error| Error::new(format!("plugins dir: {error}")))?;
        Ok(Self { root })
    }

    /// The watched plugins directory.
    pub fn plugins(&self) -> PathBuf {
        self.root.path().join("plugins")
    }

    /// The host's data directory.
    pub fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// Where [`HostBuilder::config`] writes the host's config file.
    pub fn config_file(&self) -> PathBuf {
        self.root.path().join("plugin-host.toml")
    }
}

/// Options for starting a host.
#[derive(Debug)]
pub struct HostBuilder {
    command: Command,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    config: Option<String>,
    dirs: Option<Dirs>,
    gateway_addr: String,
    registry_addr: String,
    log_filter: String,
}

impl HostBuilder {
    /// Adds a command-line argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds command-line arguments.
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable of the host.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Starts the host with `--config` naming a file holding `toml`
    /// ([`Dirs::config_file`]; [`Host::write_config`] rewrites it). The
    /// harness's own flags (directories, addresses) beat the file's keys.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_owned());
        self
    }

    /// Uses existing directories (e.g. of a host that was killed).
    pub fn dirs(mut self, dirs: Dirs) -> Self {
        self.dirs = Some(dirs);
        self
    }

    /// Fixed addresses instead of ephemeral ports on 127.0.0.1.
    pub fn addrs(mut self, gateway: &str, registry: &str) -> Self {
        gateway.clone_into(&mut self.gateway_addr);
        registry.clone_into(&mut self.registry_addr);
        self
    }

    /// `RUST_LOG` of the host (default `info,plugin_host=debug`; the bench
    /// uses `info`, which logs nothing per request).
    pub fn log_filter(mut self, filter: &str) -> Self {
        filter.clone_into(&mut self.log_filter);
        self
    }

    /// Starts the host and waits until it logs the addresses it listens
    /// on.
    pub async fn start(self) -> Result<Host> {
        let (proc, dirs) = self.spawn()?;
        let line = proc.wait_for_since(0, &["listening"], PATIENCE).await?;
        let address = |key| {
            field(&line, key)
                .and_then(|addr| addr.parse().ok())
                .ok_or_else(|| Error::new(format!("no `{key}=` address in `{line}`")))
        };
        Ok(Host {
            gateway: address("gateway")?,
            registry: address("registry")?,
            proc,
            dirs: Some(dirs),
        })
    }
}

/// A host that refused to start, as [`HostBuilder::start_refused`] saw it.
#[derive(Debug)]
pub struct Refused {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote, stdout and stderr.
    pub output: String,
    /// Its directories, as it left them.
    pub dirs: Dirs,
}

impl HostBuilder {
    /// Starts a host that is expected to refuse to start, and waits until
    /// it exited. Fails if it is still running after [`PATIENCE`] (it
    /// started instead).
    pub async fn start_refused(self) -> Result<Refused> {
        let (mut proc, dirs) = self.spawn()?;
        let status = proc.wait_for_exit(PATIENCE).await?;
        Ok(Refused {
            status,
            output: proc.output(),
            dirs,
        })
    }

    fn spawn(mut self) -> Result<(Proc, Dirs)> {
        let dirs = match self.dirs {
            Some(dirs) => dirs,
            None => Dirs::new()?,
        };
        if let Some(toml) = &self.config {
            write_config(&dirs, toml)?;
            self.command.arg("--config").arg(dirs.config_file());
        }
        self.command
            .arg("--plugins-dir")
            .arg(dirs.plugins())
            .arg("--data-dir")
            .arg(dirs.data())
            .args(["--gateway-addr", &self.gateway_addr])
            .args(["--registry-addr", &self.registry_addr])
            .args(&self.args)
            .envs(self.envs)
            .env("RUST_LOG", &self.log_filter)
            .env_remove("RUST_BACKTRACE");
        Ok((Proc::spawn("plugin-host", self.command)?, dirs))
    }
}

fn write_config(dirs: &Dirs, toml: &str) -> Result<()> {
    std::fs::write(dirs.config_file(), toml)
        .map_err(|error| Error::new(format!("write the config file: {error}")))
}

/// A running `plugin-host`, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Host {
    proc: Proc,
    /// `None` only once [`Host::kill9`] handed them back.
    dirs: Option<Dirs>,
    gateway: SocketAddr,
    registry: SocketAddr,
}

impl Host {
    /// Options for a host running `command` (the `plugin-host` binary,
    /// possibly behind a wrapper such as `taskset`); the harness adds the
    /// directories, the addresses and `RUST_LOG`.
    pub fn builder(command: Command) -> HostBuilder {
        HostBuilder {
            command,
            args: Vec::new(),
            envs: Vec::new(),
            config: None,
            dirs: None,
            gateway_addr: "127.0.0.1:0".to_owned(),
            registry_addr: "127.0.0.1:0".to_owned(),
            log_filter: "info,plugin_host=debug".to_owned(),
        }
    }

    /// The gateway's address.
    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway
    }

    /// The registry's address.
    pub fn registry_addr(&self) -> SocketAddr {
        self.registry
    }

    /// `http://<gateway><path>`.
    pub fn gateway_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway)
    }

    /// `http://<registry><path>`.
    pub fn registry_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.registry)
    }

    /// The host's process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Whether the host is still running.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    fn dirs(&self) -> &Dirs {
        self.dirs.as_ref().expect("dirs are only taken by kill9")
    }

    /// The watched plugins directory.
    pub fn plugins_dir(&self) -> PathBuf {
        self.dirs().plugins()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dirs().data()
    }

    /// The config file [`HostBuilder::config`] wrote.
    pub fn config_file(&self) -> PathBuf {
        self.dirs().config_file()
    }

    /// Replaces the content of the host's config file (the host reads it
    /// again on [`Host::sighup`]).
    pub fn write_config(&self, toml: &str) -> Result<()> {
        write_config(self.dirs(), toml)
    }

    /// Sends the host SIGHUP: reload the config file.
    pub fn sighup(&self) -> Result<()> {
        self.proc.signal("HUP")
    }

    /// Stops the host with SIGSTOP: it answers nothing and reads nothing
    /// (its etcd watch included) until [`Host::resume`]; the kernel still
    /// accepts connections and buffers what is sent to it.
    pub fn pause(&self) -> Result<()> {
        self.proc.signal("STOP")
    }

    /// Lets a host stopped by [`Host::pause`] run again (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.proc.signal("CONT")
    }

    /// Copies `library` into the plugins directory as `file` the way `cp`
    /// does: truncating and rewriting the file in place. The copy is mode
    /// 0755 whatever the source's mode and the umask: the host refuses a
    /// group- or world-writable plugin file.
    pub fn install_plugin(&self, library: impl AsRef<Path>, file: &str) -> Result<()> {
        let library = library.as_ref();
        let target = self.plugins_dir().join(file);
        let failed = |error| Error::new(format!("copy {} to {file}: {error}", library.display()));
        std::fs::copy(library, &target).map_err(failed)?;
        // Only if needed: a chmod is an event the host reacts to.
        let mode = std::fs::metadata(&target).map_err(failed)?.mode() & 0o7777;
        if mode != 0o755 {
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
                .map_err(failed)?;
        }
        Ok(())
    }

    /// Installs `library` as `file` (as [`Host::install_plugin`] does) and
    /// waits until the host mounted that file; returns the `plugin mounted`
    /// line.
    pub async fn mount_plugin(&self, library: impl AsRef<Path>, file: &str) -> Result<String> {
        let mark = self.log_mark();
        self.install_plugin(library, file)?;
        self.wait_for_log_since(mark, &["plugin mounted", &format!("file={file}")])
            .await
    }

    /// Writes `library` under a name the watcher ignores, then renames it
    /// to `file`: the atomic replace a deployment should use.
    pub fn rename_plugin_in(&self, library: impl AsRef<Path>, file: &str) -> Result<()> {
        let temp = format!(".{file}.partial");
        self.install_plugin(library, &temp)?;
        std::fs::rename(
            self.plugins_dir().join(&temp),
            self.plugins_dir().join(file),
        )
        .map_err(|error| Error::new(format!("rename {temp} to {file}: {error}")))
    }

    /// Removes `file` from the plugins directory.
    pub fn remove_plugin(&self, file: &str) -> Result<()> {
        std::fs::remove_file(self.plugins_dir().join(file))
            .map_err(|error| Error::new(format!("remove {file}: {error}")))
    }

    /// Everything the host logged so far.
    pub fn logs(&self) -> String {
        self.proc.output()
    }

    /// Number of log lines so far: a mark for the `*_since` methods.
    pub fn log_mark(&self) -> usize {
        self.proc.mark()
    }

    /// Log lines after `mark` containing all `needles`.
    pub fn log_lines_since(&self, mark: usize, needles: &[&str]) -> Vec<String> {
        self.proc.lines_since(mark, needles)
    }

    /// Waits for a log line containing `needle`.
    pub async fn wait_for_log(&self, needle: &str) -> Result<String> {
        self.wait_for_log_since(0, &[needle]).await
    }

    /// Waits for a log line after line `mark` containing all `needles`.
    pub async fn wait_for_log_since(&self, mark: usize, needles: &[&str]) -> Result<String> {
        self.proc.wait_for_since(mark, needles, PATIENCE).await
    }

    /// The host's `/proc/<pid>/maps`.
    pub fn maps(&self) -> Result<String> {
        std::fs::read_to_string(format!("/proc/{}/maps", self.pid()))
            .map_err(|error| Error::new(format!("maps of the host: {error}")))
    }

    /// The host's resident set size in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        self.proc
            .rss_kib()
            .ok_or_else(|| Error::new("no VmRSS: the host is gone"))
    }

    /// Kills the host with SIGKILL, as a crash would, and returns its
    /// directories for a restart.
    pub fn kill9(mut self) -> Dirs {
        self.proc.kill();
        self.dirs.take().expect("dirs are only taken by kill9")
    }

    /// Stops the host with SIGTERM and waits for it and its last log
    /// line; [`Host::logs`] still answers afterwards.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.proc.stop()
    }

    /// Stops the host as [`Host::stop`] does and returns its directories
    /// for a restart.
    pub fn stop_keeping_dirs(mut self) -> (Option<ExitStatus>, Dirs) {
        let exit = self.stop();
        (exit, self.dirs.take().expect("dirs are only taken once"))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // A test that is done (or failed) needs no graceful shutdown; the
        // directories go right after.
        self.proc.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn a_field_is_the_word_after_its_key() {
        let line = "2024 INFO plugin_host: listening gateway=127.0.0.1:8000 registry=[::1]:9";
        assert_eq!(field(line, "gateway"), Some("127.0.0.1:8000"));
        assert_eq!(field(line, "registry"), Some("[::1]:9"));
        assert_eq!(field(line, "way"), None, "a key is a whole word");
        assert_eq!(field(line, "missing"), None);
    }

    #[test]
    fn a_json_line_s_field_is_its_string_value() {
        let line = r#"{"level":"INFO","fields":{"message":"listening","gateway":"127.0.0.1:8000","registry":"[::1]:9"}}"#;
        assert_eq!(field(line, "gateway"), Some("127.0.0.1:8000"));
        assert_eq!(field(line, "registry"), Some("[::1]:9"));
        assert_eq!(field(line, "way"), None, "a key is a whole word");
    }
}
