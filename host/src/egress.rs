//! Where the host may connect on a caller's behalf.
//!
//! A registration names a `host:port` that the gateway will forward
//! requests to and the liveness task will poll: whoever can register can
//! aim the host at any address it can reach. The policy bounds that: an
//! upstream's addresses must be inside an allow-list of networks (by
//! default loopback and the private ranges; never link-local, where cloud
//! metadata services live, nor the unspecified address), and an upstream
//! may never be one of the host's own listeners (a service pointing at the
//! gateway would make every request a loop; one pointing at the registry
//! would expose the registry API through the gateway).
//!
//! The registry checks a registration's resolved addresses before
//! accepting it, and [`Resolver`] checks them again at every connection,
//! so a name that later resolves elsewhere (DNS rebinding) is refused too.
//! Loops that no address check can see (a chain through other gateways)
//! are stopped by [`LoopGuard`]: every request the host sends carries a
//! `Via` entry naming this host, and one that comes back, or has passed
//! too many hops, is refused.

use std::future::Future;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{HeaderMap, HeaderValue, header};
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use ipnet::IpNet;
use tower_service::Service;

/// The networks the default allow-list admits: loopback and the private
/// ranges (RFC 1918, unique local IPv6).
pub const DEFAULT_ALLOWED: &[&str] = &[
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
];

/// Which upstream addresses are acceptable. Cheap to share: clone the
/// `Arc` it lives in.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    allowed: Vec<IpNet>,
    /// The host's listeners, as bound, and which each is.
    own_listeners: Vec<(SocketAddr, &'static str)>,
}

/// Why an upstream address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The name does not resolve.
    #[error("`{host}` does not resolve: {error}")]
    Unresolvable {
        /// The host name.
        host: String,
        /// The resolver's error.
        error: String,
    },
    /// An address outside the allow-list.
    #[error(
        "{ip} is outside the upstream allow-list ({allowed}); link-local and unspecified addresses are never allowed"
    )]
    NotAllowed {
        /// The address.
        ip: IpAddr,
        /// The allow-list, as configured.
        allowed: String,
    },
    /// One of the host's own listeners.
    #[error(
        "{addr} is this host's own {which} listener; a service there would loop back into the host"
    )]
    OwnListener {
        /// The address.
        addr: SocketAddr,
        /// `gateway` or `registry`.
        which: &'static str,
    },
}

impl EgressPolicy {
    /// A policy admitting `allowed` networks; no own listeners known yet.
    pub fn new(allowed: Vec<IpNet>) -> Self {
        Self {
            allowed,
            own_listeners: Vec::new(),
        }
    }

    /// The same policy, also refusing the host's listeners: `[gateway,
    /// registry]`, as bound.
    pub fn with_own_listeners(mut self, gateway: SocketAddr, registry: SocketAddr) -> Self {
        self.own_listeners = vec![(gateway, "gateway"), (registry, "registry")];
        self
    }

    /// Whether the host may connect to `ip`, whatever the port.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Refused> {
        let ip = ip.to_canonical();
        let never = ip.is_unspecified() || is_link_local(ip) || ip.is_multicast();
        if never || !self.allowed.iter().any(|net| net.contains(&ip)) {
            return Err(Refused::NotAllowed {
                ip,
                allowed: self
                    .allowed
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(())
    }

    /// Whether the host may connect to `addr`: an allowed address that is
    /// not one of its own listeners.
    pub fn check(&self, addr: SocketAddr) -> Result<(), Refused> {
        self.check_ip(addr.ip())?;
        let ip = addr.ip().to_canonical();
        for &(listener, which) in &self.own_listeners {
            let same_ip = listener.ip().to_canonical() == ip
                // A listener on 0.0.0.0 or [::] answers on every local
                // address; binding a socket to `ip` succeeds only for those.
                || (listener.ip().is_unspecified() && (ip.is_loopback() || is_local(ip)));
            if listener.port() == addr.port() && same_ip {
                return Err(Refused::OwnListener { addr, which });
            }
        }
        Ok(())
    }

    /// Resolves `host:port` and checks every address it gives: a name that
    /// resolves partly outside the policy is refused whole.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Refused> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|error| Refused::Unresolvable {
                host: host.to_owned(),
                error: error.to_string(),
            })?
            .collect();
        if addrs.is_empty() {
            return Err(Refused::Unresolvable {
                host: host.to_owned(),
                error: "no addresses".to_owned(),
            });
        }
        for addr in &addrs {
            self.check(*addr)?;
        }
        Ok(addrs)
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

fn is_local(ip: IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The system resolver, keeping only the addresses the policy admits: the
/// proxy's and the health checks' connector use it, so every connection is
/// checked, not just the registration.
#[derive(Debug, Clone)]
pub struct Resolver {
    system: GaiResolver,
    policy: Arc<EgressPolicy>,
}

impl Resolver {
    /// A resolver filtering through `policy`.
    pub fn new(policy: Arc<EgressPolicy>) -> Self {
        Self {
            system: GaiResolver::new(),
            policy,
        }
    }
}

type Resolving =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, std::io::Error>> + Send>>;

impl Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.system.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        let resolving = self.system.call(name);
        Box::pin(async move {
            let mut refusal = None;
            let allowed: Vec<SocketAddr> = resolving
                .await?
                .filter(|addr| match policy.check_ip(addr.ip()) {
                    Ok(()) => true,
                    Err(refused) => {
                        refusal = Some(refused);
                        false
                    }
                })
                .collect();
            match refusal {
                Some(refused) if allowed.is_empty() => Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("`{host}` resolves to no allowed address: {refused}"),
                )),
                _ => Ok(allowed.into_iter()),
            }
        })
    }
}

