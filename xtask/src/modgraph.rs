//! The module graph of one crate, read from its source, and the cycles in it.
//!
//! A file's module is its path (`a/b.rs` and `a/b/mod.rs` are `a::b`). Module A depends on B
//! when A names a path (`crate::…`, `super::…`, `self::…`, also inside `use` groups) that
//! resolves to B — the longest prefix that is a module. A folder's `mod.rs` declaring and
//! re-exporting its own children is not a dependency, and neither are test modules
//! (`#[cfg(test)] mod tests` to the end of a file). Dependencies must point one way, so any
//! strongly connected component of more than one module is a cycle to report.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

type Module = Vec<String>;

/// Every `.rs` file under `src`, as (module path, file name, source).
fn read_modules(src: &Path) -> Result<Vec<(Module, String, String)>, String> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let mut parts: Module = rel
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let file = parts.last().cloned().unwrap_or_default();
            if matches!(file.as_str(), "mod" | "lib" | "main") {
                parts.pop();
            }
            let text = fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            out.push((parts, file, text));
        }
    }
    Ok(out)
}

/// Source without comments and without the trailing test module.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|l| l.find("//").map_or(l, |at| &l[..at]))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Paths named in `code`, made absolute (relative to `crate`) from the module `here`.
fn referenced_paths(code: &str, here: &Module) -> Vec<Module> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts_word = i == 0 || !is_ident(chars[i - 1]) && chars[i - 1] != ':';
        let rest: String = chars[i..chars.len().min(i + 6)].iter().collect();
        let head = ["crate", "super", "self"].into_iter().find(|h| {
            rest.starts_with(h) && chars.get(i + h.len()) == Some(&':') && chars.get(i + h.len() + 1) == Some(&':')
        });
        let Some(head) = head.filter(|_| starts_word) else {
            i += 1;
            continue;
        };
        let base: Module = match head {
            "crate" => Vec::new(),
            "self" => here.clone(),
            _ => here[..here.len().saturating_sub(1)].to_vec(),
        };
        i += head.len();
        i = collect(&chars, i, base, &mut out);
    }
    out
}

/// Read `::a::b`, `::{x, y::{z}}` after a path prefix `base`; push every full path. Returns
/// the index after what was read.
fn collect(chars: &[char], mut i: usize, mut base: Module, out: &mut Vec<Module>) -> usize {
    loop {
        if chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':') {
            i += 2;
        } else {
            out.push(base);
            return i;
        }
        while chars.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        if chars.get(i) == Some(&'{') {
            i += 1;
            loop {
                while chars.get(i).is_some_and(|c| c.is_whitespace() || *c == ',') {
                    i += 1;
                }
                match chars.get(i) {
                    None => return i,
                    Some('}') => return i + 1,
                    _ => {}
                }
                let start = i;
                while chars.get(i).is_some_and(|c| is_ident(*c)) {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                if name.is_empty() {
                    // `*` or something we do not follow: the group names `base` itself.
                    out.push(base.clone());
                    i += 1;
                    continue;
                }
                let mut item = base.clone();
                if name != "self" {
                    item.push(name);
                }
                i = collect(chars, i, item, out);
                // Skip an `as alias`.
                while chars.get(i).is_some_and(|c| *c != ',' && *c != '}') {
                    i += 1;
                }
            }
        }
        let start = i;
        while chars.get(i).is_some_and(|c| is_ident(*c)) {
            i += 1;
        }
        if start == i {
            out.push(base);
            return i;
        }
        base.push(chars[start..i].iter().collect());
    }
}

/// Module → the modules it depends on.
pub fn graph(src: &Path) -> Result<BTreeMap<Module, BTreeSet<Module>>, String> {
    let modules = read_modules(src)?;
    let known: BTreeSet<Module> = modules.iter().map(|(m, _, _)| m.clone()).collect();
    let resolve = |path: &Module| {
        (0..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|p| known.contains(p))
    };
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, file, text) in &modules {
        let is_folder = matches!(file.as_str(), "mod" | "lib" | "main");
        let deps = edges.entry(module.clone()).or_default();
        for path in referenced_paths(&code_of(text), module) {
            let Some(target) = resolve(&path) else { continue };
            let own_child = is_folder && target.starts_with(module);
            let own_parent = module.len() == target.len() + 1 && module.starts_with(&target);
            if target != *module && !own_child && !own_parent {
                deps.insert(target);
            }
        }
    }
    Ok(edges)
}

