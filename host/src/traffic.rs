//! A service name's traffic split between its versions (a canary): the
//! policy as an operator sets and the store keeps it ([`TrafficPolicy`]),
//! and the same compiled against the versions present ([`Split`]), which
//! picks a version per request.
//!
//! A policy may name versions that are gone (it is kept as set: the
//! version may come back); only the versions present with a positive
//! weight share the traffic, and when none is present the name falls back
//! to its default version. A pick is a weighted random draw (a per-thread
//! xorshift, no lock), or with a sticky key a hash of the key's value into
//! the weights' range: the same value picks the same version while the
//! versions present do not change.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderName, header};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::service::{InvalidField, Version};
use crate::sync::random_below;

/// Largest weight of one version.
pub const MAX_WEIGHT: u32 = 10_000;

/// How a name's traffic is shared between its versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficPolicy {
    /// Weight per version (0..=[`MAX_WEIGHT`]); a version's share is its
    /// weight over the sum of the weights of the versions present.
    pub weights: BTreeMap<Version, u32>,
    /// What keeps one client on one version, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
}

/// Where a request carries the value that keeps its client on one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Sticky {
    /// A request header (`{"header": "X-User-Id"}`).
    Header(String),
    /// A cookie (`{"cookie": "session"}`).
    Cookie(String),
}

