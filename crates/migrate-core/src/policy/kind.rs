//! Choosing a policy by name: [`PolicyKind`], parsed from a string and
//! built into a [`Policy`] with the settings of a [`PolicyConfig`].

use super::prepaging::Prepaging;
use super::{
    Hca, HcaConfig, Hybrid, HybridConfig, Policy, PostCopy, Precopy, PrecopyConfig, StopAndCopy,
};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Which policy to run, as a program or a comparison names it.
///
/// The names are those of [`Policy::name`]; post-copy and hybrid take an
/// optional pre-paging order after a colon (`postcopy:bubble`,
/// `hybrid:multi-pivot:3`, see [`Prepaging`]'s names), and are shown
/// without it when it is the default one:
///
/// ```
/// use migrate_core::{PolicyConfig, PolicyKind, Prepaging};
///
/// let kind: PolicyKind = "postcopy:sequential".parse().unwrap();
/// assert_eq!(kind, PolicyKind::PostCopy(Prepaging::Sequential));
/// assert_eq!(kind.to_string(), "postcopy:sequential");
/// let policy = kind.build(&PolicyConfig::default());
/// assert_eq!(policy.name(), "postcopy");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyKind {
    /// [`Precopy`]: iterative pre-copy.
    Precopy,
    /// [`StopAndCopy`]: pause, copy everything, resume.
    StopAndCopy,
    /// [`PostCopy`]: resume on the destination at once; pages follow in
    /// this order and are fetched on demand.
    PostCopy(Prepaging),
    /// [`Hybrid`]: pre-copy rounds, then post-copy (in this order) if
    /// pre-copy would not converge.
    Hybrid(Prepaging),
    /// [`Hca`]: the Hierarchical Copy Algorithm.
    Hca,
}

impl PolicyKind {
    /// Every policy once, with the default pre-paging order.
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::Precopy,
        PolicyKind::StopAndCopy,
        PolicyKind::PostCopy(Prepaging::MultiPivot { k: 7 }),
        PolicyKind::Hybrid(Prepaging::MultiPivot { k: 7 }),
        PolicyKind::Hca,
    ];

    /// The set a comparison runs: every policy, and post-copy with each
    /// pre-paging family (sequential, bubbling both ways, multi-pivot).
    pub const COMPARED: [PolicyKind; 7] = [
        PolicyKind::Precopy,
        PolicyKind::StopAndCopy,
        PolicyKind::PostCopy(Prepaging::Sequential),
        PolicyKind::PostCopy(Prepaging::Bubble { both_ways: true }),
        PolicyKind::PostCopy(Prepaging::MultiPivot { k: 7 }),
        PolicyKind::Hybrid(Prepaging::MultiPivot { k: 7 }),
        PolicyKind::Hca,
    ];

    /// The policy's name without its pre-paging order, as
    /// [`Policy::name`] gives it.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Precopy => "precopy",
            PolicyKind::StopAndCopy => "stop-and-copy",
            PolicyKind::PostCopy(_) => "postcopy",
            PolicyKind::Hybrid(_) => "hybrid",
            PolicyKind::Hca => "hca",
        }
    }

    /// Whether the policy may resume the guest before all of its memory
    /// arrived (post-copy, hybrid): the destination then needs a way to
    /// fault pages in.
    pub fn may_postcopy(self) -> bool {
        matches!(self, PolicyKind::PostCopy(_) | PolicyKind::Hybrid(_))
    }

    /// The push order of a policy that may run post-copy.
    pub fn prepaging(self) -> Option<Prepaging> {
        match self {
            PolicyKind::PostCopy(p) | PolicyKind::Hybrid(p) => Some(p),
            _ => None,
        }
    }

    /// The same policy pushing in `prepaging` order, if it runs post-copy;
    /// other policies are returned unchanged.
    pub fn with_prepaging(self, prepaging: Prepaging) -> Self {
        match self {
            PolicyKind::PostCopy(_) => PolicyKind::PostCopy(prepaging),
            PolicyKind::Hybrid(_) => PolicyKind::Hybrid(prepaging),
            other => other,
        }
    }

    /// Builds the policy with the settings in `config` (each policy reads
    /// the part that is its own).
    pub fn build(self, config: &PolicyConfig) -> Box<dyn Policy> {
        match self {
            PolicyKind::Precopy => Box::new(Precopy::new(config.precopy.clone())),
            PolicyKind::StopAndCopy => Box::new(StopAndCopy),
            PolicyKind::PostCopy(p) => Box::new(PostCopy::new(p)),
            PolicyKind::Hybrid(p) => Box::new(Hybrid::new(HybridConfig {
                precopy: config.hybrid_precopy.clone(),
                prepaging: p,
            })),
            PolicyKind::Hca => Box::new(Hca::new(config.hca.clone())),
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyKind::PostCopy(p) | PolicyKind::Hybrid(p) if *p != Prepaging::default() => {
                write!(f, "{}:{p}", self.name())
            }
            _ => f.write_str(self.name()),
        }
    }
}

