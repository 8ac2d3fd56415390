//! Reloading the config file on SIGHUP: which pieces of the host a reload
//! replaces, and how.
//!
//! A reloadable piece is a value its users load per use from an
//! `Arc<ArcSwap<T>>`, and a function building it from the resolved
//! [`Config`] that does all of its validation. [`Live`] holds every piece
//! and the [`Reloader`] that rebuilds them: a reload builds every piece
//! from the new config first and stores them only if all of them built, so
//! it changes everything or nothing. A request holds the `Arc` it loaded
//! until it ends, so in-flight requests finish under the settings they
//! started with.
//!
//! # Adding a reloadable piece
//!
//! Two lines, in [`Live`] and [`Live::build`]:
//!
//! ```text
//! pub registry_tokens: Arc<ArcSwap<TokenPolicy>>,
//! // ...
//! registry_tokens: reloader.add(config, |config| {
//!     Ok(TokenPolicy::from_settings(&config.file.auth.registry)?)
//! })?,
//! ```
//!
//! (with a `HostError` variant `#[from]` the constructor's error), then hand
//! `live.registry_tokens.clone()` to its user in `run`. Start-up,
//! `check-config` and every reload then build it. A user that must act
//! when its piece changes, rather than load it per use, takes a
//! [`Reloader::subscribe`] channel, as the plugin manager does.
//!
//! Options that need a restart are not pieces: a reload keeps their old
//! values and warns about each one that changed
//! ([`Config::keeping_restart_keys`]).

use std::sync::Arc;

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};

use crate::admission::Admission;
use crate::auth::{Authenticator, ManagedKeys};
use crate::plugin::RuntimeLimits;
use crate::plugin_manager::PluginPolicy;
use crate::registry::TokenPolicy;
use crate::remote::InstancePolicy;
use crate::{Config, HostError};

/// Every reloadable piece of the host, live.
#[derive(Debug)]
pub struct Live {
    /// Per-plugin threads, queue and integrity pins, for the plugin
    /// manager (`[plugins] workers`, `queue`, `[plugin.<name>]`).
    pub plugin_policy: Arc<ArcSwap<PluginPolicy>>,
    /// The gateway's credentials (`[auth]` API keys and JWT issuers).
    pub authenticator: Arc<ArcSwap<Authenticator>>,
    /// The API keys added at run time through the registry's admin
    /// endpoints: not a piece (no file holds them), but every
    /// authenticator a reload builds consults them.
    pub managed_keys: Arc<ManagedKeys>,
    /// Who may write to and read the registry (`[auth.registry]`).
    pub registry_tokens: Arc<ArcSwap<TokenPolicy>>,
    /// CORS, rate limits and requests in flight per service (`[cors]`,
    /// `[rate_limit]`, `[service.<name>]`,
    /// `gateway.max_concurrent_per_service`); a reload keeps the counts in
    /// flight and the buckets of unchanged rates.
    pub admission: Arc<ArcSwap<Admission>>,
    /// Load balancing, outlier ejection, health check thresholds and the
    /// protect threshold for remote services' instances
    /// (`[load_balancing]`, `[outlier]`, `[health]`,
    /// `[service.<name>] load_balancing`); instances keep their state
    /// across a reload.
    pub instances: Arc<ArcSwap<InstancePolicy>>,
    /// Builds and stores every piece above again on reload.
    pub reloader: Reloader,
}

impl Live {
    /// Builds every reloadable piece from `config`: the first error is the
    /// host's refusal to start (or `check-config`'s verdict).
    pub fn build(config: &Config) -> Result<Live, HostError> {
        let mut reloader = Reloader::default();
        let managed_keys = Arc::new(ManagedKeys::new());
        let authenticator = reloader.add(config, {
            let managed_keys = managed_keys.clone();
            move |config| {
                Ok(Authenticator::from_settings(
                    &config.file.auth.gateway(),
                    &managed_keys,
                )?)
            }
        })?;
        Ok(Live {
            plugin_policy: reloader.add(config, plugin_policy)?,
            authenticator,
            managed_keys,
            registry_tokens: reloader.add(config, |config| {
                Ok(TokenPolicy::from_settings(&config.file.auth.registry)?)
            })?,
            admission: reloader.add_carrying_over(
                config,
                |config| {
                    Ok(Admission::from_settings(
                        &config.file.cors,
                        &config.file.service,
                        &config.file.rate_limit,
                        config.file.gateway.max_concurrent_per_service,
                    )?)
                },
                Some(Admission::carrying_over),
            )?,
            instances: reloader.add(config, |config| {
                Ok(InstancePolicy::from_settings(
                    &config.file.load_balancing,
                    &config.file.outlier,
                    &config.file.health,
                    config.file.service.iter().filter_map(|(name, settings)| {
                        settings.load_balancing.map(|balancing| (name, balancing))
                    }),
                )?)
            })?,
            reloader,
        })
    }
}

fn plugin_policy(config: &Config) -> Result<PluginPolicy, HostError> {
    let defaults = RuntimeLimits {
        workers: config.plugin_workers,
        queue: config.plugin_queue,
    };
    Ok(PluginPolicy::from_settings(defaults, &config.file.plugin)?)
}

/// How to build a piece from the config.
pub type Build<T> = Box<dyn Fn(&Config) -> Result<T, HostError> + Send + Sync>;

