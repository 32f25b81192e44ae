//! A PostgreSQL source's schema as `pg_dump` takes it, for a PostgreSQL
//! target: the archive, its table of contents as `pg_restore -l` lists it,
//! and what was left out. Restored in two parts as `pg_restore` does:
//! pre-data (types, domains, functions, sequences, tables with their
//! defaults, generated columns and CHECKs, views) before the load,
//! post-data (keys, indexes, foreign keys, triggers, rules, policies)
//! after it.

use std::path::PathBuf;

/// The two parts a schema is restored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    PreData,
    PostData,
}

impl Section {
    /// `pg_restore --section=…`
    pub fn arg(self) -> &'static str {
        match self {
            Section::PreData => "pre-data",
            Section::PostData => "post-data",
        }
    }
}

/// One entry of an archive's table of contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocEntry {
    pub id: u32,
    /// `TABLE`, `INDEX`, `FK CONSTRAINT`, …
    pub desc: String,
    /// `-` for objects outside a schema.
    pub schema: String,
    /// The object's name (for objects of a table: `table name`).
    pub tag: String,
}

impl TocEntry {
    /// The section `pg_dump` puts this kind of object in.
    pub fn section(&self) -> Section {
        match self.desc.as_str() {
            "INDEX"
            | "INDEX ATTACH"
            | "CONSTRAINT"
            | "FK CONSTRAINT"
            | "TRIGGER"
            | "RULE"
            | "POLICY"
            | "ROW SECURITY"
            | "EVENT TRIGGER"
            | "PUBLICATION"
            | "PUBLICATION TABLE"
            | "MATERIALIZED VIEW DATA" => Section::PostData,
            _ => Section::PreData,
        }
    }

    /// How the entry reads in a report: `TABLE public.acct`.
    pub fn shown(&self) -> String {
        if self.desc == "COMMENT" {
            return format!("COMMENT ON {}", self.tag);
        }
        if self.schema == "-" {
            format!("{} {}", self.desc, self.tag)
        } else {
            format!("{} {}.{}", self.desc, self.schema, self.tag)
        }
    }
}

/// Reads `pg_restore -l`: lines `id; tableoid oid DESC schema tag owner`
/// (comments start with `;`). The owner is the last word; the description
/// may hold spaces (`FK CONSTRAINT`), so it is matched against the known
/// ones, longest first.
pub fn parse_toc(text: &str) -> Vec<TocEntry> {
    const DESCS: [&str; 40] = [
        "MATERIALIZED VIEW DATA",
        "MATERIALIZED VIEW",
        "FOREIGN TABLE",
        "FK CONSTRAINT",
        "CHECK CONSTRAINT",
        "PUBLICATION TABLE",
        "PUBLICATION TABLES IN SCHEMA",
        "ROW SECURITY",
        "INDEX ATTACH",
        "TABLE ATTACH",
        "SEQUENCE OWNED BY",
        "SEQUENCE SET",
        "EVENT TRIGGER",
        "TEXT SEARCH CONFIGURATION",
        "TEXT SEARCH DICTIONARY",
        "DEFAULT ACL",
        "SHELL TYPE",
        "FOREIGN DATA WRAPPER",
        "SERVER",
        "USER MAPPING",
        "ACCESS METHOD",
        "OPERATOR CLASS",
        "OPERATOR FAMILY",
        "STATISTICS",
        "CONSTRAINT",
        "TABLE DATA",
        "TABLE",
        "VIEW",
        "SEQUENCE",
        "INDEX",
        "TRIGGER",
        "RULE",
        "POLICY",
        "DEFAULT",
        "DOMAIN",
        "TYPE",
        "FUNCTION",
        "PROCEDURE",
        "AGGREGATE",
        "EXTENSION",
    ];
    const MORE: [&str; 8] = [
        "SCHEMA",
        "COMMENT",
        "ACL",
        "OPERATOR",
        "CAST",
        "COLLATION",
        "CONVERSION",
        "SECURITY LABEL",
    ];
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') {
            continue;
        }
        let Some((id, rest)) = line.split_once(';') else {
            continue;
        };
        let Ok(id) = id.trim().parse::<u32>() else {
            continue;
        };
        // Skip the catalog OIDs.
        let mut words = rest.split_whitespace();
        let (_, _) = (words.next(), words.next());
        let rest: Vec<&str> = words.collect();
        let joined = rest.join(" ");
        let Some(desc) = DESCS
            .iter()
            .chain(MORE.iter())
            .filter(|d| joined.starts_with(&format!("{d} ")))
            .max_by_key(|d| d.len())
        else {
            continue;
        };
        let after: Vec<&str> = joined[desc.len()..].split_whitespace().collect();
        if after.is_empty() {
            continue;
        }
        let schema = after[0].to_string();
        // The owner is last, where there is one besides the tag.
        let tag_words = if after.len() > 2 {
            &after[1..after.len() - 1]
        } else {
            &after[1..]
        };
        out.push(TocEntry {
            id,
            desc: desc.to_string(),
            schema,
            tag: tag_words.join(" "),
        });
    }
    out
}

