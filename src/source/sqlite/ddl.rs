//! What a SQLite table's `CREATE` statement says that its pragmas do not:
//! CHECK constraints, `WITHOUT ROWID`, and a virtual table's module and
//! arguments. A small tokenizer of SQLite's SQL; expressions are only
//! recognised or carried, never evaluated.

use crate::model::{CheckToken, Column, LogicalType};

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// A bare word (`status`, `IN`, `lower`).
    Word(String),
    /// A quoted identifier (`"status"`, `` `status` ``, `[status]`); SQLite
    /// also reads `"x"` as a string when no column is named x.
    Quoted(String),
    Str(String),
    Num(String),
    /// A blob literal, `X'00ff'`.
    Blob,
    Op(String),
}

impl Tok {
    fn is_word(&self, w: &str) -> bool {
        matches!(self, Tok::Word(x) if x.eq_ignore_ascii_case(w))
    }

    fn is_op(&self, o: &str) -> bool {
        matches!(self, Tok::Op(x) if x == o)
    }

    /// The SQL text of the token, for messages.
    fn text(&self) -> String {
        match self {
            Tok::Word(w) | Tok::Num(w) | Tok::Op(w) => w.clone(),
            Tok::Quoted(q) => format!("\"{}\"", q.replace('"', "\"\"")),
            Tok::Str(s) => format!("'{}'", s.replace('\'', "''")),
            Tok::Blob => "X'…'".into(),
        }
    }
}

/// The tokens of `sql`, comments left out.
pub fn tokenize(sql: &str) -> Vec<Tok> {
    let b: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let until = |i: usize, close: char| -> (String, usize) {
        // A quoted run with the closing character doubled as its escape.
        let mut s = String::new();
        let mut j = i + 1;
        while j < b.len() {
            if b[j] == close {
                if close != ']' && b.get(j + 1) == Some(&close) {
                    s.push(close);
                    j += 2;
                    continue;
                }
                return (s, j + 1);
            }
            s.push(b[j]);
            j += 1;
        }
        (s, j)
    };
    while i < b.len() {
        let c = b[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '-' && b.get(i + 1) == Some(&'-') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && b.get(i + 1) == Some(&'*') {
            i += 2;
            while i < b.len() && !(b[i] == '*' && b.get(i + 1) == Some(&'/')) {
                i += 1;
            }
            i += 2;
        } else if (c == 'x' || c == 'X') && b.get(i + 1) == Some(&'\'') {
            let (_, j) = until(i + 1, '\'');
            out.push(Tok::Blob);
            i = j;
        } else if c == '\'' {
            let (s, j) = until(i, '\'');
            out.push(Tok::Str(s));
            i = j;
        } else if c == '"' || c == '`' || c == '[' {
            let close = match c {
                '[' => ']',
                c => c,
            };
            let (s, j) = until(i, close);
            out.push(Tok::Quoted(s));
            i = j;
        } else if c.is_ascii_digit()
            || (c == '.' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            let start = i;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric()
                    || b[i] == '.'
                    || ((b[i] == '+' || b[i] == '-') && matches!(b[i - 1], 'e' | 'E')))
            {
                i += 1;
            }
            out.push(Tok::Num(b[start..i].iter().collect()));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_' || b[i] == '$') {
                i += 1;
            }
            out.push(Tok::Word(b[start..i].iter().collect()));
        } else {
            let two: String = b[i..(i + 2).min(b.len())].iter().collect();
            if ["==", "!=", "<>", "<=", ">=", "||", "<<", ">>"].contains(&two.as_str()) {
                out.push(Tok::Op(two));
                i += 2;
            } else {
                out.push(Tok::Op(c.to_string()));
                i += 1;
            }
        }
    }
    out
}

/// The index of the `)` that closes the `(` at `open`.
fn closing(toks: &[Tok], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, t) in toks.iter().enumerate().skip(open) {
        if t.is_op("(") {
            depth += 1;
        } else if t.is_op(")") {
            depth -= 1;
            if depth == 0 {
                return Some(i);
            }
        }
    }
    None
}

