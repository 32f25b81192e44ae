//! Property tests: the parsers of what switchyard reads from outside (COPY
//! text, PostgreSQL value texts, SQLite cells and DDL, the config) answer
//! any input with a value or a definite error, never a panic. The
//! suite runs a bounded number of cases (proptest's 256); `scripts/fuzz`
//! runs the same properties for as long as it is given.

use proptest::collection::vec;
use proptest::prelude::*;

use crate::model::{Column, LogicalType};

/// Text of any characters, with the ones the parsers look for made likely.
fn text() -> impl Strategy<Value = String> {
    let special = prop_oneof![
        Just('\\'),
        Just('\t'),
        Just('\n'),
        Just('"'),
        Just('\''),
        Just('{'),
        Just('}'),
        Just(','),
        Just('('),
        Just(')'),
        Just('['),
        Just(']'),
        Just('-'),
        Just(':'),
        Just('.'),
        Just(' '),
        Just('e'),
        Just('N'),
        Just('x'),
        Just('0'),
        Just('9'),
        Just('T'),
        Just('Z'),
        Just('+'),
    ];
    vec(prop_oneof![3 => special, 1 => any::<char>()], 0..64).prop_map(|v| v.into_iter().collect())
}

fn logical() -> impl Strategy<Value = LogicalType> {
    prop_oneof![
        Just(LogicalType::Bool),
        Just(LogicalType::Int),
        Just(LogicalType::Float),
        Just(LogicalType::Decimal),
        Just(LogicalType::Text),
        Just(LogicalType::Bytes),
        Just(LogicalType::Json),
        Just(LogicalType::Timestamp),
        Just(LogicalType::Any),
    ]
}

fn column(logical: LogicalType, array: bool) -> Column {
    Column {
        name: "c".into(),
        source_type: if array {
            "integer[]".into()
        } else {
            "text".into()
        },
        logical,
        nullable: true,
    }
}

proptest! {
    #[test]
    fn copy_text_is_rows_or_an_error(chunks in vec(vec(any::<u8>(), 0..64), 0..6), columns in 1usize..6) {
        let mut p = crate::source::postgres::values::CopyTextParser::new(columns);
        for c in &chunks {
            if p.feed(c).is_err() {
                return Ok(());
            }
        }
        let _ = p.finish();
    }

    #[test]
    fn postgres_value_texts_are_values_or_errors(s in text(), l in logical(), array in any::<bool>(), oid in prop_oneof![Just(16u32), Just(20), Just(23), Just(700), Just(701), Just(1700), Just(25), Just(17), Just(114), Just(3802), Just(1114), Just(1184), Just(1082), Just(0)]) {
        let _ = crate::source::postgres::values::decode(&column(l, array), oid, &s);
        let _ = crate::source::postgres::values::parse_array(&s, oid);
        let _ = crate::source::postgres::values::parse_timestamp(&s);
    }

    #[test]
    fn sqlite_cells_are_values_or_errors(s in text(), i in any::<i64>(), x in any::<f64>(), b in vec(any::<u8>(), 0..16), l in logical()) {
        use crate::source::sqlite::convert::{convert, parse_decimal, parse_timestamp, Raw};
        let col = column(l, false);
        for raw in [Raw::Text(s.clone()), Raw::Integer(i), Raw::Real(x), Raw::Blob(b.clone()), Raw::Null] {
            let _ = convert(raw, &col);
        }
        let _ = parse_timestamp(&s);
        let _ = parse_decimal(&s);
    }

    #[test]
    fn sqlite_ddl_is_read_or_left_alone(s in text(), l in logical()) {
        use crate::source::sqlite::ddl;
        let sql = format!("CREATE TABLE t (c TEXT CHECK ({s}), {s})");
        for c in ddl::checks(&sql).iter().chain(ddl::checks(&s).iter()) {
            let _ = c.shape();
            let _ = c.shown();
            let _ = c.carry(&[column(l, false)]);
        }
        let _ = ddl::without_rowid(&s);
        let _ = ddl::virtual_module(&s);
        let _ = crate::source::sqlite::catalog::default_expr(&s, l);
    }

    #[test]
    fn any_config_text_is_a_config_or_an_error(s in text(), cut in 0usize..4000, flip in any::<char>()) {
        let _ = crate::config::Config::parse(&s);
        // An example config, cut and with a character changed.
        let example = include_str!("../config/m6-sqlite-to-postgres.toml");
        let mut chars: Vec<char> = example.chars().collect();
        let at = cut % chars.len();
        chars[at] = flip;
        chars.truncate(cut % (chars.len() + 1) + at / 2);
        let _ = crate::config::Config::parse(&chars.into_iter().collect::<String>());
    }

    #[test]
    fn type_rules_are_rules_or_errors(k in text(), v in text()) {
        let _ = crate::schema::cast::TypeRules::compile(&[(k, v.clone())].into());
        let _ = crate::schema::cast::parse_target(&v);
    }
}
