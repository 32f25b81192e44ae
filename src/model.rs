//! The neutral model every source produces and every sink consumes.
//!
//! A source decodes its rows into [`Value`]s according to the column's
//! [`LogicalType`]; a sink maps the logical type onto its own type system.
//! Decimal values are carried as their exact decimal text, never as `f64`.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::position::Position;

/// The type of a column, independent of source and target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogicalType {
    Bool,
    Int,
    Float,
    Decimal,
    Text,
    Bytes,
    Json,
    Timestamp,
    /// A UUID, carried as its text (`a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11`).
    Uuid,
    /// A calendar date, carried as PostgreSQL's ISO text (`2024-02-29`,
    /// `0044-03-15 BC`, `infinity`).
    Date,
    /// A time span, carried as PostgreSQL's ISO 8601 text (`P1Y2M3DT4H5M6S`).
    Interval,
    /// No declared type: each value keeps its own storage class.
    Any,
}

impl fmt::Display for LogicalType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            LogicalType::Bool => "bool",
            LogicalType::Int => "int",
            LogicalType::Float => "float",
            LogicalType::Decimal => "decimal",
            LogicalType::Text => "text",
            LogicalType::Bytes => "bytes",
            LogicalType::Json => "json",
            LogicalType::Timestamp => "timestamp",
            LogicalType::Uuid => "uuid",
            LogicalType::Date => "date",
            LogicalType::Interval => "interval",
            LogicalType::Any => "any",
        };
        f.write_str(s)
    }
}

/// One value of one column.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Exact decimal text, for example `-12.500`.
    Decimal(String),
    Text(String),
    Bytes(Vec<u8>),
    /// JSON document text as the source holds it (validated).
    Json(String),
    Timestamp(DateTime<Utc>),
    /// A SurrealDB value that JSON would change (a geometry, or an object or
    /// array holding a datetime, decimal, record id, duration, uuid or
    /// bytes), from a SurrealDB source: a SurrealDB target writes it as it
    /// is; every other use takes its JSON form, as for [`Value::Json`].
    #[cfg(feature = "surrealdb")]
    Native(Box<Native>),
    /// In an update: the column kept its value, which the source did not send
    /// (PostgreSQL's unchanged TOAST values). A sink leaves the column as it is.
    Unchanged,
}

/// See [`Value::Native`].
#[cfg(feature = "surrealdb")]
#[derive(Debug, Clone, PartialEq)]
pub struct Native {
    pub value: surrealdb::types::Value,
    /// Its JSON form (datetimes, record ids, … as strings; a geometry as
    /// GeoJSON).
    pub json: String,
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn is_unchanged(&self) -> bool {
        matches!(self, Value::Unchanged)
    }
}

impl fmt::Display for Value {
    /// A short rendering for error messages: long texts and blobs are cut.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn cut(s: &str) -> String {
            if s.chars().count() > 80 {
                format!(
                    "{}… ({} bytes)",
                    s.chars().take(80).collect::<String>(),
                    s.len()
                )
            } else {
                s.to_string()
            }
        }
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Decimal(d) => f.write_str(d),
            Value::Text(s) => write!(f, "{:?}", cut(s)),
            Value::Json(s) => write!(f, "{}", cut(s)),
            #[cfg(feature = "surrealdb")]
            Value::Native(n) => write!(f, "{}", cut(&surrealdb::types::ToSql::to_sql(&n.value))),
            Value::Bytes(b) => write!(f, "<{} bytes>", b.len()),
            Value::Timestamp(t) => write!(f, "{}", t.to_rfc3339()),
            Value::Unchanged => f.write_str("<unchanged>"),
        }
    }
}

/// Bytes as PostgreSQL's `\\x…` hex text.
pub fn hex_text(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("\\x");
    for byte in b {
        let _ = write!(s, "{byte:02x}");
    }
    s
}

/// A row: one value per column, in the table's column order.
pub type Row = Vec<Value>;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Column {
    pub name: String,
    /// The type as the source declares it (`VARCHAR(20)`, `int8`, or empty).
    pub source_type: String,
    pub logical: LogicalType,
    pub nullable: bool,
}