/// A CREATE TABLE's column definitions and table constraints, each as its
/// tokens, and what follows the closing parenthesis.
fn body(sql: &str) -> Option<(Vec<Vec<Tok>>, Vec<Tok>)> {
    let toks = tokenize(sql);
    let open = toks.iter().position(|t| t.is_op("("))?;
    let close = closing(&toks, open)?;
    let mut parts = vec![Vec::new()];
    let mut depth = 0usize;
    for t in &toks[open + 1..close] {
        if t.is_op("(") {
            depth += 1;
        } else if t.is_op(")") {
            depth = depth.saturating_sub(1);
        }
        if depth == 0 && t.is_op(",") {
            parts.push(Vec::new());
        } else if let Some(last) = parts.last_mut() {
            last.push(t.clone());
        }
    }
    Some((parts, toks[close + 1..].to_vec()))
}

/// Whether the table is declared `WITHOUT ROWID`.
pub fn without_rowid(sql: &str) -> bool {
    body(sql).is_some_and(|(_, tail)| {
        tail.windows(2)
            .any(|w| w[0].is_word("WITHOUT") && w[1].is_word("ROWID"))
    })
}

/// A CHECK constraint as the source writes it.
#[derive(Debug, Clone)]
pub struct SourceCheck {
    /// `CONSTRAINT name`, where given.
    pub name: Option<String>,
    /// The column it is written on, for a column constraint.
    pub column: Option<String>,
    pub expr: Vec<Tok>,
}

impl SourceCheck {
    /// `CHECK (…)` as the source wrote it, for messages.
    pub fn shown(&self) -> String {
        let mut s = String::new();
        let mut prev: Option<&Tok> = None;
        for t in &self.expr {
            let tight = t.is_op(")")
                || t.is_op(",")
                || prev.is_some_and(|p| p.is_op("("))
                || (t.is_op("(") && matches!(prev, Some(Tok::Word(w)) if !is_keyword(w)));
            if prev.is_some() && !tight {
                s.push(' ');
            }
            s.push_str(&t.text());
            prev = Some(t);
        }
        format!("CHECK ({s})")
    }
}

fn is_keyword(w: &str) -> bool {
    KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(w))
}

const KEYWORDS: &[&str] = &[
    "AND", "OR", "NOT", "IN", "IS", "NULL", "BETWEEN", "TRUE", "FALSE", "CASE", "WHEN", "THEN",
    "ELSE", "END",
];

/// Functions that mean the same in PostgreSQL for text arguments.
const TEXT_FUNCTIONS: &[&str] = &["lower", "upper", "length", "trim", "ltrim", "rtrim"];
/// Functions that mean the same in PostgreSQL for any argument.
const FUNCTIONS: &[&str] = &["abs", "coalesce"];

/// The CHECK constraints of a CREATE TABLE statement.
pub fn checks(sql: &str) -> Vec<SourceCheck> {
    let Some((parts, _)) = body(sql) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for part in parts {
        let column = match part.first() {
            Some(Tok::Word(w))
                if !["CONSTRAINT", "PRIMARY", "UNIQUE", "CHECK", "FOREIGN"]
                    .iter()
                    .any(|k| k.eq_ignore_ascii_case(w)) =>
            {
                Some(w.clone())
            }
            Some(Tok::Quoted(q)) => Some(q.clone()),
            _ => None,
        };
        let mut i = 0;
        while i < part.len() {
            if part[i].is_word("CHECK") && part.get(i + 1).is_some_and(|t| t.is_op("(")) {
                let Some(end) = closing(&part, i + 1) else {
                    break;
                };
                let name =
                    (i >= 2 && part[i - 2].is_word("CONSTRAINT")).then(|| match &part[i - 1] {
                        Tok::Word(w) | Tok::Quoted(w) => w.clone(),
                        t => t.text(),
                    });
                out.push(SourceCheck {
                    name,
                    column: column.clone(),
                    expr: part[i + 2..end].to_vec(),
                });
                i = end;
            }
            i += 1;
        }
    }
    out
}

/// What a CHECK says of one column that decides its type.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// `x IN (0, 1)`, `x BETWEEN 0 AND 1`: a boolean kept as an integer.
    Boolean(String),
    /// `json_valid(x)`: JSON kept as text.
    Json(String),
    /// `x IN ('a', 'b', …)`.
    Labels(String),
    Other,
}

fn column_name(t: &Tok) -> Option<&str> {
    match t {
        Tok::Word(w) if !is_keyword(w) => Some(w),
        Tok::Quoted(q) => Some(q),
        _ => None,
    }
}