/// A source's schema, dumped.
#[derive(Debug)]
pub struct SchemaDump {
    /// The custom-format archive (removed when this is dropped).
    pub archive: PathBuf,
    /// The major version of the `pg_dump` that made it: `pg_restore` must
    /// be at least as new.
    pub tool_major: u32,
    pub entries: Vec<TocEntry>,
    /// Extensions the kept objects need, created first in the target.
    pub extensions: Vec<(String, String)>,
    /// What was left out, and why.
    pub left_out: Vec<String>,
    /// The replicated tables the dump creates (switchyard's names).
    pub tables: Vec<String>,
    /// Owners and grants are in the archive (else `--no-owner --no-acl`).
    pub owners: bool,
}

impl Drop for SchemaDump {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.archive);
    }
}

impl SchemaDump {
    /// What each section creates, by kind: `pre-data: 2 TYPE, 1 DOMAIN, …`.
    pub fn plan(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for section in [Section::PreData, Section::PostData] {
            let mut kinds: Vec<(String, usize)> = Vec::new();
            for e in self.entries.iter().filter(|e| e.section() == section) {
                match kinds.iter_mut().find(|(k, _)| *k == e.desc) {
                    Some((_, n)) => *n += 1,
                    None => kinds.push((e.desc.clone(), 1)),
                }
            }
            lines.push(format!(
                "{} ({}): {}",
                section.arg(),
                match section {
                    Section::PreData => "before the load",
                    Section::PostData => "after the load",
                },
                kinds
                    .iter()
                    .map(|(k, n)| format!("{n} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        lines
    }

    /// Triggers and rules of the dump: they would fire for replicated rows
    /// where the apply cannot set `session_replication_role = replica`.
    pub fn firing(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e.desc == "TRIGGER" || e.desc == "RULE")
            .map(TocEntry::shown)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_of_contents_reads_into_entries() {
        let toc = ";
; Archive created at 2026-12-01 20:00:00 UTC
;
5; 2615 2200 SCHEMA - public postgres
3370; 0 0 COMMENT - SCHEMA public postgres
862; 1247 16386 DOMAIN public posint postgres
219; 1259 16400 TABLE public acct postgres
3201; 2604 16403 DEFAULT public acct id postgres
3210; 2606 16405 CONSTRAINT public acct acct_pkey postgres
3215; 2606 16412 FK CONSTRAINT public lines lines_acct_fkey postgres
3213; 1259 16410 INDEX public acct_v_idx postgres
3216; 3256 16413 POLICY public acct p1 postgres
3217; 0 16400 ROW SECURITY public acct postgres
3218; 1259 16420 MATERIALIZED VIEW public totals postgres
";
        let e = parse_toc(toc);
        let shown: Vec<String> = e.iter().map(TocEntry::shown).collect();
        assert_eq!(
            shown,
            [
                "SCHEMA public",
                "COMMENT ON SCHEMA public",
                "DOMAIN public.posint",
                "TABLE public.acct",
                "DEFAULT public.acct id",
                "CONSTRAINT public.acct acct_pkey",
                "FK CONSTRAINT public.lines lines_acct_fkey",
                "INDEX public.acct_v_idx",
                "POLICY public.acct p1",
                "ROW SECURITY public.acct",
                "MATERIALIZED VIEW public.totals",
            ]
        );
        let post: Vec<&str> = e
            .iter()
            .filter(|e| e.section() == Section::PostData)
            .map(|e| e.desc.as_str())
            .collect();
        assert_eq!(
            post,
            [
                "CONSTRAINT",
                "FK CONSTRAINT",
                "INDEX",
                "POLICY",
                "ROW SECURITY"
            ]
        );
    }
}