/// A policy name that is not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown policy {0:?} (expected precopy, stop-and-copy, postcopy[:PREPAGING], \
     hybrid[:PREPAGING] or hca)"
)]
pub struct UnknownPolicy(pub String);

impl FromStr for PolicyKind {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || UnknownPolicy(s.to_owned());
        let (name, prepaging) = match s.split_once(':') {
            Some((name, order)) => (name, Some(order.parse().map_err(|_| bad())?)),
            None => (s, None),
        };
        let prepaging = prepaging.unwrap_or_default();
        let kind = match name {
            "precopy" => PolicyKind::Precopy,
            "stop-and-copy" => PolicyKind::StopAndCopy,
            "postcopy" => PolicyKind::PostCopy(prepaging),
            "hybrid" => PolicyKind::Hybrid(prepaging),
            "hca" => PolicyKind::Hca,
            _ => return Err(bad()),
        };
        if !kind.may_postcopy() && s.contains(':') {
            return Err(bad());
        }
        Ok(kind)
    }
}

/// The settings [`PolicyKind::build`] hands to the policy it builds.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct PolicyConfig {
    /// Limits of [`Precopy`].
    pub precopy: PrecopyConfig,
    /// The pre-copy phase of [`Hybrid`] (its own round limit, 5).
    pub hybrid_precopy: PrecopyConfig,
    /// Settings of [`Hca`].
    pub hca: HcaConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            precopy: PrecopyConfig::default(),
            hybrid_precopy: HybridConfig::default().precopy,
            hca: HcaConfig::default(),
        }
    }
}

impl PolicyConfig {
    /// The same settings with one downtime target for every policy that
    /// has one.
    pub fn with_downtime_target(mut self, target: Duration) -> Self {
        self.precopy.downtime_target = target;
        self.hybrid_precopy.downtime_target = target;
        self.hca.downtime_target = target;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in PolicyKind::COMPARED.into_iter().chain(PolicyKind::ALL) {
            assert_eq!(kind.to_string().parse::<PolicyKind>(), Ok(kind));
            assert_eq!(kind.build(&PolicyConfig::default()).name(), kind.name());
        }
    }

    #[test]
    fn bare_names_take_the_default_order() {
        assert_eq!(
            "hybrid".parse::<PolicyKind>(),
            Ok(PolicyKind::Hybrid(Prepaging::default()))
        );
        assert_eq!(
            PolicyKind::Hybrid(Prepaging::default()).to_string(),
            "hybrid"
        );
        assert_eq!(
            "postcopy:bubble-forward".parse::<PolicyKind>(),
            Ok(PolicyKind::PostCopy(Prepaging::Bubble { both_ways: false }))
        );
    }

    #[test]
    fn unknown_names_and_stray_orders_are_refused() {
        for bad in [
            "",
            "pre-copy",
            "postcopy:",
            "postcopy:zigzag",
            "hca:bubble",
            "HCA",
        ] {
            assert_eq!(bad.parse::<PolicyKind>(), Err(UnknownPolicy(bad.into())));
        }
    }
}
