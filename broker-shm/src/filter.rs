//! Trigger filters: `spec.filter.attributes` and `spec.filters` (Subscriptions API dialects:
//! exact, prefix, suffix, all, any, not, cesql), with the webhook's validation rules.

use crate::event::CloudEvent;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// `spec.filter` of a Trigger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerFilter {
    /// Attribute name → exact value ("" matches any value).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// One element of `spec.filters` (CloudEvents Subscriptions API filter).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionsApiFilter {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub all: Vec<SubscriptionsApiFilter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub any: Vec<SubscriptionsApiFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<SubscriptionsApiFilter>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exact: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prefix: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub suffix: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cesql: String,
}

/// A validation failure, with the field path as the webhook reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}: {path}")]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

fn valid_attr_name(n: &str) -> bool {
    let mut b = n.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase())
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

fn check_names(map: &BTreeMap<String, String>, path: &str, errs: &mut Vec<FieldError>) {
    for k in map.keys() {
        if !valid_attr_name(k) {
            errs.push(FieldError {
                path: format!("{path}[{k}]"),
                message: format!(
                    "invalid key name {k:?}: Attribute name must start with a letter and can only contain lowercase alphanumeric"
                ),
            });
        }
    }
}

/// Validates `spec.filter.attributes`.
pub fn validate_attributes(f: &TriggerFilter, path: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    check_names(&f.attributes, &format!("{path}.attributes"), &mut errs);
    errs
}

/// Validates `spec.filters` (every element, recursively).
pub fn validate_filters(list: &[SubscriptionsApiFilter], path: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for (i, f) in list.iter().enumerate() {
        validate_one(f, &format!("{path}[{i}]"), &mut errs);
    }
    errs
}

fn dialect_count(f: &SubscriptionsApiFilter) -> usize {
    [
        !f.exact.is_empty(),
        !f.prefix.is_empty(),
        !f.suffix.is_empty(),
        !f.all.is_empty(),
        !f.any.is_empty(),
        f.not.is_some(),
        !f.cesql.is_empty(),
    ]
    .into_iter()
    .filter(|b| *b)
    .count()
}

fn validate_one(f: &SubscriptionsApiFilter, path: &str, errs: &mut Vec<FieldError>) {
    if dialect_count(f) > 1 {
        errs.push(FieldError {
            path: path.to_string(),
            message: "multiple dialects found, filters can have only one dialect set".into(),
        });
    }
    // Several keys in one exact, prefix or suffix are valid (every one must match): the
    // webhook checks only their names (trigger_validation.go, ValidateAttributesNames).
    check_names(&f.exact, &format!("{path}.exact"), errs);
    check_names(&f.prefix, &format!("{path}.prefix"), errs);
    check_names(&f.suffix, &format!("{path}.suffix"), errs);
    for (i, c) in f.all.iter().enumerate() {
        validate_one(c, &format!("{path}.all[{i}]"), errs);
    }
    for (i, c) in f.any.iter().enumerate() {
        validate_one(c, &format!("{path}.any[{i}]"), errs);
    }
    if let Some(n) = &f.not {
        validate_one(n, &format!("{path}.not"), errs);
    }
    if !f.cesql.is_empty()
        && let Err(e) = cesql::Expression::parse(&f.cesql)
    {
        errs.push(FieldError {
            path: format!("{path}.cesql"),
            message: format!("invalid value: {}: {e}", f.cesql),
        });
    }
}

/// Three-valued filter outcome, as in Knative's eventfilter package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterResult {
    Pass,
    Fail,
    NoFilter,
}

/// A compiled trigger filter.
#[derive(Debug, Clone)]
pub enum Filter {
    NoFilter,
    Attributes(BTreeMap<String, String>),
    Exact(BTreeMap<String, String>),
    Prefix(BTreeMap<String, String>),
    Suffix(BTreeMap<String, String>),
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
    Cesql(Box<cesql::Expression>),
}

/// Looks an attribute up the way Knative's attribute filter does
/// (pkg/eventfilter/attributes `LookupAttribute`): standard attributes exist even when unset
/// (as ""), extensions only when present; `time` in its canonical form ([`canonical_time`]).
fn lookup<'a>(ev: &'a CloudEvent, name: &str) -> Option<Cow<'a, str>> {
    Some(Cow::Borrowed(match name {
        "time" => return Some(Cow::Owned(canonical_time(ev.get("time")))),
        "specversion"
        | "type"
        | "source"
        | "subject"
        | "id"
        | "datacontenttype"
        | "datacontentencoding" => ev.get(name).unwrap_or(""),
        "schemaurl" | "dataschema" => ev
            .get("dataschema")
            .or_else(|| ev.get("schemaurl"))
            .unwrap_or(""),
        "datamediatype" => ev
            .get("datacontenttype")
            .and_then(|c| c.split(';').next())
            .map_or("", str::trim),
        _ => ev.get(name)?,
    }))
}