/// A replicated table as the pipeline sees it. Serialized with the target's
/// state: the shape the target holds (see [`TableSchema::same_shape`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TableSchema {
    /// The name in the source.
    pub name: String,
    /// The name in the target (the source name unless renamed).
    pub target_name: String,
    pub columns: Vec<Column>,
    /// Indexes into `columns` of the key, in key order. For a table
    /// identified by its whole row, every column.
    pub key: Vec<usize>,
    /// The table has no key: a row is identified by all of its values
    /// (PostgreSQL `REPLICA IDENTITY FULL`), and identical rows are counted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whole_row: bool,
    /// What identifies this incarnation of the table in the source
    /// (PostgreSQL: its OID), so that a table dropped and created again
    /// under the same name is copied again. Empty where the source has none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source_id: String,
    /// What identifies each column in the source whatever its name
    /// (PostgreSQL: its attribute number), parallel to `columns`; empty
    /// where the source has none (columns are then known by name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub column_ids: Vec<i32>,
    /// PostgreSQL: the type OID each column's text is read as (a domain's
    /// base type, an array's element type), parallel to `columns`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_as: Vec<u32>,
    /// Secondary indexes and foreign keys of the source table (PostgreSQL),
    /// which a target that creates its schema builds after the bulk load.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secondary: Vec<Secondary>,
    /// The enum types of the table's columns (PostgreSQL): the type's name as
    /// the source writes it, and its labels in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enum_types: Vec<(String, Vec<String>)>,
    /// Identity columns and portable defaults of the source (PostgreSQL), for
    /// a target that creates its schema.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub column_defaults: Vec<ColumnDefault>,
    /// A partitioned table's partitions (PostgreSQL), which a partitioned
    /// target table follows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<Partition>,
    /// CHECK constraints of the source (SQLite) that mean the same in the
    /// target, for a target that creates its schema.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
    /// Columns whose target type is not the one their declared type gives:
    /// a cast of `[tables.types]` or a rule that reads the column's default
    /// or CHECK (SQLite), with the reason `check` and the report show.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conversions: Vec<Conversion>,
    /// Full-text indexes of the source (SQLite FTS tables over this table)
    /// that a PostgreSQL target builds as a `tsvector` column.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub text_search: Vec<TextSearch>,
    /// Columns stored as record links in a SurrealDB target
    /// (`target.links`): their foreign key names the referenced table's
    /// primary key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<Link>,
    /// A SurrealDB source's own table definition, which a SurrealDB target
    /// takes instead of fields typed from the columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub surreal: Option<SurrealTable>,
}

/// A SurrealDB source table's definition as a SurrealDB target repeats it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SurrealTable {
    pub schemafull: bool,
    /// Each defined field, nested ones (`address.city`, `tags.*`) too:
    /// its path as SurrealQL writes it, and the clauses after `ON TABLE t`
    /// that are carried (`TYPE`, `FLEXIBLE`, `DEFAULT`, `ASSERT`,
    /// `PERMISSIONS`, `COMMENT`).
    pub fields: Vec<(String, String)>,
    /// Every index: its name and the clauses after `ON TABLE t` (`FIELDS
    /// … UNIQUE`, `FULLTEXT ANALYZER …`, `HNSW …`, `COUNT`), built after the
    /// load.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub indexes: Vec<(String, String)>,
    /// The `DEFINE ANALYZER` statements its full-text indexes use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analyzers: Vec<String>,
}

/// A column whose values are keys of another table's rows.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Link {
    /// Index into the table's columns.
    pub column: usize,
    /// The referenced table's name in the target.
    pub table: String,
}

/// A CHECK constraint, as a sequence of neutral tokens each target writes
/// in its own language.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Check {
    /// The constraint's name in the target.
    pub name: String,
    pub expr: Vec<CheckToken>,
    /// How the source wrote it, for messages.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum CheckToken {
    /// A column, by index into the table's columns.
    Column(usize),
    /// A string literal's value.
    Text(String),
    /// A number as written.
    Number(String),
    /// A keyword, operator, function name or punctuation, as the target
    /// writes it (`IN`, `AND`, `(`, `=`, `lower`).
    Word(String),
}

impl Check {
    /// `column IN (literal, …)`: the column and the literals as JSON values.
    pub fn allowed_values(&self) -> Option<(usize, Vec<serde_json::Value>)> {
        use CheckToken as T;
        let [T::Column(c), T::Word(kw), T::Word(open), rest @ ..] = self.expr.as_slice() else {
            return None;
        };
        if !kw.eq_ignore_ascii_case("IN") || open != "(" {
            return None;
        }
        let mut out = Vec::new();
        let mut expect_value = true;
        for (i, t) in rest.iter().enumerate() {
            match (expect_value, t) {
                (true, T::Text(s)) => out.push(serde_json::Value::String(s.clone())),
                (true, T::Number(n)) => out.push(serde_json::from_str(n).ok()?),
                (false, T::Word(w)) if w == "," => {}
                (false, T::Word(w)) if w == ")" && i + 1 == rest.len() => return Some((*c, out)),
                _ => return None,
            }
            expect_value = !expect_value;
        }
        None
    }
}

/// A column whose type was chosen by a rule other than its declared type.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Conversion {
    /// Index into the table's columns.
    pub column: usize,
    /// The PostgreSQL type a cast names (`numeric(12,2)`, `jsonb`), where it
    /// says more than the logical type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_type: Option<String>,
    /// Why: `[tables.types] "missions.meta"`, `its default is datetime('now')`.
    pub reason: String,
}