/// The reloadable pieces' live values and how to build each: replaces them
/// all from a new config, or none.
#[derive(Default)]
pub struct Reloader {
    pieces: Vec<Box<dyn Piece>>,
    subscribers: Vec<Sender<()>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("pieces", &self.pieces.len())
            .field("subscribers", &self.subscribers.len())
            .finish()
    }
}

/// A built value waiting to be stored.
type Staged = Box<dyn FnOnce() + Send>;

trait Piece: Send + Sync {
    /// Builds the piece from `config`; storing it is left to the caller,
    /// once every piece built.
    fn stage(&self, config: &Config) -> Result<Staged, HostError>;
}

/// How a new value takes over the state of the one it replaces (counters,
/// buckets), at the moment it is stored.
pub type CarryOver<T> = fn(T, &T) -> T;

struct Swappable<T> {
    live: Arc<ArcSwap<T>>,
    build: Build<T>,
    carry_over: Option<CarryOver<T>>,
}

impl<T: Send + Sync + 'static> Piece for Swappable<T> {
    fn stage(&self, config: &Config) -> Result<Staged, HostError> {
        let value = (self.build)(config)?;
        let live = self.live.clone();
        let carry_over = self.carry_over;
        Ok(Box::new(move || {
            let value = match carry_over {
                Some(carry_over) => carry_over(value, &live.load()),
                None => value,
            };
            live.store(Arc::new(value));
        }))
    }
}

impl Reloader {
    /// Builds a piece from `config` with `build`, and keeps `build` to
    /// rebuild it on reload; returns its live value.
    pub fn add<T: Send + Sync + 'static>(
        &mut self,
        config: &Config,
        build: impl Fn(&Config) -> Result<T, HostError> + Send + Sync + 'static,
    ) -> Result<Arc<ArcSwap<T>>, HostError> {
        self.add_carrying_over(config, build, None)
    }

    /// [`Reloader::add`] for a piece with state of its own that a reload
    /// must keep: `carry_over` moves it from the value in force to the new
    /// one when the new one is stored.
    pub fn add_carrying_over<T: Send + Sync + 'static>(
        &mut self,
        config: &Config,
        build: impl Fn(&Config) -> Result<T, HostError> + Send + Sync + 'static,
        carry_over: Option<CarryOver<T>>,
    ) -> Result<Arc<ArcSwap<T>>, HostError> {
        let live = Arc::new(ArcSwap::from_pointee(build(config)?));
        self.pieces.push(Box::new(Swappable {
            live: live.clone(),
            build: Box::new(build),
            carry_over,
        }));
        Ok(live)
    }

    /// A channel that gets a message after each reload that stored new
    /// values (one pending message at most: a slow reader sees the latest
    /// values once).
    pub fn subscribe(&mut self) -> Receiver<()> {
        let (sender, receiver) = crossbeam_channel::bounded(1);
        self.subscribers.push(sender);
        receiver
    }

    /// Builds every piece from `config` and, only if all of them built,
    /// stores them and tells the subscribers; otherwise changes nothing.
    /// Each piece switches atomically; they switch one after the other,
    /// with nothing left that can fail in between.
    pub fn apply(&self, config: &Config) -> Result<(), HostError> {
        let staged = self
            .pieces
            .iter()
            .map(|piece| piece.stage(config))
            .collect::<Result<Vec<_>, _>>()?;
        for store in staged {
            store();
        }
        for subscriber in &self.subscribers {
            // Full: a message is pending already.
            let _ = subscriber.try_send(());
        }
        Ok(())
    }
}

/// Reloads on each message of `requests` (one per SIGHUP) until the
/// channel closes: see [`reload`]. `running` is the config the host started
/// with.
pub async fn serve(
    running: Config,
    reloader: Reloader,
    mut requests: tokio::sync::mpsc::Receiver<()>,
) {
    let reloader = Arc::new(reloader);
    let mut running = running;
    while requests.recv().await.is_some() {
        let reloader = reloader.clone();
        let previous = running.clone();
        // Reading files and building pieces blocks.
        running = match tokio::task::spawn_blocking(move || reload(previous, &reloader)).await {
            Ok(now) => now,
            Err(error) => {
                tracing::error!(%error, "config reload failed; the settings are unchanged");
                running
            }
        };
    }
}

/// Reads `running`'s config file again, resolved against the same command
/// line and environment, and checks it as `check-config` would; if it is
/// valid, applies it (keeping the options that need a restart as they
/// are, with a WARN line naming each that changed) and logs `config
/// reloaded`; if not, logs `config reload refused` and changes nothing.
/// Returns the config in force afterwards.
pub fn reload(running: Config, reloader: &Reloader) -> Config {
    let Some(file) = running.config_file.clone() else {
        tracing::warn!(
            "SIGHUP: no config file to reload (the host was started without --config); nothing changed"
        );
        return running;
    };
    match reread(&running, reloader) {
        Ok((now, restart_keys)) => {
            for key in restart_keys {
                tracing::warn!(file = %file.display(), key = %key, "config key needs a restart; its old value stays in force");
            }
            tracing::info!(file = %file.display(), "config reloaded");
            now
        }
        Err(error) => {
            tracing::error!(file = %file.display(), %error, "config reload refused; the old settings stay in force");
            running
        }
    }
}

fn reread(running: &Config, reloader: &Reloader) -> Result<(Config, Vec<&'static str>), HostError> {
    let new = running.reread()?;
    // As a restart would find it, whatever a reload can apply of it.
    crate::check_settings(&new)?;
    let (now, restart_keys) = new.keeping_restart_keys(running);
    reloader.apply(&now)?;
    Ok((now, restart_keys))
}
