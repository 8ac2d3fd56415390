use super::*;

/// The config for `args` (after the program name) and a file with `toml`
/// at a path it is not read from.
fn resolve_with(command: clap::Command, args: &[&str], toml: &str) -> Result<Config, ConfigError> {
    let matches = command
        .try_get_matches_from(std::iter::once("plugin-host").chain(args.iter().copied()))
        .expect("a valid command line");
    let file = FileConfig::parse(toml).expect("valid TOML");
    Config::from_arg_matches(&matches)?
        .resolve(matches, Some((PathBuf::from("/etc/ph.toml"), file)))
}

fn resolve(args: &[&str], toml: &str) -> Result<Config, ConfigError> {
    resolve_with(Config::command(), args, toml)
}

fn refusal(args: &[&str], toml: &str) -> String {
    resolve(args, toml).expect_err("refused").to_string()
}

#[test]
fn the_file_beats_the_default() {
    let config = resolve(
        &[],
        "[plugins]\nworkers = 2\ndir = \"/srv/plugins\"\n[connections]\nidle_timeout = \"5s\"\n",
    )
    .unwrap();
    assert_eq!(config.plugin_workers, 2);
    assert_eq!(config.plugins_dir, PathBuf::from("/srv/plugins"));
    assert_eq!(config.idle_timeout, Duration::from_secs(5));
    assert_eq!(config.plugin_queue, 1024, "unset: the default");
    assert_eq!(config.config_file, Some(PathBuf::from("/etc/ph.toml")));
}

#[test]
fn a_flag_beats_the_file() {
    let config = resolve(
        &["--plugin-workers", "8", "--idle-timeout", "7s"],
        "[plugins]\nworkers = 2\n[connections]\nidle_timeout = \"5s\"\n",
    )
    .unwrap();
    assert_eq!(config.plugin_workers, 8);
    assert_eq!(config.idle_timeout, Duration::from_secs(7));
}

#[test]
fn the_environment_beats_the_file() {
    // Setting a variable is unsafe in a threaded test process, so the
    // option reads one every process has.
    let path = std::env::var_os("PATH").expect("PATH is set");
    let command = Config::command().mut_arg("plugins_dir", |arg| arg.env("PATH"));
    let config = resolve_with(command, &[], "[plugins]\ndir = \"/srv/plugins\"\n").unwrap();
    assert_eq!(config.plugins_dir, PathBuf::from(path));
}

#[test]
fn a_bad_file_value_is_refused_with_its_key_even_under_a_flag() {
    assert_eq!(
        refusal(&[], "[plugins]\nworkers = 0\n"),
        "config file /etc/ph.toml: plugins.workers: must be between 1 and 256"
    );
    assert_eq!(
        refusal(&["--plugin-workers", "8"], "[plugins]\nworkers = 257\n"),
        "config file /etc/ph.toml: plugins.workers: must be between 1 and 256"
    );
    assert_eq!(
        refusal(&[], "[connections]\nheader_read_timeout = \"0s\"\n"),
        "config file /etc/ph.toml: connections.header_read_timeout: must be longer than zero"
    );
    assert_eq!(
        refusal(&[], "[connections]\nmax_connections = 0\n"),
        "config file /etc/ph.toml: connections.max_connections: must be at least 1"
    );
    assert_eq!(
        refusal(&[], "[plugins]\nmax_threads = 0\n"),
        "config file /etc/ph.toml: plugins.max_threads: must be at least 1"
    );
}

#[test]
fn a_flag_is_checked_as_its_key_is() {
    let error = Config::command()
        .try_get_matches_from(["plugin-host", "--plugin-workers", "0"])
        .expect_err("refused");
    assert!(
        error.to_string().contains("must be between 1 and 256"),
        "{error}"
    );
}

#[test]
fn the_rules_between_options_hold_whatever_set_them() {
    assert_eq!(
        refusal(&[], "[registry]\nevict_after = \"1m\"\n"),
        "config file /etc/ph.toml: registry.evict_after: must be longer than --heartbeat-ttl (1m 30s)"
    );
    assert_eq!(
        refusal(
            &["--evict-after", "1m"],
            "[registry]\nheartbeat_ttl = \"2m\"\n"
        ),
        "--evict-after: must be longer than registry.heartbeat_ttl (2m)"
    );
    assert_eq!(
        refusal(&[], "[registry]\nheartbeat_ttl = \"0s\"\n"),
        "config file /etc/ph.toml: registry.heartbeat_ttl: must be longer than zero"
    );
    let flags_only = Config::command()
        .try_get_matches_from(["plugin-host", "--health-check-interval", "0s"])
        .unwrap();
    let error = Config::from_command_line(flags_only).expect_err("refused");
    assert_eq!(
        error.to_string(),
        "--health-check-interval: must be longer than zero"
    );
}