/// A full-text index over some columns of a table.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TextSearch {
    /// The source's FTS table, and the name of the target's `tsvector` column.
    pub name: String,
    /// Indexes into the table's columns, in the index's order.
    pub columns: Vec<usize>,
    /// The text search configuration (`simple`; `english` for a porter
    /// tokenizer).
    pub config: String,
}

/// A partition of a partitioned table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Partition {
    /// Its name (`table` in `public`, else `schema.table`).
    pub name: String,
    /// `FOR VALUES …` or `DEFAULT`.
    pub bound: String,
}

/// How a source column fills itself.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ColumnDefault {
    /// Index into the table's columns.
    pub column: usize,
    /// An identity column (or a serial one, whose sequence default becomes
    /// an identity).
    pub identity: bool,
    /// A default expression that means the same in any PostgreSQL database
    /// (a constant, `now()`, …).
    pub default: Option<String>,
    /// For a column added to a table that had rows: the value those rows
    /// hold (PostgreSQL's `attmissingval`, as its text), which no row change
    /// carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing: Option<String>,
}

/// A secondary index or a foreign key of a source table.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Secondary {
    Index {
        name: String,
        unique: bool,
        /// What follows `ON table` in its definition: `USING btree (a, b) WHERE …`.
        using: String,
        /// A unique constraint checked at commit (`DEFERRABLE INITIALLY
        /// DEFERRED`), which a target checking each statement cannot follow.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        deferred: bool,
    },
    ForeignKey {
        name: String,
        columns: Vec<String>,
        /// The referenced table's source name.
        references: String,
        ref_columns: Vec<String>,
        /// `ON UPDATE … ON DELETE …`.
        actions: String,
    },
}
impl TableSchema {
    /// A table identified by its key columns.
    pub fn keyed(name: String, target_name: String, columns: Vec<Column>, key: Vec<usize>) -> Self {
        Self {
            name,
            target_name,
            columns,
            key,
            whole_row: false,
            source_id: String::new(),
            column_ids: Vec::new(),
            read_as: Vec::new(),
            secondary: Vec::new(),
            enum_types: Vec::new(),
            column_defaults: Vec::new(),
            partitions: Vec::new(),
            checks: Vec::new(),
            conversions: Vec::new(),
            text_search: Vec::new(),
            links: Vec::new(),
            surreal: None,
        }
    }

    /// A table without a key, identified by its whole row.
    pub fn whole_row(name: String, target_name: String, columns: Vec<Column>) -> Self {
        let key = (0..columns.len()).collect();
        Self {
            name,
            target_name,
            columns,
            key,
            whole_row: true,
            source_id: String::new(),
            column_ids: Vec::new(),
            read_as: Vec::new(),
            secondary: Vec::new(),
            enum_types: Vec::new(),
            column_defaults: Vec::new(),
            partitions: Vec::new(),
            checks: Vec::new(),
            conversions: Vec::new(),
            text_search: Vec::new(),
            links: Vec::new(),
            surreal: None,
        }
    }

    /// Whether `other` has the same columns (names, types, nullability,
    /// identities and defaults) and key: no DDL between them.
    pub fn same_shape(&self, other: &TableSchema) -> bool {
        self.target_name == other.target_name
            && self.columns == other.columns
            && self.key == other.key
            && self.whole_row == other.whole_row
            && self.column_ids == other.column_ids
            && self.column_defaults == other.column_defaults
            && self.checks == other.checks
            && self.links == other.links
    }

