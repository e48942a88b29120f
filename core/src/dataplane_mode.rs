//! The data path a revision's pods use, chosen per revision with the pod annotation
//! [`ANNOTATION`] (`spright.dev/dataplane-mode`).
//!
//! One type for every component that reads the annotation: the sidecar (queue-proxy-ebpf, from
//! Knative's podinfo file), the node agent (from the Pod object or a registration) and
//! activator-lite (from the Revision, to know where to probe). The modes are described in
//! `queue-proxy-ebpf/modes.md`:
//!
//! - `userspace` (the default, [`DataplaneMode::default`]): the userspace proxy of the
//!   queue-proxy contract;
//! - `full`: the same proxy, with the in-pod hop to the user container short-circuited through
//!   a sockmap and the accounting in the kernel;
//! - `event-driven` (EPROXY): connections to the serving port are steered in the kernel straight
//!   to the user container; the sidecar serves stats, admin and drain.
//!
//! Values are matched exactly (lower case), surrounding blanks ignored. An absent annotation
//! means the default; an unknown value is an error ([`UnknownMode`]), which the sidecar and the
//! agent refuse: a revision that asks for a mode must never silently run another.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The pod (and Revision template) annotation that selects the mode.
pub const ANNOTATION: &str = "spright.dev/dataplane-mode";

/// The data path of a revision's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataplaneMode {
    /// The userspace proxy (the queue-proxy contract). The documented default.
    #[default]
    Userspace,
    /// The userspace proxy, its in-pod hop through a sockmap, accounting in the kernel.
    Full,
    /// EPROXY: the serving port steered in the kernel to the user container.
    EventDriven,
}

/// An annotation value that names no mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ANNOTATION}={0:?}: use userspace, full or event-driven")]
pub struct UnknownMode(pub String);

impl DataplaneMode {
    /// Every mode, in documentation order.
    pub const ALL: [Self; 3] = [Self::Userspace, Self::Full, Self::EventDriven];

    /// The value as written in the annotation.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Userspace => "userspace",
            Self::Full => "full",
            Self::EventDriven => "event-driven",
        }
    }

    /// Parses an annotation value (surrounding blanks ignored, case kept).
    pub fn parse(value: &str) -> Result<Self, UnknownMode> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == value.trim())
            .ok_or_else(|| UnknownMode(value.to_owned()))
    }

    /// The mode an optional annotation value asks for: the default when absent.
    pub fn from_annotation(value: Option<&str>) -> Result<Self, UnknownMode> {
        value.map_or(Ok(Self::default()), Self::parse)
    }
}

impl FromStr for DataplaneMode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for DataplaneMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_the_default_is_userspace() {
        for mode in DataplaneMode::ALL {
            assert_eq!(DataplaneMode::parse(mode.as_str()), Ok(mode));
            assert_eq!(format!(" {mode}\n").parse(), Ok(mode));
            let json = serde_json::to_string(&mode).unwrap();
            assert_eq!(json, format!("\"{mode}\""));
            assert_eq!(serde_json::from_str::<DataplaneMode>(&json).unwrap(), mode);
        }
        assert_eq!(DataplaneMode::default(), DataplaneMode::Userspace);
        assert_eq!(
            DataplaneMode::from_annotation(None),
            Ok(DataplaneMode::Userspace)
        );
        assert_eq!(
            DataplaneMode::from_annotation(Some("event-driven")),
            Ok(DataplaneMode::EventDriven)
        );
    }

    #[test]
    fn unknown_values_are_errors_naming_the_choices() {
        for bad in [
            "",
            "ebpf",
            "Event-Driven",
            "FULL",
            "event_driven",
            "full mode",
        ] {
            let err = DataplaneMode::parse(bad).unwrap_err();
            assert_eq!(err, UnknownMode(bad.to_owned()));
            let text = err.to_string();
            assert!(
                text.contains(ANNOTATION) && text.contains("event-driven"),
                "{text}"
            );
        }
        assert!(serde_json::from_str::<DataplaneMode>("\"ebpf\"").is_err());
    }
}
