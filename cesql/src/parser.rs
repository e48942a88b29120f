//! Recursive-descent / precedence-climbing parser.
//!
//! Precedence, tightest first (the order of the reference ANTLR grammar): prefix `NOT`, `-`,
//! `EXISTS`, function calls and parentheses; `LIKE`; `IN`; `* / %`; `+ -`; `= != <>`;
//! `< <= > >=`; `AND OR XOR`. Binary operators associate to the left.

use crate::Value;
use crate::ast::{BinOp, Expression, LikeTok, Node};
use crate::lexer::{Tok, Token, lex};

/// Deepest syntax tree accepted; bounds the recursion of both parser and evaluator.
pub const MAX_DEPTH: u32 = 200;
/// Longest expression accepted, in bytes.
pub const MAX_LEN: usize = 64 * 1024;

/// Why an expression could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parse error at offset {pos}: {message}")]
pub struct ParseError {
    /// Byte offset in the expression.
    pub pos: usize,
    /// What was wrong.
    pub message: String,
}

impl ParseError {
    pub(crate) fn new(pos: usize, message: impl Into<String>) -> Self {
        Self {
            pos,
            message: message.into(),
        }
    }
}

const KEYWORDS: &[&str] = &[
    "AND", "OR", "XOR", "NOT", "LIKE", "IN", "EXISTS", "TRUE", "FALSE",
];

fn is_kw(w: &str, kw: &str) -> bool {
    w.eq_ignore_ascii_case(kw)
}

struct Parser {
    toks: Vec<Token>,
    i: usize,
    end: usize,
}

type Parsed = Result<(Node, u32), ParseError>;