    /// The identity of column `i`: its source id where known, else its name.
    pub fn column_identity(&self, i: usize) -> ColumnIdentity<'_> {
        match self.column_ids.get(i) {
            Some(id) => ColumnIdentity::Id(*id),
            None => ColumnIdentity::Name(&self.columns[i].name),
        }
    }

    pub fn key_names(&self) -> Vec<&str> {
        self.key
            .iter()
            .map(|&i| self.columns[i].name.as_str())
            .collect()
    }

    pub fn key_of(&self, row: &Row) -> Vec<Value> {
        self.key.iter().map(|&i| row[i].clone()).collect()
    }

    /// A stable identity of a whole row: a SHA-256 digest (hex, 128 bits) of
    /// the non-NULL values with their column names, so that a column added
    /// later with NULLs leaves the identity of existing rows unchanged.
    pub fn row_digest(&self, row: &Row) -> std::result::Result<String, String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (c, v) in self.columns.iter().zip(row) {
            let (tag, bytes): (u8, std::borrow::Cow<[u8]>) = match v {
                Value::Null => continue,
                Value::Unchanged => {
                    return Err(format!("column {:?} has no value in the row image", c.name))
                }
                Value::Bool(b) => (1, vec![*b as u8].into()),
                Value::Int(i) => (2, i.to_be_bytes().to_vec().into()),
                Value::Float(x) => (
                    3,
                    (if x.is_nan() { f64::NAN } else { *x })
                        .to_bits()
                        .to_be_bytes()
                        .to_vec()
                        .into(),
                ),
                Value::Decimal(d) => (4, d.as_bytes().into()),
                Value::Text(s) => (5, s.as_bytes().into()),
                Value::Bytes(b) => (6, b.as_slice().into()),
                Value::Json(s) => (7, s.as_bytes().into()),
                // As its JSON: identical to the same value from a target
                // that holds JSON.
                #[cfg(feature = "surrealdb")]
                Value::Native(n) => (7, n.json.as_bytes().into()),
                Value::Timestamp(t) => (
                    8,
                    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                        .into_bytes()
                        .into(),
                ),
            };
            h.update((c.name.len() as u64).to_be_bytes());
            h.update(c.name.as_bytes());
            h.update([tag]);
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(&bytes);
        }
        let d = h.finalize();
        Ok(d[..16].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// `(col = value, …)` for error messages.
    pub fn describe_key(&self, key: &[Value]) -> String {
        let parts: Vec<String> = self
            .key_names()
            .iter()
            .zip(key)
            .map(|(n, v)| format!("{n} = {v}"))
            .collect();
        format!("({})", parts.join(", "))
    }
}

/// What a column is known by across schema changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnIdentity<'a> {
    Id(i32),
    Name(&'a str),
}

/// A change of a table's definition, in stream order with its rows. The
/// change's table is the table as it is after it.
#[derive(Debug, Clone, PartialEq)]
pub enum Ddl {
    /// The table's columns (names, types, nullability, defaults) changed;
    /// the target brings its table to the change's shape in place.
    Alter,
    /// The table must be copied now, at a snapshot of its own: it is new,
    /// or its rows changed without row changes in the stream (a rewrite, a
    /// type change the target cannot follow in place, a partition attached,
    /// detached or truncated).
    Copy { reason: String },
    /// The table is gone from the source.
    Drop,
    /// The table was renamed in the source: its old source name.
    Rename { from: String },
}

/// A row operation, with everything a sink needs to apply it by key.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Insert {
        row: Row,
    },
    /// `old_key` is set when the update changed the key.
    Update {
        old_key: Option<Vec<Value>>,
        row: Row,
    },
    Delete {
        key: Vec<Value>,
    },
    /// Every row of the table is removed (PostgreSQL `TRUNCATE`).
    Truncate,
    /// The table's definition changed.
    Ddl(Ddl),
}

/// A marker that `cutover` writes into the source's change stream: once
/// the target has applied everything before it, the target records it (so
/// that whoever wrote it knows the target holds every change up to there);
/// with `stop`, the stream ends at it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Marker {
    pub id: String,
    #[serde(default)]
    pub stop: bool,
}

/// A sequence of the source as `cutover` reads it after the fence, to set
/// the target's to the same value.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SequenceValue {
    pub schema: String,
    pub name: String,
    /// The replicated table (switchyard's name for it) and column that own
    /// it (serial and identity columns).
    pub owned_by: Option<(String, String)>,
    /// Replicated columns whose default draws from it (table, column).
    #[serde(default)]
    pub used_by: Vec<(String, String)>,
    /// `pg_sequences.last_value`: none before the first `nextval`.
    pub last_value: Option<i64>,
    /// `bigint`, `integer` or `smallint`.
    pub data_type: String,
    pub start: i64,
    pub increment: i64,
    pub min: i64,
    pub max: i64,
    pub cycle: bool,
}

/// One change of one table, with its source position.
#[derive(Debug, Clone)]
pub struct Change {
    pub table: Arc<TableSchema>,
    pub op: Op,
    pub position: Position,
}

impl Op {
    /// What the operation is, in words (for metrics and messages).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Op::Insert { .. } => "insert",
            Op::Update { .. } => "update",
            Op::Delete { .. } => "delete",
            Op::Truncate => "truncate",
            Op::Ddl(Ddl::Alter) => "alter",
            Op::Ddl(Ddl::Copy { .. }) => "copy",
            Op::Ddl(Ddl::Drop) => "drop",
            Op::Ddl(Ddl::Rename { .. }) => "rename",
        }
    }
}

impl Change {
    pub fn kind(&self) -> &'static str {
        self.op.kind_name()
    }

    pub fn key(&self) -> Vec<Value> {
        match &self.op {
            Op::Insert { row } | Op::Update { row, .. } => self.table.key_of(row),
            Op::Delete { key } => key.clone(),
            Op::Truncate | Op::Ddl(_) => Vec::new(),
        }
    }
}
