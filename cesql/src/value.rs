//! CESQL values and the casting rules of spec section 3.7.

use crate::{ErrorKind, EvalError};
use std::fmt;

/// The three primitive CESQL types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// `true` / `false`.
    Boolean,
    /// Signed 32-bit integer.
    Integer,
    /// Unicode string (also URI, URI-reference and timestamp attributes).
    String,
}

/// A CESQL value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Boolean value.
    Bool(bool),
    /// Integer value.
    Int(i32),
    /// String value.
    String(String),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<i32> for Value {
    fn from(i: i32) -> Self {
        Value::Int(i)
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::String(s) => f.write_str(s),
        }
    }
}

impl Value {
    /// The type of this value.
    pub fn type_of(&self) -> Type {
        match self {
            Value::Bool(_) => Type::Boolean,
            Value::Int(_) => Type::Integer,
            Value::String(_) => Type::String,
        }
    }

    /// The zero value of a type, returned alongside an error.
    pub fn zero(t: Type) -> Value {
        match t {
            Type::Boolean => Value::Bool(false),
            Type::Integer => Value::Int(0),
            Type::String => Value::String(String::new()),
        }
    }

    /// Implicit cast (spec 3.7). On failure returns the zero value and a cast error.
    pub(crate) fn cast(self, target: Type) -> (Value, Option<EvalError>) {
        match (self, target) {
            (v @ Value::Bool(_), Type::Boolean)
            | (v @ Value::Int(_), Type::Integer)
            | (v @ Value::String(_), Type::String) => (v, None),
            (v, Type::String) => (Value::String(v.to_string()), None),
            (Value::Bool(b), Type::Integer) => (Value::Int(i32::from(b)), None),
            (Value::String(s), Type::Integer) => match parse_int(&s) {
                Some(i) => (Value::Int(i), None),
                None => (
                    Value::Int(0),
                    Some(EvalError::new(
                        ErrorKind::Cast,
                        format!("cannot cast string {s:?} to integer"),
                    )),
                ),
            },
            (Value::String(s), Type::Boolean) => {
                if s.eq_ignore_ascii_case("true") {
                    (Value::Bool(true), None)
                } else if s.eq_ignore_ascii_case("false") {
                    (Value::Bool(false), None)
                } else {
                    (
                        Value::Bool(false),
                        Some(EvalError::new(
                            ErrorKind::Cast,
                            format!("cannot cast string {s:?} to boolean"),
                        )),
                    )
                }
            }
            (Value::Int(i), Type::Boolean) => (
                Value::Bool(false),
                Some(EvalError::new(
                    ErrorKind::Cast,
                    format!("cannot implicitly cast integer {i} to boolean"),
                )),
            ),
        }
    }
}

/// Parses a decimal 32-bit integer with an optional sign.
pub(crate) fn parse_int(s: &str) -> Option<i32> {
    let t = s.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse::<i32>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn casts() {
        assert_eq!(Value::from("12").cast(Type::Integer).0, Value::Int(12));
        assert_eq!(Value::from("-3").cast(Type::Integer).0, Value::Int(-3));
        assert!(Value::from("1x").cast(Type::Integer).1.is_some());
        assert!(Value::from("99999999999").cast(Type::Integer).1.is_some());
        assert_eq!(Value::from("TrUe").cast(Type::Boolean).0, Value::Bool(true));
        assert_eq!(Value::Bool(true).cast(Type::Integer).0, Value::Int(1));
        assert_eq!(
            Value::Bool(false).cast(Type::String).0,
            Value::from("false")
        );
        assert!(Value::Int(3).cast(Type::Boolean).1.is_some());
    }
}
