//! Chain definitions: which functions exist and in which order a chain runs them. Read from a
//! YAML file by the gateway and handed to each function when it joins.
//!
//! ```yaml
//! functions:
//!   - name: decode
//!     command: ["spright-sample-chain", "decode"]   # optional: the gateway starts it
//! chains:
//!   - name: motion
//!     route: /motion
//!     steps: [decode, denoise, detect, alert]
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Highest number of functions one dataplane routes (ids 1..=255; 0 is the gateway).
pub const MAX_FUNCTIONS: usize = 255;

/// Errors in a chain file.
#[derive(Debug, Error)]
pub enum ChainError {
    #[error("reading chain file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("chain file is not valid YAML for a chain spec: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("invalid chain spec: {0}")]
    Invalid(String),
}

/// One function process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// Name, unique in the file.
    pub name: String,
    /// Command the gateway runs to start the function (argv); absent when started elsewhere.
    #[serde(default)]
    pub command: Vec<String>,
}

/// One chain: an HTTP route and the functions it runs in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainSpec {
    pub name: String,
    /// HTTP path the gateway serves the chain at.
    pub route: String,
    /// Function names in order.
    pub steps: Vec<String>,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainFile {
    pub functions: Vec<FunctionSpec>,
    pub chains: Vec<ChainSpec>,
}

/// What every participant needs to route: function ids and chains as id lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RoutingTable {
    /// Function name to id (ids start at 1).
    pub functions: BTreeMap<String, u32>,
    /// Chains as function ids, indexed by chain number.
    pub chains: Vec<Vec<u32>>,
}

impl RoutingTable {
    /// The id of a function.
    pub fn id(&self, name: &str) -> Option<u32> {
        self.functions.get(name).copied()
    }

    /// The name of a function id.
    pub fn name(&self, id: u32) -> Option<&str> {
        self.functions
            .iter()
            .find(|(_, v)| **v == id)
            .map(|(k, _)| k.as_str())
    }

    /// The function after `hop` in `chain`, or `None` at the end of the chain.
    pub fn next(&self, chain: u16, hop: u16) -> Option<(u16, u32)> {
        let steps = self.chains.get(usize::from(chain))?;
        let next = hop.checked_add(1)?;
        steps.get(usize::from(next)).map(|id| (next, *id))
    }
}

impl ChainFile {
    /// Reads and validates a chain file.
    pub fn load(path: &Path) -> Result<Self, ChainError> {
        let text = std::fs::read_to_string(path).map_err(|source| ChainError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates chain YAML.
    pub fn parse(text: &str) -> Result<Self, ChainError> {
        let file: Self = serde_yaml::from_str(text)?;
        file.validate()?;
        Ok(file)
    }

    fn validate(&self) -> Result<(), ChainError> {
        let bad = |m: String| Err(ChainError::Invalid(m));
        if self.functions.is_empty() {
            return bad("no functions".into());
        }
        if self.functions.len() > MAX_FUNCTIONS {
            return bad(format!(
                "{} functions, at most {MAX_FUNCTIONS}",
                self.functions.len()
            ));
        }
        let mut names = HashSet::new();
        for f in &self.functions {
            let valid = !f.name.is_empty()
                && f.name.len() <= 63
                && f.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid {
                return bad(format!(
                    "function name {:?} must be 1-63 characters of [A-Za-z0-9_-]",
                    f.name
                ));
            }
            if !names.insert(f.name.as_str()) {
                return bad(format!("function {:?} is defined twice", f.name));
            }
        }
        if self.chains.is_empty() {
            return bad("no chains".into());
        }
        if self.chains.len() > usize::from(u16::MAX) {
            return bad("too many chains".into());
        }
        let mut routes = HashSet::new();
        for c in &self.chains {
            if !c.route.starts_with('/') {
                return bad(format!("chain {:?}: route must start with '/'", c.name));
            }
            if !routes.insert(c.route.as_str()) {
                return bad(format!("route {:?} is used by two chains", c.route));
            }
            if c.steps.is_empty() || c.steps.len() > usize::from(u16::MAX) {
                return bad(format!("chain {:?} needs 1 to 65535 steps", c.name));
            }
            if let Some(s) = c.steps.iter().find(|s| !names.contains(s.as_str())) {
                return bad(format!("chain {:?} names unknown function {s:?}", c.name));
            }
        }
        Ok(())
    }

    /// The routing table: functions numbered from 1 in file order.
    pub fn routing_table(&self) -> RoutingTable {
        let functions: BTreeMap<String, u32> = self
            .functions
            .iter()
            .zip(1u32..)
            .map(|(f, id)| (f.name.clone(), id))
            .collect();
        let chains = self
            .chains
            .iter()
            .map(|c| {
                c.steps
                    .iter()
                    .filter_map(|s| functions.get(s).copied())
                    .collect()
            })
            .collect();
        RoutingTable { functions, chains }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
functions:
  - name: a
  - name: b
    command: ["x", "b"]
chains:
  - name: ab
    route: /ab
    steps: [a, b]
  - name: b
    route: /b
    steps: [b]
"#;

    #[test]
    fn parses_and_numbers() {
        let f = ChainFile::parse(GOOD).expect("valid");
        let t = f.routing_table();
        assert_eq!(t.id("a"), Some(1));
        assert_eq!(t.id("b"), Some(2));
        assert_eq!(t.chains, vec![vec![1, 2], vec![2]]);
        assert_eq!(t.next(0, 0), Some((1, 2)));
        assert_eq!(t.next(0, 1), None);
        assert_eq!(t.next(9, 0), None);
        assert_eq!(t.name(2), Some("b"));
    }

    #[test]
    fn rejects_bad_specs_with_reasons() {
        let cases = [
            ("functions: []\nchains: []", "no functions"),
            (
                "functions: [{name: a}, {name: a}]\nchains: [{name: c, route: /c, steps: [a]}]",
                "twice",
            ),
            (
                "functions: [{name: a}]\nchains: [{name: c, route: c, steps: [a]}]",
                "start with",
            ),
            (
                "functions: [{name: a}]\nchains: [{name: c, route: /c, steps: [z]}]",
                "unknown function",
            ),
            (
                "functions: [{name: 'a b'}]\nchains: [{name: c, route: /c, steps: [a]}]",
                "must be",
            ),
            (
                "functions: [{name: a, cmd: x}]\nchains: []",
                "unknown field",
            ),
            ("{", "YAML"),
        ];
        for (text, want) in cases {
            let err = ChainFile::parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
