//! What changed between two shapes of a table: the steps that bring a
//! target table from the shape it holds to the shape of the source now.
//! Columns are matched by their source identity (PostgreSQL's attribute
//! number, which a rename keeps), or where the source has none by name,
//! and a column whose name alone changed in place (same position, same
//! type) is a rename.

use crate::model::{ColumnDefault, TableSchema};

/// One step of a table's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlterStep {
    /// A column renamed: from its old name to `new.columns[column]`.
    Rename { from: String, column: usize },
    /// A column dropped: its old name.
    Drop { name: String },
    /// A column's type changed: its old source type; the new one is
    /// `new.columns[column].source_type`.
    Type { column: usize, from: String },
    /// A column added: `new.columns[column]`.
    Add { column: usize },
    /// A column's nullability changed (`new.columns[column].nullable`).
    Nullable { column: usize },
    /// A column's default changed (in `new.column_defaults`).
    Default { column: usize },
}

/// The steps from `old` to `new`, renames first, then drops, type changes,
/// additions, and nullability and defaults last.
pub fn diff(old: &TableSchema, new: &TableSchema) -> Vec<AlterStep> {
    let by_id = !old.column_ids.is_empty()
        && old.column_ids.len() == old.columns.len()
        && new.column_ids.len() == new.columns.len();
    // new column index → old column index
    let mut matched: Vec<Option<usize>> = vec![None; new.columns.len()];
    let mut taken = vec![false; old.columns.len()];
    for (j, m) in matched.iter_mut().enumerate() {
        let found = (0..old.columns.len()).find(|&i| {
            !taken[i]
                && if by_id {
                    old.column_ids[i] == new.column_ids[j]
                } else {
                    old.columns[i].name == new.columns[j].name
                }
        });
        if let Some(i) = found {
            taken[i] = true;
            *m = Some(i);
        }
    }
    if !by_id {
        // A column renamed in place: the same position and type, another name.
        for (j, m) in matched.iter_mut().enumerate() {
            if m.is_none()
                && j < old.columns.len()
                && !taken[j]
                && old.columns[j].source_type == new.columns[j].source_type
            {
                taken[j] = true;
                *m = Some(j);
            }
        }
    }
    let mut renames = Vec::new();
    let mut types = Vec::new();
    let mut adds = Vec::new();
    let mut rest = Vec::new();
    for (j, m) in matched.iter().enumerate() {
        let Some(i) = *m else {
            adds.push(AlterStep::Add { column: j });
            continue;
        };
        let (o, n) = (&old.columns[i], &new.columns[j]);
        if o.name != n.name {
            renames.push(AlterStep::Rename {
                from: o.name.clone(),
                column: j,
            });
        }
        if o.source_type != n.source_type || o.logical != n.logical {
            types.push(AlterStep::Type {
                column: j,
                from: o.source_type.clone(),
            });
        }
        if o.nullable != n.nullable {
            rest.push(AlterStep::Nullable { column: j });
        }
        let default_of = |t: &TableSchema, c: usize| -> Option<ColumnDefault> {
            t.column_defaults
                .iter()
                .find(|d| d.column == c)
                .map(|d| ColumnDefault {
                    column: 0,
                    existing: None,
                    ..d.clone()
                })
        };
        if default_of(old, i) != default_of(new, j) {
            rest.push(AlterStep::Default { column: j });
        }
    }
    let drops = old
        .columns
        .iter()
        .enumerate()
        .filter(|(i, _)| !taken[*i])
        .map(|(_, c)| AlterStep::Drop {
            name: c.name.clone(),
        });
    renames
        .into_iter()
        .chain(drops)
        .chain(types)
        .chain(adds)
        .chain(rest)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Column, LogicalType};

    fn col(name: &str, ty: &str) -> Column {
        Column {
            name: name.into(),
            source_type: ty.into(),
            logical: LogicalType::Int,
            nullable: true,
        }
    }

    fn table(cols: &[(&str, &str)], ids: &[i32]) -> TableSchema {
        let mut t = TableSchema::keyed(
            "t".into(),
            "t".into(),
            cols.iter().map(|(n, ty)| col(n, ty)).collect(),
            vec![0],
        );
        t.column_ids = ids.to_vec();
        t
    }

    #[test]
    fn columns_are_followed_by_identity() {
        let old = table(
            &[("id", "integer"), ("a", "integer"), ("b", "text")],
            &[1, 2, 3],
        );
        // a renamed to c, b dropped, d added, id widened.
        let new = table(
            &[("id", "bigint"), ("c", "integer"), ("d", "text")],
            &[1, 2, 4],
        );
        assert_eq!(
            diff(&old, &new),
            vec![
                AlterStep::Rename {
                    from: "a".into(),
                    column: 1
                },
                AlterStep::Drop { name: "b".into() },
                AlterStep::Type {
                    column: 0,
                    from: "integer".into()
                },
                AlterStep::Add { column: 2 },
            ]
        );
        // Dropped and added under the same name: another column.
        let again = table(
            &[("id", "integer"), ("a", "integer"), ("b", "text")],
            &[1, 2, 5],
        );
        assert_eq!(
            diff(&old, &again),
            vec![
                AlterStep::Drop { name: "b".into() },
                AlterStep::Add { column: 2 }
            ]
        );
        assert!(diff(&old, &old).is_empty());
    }

    #[test]
    fn without_identities_a_rename_is_a_new_name_in_place() {
        let old = table(&[("id", "INTEGER"), ("a", "TEXT"), ("b", "TEXT")], &[]);
        let renamed = table(&[("id", "INTEGER"), ("x", "TEXT"), ("b", "TEXT")], &[]);
        assert_eq!(
            diff(&old, &renamed),
            vec![AlterStep::Rename {
                from: "a".into(),
                column: 1
            }]
        );
        // Dropped in the middle, added at the end: not a rename.
        let moved = table(&[("id", "INTEGER"), ("b", "TEXT"), ("c", "TEXT")], &[]);
        assert_eq!(
            diff(&old, &moved),
            vec![
                AlterStep::Drop { name: "a".into() },
                AlterStep::Add { column: 2 }
            ]
        );
    }
}