/// The cycles (strongly connected components of more than one module), Tarjan's algorithm.
pub fn cycles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.edges.get(v).into_iter().flatten() {
            let Some((w, _)) = s.edges.get_key_value(w) else {
                continue;
            };
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[w].min(s.low[v]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.index[w].min(s.low[v]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// The dependencies that break `rules`: (room, the rooms it may use), each room a top-level
/// module. A module in a room with a rule may depend only on modules of the allowed rooms.
pub fn layer_violations(
    edges: &BTreeMap<Module, BTreeSet<Module>>,
    rules: &[(&str, &[&str])],
) -> Vec<(Module, Module)> {
    let mut out = Vec::new();
    for (module, deps) in edges {
        let Some((_, allowed)) = rules.iter().find(|(room, _)| module.first().is_some_and(|m| m == room)) else {
            continue;
        };
        for dep in deps {
            if !dep.first().is_some_and(|d| allowed.contains(&d.as_str())) {
                out.push((module.clone(), dep.clone()));
            }
        }
    }
    out
}

/// Fail with every cycle, and every dependency against `rules`, named.
pub fn check(src: &Path, rules: &[(&str, &[&str])]) -> Result<(), String> {
    let edges = graph(src)?;
    let against = layer_violations(&edges, rules);
    if !against.is_empty() {
        let names: Vec<String> = against
            .iter()
            .map(|(m, d)| format!("crate::{} -> crate::{}", m.join("::"), d.join("::")))
            .collect();
        return Err(format!(
            "modules of {} depend upward:\n  {}\nmove what they need down, or pass it in",
            src.display(),
            names.join("\n  ")
        ));
    }
    let found = cycles(&edges);
    if found.is_empty() {
        eprintln!(
            "xtask: no module cycles and no upward dependencies in {}",
            src.display()
        );
        return Ok(());
    }
    let names: Vec<String> = found
        .iter()
        .map(|c| {
            c.iter()
                .map(|m| format!("crate::{}", m.join("::")))
                .collect::<Vec<_>>()
                .join(" ↔ ")
        })
        .collect();
    Err(format!(
        "module cycles in {}:\n  {}\nmove what both sides share into a module below them, or pass a small handle",
        src.display(),
        names.join("\n  ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crate of `files` in a folder of its own (`name` tells the tests, which run at once, apart).
    fn crate_with(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("modgraph-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (path, text) in files {
            let p = dir.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        dir
    }

    #[test]
    fn a_use_group_across_folders_makes_a_cycle_and_parents_declaring_children_do_not() {
        let dir = crate_with(
            "cycle",
            &[
                ("lib.rs", "pub mod a;\npub mod b;\n"),
                ("a/mod.rs", "pub mod inner;\npub use inner::X;\n"),
                ("a/inner.rs", "use crate::{b::{self, Y as Z}};\npub struct X;\n"),
                (
                    "b.rs",
                    "use super::a::inner::X; // crate::lib\npub struct Y;\n#[cfg(test)]\nmod tests { use crate::c; }\n",
                ),
            ],
        );
        let edges = graph(&dir).unwrap();
        let m = |s: &str| s.split("::").map(String::from).collect::<Module>();
        assert!(edges[&m("a::inner")].contains(&m("b")));
        assert!(edges[&m("b")].contains(&m("a::inner")));
        assert!(
            edges[&m("a")].is_empty(),
            "a folder re-exporting its child is no dependency"
        );
        assert_eq!(cycles(&edges), vec![vec![m("a::inner"), m("b")]]);
        assert!(check(&dir, &[]).unwrap_err().contains("crate::a::inner ↔ crate::b"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_way_dependencies_are_no_cycle() {
        let dir = crate_with(
            "one-way",
            &[
                ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
                ("a.rs", "use crate::b::B;\n"),
                ("b.rs", "pub struct B; fn f() -> crate::c::C { todo!() }\n"),
                ("c.rs", "pub struct C;\n"),
            ],
        );
        let edges = graph(&dir).unwrap();
        assert!(cycles(&edges).is_empty());
        // c may use nothing, b only c: b's use of c is fine, a's of b is not.
        let rules: &[(&str, &[&str])] = &[("c", &["c"]), ("b", &["b", "c"]), ("a", &["a"])];
        let m = |s: &str| vec![s.to_string()];
        assert_eq!(layer_violations(&edges, rules), vec![(m("a"), m("b"))]);
        assert!(check(&dir, rules).unwrap_err().contains("crate::a -> crate::b"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
