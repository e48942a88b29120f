//! Tokenizer for CESQL expressions.

use crate::parser::ParseError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tok {
    /// A bare word: identifier, function name or keyword (original spelling).
    Word(String),
    /// Unsigned decimal digits (sign handled by the parser).
    Int(String),
    /// A quoted string with escapes resolved.
    Str(String),
    LParen,
    RParen,
    Comma,
    Eq,
    NotEq,
    Lt,
    Le,
    Gt,
    Ge,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
}

#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub tok: Tok,
    pub pos: usize,
}

/// Splits an expression into tokens.
pub(crate) fn lex(input: &str) -> Result<Vec<Token>, ParseError> {
    let mut out = Vec::new();
    let mut chars = input.char_indices().peekable();
    while let Some(&(pos, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let push = |out: &mut Vec<Token>, tok| out.push(Token { tok, pos });
        if c.is_ascii_alphabetic() || c == '_' {
            let mut w = String::new();
            while let Some(&(_, c)) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    w.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            push(&mut out, Tok::Word(w));
            continue;
        }
        if c.is_ascii_digit() {
            let mut w = String::new();
            let mut alpha = false;
            while let Some(&(_, c)) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    alpha |= !c.is_ascii_digit();
                    w.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            // Value identifiers may start with a digit (e.g. `1ext`); pure digits are integers.
            push(&mut out, if alpha { Tok::Word(w) } else { Tok::Int(w) });
            continue;
        }
        if c == '\'' || c == '"' {
            chars.next();
            let quote = c;
            let mut s = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                if c == '\\' {
                    match chars.peek() {
                        Some(&(_, n)) if n == quote => {
                            s.push(n);
                            chars.next();
                        }
                        _ => s.push('\\'),
                    }
                } else if c == quote {
                    closed = true;
                    break;
                } else {
                    s.push(c);
                }
            }
            if !closed {
                return Err(ParseError::new(pos, "unterminated string literal"));
            }
            push(&mut out, Tok::Str(s));
            continue;
        }
        chars.next();
        let next = chars.peek().map(|&(_, c)| c);
        let tok = match (c, next) {
            ('(', _) => Tok::LParen,
            (')', _) => Tok::RParen,
            (',', _) => Tok::Comma,
            ('=', _) => Tok::Eq,
            ('!', Some('=')) => {
                chars.next();
                Tok::NotEq
            }
            ('<', Some('>')) => {
                chars.next();
                Tok::NotEq
            }
            ('<', Some('=')) => {
                chars.next();
                Tok::Le
            }
            ('>', Some('=')) => {
                chars.next();
                Tok::Ge
            }
            ('<', _) => Tok::Lt,
            ('>', _) => Tok::Gt,
            ('+', _) => Tok::Plus,
            ('-', _) => Tok::Minus,
            ('*', _) => Tok::Star,
            ('/', _) => Tok::Slash,
            ('%', _) => Tok::Percent,
            (other, _) => {
                return Err(ParseError::new(
                    pos,
                    format!("unexpected character {other:?}"),
                ));
            }
        };
        push(&mut out, tok);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let t: Vec<Tok> = lex("a <> 'x\\'y' >= 12 \"q\\\"\"")
            .unwrap()
            .into_iter()
            .map(|t| t.tok)
            .collect();
        assert_eq!(
            t,
            vec![
                Tok::Word("a".into()),
                Tok::NotEq,
                Tok::Str("x'y".into()),
                Tok::Ge,
                Tok::Int("12".into()),
                Tok::Str("q\"".into()),
            ]
        );
        assert!(lex("'abc").is_err());
        assert!(lex("a # b").is_err());
    }
}
