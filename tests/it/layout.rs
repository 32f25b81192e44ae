//! The code map holds: imports between the modules of `src/` run one way (no
//! cycles, a module's children never import their parent's items back),
//! sources and sinks never import each other, and nothing in the library
//! imports `commands`. Read from the source files themselves with `syn`:
//! every `use` and every path (macro arguments included) that starts with
//! `crate`, `super`, `self` or a child module's name is an edge from the
//! module it is written in to the deepest module it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// A module path: `[]` is the crate root, `["source", "postgres"]` its module.
type Module = Vec<String>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every module of the library with its file (not `main.rs`, the binary).
fn modules() -> BTreeMap<Module, PathBuf> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<Module, PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                let mut m = prefix.to_vec();
                m.push(name);
                walk(&path, &m, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let module = match name.as_str() {
                    "lib" if prefix.is_empty() => Vec::new(),
                    "main" if prefix.is_empty() => continue,
                    "mod" => prefix.to_vec(),
                    _ => {
                        let mut m = prefix.to_vec();
                        m.push(name);
                        m
                    }
                };
                out.insert(module, path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), &[], &mut out);
    out
}

/// The paths written in one file, as segment lists.
#[derive(Default)]
struct Paths(Vec<Vec<String>>);

impl Paths {
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut p = prefix.clone();
                if n.ident != "self" {
                    p.push(n.ident.to_string());
                }
                self.0.push(p);
            }
            syn::UseTree::Rename(r) => {
                let mut p = prefix.clone();
                p.push(r.ident.to_string());
                self.0.push(p);
            }
            syn::UseTree::Glob(_) => self.0.push(prefix.clone()),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    /// `a :: b :: c` sequences in a macro's tokens.
    fn tokens(&mut self, tokens: proc_macro2::TokenStream) {
        let mut current: Vec<String> = Vec::new();
        let mut colons = 0;
        for t in tokens {
            match t {
                proc_macro2::TokenTree::Ident(i) if current.is_empty() || colons == 2 => {
                    current.push(i.to_string());
                    colons = 0;
                }
                proc_macro2::TokenTree::Punct(p) if p.as_char() == ':' && !current.is_empty() => {
                    colons += 1;
                }
                proc_macro2::TokenTree::Group(g) => {
                    self.flush(&mut current);
                    colons = 0;
                    self.tokens(g.stream());
                }
                other => {
                    self.flush(&mut current);
                    colons = 0;
                    if let proc_macro2::TokenTree::Ident(i) = other {
                        current.push(i.to_string());
                    }
                }
            }
        }
        self.flush(&mut current);
    }

    fn flush(&mut self, current: &mut Vec<String>) {
        if current.len() > 1 {
            self.0.push(std::mem::take(current));
        }
        current.clear();
    }
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        self.0
            .push(p.segments.iter().map(|s| s.ident.to_string()).collect());
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.visit_path(&m.path);
        self.tokens(m.tokens.clone());
    }
}

/// The module a path written in `from` names, if it is one of ours.
fn resolve(from: &Module, path: &[String], known: &BTreeSet<Module>) -> Option<Module> {
    let (first, rest) = path.split_first()?;
    match first.as_str() {
        "crate" => deepest(Vec::new(), rest, known),
        "self" => deepest(from.clone(), rest, known),
        "super" => {
            let mut m = from.clone();
            m.pop();
            let mut rest = rest;
            while rest.first().is_some_and(|s| s == "super") {
                m.pop();
                rest = &rest[1..];
            }
            deepest(m, rest, known)
        }
        name => {
            let mut child = from.clone();
            child.push(name.to_string());
            known
                .contains(&child)
                .then(|| deepest(from.clone(), path, known))
                .flatten()
        }
    }
}

/// The deepest known module along `base` then `rest`.
fn deepest(mut base: Module, rest: &[String], known: &BTreeSet<Module>) -> Option<Module> {
    for seg in rest {
        let mut next = base.clone();
        next.push(seg.clone());
        if known.contains(&next) {
            base = next;
        } else {
            break;
        }
    }
    Some(base)
}

fn edges() -> BTreeMap<Module, BTreeSet<Module>> {
    let files = modules();
    let known: BTreeSet<Module> = files.keys().cloned().collect();
    let mut out: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, file) in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut paths = Paths::default();
        // Not the unit tests: they may use whatever they test.
        for item in &ast.items {
            if let syn::Item::Mod(m) = item {
                if m.attrs.iter().any(|a| a.path().is_ident("cfg")) {
                    continue;
                }
            }
            paths.visit_item(item);
        }
        let set = out.entry(module.clone()).or_default();
        for p in &paths.0 {
            if let Some(to) = resolve(module, p, &known) {
                if &to != module {
                    set.insert(to);
                }
            }
        }
    }
    out
}

fn show(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// A cycle through `start`, if there is one.
fn cycle(graph: &BTreeMap<Module, BTreeSet<Module>>, start: &Module) -> Option<Vec<Module>> {
    fn dfs(
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        at: &Module,
        start: &Module,
        path: &mut Vec<Module>,
        seen: &mut BTreeSet<Module>,
    ) -> bool {
        for next in graph.get(at).into_iter().flatten() {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if dfs(graph, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.clone()];
    let mut seen = BTreeSet::new();
    dfs(graph, start, start, &mut path, &mut seen).then_some(path)
}

#[test]
fn imports_between_modules_run_one_way() {
    let graph = edges();
    assert!(
        graph.len() > 30,
        "too few modules found: {:?}",
        graph.keys()
    );
    let mut cycles = Vec::new();
    for m in graph.keys() {
        if let Some(c) = cycle(&graph, m) {
            cycles.push(
                c.iter()
                    .chain(std::iter::once(m))
                    .map(show)
                    .collect::<Vec<_>>()
                    .join(" → "),
            );
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn sources_and_sinks_never_import_each_other_and_nothing_imports_commands() {
    let graph = edges();
    let under = |m: &Module, top: &str| m.first().is_some_and(|f| f == top);
    let mut wrong = Vec::new();
    for (from, tos) in &graph {
        for to in tos {
            if (under(from, "source") && under(to, "sink"))
                || (under(from, "sink") && under(to, "source"))
                || (under(to, "commands") && !under(from, "commands") && !from.is_empty())
            {
                wrong.push(format!("{} → {}", show(from), show(to)));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the code map:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_checker_sees_a_cycle_and_a_forbidden_import() {
    // The checker itself: a parent that uses its child's item while the
    // child uses the parent's is a cycle.
    let known: BTreeSet<Module> = [vec![], vec!["a".to_string()], vec!["a".into(), "b".into()]]
        .into_iter()
        .collect();
    let a = vec!["a".to_string()];
    let ab = vec!["a".to_string(), "b".to_string()];
    assert_eq!(
        resolve(&ab, &["super".into(), "Thing".into()], &known),
        Some(a.clone())
    );
    assert_eq!(
        resolve(&a, &["b".into(), "f".into()], &known),
        Some(ab.clone())
    );
    assert_eq!(
        resolve(&a, &["self".into(), "b".into()], &known),
        Some(ab.clone())
    );
    assert_eq!(resolve(&a, &["std".into(), "fmt".into()], &known), None);
    let mut graph = BTreeMap::new();
    graph.insert(a.clone(), [ab.clone()].into_iter().collect());
    graph.insert(ab.clone(), [a.clone()].into_iter().collect());
    assert!(cycle(&graph, &a).is_some());
    graph.insert(ab.clone(), BTreeSet::new());
    assert!(cycle(&graph, &a).is_none());
}