#[test]
fn check_config_reads_its_own_file() {
    let matches = Config::command()
        .try_get_matches_from([
            "plugin-host",
            "--config",
            "/not/read.toml",
            "check-config",
            "/no/such/file.toml",
        ])
        .unwrap();
    let error = Config::from_command_line(matches).expect_err("no such file");
    assert!(
        error
            .to_string()
            .starts_with("config file /no/such/file.toml: "),
        "{error}"
    );
}

#[test]
fn a_reload_keeps_what_needs_a_restart_and_names_it() {
    let running = resolve(&[], "[plugins]\nworkers = 2\n").unwrap();
    let new = resolve(
        &[],
        "[plugins]\nworkers = 3\ndir = \"/elsewhere\"\n[gateway]\nlisten = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    let (now, kept) = new.keeping_restart_keys(&running);
    assert_eq!(kept, ["gateway.listen", "plugins.dir"]);
    assert_eq!(now.gateway_addr, running.gateway_addr);
    assert_eq!(now.plugins_dir, running.plugins_dir);
    assert_eq!(now.plugin_workers, 3, "reloadable: applied");
    let trusting = resolve(&[], "[tenants]\ntrust_header = true\n").unwrap();
    let (now, kept) = trusting.keeping_restart_keys(&running);
    assert_eq!(kept, ["tenants.trust_header"]);
    assert!(!now.file.tenants.trust_header);
}

#[test]
fn the_version_names_the_plugin_abi() {
    let version = Config::command().render_version();
    assert_eq!(
        version.trim_end(),
        format!(
            "plugin-host {} (plugin ABI {})",
            env!("CARGO_PKG_VERSION"),
            plugin_api::ffi::ABI_VERSION
        )
    );
}

/// The example shipped at the repository's root, as the docs show it.
const EXAMPLE: &str = include_str!("../../../plugin-host.example.toml");

#[test]
fn the_shipped_example_resolves_and_passes_every_check() {
    let config = resolve(&[], EXAMPLE).expect("the example resolves");
    crate::check_settings(&config).expect("the example passes every check");
    assert_eq!(
        config.plugins_dir,
        PathBuf::from("/var/lib/plugin-host/plugins")
    );
}

#[test]
fn the_guide_shows_the_shipped_example_verbatim() {
    let guide = include_str!("../../../docs/GATEWAY_CONFIG.md");
    assert!(
        guide.contains(&format!("```toml\n{EXAMPLE}```\n")),
        "docs/GATEWAY_CONFIG.md must include plugin-host.example.toml verbatim"
    );
}

#[test]
fn the_etcd_store_is_refused_without_endpoints_or_without_the_feature() {
    let error = refusal(&[], "[registry]\nstore = \"etcd\"\n");
    if cfg!(feature = "etcd") {
        // Set nowhere: named as the flag.
        assert!(
            error.starts_with("--etcd-endpoints: the etcd store needs at least one endpoint"),
            "{error}"
        );
        let config = resolve(
            &[
                "--etcd-endpoints",
                "http://127.0.0.1:2379,http://127.0.0.1:2380",
            ],
            "[registry]\nstore = \"etcd\"\netcd_prefix = \"/staging\"\n",
        )
        .unwrap();
        let store = config.registry_store();
        assert_eq!(store.kind, StoreKind::Etcd);
        assert_eq!(store.etcd_endpoints.len(), 2);
        assert_eq!(store.etcd_prefix, "/staging");
    } else {
        assert!(error.contains("/etc/ph.toml: registry.store:"), "{error}");
        assert!(error.contains("--features etcd"), "{error}");
    }
}

#[test]
fn an_etcd_prefix_must_be_an_absolute_key_path() {
    for bad in ["plugin-host", "/plugin-host/", "/with space", ""] {
        let error = refusal(&[], &format!("[registry]\netcd_prefix = {bad:?}\n"));
        assert!(error.contains("registry.etcd_prefix"), "{bad:?}: {error}");
        assert!(error.contains("not a key prefix"), "{bad:?}: {error}");
    }
    assert!(resolve(&[], "[registry]\netcd_prefix = \"/a/b\"\n").is_ok());
}
