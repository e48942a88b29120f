//! Evaluator: every node yields a value; errors are collected, never thrown.
//!
//! Error propagation follows the reference implementation: when an operand's evaluation
//! fails, the operator returns the zero value of its result type together with that error.
//! A failed cast inside an operator yields the zero value for the operand and the operator
//! goes on computing.

use crate::ast::{BinOp, Expression, LikeTok, Node};
use crate::{ErrorKind, EvalError, Type, Value};
use std::collections::HashMap;

/// Read access to the context attributes and extensions of an event.
pub trait EventAttributes {
    /// The value of attribute `name` (lower case), or `None` when the event does not carry it.
    fn attribute(&self, name: &str) -> Option<Value>;
}

impl EventAttributes for HashMap<String, Value> {
    fn attribute(&self, name: &str) -> Option<Value> {
        self.get(name).cloned()
    }
}

impl<T: EventAttributes + ?Sized> EventAttributes for &T {
    fn attribute(&self, name: &str) -> Option<Value> {
        (**self).attribute(name)
    }
}

/// The outcome of evaluating an expression: always a value, plus any errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// The primary output.
    pub value: Value,
    /// The errors collected during evaluation (empty on success).
    pub errors: Vec<EvalError>,
}

impl Evaluation {
    /// Filter semantics (spec 1.2): passes only on `true` with no errors.
    pub fn is_match(&self) -> bool {
        self.errors.is_empty() && self.value == Value::Bool(true)
    }
}

type Out = (Value, Option<EvalError>);

impl Expression {
    /// Evaluates the expression against an event.
    pub fn evaluate(&self, event: &dyn EventAttributes) -> Evaluation {
        let mut errors = Vec::new();
        let (value, err) = eval(&self.root, event, &mut errors);
        if let Some(e) = err {
            errors.insert(0, e);
        }
        Evaluation { value, errors }
    }

    /// Shorthand for `evaluate(event).is_match()`.
    pub fn matches(&self, event: &dyn EventAttributes) -> bool {
        self.evaluate(event).is_match()
    }
}

/// Evaluates `node`. A returned error aborts the enclosing operators; `side` collects
/// cast errors that do not abort.
fn eval(node: &Node, ev: &dyn EventAttributes, side: &mut Vec<EvalError>) -> Out {
    match node {
        Node::Literal(v) => (v.clone(), None),
        Node::Attribute(name) => match ev.attribute(name) {
            Some(v) => (v, None),
            None => (
                Value::Bool(false),
                Some(EvalError::new(
                    ErrorKind::MissingAttribute,
                    format!("missing attribute {name}"),
                )),
            ),
        },
        Node::Exists(name) => (Value::Bool(ev.attribute(name).is_some()), None),
        Node::Not(inner) => {
            let (v, e) = eval(inner, ev, side);
            if e.is_some() {
                return (Value::Bool(false), e);
            }
            let b = cast_bool(v, side);
            (Value::Bool(!b), None)
        }
        Node::Neg(inner) => {
            let (v, e) = eval(inner, ev, side);
            if e.is_some() {
                return (Value::Int(0), e);
            }
            let i = cast_int(v, side);
            match i.checked_neg() {
                Some(n) => (Value::Int(n), None),
                None => (Value::Int(i), Some(math("integer overflow in negation"))),
            }
        }
        Node::Binary(op, l, r) => binary(*op, l, r, ev, side),
        Node::Like {
            value,
            pattern,
            negated,
        } => {
            let (v, e) = eval(value, ev, side);
            if e.is_some() {
                return (Value::Bool(false), e);
            }
            let s = cast_string(v);
            let chars: Vec<char> = s.chars().collect();
            (Value::Bool(like(&chars, pattern) != *negated), None)
        }
        Node::In {
            value,
            set,
            negated,
        } => {
            let (v, e) = eval(value, ev, side);
            if e.is_some() {
                return (Value::Bool(false), e);
            }
            let target = v.type_of();
            let mut found = false;
            for item in set {
                let (iv, ie) = eval(item, ev, side);
                if ie.is_some() {
                    return (Value::Bool(false), ie);
                }
                let (cv, ce) = iv.cast(target);
                side.extend(ce);
                if cv == v {
                    found = true;
                    break;
                }
            }
            (Value::Bool(found != *negated), None)
        }
        Node::Call(name, args) => call(name, args, ev, side),
    }
}

fn math(msg: &str) -> EvalError {
    EvalError::new(ErrorKind::Math, msg)
}

fn cast_bool(v: Value, side: &mut Vec<EvalError>) -> bool {
    let (v, e) = v.cast(Type::Boolean);
    side.extend(e);
    matches!(v, Value::Bool(true))
}

fn cast_int(v: Value, side: &mut Vec<EvalError>) -> i32 {
    let (v, e) = v.cast(Type::Integer);
    side.extend(e);
    match v {
        Value::Int(i) => i,
        _ => 0,
    }
}