/// An event's `time` as Knative's filters see it: Go's RFC 3339 text of the parsed time
/// (`time.Time.MarshalText`): the fraction without trailing zeros (none when zero), `Z` for a
/// zero offset, other offsets kept; an unset time is Go's zero time. A value that does not
/// parse stays as it is (the ingress refuses such events before they reach a filter).
pub fn canonical_time(time: Option<&str>) -> String {
    match time {
        None => "0001-01-01T00:00:00Z".into(),
        Some(t) => spright_core::cloudevent::go_time_text(t).unwrap_or_else(|| t.to_string()),
    }
}

impl Filter {
    /// Compiles a Trigger's filters: `spec.filters` wins when non-empty, else `spec.filter`.
    pub fn for_trigger(
        filter: Option<&TriggerFilter>,
        filters: &[SubscriptionsApiFilter],
    ) -> Filter {
        if !filters.is_empty() {
            return Filter::All(filters.iter().filter_map(Self::compile).collect());
        }
        match filter {
            Some(f) if !f.attributes.is_empty() => Filter::Attributes(f.attributes.clone()),
            _ => Filter::NoFilter,
        }
    }

    /// Compiles one Subscriptions API filter; `None` for an element that cannot be built
    /// (skipped, as Knative does).
    fn compile(f: &SubscriptionsApiFilter) -> Option<Filter> {
        let non_empty =
            |m: &BTreeMap<String, String>| m.iter().all(|(k, v)| !k.is_empty() && !v.is_empty());
        Some(if !f.exact.is_empty() {
            Filter::Exact(f.exact.clone()).only_if(non_empty(&f.exact))?
        } else if !f.prefix.is_empty() {
            Filter::Prefix(f.prefix.clone()).only_if(non_empty(&f.prefix))?
        } else if !f.suffix.is_empty() {
            Filter::Suffix(f.suffix.clone()).only_if(non_empty(&f.suffix))?
        } else if !f.all.is_empty() {
            Filter::All(f.all.iter().filter_map(Self::compile).collect())
        } else if !f.any.is_empty() {
            Filter::Any(f.any.iter().filter_map(Self::compile).collect())
        } else if let Some(n) = &f.not {
            Filter::Not(Box::new(Self::compile(n).unwrap_or(Filter::NoFilter)))
        } else if !f.cesql.is_empty() {
            Filter::Cesql(Box::new(cesql::Expression::parse(&f.cesql).ok()?))
        } else {
            return None;
        })
    }

    fn only_if(self, ok: bool) -> Option<Filter> {
        ok.then_some(self)
    }

    /// Evaluates the filter.
    pub fn evaluate(&self, ev: &CloudEvent) -> FilterResult {
        use FilterResult::{Fail, NoFilter, Pass};
        let all_match = |m: &BTreeMap<String, String>, f: &dyn Fn(&str, &str) -> bool| {
            if m.iter()
                .all(|(k, want)| lookup(ev, k).is_some_and(|got| f(&got, want)))
            {
                Pass
            } else {
                Fail
            }
        };
        match self {
            Filter::NoFilter => NoFilter,
            // "" asks for a present, non-empty attribute (an unset subject or an empty
            // extension fails), as in pkg/eventfilter/attributes.
            Filter::Attributes(m) => all_match(m, &|got, want| {
                if want.is_empty() {
                    !got.is_empty()
                } else {
                    got == want
                }
            }),
            Filter::Exact(m) => all_match(m, &|got, want| got == want),
            Filter::Prefix(m) => all_match(m, &|got, want| got.starts_with(want)),
            Filter::Suffix(m) => all_match(m, &|got, want| got.ends_with(want)),
            Filter::All(list) => {
                let mut res = NoFilter;
                for f in list {
                    match f.evaluate(ev) {
                        Fail => return Fail,
                        Pass => res = Pass,
                        NoFilter => {}
                    }
                }
                res
            }
            Filter::Any(list) => {
                let mut res = NoFilter;
                for f in list {
                    match f.evaluate(ev) {
                        Pass => return Pass,
                        Fail => res = Fail,
                        NoFilter => {}
                    }
                }
                res
            }
            Filter::Not(inner) => match inner.evaluate(ev) {
                Pass => Fail,
                Fail => Pass,
                NoFilter => NoFilter,
            },
            Filter::Cesql(expr) => {
                if expr.matches(ev) {
                    Pass
                } else {
                    Fail
                }
            }
        }
    }