/// Most `Via` entries a request may carry into the gateway. Real chains of
/// gateways and proxies are a handful long; a loop through other hosts
/// (which [`LoopGuard`] cannot recognise as its own) grows by one per pass.
pub const MAX_VIA_HOPS: usize = 16;

/// Marks the requests this host sends with a `Via` entry of its own, and
/// recognises them when they come back.
#[derive(Debug, Clone)]
pub struct LoopGuard {
    /// `plugin-host-<random>`: tells this process apart from other hosts
    /// in a chain, and says nothing about the machine.
    pseudonym: String,
    via: HeaderValue,
}

/// A request that already passed through this host, or too many hops.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoopDetected {
    /// It carries this host's own `Via` entry.
    #[error("request loop: this request already passed through this host ({0})")]
    Returned(String),
    /// It carries more entries than [`MAX_VIA_HOPS`].
    #[error("request passed {0} proxies, more than the limit of {MAX_VIA_HOPS}")]
    TooManyHops(usize),
}

impl LoopGuard {
    /// A guard with a pseudonym of its own.
    pub fn new() -> Self {
        let pseudonym = format!(
            "plugin-host-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let via = HeaderValue::from_str(&format!("1.1 {pseudonym}"))
            .expect("a pseudonym of ASCII letters, digits and `-`");
        Self { pseudonym, via }
    }

    /// Refuses a request that carries this host's `Via` entry or more than
    /// [`MAX_VIA_HOPS`] entries.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), LoopDetected> {
        let mut hops = 0;
        for value in headers.get_all(header::VIA) {
            // An entry that is not text still counts as a hop.
            let text = value.to_str().unwrap_or_default();
            for entry in text.split(',') {
                hops += 1;
                // `<protocol> <received-by> [comment]`
                if entry.split_whitespace().nth(1) == Some(self.pseudonym.as_str()) {
                    return Err(LoopDetected::Returned(self.pseudonym.clone()));
                }
            }
        }
        if hops > MAX_VIA_HOPS {
            return Err(LoopDetected::TooManyHops(hops));
        }
        Ok(())
    }

    /// Adds this host's `Via` entry to a request it sends.
    pub fn stamp(&self, headers: &mut HeaderMap) {
        headers.append(header::VIA, self.via.clone());
    }
}

impl Default for LoopGuard {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_policy() -> EgressPolicy {
        EgressPolicy::new(
            DEFAULT_ALLOWED
                .iter()
                .map(|net| net.parse().unwrap())
                .collect(),
        )
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_default_list_admits_loopback_and_private_ranges_only() {
        let policy = default_policy();
        for admitted in [
            "127.0.0.1",
            "127.0.0.2",
            "::1",
            "10.1.2.3",
            "172.31.0.1",
            "192.168.1.1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert_eq!(policy.check_ip(ip(admitted)), Ok(()), "{admitted}");
        }
        for refused in [
            "169.254.169.254",
            "fe80::1",
            "0.0.0.0",
            "::",
            "8.8.8.8",
            "172.32.0.1",
            "224.0.0.1",
            "2001:db8::1",
        ] {
            assert!(
                matches!(
                    policy.check_ip(ip(refused)),
                    Err(Refused::NotAllowed { .. })
                ),
                "{refused}"
            );
        }
    }

    #[test]
    fn link_local_and_unspecified_are_refused_even_when_listed() {
        let policy = EgressPolicy::new(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]);
        assert_eq!(policy.check_ip(ip("8.8.8.8")), Ok(()));
        for refused in ["169.254.169.254", "fe80::1", "0.0.0.0", "::"] {
            assert!(policy.check_ip(ip(refused)).is_err(), "{refused}");
        }
    }

    #[test]
    fn own_listeners_are_refused_on_any_address_they_answer() {
        let gateway: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let registry: SocketAddr = "0.0.0.0:8001".parse().unwrap();
        let policy = default_policy().with_own_listeners(gateway, registry);
        assert_eq!(
            policy.check(gateway),
            Err(Refused::OwnListener {
                addr: gateway,
                which: "gateway"
            })
        );
        assert_eq!(policy.check("127.0.0.1:8010".parse().unwrap()), Ok(()));
        assert_eq!(policy.check("127.0.0.2:8000".parse().unwrap()), Ok(()));
        for own in [
            "127.0.0.1:8001",
            "127.0.0.5:8001",
            "[::ffff:127.0.0.1]:8001",
        ] {
            assert!(
                matches!(
                    policy.check(own.parse().unwrap()),
                    Err(Refused::OwnListener {
                        which: "registry",
                        ..
                    })
                ),
                "{own}"
            );
        }
    }

    #[test]
    fn a_request_is_refused_when_it_comes_back_or_passed_too_many_hops() {
        let guard = LoopGuard::new();
        let mut headers = HeaderMap::new();
        assert_eq!(guard.check(&headers), Ok(()));
        headers.append(
            header::VIA,
            HeaderValue::from_static("1.1 nginx, 1.0 other"),
        );
        assert_eq!(guard.check(&headers), Ok(()));
        guard.stamp(&mut headers);
        assert!(matches!(
            guard.check(&headers),
            Err(LoopDetected::Returned(_))
        ));
        // Another host's stamp is a hop, not a loop.
        assert_eq!(LoopGuard::new().check(&headers), Ok(()));
        let mut long = HeaderMap::new();
        long.insert(
            header::VIA,
            HeaderValue::from_str(&vec!["1.1 hop"; MAX_VIA_HOPS + 1].join(", ")).unwrap(),
        );
        assert_eq!(
            LoopGuard::new().check(&long),
            Err(LoopDetected::TooManyHops(MAX_VIA_HOPS + 1))
        );
    }
}