fn cast_string(v: Value) -> String {
    match v.cast(Type::String) {
        (Value::String(s), _) => s,
        (other, _) => other.to_string(),
    }
}

fn result_type(op: BinOp) -> Type {
    match op {
        BinOp::Mul | BinOp::Div | BinOp::Mod | BinOp::Add | BinOp::Sub => Type::Integer,
        _ => Type::Boolean,
    }
}

fn binary(
    op: BinOp,
    l: &Node,
    r: &Node,
    ev: &dyn EventAttributes,
    side: &mut Vec<EvalError>,
) -> Out {
    let zero = Value::zero(result_type(op));
    let (lv, le) = eval(l, ev, side);
    if le.is_some() {
        return (zero, le);
    }
    // Short circuit before evaluating the right operand.
    let lb = if matches!(op, BinOp::And | BinOp::Or | BinOp::Xor) {
        let b = cast_bool(lv.clone(), side);
        match (op, b) {
            (BinOp::And, false) => return (Value::Bool(false), None),
            (BinOp::Or, true) => return (Value::Bool(true), None),
            _ => b,
        }
    } else {
        false
    };
    let (rv, re) = eval(r, ev, side);
    if re.is_some() {
        return (zero, re);
    }
    match op {
        BinOp::And | BinOp::Or => (Value::Bool(cast_bool(rv, side)), None),
        BinOp::Xor => (Value::Bool(lb != cast_bool(rv, side)), None),
        BinOp::Eq | BinOp::NotEq => {
            // Ambiguous operator: the right operand's type selects the definition.
            let (lc, ce) = lv.cast(rv.type_of());
            side.extend(ce);
            (Value::Bool((lc == rv) == (op == BinOp::Eq)), None)
        }
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
            let (a, b) = (cast_int(lv, side), cast_int(rv, side));
            let res = match op {
                BinOp::Lt => a < b,
                BinOp::Le => a <= b,
                BinOp::Gt => a > b,
                _ => a >= b,
            };
            (Value::Bool(res), None)
        }
        BinOp::Mul | BinOp::Div | BinOp::Mod | BinOp::Add | BinOp::Sub => {
            let (a, b) = (cast_int(lv, side), cast_int(rv, side));
            let res = match op {
                BinOp::Div | BinOp::Mod if b == 0 => {
                    return (Value::Int(0), Some(math("division by zero")));
                }
                BinOp::Mul => a.checked_mul(b),
                BinOp::Div => a.checked_div(b),
                BinOp::Mod => a.checked_rem(b),
                BinOp::Add => a.checked_add(b),
                _ => a.checked_sub(b),
            };
            match res {
                Some(v) => (Value::Int(v), None),
                None => (Value::Int(0), Some(math("integer overflow"))),
            }
        }
    }
}

/// LIKE matching over characters with `%` / `_` wildcards (iterative, linear memory).
fn like(s: &[char], p: &[LikeTok]) -> bool {
    let (mut si, mut pi) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(LikeTok::Many) => {
                star = Some((pi, si));
                pi += 1;
                continue;
            }
            Some(LikeTok::One) => {
                si += 1;
                pi += 1;
                continue;
            }
            Some(LikeTok::Char(c)) if *c == s[si] => {
                si += 1;
                pi += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, ss)) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|t| *t == LikeTok::Many)
}

fn fn_err(msg: impl Into<String>) -> EvalError {
    EvalError::new(ErrorKind::FunctionEvaluation, msg)
}

