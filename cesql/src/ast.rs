//! The syntax tree of a parsed expression.

use crate::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Mul,
    Div,
    Mod,
    Add,
    Sub,
    Eq,
    NotEq,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    Xor,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Literal(Value),
    /// Lower-cased attribute name.
    Attribute(String),
    Exists(String),
    Not(Box<Node>),
    Neg(Box<Node>),
    Binary(BinOp, Box<Node>, Box<Node>),
    Like {
        value: Box<Node>,
        pattern: Vec<LikeTok>,
        negated: bool,
    },
    In {
        value: Box<Node>,
        set: Vec<Node>,
        negated: bool,
    },
    /// Upper-cased function name.
    Call(String, Vec<Node>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LikeTok {
    Char(char),
    /// `_`
    One,
    /// `%`
    Many,
}

/// A parsed CESQL expression, ready to be evaluated against any number of events.
#[derive(Debug, Clone, PartialEq)]
pub struct Expression {
    pub(crate) root: Node,
    pub(crate) source: String,
}

impl Expression {
    /// The expression text this was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }
}