/// The expression without parentheses around all of it and without an
/// `OR x IS NULL` beside it (as ORMs write them:
/// `((JSON_VALID("attrs") OR "attrs" IS NULL))`).
fn core(mut e: &[Tok]) -> &[Tok] {
    loop {
        let before = e.len();
        if e.len() >= 2 && e[0].is_op("(") && closing(e, 0) == Some(e.len() - 1) {
            e = &e[1..e.len() - 1];
        }
        let n = e.len();
        if n > 4
            && e[n - 4].is_word("OR")
            && column_name(&e[n - 3]).is_some()
            && e[n - 2].is_word("IS")
            && e[n - 1].is_word("NULL")
        {
            e = &e[..n - 4];
        } else if n > 4
            && column_name(&e[0]).is_some()
            && e[1].is_word("IS")
            && e[2].is_word("NULL")
            && e[3].is_word("OR")
        {
            e = &e[4..];
        }
        if e.len() == before {
            return e;
        }
    }
}

impl SourceCheck {
    pub fn shape(&self) -> Shape {
        let e = core(&self.expr);
        let num = |t: &Tok, v: &str| matches!(t, Tok::Num(n) if n == v);
        // x IN (0, 1) / (1, 0)
        if let [c, kw, open, a, comma, b, close] = e {
            if kw.is_word("IN") && open.is_op("(") && comma.is_op(",") && close.is_op(")") {
                if let Some(c) = column_name(c) {
                    if (num(a, "0") && num(b, "1")) || (num(a, "1") && num(b, "0")) {
                        return Shape::Boolean(c.to_string());
                    }
                }
            }
        }
        // x BETWEEN 0 AND 1
        if let [c, between, a, and, b] = e {
            if between.is_word("BETWEEN") && and.is_word("AND") && num(a, "0") && num(b, "1") {
                if let Some(c) = column_name(c) {
                    return Shape::Boolean(c.to_string());
                }
            }
        }
        // json_valid(x)
        if let [f, open, c, close] = e {
            if f.is_word("json_valid") && open.is_op("(") && close.is_op(")") {
                if let Some(c) = column_name(c) {
                    return Shape::Json(c.to_string());
                }
            }
        }
        // x IN ('a', …)
        if let [c, kw, open, rest @ ..] = e {
            if kw.is_word("IN") && open.is_op("(") && rest.last().is_some_and(|t| t.is_op(")")) {
                let inner = &rest[..rest.len() - 1];
                let labels = !inner.is_empty()
                    && inner.iter().enumerate().all(|(i, t)| {
                        if i % 2 == 0 {
                            matches!(t, Tok::Str(_))
                        } else {
                            t.is_op(",")
                        }
                    })
                    && inner.len() % 2 == 1;
                if let (true, Some(c)) = (labels, column_name(c)) {
                    return Shape::Labels(c.to_string());
                }
            }
        }
        Shape::Other
    }

