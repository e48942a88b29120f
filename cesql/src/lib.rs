//! CloudEvents SQL (CESQL) v1: a hand-written lexer, parser and evaluator.
//!
//! ```
//! use std::collections::HashMap;
//! use cesql::{Expression, Value};
//! let expr = Expression::parse("type LIKE 'com.example.%' AND INT(seq) > 3").unwrap();
//! let mut event = HashMap::new();
//! event.insert("type".to_string(), Value::from("com.example.created"));
//! event.insert("seq".to_string(), Value::from("7"));
//! let out = expr.evaluate(&event);
//! assert_eq!(out.value, Value::Bool(true));
//! assert!(out.errors.is_empty());
//! ```
//!
//! Evaluation follows the specification's "complete evaluation" mode: it always yields a value
//! together with the list of errors that occurred. A filter passes only when the value is
//! `true` and the list is empty ([`Evaluation::is_match`]).

mod ast;
mod eval;
mod lexer;
mod parser;
mod value;

pub use ast::Expression;
pub use eval::{Evaluation, EventAttributes};
pub use parser::ParseError;
pub use value::{Type, Value};

/// The error kinds the specification (and its TCK) distinguish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The expression could not be parsed.
    Parse,
    /// Division or modulo by zero, integer overflow.
    Math,
    /// An implicit or explicit cast failed.
    Cast,
    /// No function with that name and arity exists.
    MissingFunction,
    /// A function rejected its arguments.
    FunctionEvaluation,
    /// The expression addressed an attribute the event does not carry.
    MissingAttribute,
    /// Anything else.
    Generic,
}

/// One error collected while evaluating an expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?} error: {message}")]
pub struct EvalError {
    /// What went wrong.
    pub kind: ErrorKind,
    /// Human readable detail.
    pub message: String,
}

impl EvalError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}