impl TrafficPolicy {
    /// Checks what does not depend on the versions present: every weight
    /// at most [`MAX_WEIGHT`], a positive sum, a sticky key that is a
    /// header name or a cookie name. The refusal names the field.
    pub fn check(&self) -> Result<(), InvalidField> {
        if self.weights.is_empty() {
            return Err(InvalidField::new(
                "weights",
                "must name at least one version",
            ));
        }
        for (version, weight) in &self.weights {
            if *weight > MAX_WEIGHT {
                return Err(InvalidField::new(
                    format!("weights.{version}"),
                    format!("{weight} is more than the largest weight, {MAX_WEIGHT}"),
                ));
            }
        }
        if self.weights.values().all(|weight| *weight == 0) {
            return Err(InvalidField::new(
                "weights",
                "every weight is 0: at least one must be positive",
            ));
        }
        match &self.sticky {
            Some(Sticky::Header(name)) if HeaderName::try_from(name.as_str()).is_err() => Err(
                InvalidField::new("sticky.header", format!("`{name}` is not a header name")),
            ),
            Some(Sticky::Cookie(name))
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)) =>
            {
                Err(InvalidField::new(
                    "sticky.cookie",
                    format!("`{name}` is not a cookie name"),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// A policy compiled against the versions present: what a request's pick
/// reads, without allocating.
#[derive(Debug, Clone)]
pub struct Split {
    /// Index into the versions (as the caller listed them) and the end of
    /// its range in `0..total`, for the versions with a positive weight.
    shares: Vec<(usize, u64)>,
    total: u64,
    sticky: Option<Key>,
}

#[derive(Debug, Clone)]
enum Key {
    Header(HeaderName),
    Cookie(String),
}

impl Split {
    /// `policy` over `present` (the versions there are, in the caller's
    /// order); `None` when no version present has a positive weight.
    pub fn compile<'a>(
        policy: &TrafficPolicy,
        present: impl IntoIterator<Item = &'a Version>,
    ) -> Option<Self> {
        let mut total = 0;
        let shares: Vec<(usize, u64)> = present
            .into_iter()
            .enumerate()
            .filter_map(|(index, version)| {
                let weight = u64::from(*policy.weights.get(version)?);
                (weight > 0).then(|| {
                    total += weight;
                    (index, total)
                })
            })
            .collect();
        if shares.is_empty() {
            return None;
        }
        let sticky = match &policy.sticky {
            None => None,
            Some(Sticky::Header(name)) => HeaderName::try_from(name.as_str()).ok().map(Key::Header),
            Some(Sticky::Cookie(name)) => Some(Key::Cookie(name.clone())),
        };
        Some(Self {
            shares,
            total,
            sticky,
        })
    }

    /// The index of the version a request with `headers` goes to: by its
    /// sticky key's value if the policy has one and the request carries
    /// it, else at random by weight.
    pub fn pick(&self, headers: &HeaderMap) -> usize {
        let point = match self.sticky_value(headers) {
            Some(value) => xxh3_64(value) % self.total,
            None => random_below(self.total as usize) as u64,
        };
        self.at(point)
    }

    /// The version whose range holds `point` (below `total`).
    fn at(&self, point: u64) -> usize {
        self.shares
            .iter()
            .find(|(_, end)| point < *end)
            .map_or(self.shares[self.shares.len() - 1].0, |(index, _)| *index)
    }

    fn sticky_value<'h>(&self, headers: &'h HeaderMap) -> Option<&'h [u8]> {
        match self.sticky.as_ref()? {
            Key::Header(name) => headers.get(name).map(|value| value.as_bytes()),
            Key::Cookie(name) => cookie(headers, name),
        }
    }
}

/// The value of the cookie `name` in the request's `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let (key, value) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
            (key == name.as_bytes()).then_some(&value[1..])
        })
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn v(text: &str) -> Version {
        Version::parse(text).unwrap()
    }

    fn policy(weights: &[(&str, u32)], sticky: Option<Sticky>) -> TrafficPolicy {
        TrafficPolicy {
            weights: weights.iter().map(|(k, w)| (v(k), *w)).collect(),
            sticky,
        }
    }

    #[test]
    fn weighted_picks_follow_the_weights() {
        let present = [v("2.0.0"), v("1.4.2")];
        let split = Split::compile(&policy(&[("1.4.2", 90), ("2.0.0", 10)], None), &present)
            .expect("both present");
        let rounds = 20_000;
        let to_new = (0..rounds)
            .filter(|_| split.pick(&HeaderMap::new()) == 0)
            .count();
        let share = to_new as f64 / rounds as f64;
        assert!((0.08..0.12).contains(&share), "share of 2.0.0: {share}");
    }

    #[test]
    fn only_versions_present_share_and_none_present_means_no_split() {
        let present = [v("1.4.2")];
        let split = Split::compile(&policy(&[("1.4.2", 1), ("2.0.0", 99)], None), &present)
            .expect("1.4.2 present");
        assert!((0..100).all(|_| split.pick(&HeaderMap::new()) == 0));
        assert!(Split::compile(&policy(&[("3.0.0", 5)], None), &present).is_none());
        assert!(Split::compile(&policy(&[("1.4.2", 0), ("3.0.0", 5)], None), &present).is_none());
    }

    #[test]
    fn a_sticky_value_always_picks_the_same_version() {
        let present = [v("2.0.0"), v("1.0.0")];
        let split = Split::compile(
            &policy(
                &[("1.0.0", 50), ("2.0.0", 50)],
                Some(Sticky::Header("X-User-Id".into())),
            ),
            &present,
        )
        .unwrap();
        let mut seen = [0; 2];
        for user in 0..64 {
            let mut headers = HeaderMap::new();
            headers.insert(
                "x-user-id",
                HeaderValue::from_str(&format!("user-{user}")).unwrap(),
            );
            let first = split.pick(&headers);
            assert!((0..20).all(|_| split.pick(&headers) == first));
            seen[first] += 1;
        }
        assert!(seen[0] > 10 && seen[1] > 10, "keys spread: {seen:?}");

        let by_cookie = Split::compile(
            &policy(
                &[("1.0.0", 50), ("2.0.0", 50)],
                Some(Sticky::Cookie("sid".into())),
            ),
            &present,
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; sid=abc; b=2"),
        );
        let first = by_cookie.pick(&headers);
        assert!((0..20).all(|_| by_cookie.pick(&headers) == first));
        assert_eq!(cookie(&headers, "sid"), Some(&b"abc"[..]));
        assert_eq!(cookie(&headers, "si"), None);
    }

    #[test]
    fn checks_name_the_field() {
        let field = |policy: TrafficPolicy| policy.check().expect_err("refused").field;
        assert_eq!(field(policy(&[], None)), "weights");
        assert_eq!(field(policy(&[("1.0.0", 0)], None)), "weights");
        assert_eq!(field(policy(&[("1.0.0", 10_001)], None)), "weights.1.0.0");
        assert_eq!(
            field(policy(
                &[("1.0.0", 1)],
                Some(Sticky::Header("bad header".into()))
            )),
            "sticky.header"
        );
        assert_eq!(
            field(policy(&[("1.0.0", 1)], Some(Sticky::Cookie("a;b".into())))),
            "sticky.cookie"
        );
        assert!(
            policy(&[("1.0.0", 10_000), ("2.0.0", 0)], None)
                .check()
                .is_ok()
        );
    }
}