fn call(name: &str, args: &[Node], ev: &dyn EventAttributes, side: &mut Vec<EvalError>) -> Out {
    use Type::{Boolean, Integer, String as Str};
    // (return type, parameter types) for fixed arity, or variadic string functions.
    let sig: Option<(Type, Vec<Type>)> = match (name, args.len()) {
        ("ABS", 1) => Some((Integer, vec![Integer])),
        ("LENGTH", 1) => Some((Integer, vec![Str])),
        ("LOWER" | "UPPER" | "TRIM", 1) => Some((Str, vec![Str])),
        ("LEFT" | "RIGHT" | "SUBSTRING", 2) => Some((Str, vec![Str, Integer])),
        ("SUBSTRING", 3) => Some((Str, vec![Str, Integer, Integer])),
        ("CONCAT", n) => Some((Str, vec![Str; n])),
        ("CONCAT_WS", n) if n >= 1 => Some((Str, vec![Str; n])),
        // Explicit casts accept any type.
        ("INT", 1) => Some((Integer, vec![])),
        ("BOOL", 1) => Some((Boolean, vec![])),
        ("STRING", 1) => Some((Str, vec![])),
        _ => None,
    };
    let Some((ret, params)) = sig else {
        return (
            Value::Bool(false),
            Some(EvalError::new(
                ErrorKind::MissingFunction,
                format!("no function {name} with {} argument(s)", args.len()),
            )),
        );
    };
    let mut vals = Vec::with_capacity(args.len());
    for (i, a) in args.iter().enumerate() {
        let (v, e) = eval(a, ev, side);
        if e.is_some() {
            return (Value::zero(ret), e);
        }
        let v = match params.get(i) {
            Some(t) => {
                let (cv, ce) = v.cast(*t);
                side.extend(ce);
                cv
            }
            None => v,
        };
        vals.push(v);
    }
    let s = |i: usize| match vals.get(i) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let n = |i: usize| match vals.get(i) {
        Some(Value::Int(n)) => *n,
        _ => 0,
    };
    match name {
        "ABS" => match n(0).checked_abs() {
            Some(a) => (Value::Int(a), None),
            None => (Value::Int(i32::MAX), Some(math("ABS overflow"))),
        },
        "LENGTH" => (
            Value::Int(i32::try_from(s(0).chars().count()).unwrap_or(i32::MAX)),
            None,
        ),
        "LOWER" => (Value::String(s(0).to_lowercase()), None),
        "UPPER" => (Value::String(s(0).to_uppercase()), None),
        "TRIM" => (Value::String(s(0).trim().to_string()), None),
        "CONCAT" => (Value::String((0..vals.len()).map(s).collect()), None),
        "CONCAT_WS" => {
            let parts: Vec<String> = (1..vals.len()).map(s).collect();
            (Value::String(parts.join(&s(0))), None)
        }
        "LEFT" | "RIGHT" => {
            let x = s(0);
            let y = n(1);
            let Ok(y) = usize::try_from(y) else {
                return (
                    Value::String(x),
                    Some(fn_err(format!("{name}: negative length {y}"))),
                );
            };
            let chars: Vec<char> = x.chars().collect();
            if chars.len() <= y {
                return (Value::String(x), None);
            }
            let out: String = if name == "LEFT" {
                chars[..y].iter().collect()
            } else {
                chars[chars.len() - y..].iter().collect()
            };
            (Value::String(out), None)
        }
        "SUBSTRING" => substring(&s(0), n(1), (vals.len() == 3).then(|| n(2))),
        "INT" => match vals.into_iter().next() {
            Some(v) => {
                let (v, e) = v.cast(Integer);
                (v, e)
            }
            None => (Value::Int(0), None),
        },
        "BOOL" => match vals.into_iter().next() {
            Some(Value::Int(i)) => (Value::Bool(i != 0), None),
            Some(v) => v.cast(Boolean),
            None => (Value::Bool(false), None),
        },
        _ => (Value::String(s(0)), None),
    }
}

fn substring(x: &str, pos: i32, len: Option<i32>) -> Out {
    let chars: Vec<char> = x.chars().collect();
    let total = i64::try_from(chars.len()).unwrap_or(i64::MAX);
    let pos = i64::from(pos);
    if pos > total || pos < -total {
        return (
            Value::String(String::new()),
            Some(fn_err(format!("SUBSTRING: position {pos} out of range"))),
        );
    }
    if let Some(l) = len
        && l < 0
    {
        return (
            Value::String(String::new()),
            Some(fn_err(format!("SUBSTRING: negative length {l}"))),
        );
    }
    if pos == 0 {
        return (Value::String(String::new()), None);
    }
    let start = if pos > 0 { pos - 1 } else { total + pos };
    let end = match len {
        Some(l) => (start + i64::from(l)).min(total),
        None => total,
    };
    let (start, end) = (
        usize::try_from(start).unwrap_or(0),
        usize::try_from(end).unwrap_or(0),
    );
    (
        Value::String(chars[start..end.max(start)].iter().collect()),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(expr: &str) -> Evaluation {
        let e = Expression::parse(expr).unwrap();
        e.evaluate(&HashMap::<String, Value>::new())
    }

    #[test]
    fn basics() {
        assert_eq!(run("4 * 2 + 4 / 2").value, Value::Int(10));
        assert_eq!(run("'TRUE' = true").value, Value::Bool(true));
        assert_eq!(run("true = 'TRUE'").value, Value::Bool(false));
        let e = run("NOT 10");
        assert_eq!(e.value, Value::Bool(true));
        assert_eq!(e.errors[0].kind, ErrorKind::Cast);
        assert_eq!(run("'azzzbzzzc' LIKE 'a%b%c'").value, Value::Bool(true));
        assert_eq!(run("'abcd.' LIKE '._._.'").value, Value::Bool(false));
        assert_eq!(run("SUBSTRING('Sakila', -5, 3)").value, Value::from("aki"));
        assert_eq!(run("2147483647 + 1").errors[0].kind, ErrorKind::Math);
        assert!(run("TRUE XOR FALSE").is_match());
    }
}