    /// The expression in neutral tokens, where it means the same in
    /// PostgreSQL given the columns' target types; else why not.
    pub fn carry(&self, columns: &[Column]) -> std::result::Result<Vec<CheckToken>, String> {
        let find = |name: &str| {
            columns
                .iter()
                .position(|c| c.name.eq_ignore_ascii_case(name))
        };
        let mut out = Vec::new();
        let e = &self.expr;
        for (i, t) in e.iter().enumerate() {
            let next_is_call = e.get(i + 1).is_some_and(|n| n.is_op("("));
            let tok = match t {
                Tok::Word(w) if is_keyword(w) => CheckToken::Word(w.to_ascii_uppercase()),
                Tok::Word(w) if next_is_call => {
                    let f = w.to_ascii_lowercase();
                    if FUNCTIONS.contains(&f.as_str()) {
                        CheckToken::Word(f)
                    } else if TEXT_FUNCTIONS.contains(&f.as_str()) {
                        // Its argument must be a text column.
                        match e.get(i + 2).and_then(column_name).and_then(find) {
                            Some(c) if columns[c].logical == LogicalType::Text => {
                                CheckToken::Word(f)
                            }
                            _ => return Err(format!("{w}() is carried only over a text column")),
                        }
                    } else {
                        return Err(format!(
                            "{w}() has no function of the same meaning in PostgreSQL"
                        ));
                    }
                }
                Tok::Word(w) | Tok::Quoted(w) => match find(w) {
                    Some(c) => {
                        let logical = columns[c].logical;
                        if !matches!(
                            logical,
                            LogicalType::Int
                                | LogicalType::Float
                                | LogicalType::Decimal
                                | LogicalType::Text
                        ) {
                            return Err(format!(
                                "column {:?} is {logical} in the target, where the expression does not mean the same",
                                columns[c].name
                            ));
                        }
                        CheckToken::Column(c)
                    }
                    None if matches!(t, Tok::Quoted(_)) => {
                        return Err(format!(
                            "\"{w}\" names no column (SQLite reads it as a string)"
                        ))
                    }
                    None => {
                        return Err(format!(
                            "{w} is not a column or a keyword PostgreSQL reads the same"
                        ))
                    }
                },
                Tok::Str(s) => CheckToken::Text(s.clone()),
                Tok::Num(n) if n.parse::<f64>().is_ok() && !n.starts_with("0x") => {
                    CheckToken::Number(n.clone())
                }
                Tok::Op(o) => match o.as_str() {
                    "==" => CheckToken::Word("=".into()),
                    "=" | "<>" | "!=" | "<" | ">" | "<=" | ">=" | "+" | "-" | "*" | "/" | "("
                    | ")" | "," => CheckToken::Word(o.clone()),
                    _ => return Err(format!("operator {o} does not mean the same in PostgreSQL")),
                },
                t => return Err(format!("{} has no PostgreSQL form", t.text())),
            };
            out.push(tok);
        }
        if out.is_empty() {
            return Err("empty expression".into());
        }
        // SQLite compares a TEXT column with a number by affinity;
        // PostgreSQL refuses text = integer.
        let text_column = |t: &CheckToken| matches!(t, CheckToken::Column(c) if columns[*c].logical == LogicalType::Text);
        let compares = |t: &CheckToken| matches!(t, CheckToken::Word(w) if ["=", "<>", "!=", "<", ">", "<=", ">=", "IN", "BETWEEN"].contains(&w.as_str()));
        let number = |t: Option<&CheckToken>| matches!(t, Some(CheckToken::Number(_)));
        for (j, t) in out.iter().enumerate() {
            let next = out.get(j + 1);
            let compared_number = next.is_some_and(compares)
                && (number(out.get(j + 2))
                    || (matches!(out.get(j + 2), Some(CheckToken::Word(w)) if w == "(")
                        && number(out.get(j + 3))));
            let number_compared = j >= 2 && number(out.get(j - 2)) && compares(&out[j - 1]);
            if text_column(t) && (compared_number || number_compared) {
                if let CheckToken::Column(c) = t {
                    return Err(format!(
                        "column {:?} is text in the target, and PostgreSQL does not compare text with a number",
                        columns[*c].name
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// `CREATE VIRTUAL TABLE x USING module(args)`: the module (lower case) and
/// its arguments, each as written.
pub fn virtual_module(sql: &str) -> Option<(String, Vec<String>)> {
    let toks = tokenize(sql);
    let using = toks.iter().position(|t| t.is_word("USING"))?;
    let module = match toks.get(using + 1)? {
        Tok::Word(w) | Tok::Quoted(w) => w.to_ascii_lowercase(),
        _ => return None,
    };
    let mut args = Vec::new();
    if toks.get(using + 2).is_some_and(|t| t.is_op("(")) {
        let end = closing(&toks, using + 2)?;
        let mut cur = String::new();
        let mut depth = 0usize;
        for t in &toks[using + 3..end] {
            if t.is_op("(") {
                depth += 1;
            } else if t.is_op(")") {
                depth = depth.saturating_sub(1);
            }
            if depth == 0 && t.is_op(",") {
                args.push(std::mem::take(&mut cur));
                continue;
            }
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(&match t {
                Tok::Quoted(q) | Tok::Str(q) => q.clone(),
                t => t.text(),
            });
        }
        if !cur.is_empty() {
            args.push(cur);
        }
    }
    Some((module, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MISSIONS: &str = "CREATE TABLE missions(id TEXT PRIMARY KEY DEFAULT (lower(hex(randomblob(16)))),
      title TEXT NOT NULL,
      status TEXT NOT NULL DEFAULT 'draft' CHECK (status IN ('draft','active','paused','completed','archived','failed')),
      active INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)), meta TEXT CHECK (json_valid(meta)),
      score REAL, CONSTRAINT score_range CHECK (score >= 0 AND score <= 100), -- a comment, with (parens
      created_at TEXT NOT NULL DEFAULT (datetime('now')))";

    #[test]
    fn checks_are_found_with_their_column_and_shape() {
        let c = checks(MISSIONS);
        assert_eq!(c.len(), 4, "{c:?}");
        assert_eq!(c[0].column.as_deref(), Some("status"));
        assert_eq!(c[0].shape(), Shape::Labels("status".into()));
        assert_eq!(c[1].shape(), Shape::Boolean("active".into()));
        assert_eq!(c[2].shape(), Shape::Json("meta".into()));
        assert_eq!(c[3].name.as_deref(), Some("score_range"));
        assert_eq!(c[3].column, None);
        assert_eq!(c[3].shape(), Shape::Other);
        assert_eq!(c[3].shown(), "CHECK (score >= 0 AND score <= 100)");
        assert_eq!(
            c[0].shown(),
            "CHECK (status IN ('draft', 'active', 'paused', 'completed', 'archived', 'failed'))"
        );
        assert!(!without_rowid(MISSIONS));
        assert!(without_rowid(
            "CREATE TABLE k(a TEXT PRIMARY KEY, b) WITHOUT ROWID"
        ));
    }

    fn col(name: &str, logical: LogicalType) -> Column {
        Column {
            name: name.into(),
            source_type: String::new(),
            logical,
            nullable: true,
        }
    }

    #[test]
    fn shapes_are_read_through_the_parentheses_and_null_tests_orms_write() {
        let c = checks(
            r#"CREATE TABLE "p" ("attrs" text NOT NULL CHECK ((JSON_VALID("attrs") OR "attrs" IS NULL)), "b" bool CHECK ("b" IS NULL OR ("b" IN (0,1))))"#,
        );
        assert_eq!(c[0].shape(), Shape::Json("attrs".into()));
        assert_eq!(c[1].shape(), Shape::Boolean("b".into()));
    }

    #[test]
    fn an_expression_is_carried_only_where_it_means_the_same() {
        let cols = vec![
            col("score", LogicalType::Float),
            col("name", LogicalType::Text),
            col("at", LogicalType::Timestamp),
        ];
        let c = checks("CREATE TABLE t(score REAL CHECK (score == 1 OR \"score\" > 2), name TEXT CHECK (length(name) > 0), at TEXT CHECK (at > '2000'), CHECK (typeof(score) = 'real'), CHECK (name LIKE 'a%'), CHECK (\"nope\" <> name))");
        let carried: Vec<_> = c.iter().map(|c| c.carry(&cols)).collect();
        assert_eq!(
            carried[0].as_ref().unwrap(),
            &vec![
                CheckToken::Column(0),
                CheckToken::Word("=".into()),
                CheckToken::Number("1".into()),
                CheckToken::Word("OR".into()),
                CheckToken::Column(0),
                CheckToken::Word(">".into()),
                CheckToken::Number("2".into()),
            ]
        );
        assert!(carried[1].is_ok());
        let text_cols = vec![col("active", LogicalType::Text)];
        for sql in [
            "CREATE TABLE t(active TEXT CHECK (active IN (0, 1)))",
            "CREATE TABLE t(active TEXT CHECK (1 <= active))",
            "CREATE TABLE t(active TEXT CHECK (active BETWEEN 0 AND 1))",
        ] {
            let e = checks(sql)[0].carry(&text_cols).unwrap_err();
            assert!(
                e.contains("does not compare text with a number"),
                "{sql}: {e}"
            );
        }
        assert!(
            checks("CREATE TABLE t(active TEXT CHECK (length(active) > 0 AND active <> 'x'))")[0]
                .carry(&text_cols)
                .is_ok()
        );
        assert!(carried[2].as_ref().unwrap_err().contains("timestamp"));
        assert!(carried[3].as_ref().unwrap_err().contains("typeof()"));
        assert!(carried[4].as_ref().unwrap_err().contains("LIKE"));
        assert!(carried[5].as_ref().unwrap_err().contains("names no column"));
    }

    #[test]
    fn a_virtual_table_names_its_module_and_arguments() {
        let (m, args) = virtual_module(
            "CREATE VIRTUAL TABLE missions_fts USING fts5(title, body, content='missions', content_rowid='rowid', tokenize = 'porter unicode61')",
        )
        .unwrap();
        assert_eq!(m, "fts5");
        assert_eq!(
            args,
            vec![
                "title",
                "body",
                "content = missions",
                "content_rowid = rowid",
                "tokenize = porter unicode61"
            ]
        );
        assert_eq!(
            virtual_module("CREATE VIRTUAL TABLE r USING rtree(id, a, b)")
                .unwrap()
                .0,
            "rtree"
        );
    }
}