    /// True unless the filter fails.
    pub fn passes(&self, ev: &CloudEvent) -> bool {
        self.evaluate(ev) != FilterResult::Fail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> CloudEvent {
        let mut e = CloudEvent::new("1", "https://example.com/src", "com.example.created");
        e.set("myext", "hello");
        e
    }

    fn f(yaml: &str) -> Vec<SubscriptionsApiFilter> {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn dialects() {
        let cases = [
            ("- exact: {type: com.example.created}", true),
            ("- exact: {type: other}", false),
            ("- prefix: {type: com.example.}", true),
            ("- suffix: {source: /src}", true),
            ("- suffix: {missing: x}", false),
            ("- any: [{exact: {type: x}}, {exact: {myext: hello}}]", true),
            (
                "- all: [{exact: {type: x}}, {exact: {myext: hello}}]",
                false,
            ),
            ("- not: {exact: {type: x}}", true),
            (
                "- cesql: \"myext LIKE 'he%' AND source LIKE 'https://%'\"",
                true,
            ),
            ("- cesql: \"missing = 'x'\"", false),
            ("- cesql: \"INT(myext) = 1\"", false),
            ("[]", true),
            ("- {}", true),
        ];
        for (yaml, want) in cases {
            let filter = Filter::for_trigger(None, &f(yaml));
            assert_eq!(filter.passes(&ev()), want, "{yaml}");
        }
    }

    #[test]
    fn attributes_and_override() {
        let mut attrs = TriggerFilter::default();
        attrs.attributes.insert("type".into(), "nope".into());
        assert!(!Filter::for_trigger(Some(&attrs), &[]).passes(&ev()));
        attrs.attributes.insert("type".into(), String::new());
        assert!(Filter::for_trigger(Some(&attrs), &[]).passes(&ev()));
        attrs.attributes.insert("absent".into(), String::new());
        assert!(!Filter::for_trigger(Some(&attrs), &[]).passes(&ev()));
        // "" asks for a present, non-empty value: an unset subject or an empty extension fails.
        for name in ["subject", "emptyext"] {
            let mut attrs = TriggerFilter::default();
            attrs.attributes.insert(name.into(), String::new());
            let mut e = ev();
            e.set("emptyext", "");
            assert!(!Filter::for_trigger(Some(&attrs), &[]).passes(&e), "{name}");
            e.set(name, "x");
            assert!(Filter::for_trigger(Some(&attrs), &[]).passes(&e), "{name}");
        }
        // spec.filters overrides spec.filter.
        let filters = f("- exact: {myext: hello}");
        assert!(Filter::for_trigger(Some(&attrs), &filters).passes(&ev()));
    }

    #[test]
    fn time_is_compared_in_go_canonical_form() {
        let cases = [
            (Some("2021-01-01T00:00:00.000Z"), "2021-01-01T00:00:00Z"),
            (Some("2021-01-01T00:00:00.120Z"), "2021-01-01T00:00:00.12Z"),
            (
                Some("2021-01-01T00:00:00.5+00:00"),
                "2021-01-01T00:00:00.5Z",
            ),
            (
                Some("2021-01-01T01:00:00.000000001+01:30"),
                "2021-01-01T01:00:00.000000001+01:30",
            ),
            (
                Some("2021-01-01T01:00:00-05:00"),
                "2021-01-01T01:00:00-05:00",
            ),
            (None, "0001-01-01T00:00:00Z"),
            (Some("not a time"), "not a time"),
        ];
        for (input, want) in cases {
            assert_eq!(canonical_time(input), want, "{input:?}");
        }
        let mut e = ev();
        e.set("time", "2021-01-01T00:00:00.000Z");
        for yaml in [
            "- exact: {time: '2021-01-01T00:00:00Z'}",
            "- prefix: {time: '2021-01-01T00:00:00Z'}",
        ] {
            assert!(Filter::for_trigger(None, &f(yaml)).passes(&e), "{yaml}");
        }
        // An event without time has Go's zero time.
        let yaml = "- exact: {time: '0001-01-01T00:00:00Z'}";
        assert!(Filter::for_trigger(None, &f(yaml)).passes(&ev()));
    }

    #[test]
    fn validation() {
        let errs = validate_filters(&f("- {exact: {a: b}, suffix: {a: b}}"), "spec.filters");
        assert!(
            errs[0].message.contains("multiple dialects found"),
            "{errs:?}"
        );
        // Several keys in one exact/prefix/suffix are valid; their names are still checked.
        for yaml in [
            "- exact: {a: b, c: d}",
            "- prefix: {a: b, c: d}",
            "- suffix: {a: b, c: d}",
        ] {
            assert!(
                validate_filters(&f(yaml), "spec.filters").is_empty(),
                "{yaml}"
            );
        }
        let errs = validate_filters(&f("- exact: {a: b, C: d}"), "spec.filters");
        assert_eq!(errs[0].path, "spec.filters[0].exact[C]");
        let errs = validate_filters(&f("- not: {prefix: {Bad: x}}"), "spec.filters");
        assert_eq!(errs[0].path, "spec.filters[0].not.prefix[Bad]");
        let errs = validate_filters(&f("- cesql: \"a = \""), "spec.filters");
        assert!(errs[0].path.ends_with(".cesql"));
        let errs = validate_filters(
            &f("- any: [{exact: {a: b}}, {cesql: \"EXISTS a\"}]"),
            "spec.filters",
        );
        assert!(errs.is_empty(), "{errs:?}");
        let mut tf = TriggerFilter::default();
        tf.attributes.insert("1x".into(), "y".into());
        assert_eq!(validate_attributes(&tf, "spec.filter").len(), 1);
    }
}