impl Expression {
    /// Parses a CESQL expression.
    pub fn parse(input: &str) -> Result<Expression, ParseError> {
        if input.len() > MAX_LEN {
            return Err(ParseError::new(MAX_LEN, "expression too long"));
        }
        let toks = lex(input)?;
        let mut p = Parser {
            toks,
            i: 0,
            end: input.len(),
        };
        if p.toks.is_empty() {
            return Err(ParseError::new(0, "empty expression"));
        }
        let (root, _) = p.expr(0, 0)?;
        if let Some(t) = p.toks.get(p.i) {
            return Err(ParseError::new(t.pos, format!("unexpected {:?}", t.tok)));
        }
        Ok(Expression {
            root,
            source: input.to_string(),
        })
    }
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i).map(|t| &t.tok)
    }

    fn peek_at(&self, n: usize) -> Option<&Tok> {
        self.toks.get(self.i + n).map(|t| &t.tok)
    }

    fn pos(&self) -> usize {
        self.toks.get(self.i).map_or(self.end, |t| t.pos)
    }

    fn err<T>(&self, msg: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError::new(self.pos(), msg))
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.i).map(|t| t.tok.clone());
        if t.is_some() {
            self.i += 1;
        }
        t
    }

    fn expect(&mut self, want: &Tok, what: &str) -> Result<(), ParseError> {
        if self.peek() == Some(want) {
            self.i += 1;
            Ok(())
        } else {
            self.err(format!("expected {what}"))
        }
    }

    fn check_depth(&self, depth: u32) -> Result<(), ParseError> {
        if depth > MAX_DEPTH {
            self.err(format!("expression nested deeper than {MAX_DEPTH}"))
        } else {
            Ok(())
        }
    }

    /// Infix operator at the cursor: (level, kind). `NOT LIKE` / `NOT IN` count as infix.
    fn infix(&self) -> Option<(u8, Infix)> {
        let op = match self.peek()? {
            Tok::Star => (5, Infix::Bin(BinOp::Mul)),
            Tok::Slash => (5, Infix::Bin(BinOp::Div)),
            Tok::Percent => (5, Infix::Bin(BinOp::Mod)),
            Tok::Plus => (4, Infix::Bin(BinOp::Add)),
            Tok::Minus => (4, Infix::Bin(BinOp::Sub)),
            Tok::Eq => (3, Infix::Bin(BinOp::Eq)),
            Tok::NotEq => (3, Infix::Bin(BinOp::NotEq)),
            Tok::Lt => (2, Infix::Bin(BinOp::Lt)),
            Tok::Le => (2, Infix::Bin(BinOp::Le)),
            Tok::Gt => (2, Infix::Bin(BinOp::Gt)),
            Tok::Ge => (2, Infix::Bin(BinOp::Ge)),
            Tok::Word(w) if is_kw(w, "AND") => (1, Infix::Bin(BinOp::And)),
            Tok::Word(w) if is_kw(w, "OR") => (1, Infix::Bin(BinOp::Or)),
            Tok::Word(w) if is_kw(w, "XOR") => (1, Infix::Bin(BinOp::Xor)),
            Tok::Word(w) if is_kw(w, "LIKE") => (7, Infix::Like(false)),
            Tok::Word(w) if is_kw(w, "IN") => (6, Infix::In(false)),
            Tok::Word(w) if is_kw(w, "NOT") => match self.peek_at(1)? {
                Tok::Word(n) if is_kw(n, "LIKE") => (7, Infix::Like(true)),
                Tok::Word(n) if is_kw(n, "IN") => (6, Infix::In(true)),
                _ => return None,
            },
            _ => return None,
        };
        Some(op)
    }

    fn expr(&mut self, min_level: u8, depth: u32) -> Parsed {
        self.check_depth(depth)?;
        let (mut lhs, mut d) = self.prefix(depth + 1)?;
        while let Some((level, op)) = self.infix() {
            if level < min_level {
                break;
            }
            match op {
                Infix::Bin(bop) => {
                    self.i += 1;
                    let (rhs, rd) = self.expr(level + 1, depth + 1)?;
                    d = d.max(rd) + 1;
                    lhs = Node::Binary(bop, Box::new(lhs), Box::new(rhs));
                }
                Infix::Like(negated) => {
                    self.i += if negated { 2 } else { 1 };
                    let pattern = match self.next() {
                        Some(Tok::Str(s)) => compile_like(&s),
                        _ => return self.err("LIKE expects a string literal pattern"),
                    };
                    d += 1;
                    lhs = Node::Like {
                        value: Box::new(lhs),
                        pattern,
                        negated,
                    };
                }
                Infix::In(negated) => {
                    self.i += if negated { 2 } else { 1 };
                    self.expect(&Tok::LParen, "'(' after IN")?;
                    let mut set = Vec::new();
                    loop {
                        let (e, ed) = self.expr(0, depth + 1)?;
                        d = d.max(ed);
                        set.push(e);
                        match self.next() {
                            Some(Tok::Comma) => continue,
                            Some(Tok::RParen) => break,
                            _ => return self.err("expected ',' or ')' in IN set"),
                        }
                    }
                    d += 1;
                    lhs = Node::In {
                        value: Box::new(lhs),
                        set,
                        negated,
                    };
                }
            }
            self.check_depth(d)?;
        }
        Ok((lhs, d))
    }

    fn prefix(&mut self, depth: u32) -> Parsed {
        self.check_depth(depth)?;
        let Some(tok) = self.next() else {
            return self.err("unexpected end of expression");
        };
        match tok {
            Tok::LParen => {
                let inner = self.expr(0, depth + 1)?;
                self.expect(&Tok::RParen, "')'")?;
                Ok(inner)
            }
            Tok::Str(s) => Ok((Node::Literal(Value::String(s)), 1)),
            Tok::Int(digits) => {
                let v = self.int_literal(&digits, false)?;
                Ok((Node::Literal(Value::Int(v)), 1))
            }
            Tok::Minus => {
                if let Some(Tok::Int(digits)) = self.peek().cloned() {
                    self.i += 1;
                    let v = self.int_literal(&digits, true)?;
                    return Ok((Node::Literal(Value::Int(v)), 1));
                }
                let (inner, d) = self.prefix(depth + 1)?;
                Ok((Node::Neg(Box::new(inner)), d + 1))
            }
            Tok::Word(w) => self.word(w, depth),
            other => {
                self.i -= 1;
                self.err(format!("unexpected {other:?}"))
            }
        }
    }

    fn int_literal(&self, digits: &str, negative: bool) -> Result<i32, ParseError> {
        let text = if negative {
            format!("-{digits}")
        } else {
            digits.to_string()
        };
        text.parse::<i32>()
            .or_else(|_| self.err(format!("integer literal {text} out of 32-bit range")))
    }

    fn word(&mut self, w: String, depth: u32) -> Parsed {
        if is_kw(&w, "TRUE") {
            return Ok((Node::Literal(Value::Bool(true)), 1));
        }
        if is_kw(&w, "FALSE") {
            return Ok((Node::Literal(Value::Bool(false)), 1));
        }
        if is_kw(&w, "NOT") {
            let (inner, d) = self.prefix(depth + 1)?;
            return Ok((Node::Not(Box::new(inner)), d + 1));
        }
        if is_kw(&w, "EXISTS") {
            return match self.next() {
                Some(Tok::Word(id)) if !KEYWORDS.iter().any(|k| is_kw(&id, k)) => {
                    Ok((Node::Exists(self.identifier(&id)?), 1))
                }
                Some(Tok::Int(id)) => Ok((Node::Exists(id), 1)),
                _ => {
                    self.i = self.i.saturating_sub(1);
                    self.err("EXISTS expects an attribute name")
                }
            };
        }
        if KEYWORDS.iter().any(|k| is_kw(&w, k)) {
            self.i -= 1;
            return self.err(format!("unexpected keyword {w}"));
        }
        if self.peek() == Some(&Tok::LParen) {
            self.i += 1;
            if !w.starts_with(|c: char| c.is_ascii_alphabetic())
                || !w.chars().all(|c| c.is_ascii_alphabetic() || c == '_')
            {
                return self.err(format!("invalid function name {w}"));
            }
            let mut args = Vec::new();
            let mut d = 0;
            if self.peek() == Some(&Tok::RParen) {
                self.i += 1;
            } else {
                loop {
                    let (a, ad) = self.expr(0, depth + 1)?;
                    d = d.max(ad);
                    args.push(a);
                    match self.next() {
                        Some(Tok::Comma) => continue,
                        Some(Tok::RParen) => break,
                        _ => return self.err("expected ',' or ')' in argument list"),
                    }
                }
            }
            return Ok((Node::Call(w.to_ascii_uppercase(), args), d + 1));
        }
        Ok((Node::Attribute(self.identifier(&w)?), 1))
    }

    fn identifier(&self, w: &str) -> Result<String, ParseError> {
        let lower = w.to_ascii_lowercase();
        if lower
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            Ok(lower)
        } else {
            self.err(format!("invalid attribute name {w}"))
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Infix {
    Bin(BinOp),
    Like(bool),
    In(bool),
}

/// Compiles a LIKE pattern: `%` any run, `_` one character, `\%` and `\_` literal.
fn compile_like(p: &str) -> Vec<LikeTok> {
    let mut out = Vec::new();
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some(&n @ ('%' | '_')) => {
                    out.push(LikeTok::Char(n));
                    chars.next();
                }
                _ => out.push(LikeTok::Char('\\')),
            },
            '%' => {
                if out.last() != Some(&LikeTok::Many) {
                    out.push(LikeTok::Many);
                }
            }
            '_' => out.push(LikeTok::One),
            c => out.push(LikeTok::Char(c)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence() {
        let e = Expression::parse("1 + 2 * 3 = 7 AND NOT FALSE").unwrap();
        match e.root {
            Node::Binary(BinOp::And, l, r) => {
                assert!(matches!(*l, Node::Binary(BinOp::Eq, _, _)));
                assert!(matches!(*r, Node::Not(_)));
            }
            other => panic!("unexpected tree {other:?}"),
        }
    }

    #[test]
    fn errors() {
        for bad in [
            "",
            "ABC(",
            "a LIKE 1",
            "(a",
            "a b",
            "2147483648",
            "EXISTS 'x'",
            "a IN ()",
            "AND",
            "my_ext = 1",
        ] {
            assert!(Expression::parse(bad).is_err(), "{bad:?} should not parse");
        }
        assert!(Expression::parse("-2147483648").is_ok());
        let deep = "(".repeat(10_000) + "1" + &")".repeat(10_000);
        assert!(Expression::parse(&deep).is_err());
        let long_chain = vec!["1"; 5000].join(" + ");
        assert!(Expression::parse(&long_chain).is_err());
    }
}
