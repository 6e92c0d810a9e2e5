//! The layering of ARCHITECTURE.md, checked: every file under `src/` is read whole (inline test
//! modules included), every path into the crate (`use crate::x`, `use crate::{x, y}`,
//! `crate::x::f()`, `$crate::x` in macros, the same through an alias such as `use crate as c;`,
//! `super::` paths that climb to the crate root, in nested groups too, with or without spaces
//! around `::`) is resolved to the top-level module it names, and a module may name only
//! modules of lower layers. The layer table is read from ARCHITECTURE.md itself, and must list
//! exactly the modules src/lib.rs declares, so the document and the code cannot drift apart; the
//! document's walk of a held poll must name functions where they are.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The layer of each top-level module, from ARCHITECTURE.md's table between its markers:
/// rows `| N | `module`, `module` | ... |`.
fn layers() -> BTreeMap<String, usize> {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md"))
        .expect("ARCHITECTURE.md at the project root");
    let start = doc
        .find("<!-- layers:begin -->")
        .expect("ARCHITECTURE.md marks its layer table with <!-- layers:begin -->");
    let end = doc[start..]
        .find("<!-- layers:end -->")
        .expect("and <!-- layers:end -->")
        + start;
    let mut out = BTreeMap::new();
    for row in doc[start..end].lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let Ok(layer) = cells[1].parse::<usize>() else {
            continue; // the header and separator rows
        };
        for module in cells[2].split(',') {
            let module = module.trim().trim_matches('`');
            assert!(
                out.insert(module.to_owned(), layer).is_none(),
                "{module} is listed twice in ARCHITECTURE.md's layer table"
            );
        }
    }
    assert!(!out.is_empty(), "ARCHITECTURE.md's layer table has no rows");
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`None` for the crate root files), and
/// how deep below the crate root its own module is (`src/hub.rs` and `src/hub/mod.rs`: 1,
/// `src/hub/ring.rs`: 2).
fn module_of(src: &Path, file: &Path) -> (Option<String>, usize) {
    let rel: Vec<String> = file
        .strip_prefix(src)
        .unwrap()
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let stem = |name: &str| name.trim_end_matches(".rs").to_owned();
    match rel.as_slice() {
        [f] if f == "lib.rs" || f == "main.rs" => (None, 0),
        [f] => (Some(stem(f)), 1),
        [dir, rest @ ..] => {
            let last = rest.last().unwrap();
            let depth = if last == "mod.rs" {
                rest.len()
            } else {
                rest.len() + 1
            };
            (Some(dir.clone()), depth)
        }
        [] => unreachable!("a file has a name"),
    }
}

/// Source text without comments and string literals, so a path named in prose is not an import.
fn code_only(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        if text[i..].starts_with("//") {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if text[i..].starts_with("/*") {
            let end = text[i + 2..]
                .find("*/")
                .map_or(bytes.len(), |e| i + 2 + e + 2);
            i = end;
        } else if bytes[i] == b'"' {
            // Raw strings (r"…", r#"…"#) end at their own delimiter.
            let hashes = text[..i].chars().rev().take_while(|&c| c == '#').count();
            let raw = text[..i - hashes].ends_with('r');
            let close = format!("\"{}", "#".repeat(hashes));
            i += 1;
            while i < bytes.len() {
                if raw {
                    if text[i..].starts_with(&close) {
                        i += close.len();
                        break;
                    }
                } else if bytes[i] == b'\\' {
                    i += 1;
                } else if bytes[i] == b'"' {
                    i += 1;
                    break;
                }
                i += 1;
            }
            out.push_str("\"\"");
        } else if bytes[i] == b'\'' {
            // A char literal ('"', '\'', '\u{7f}'); a lifetime has no closing quote.
            let rest = &text[i + 1..];
            let literal = if let Some(escaped) = rest.strip_prefix('\\') {
                escaped.get(1..).and_then(|e| e.find('\'')).map(|e| e + 2)
            } else {
                rest.chars()
                    .next()
                    .filter(|c| rest[c.len_utf8()..].starts_with('\''))
                    .map(char::len_utf8)
            };
            match literal {
                Some(len) => i += 1 + len + 1,
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Whether a word may start at `i`: the byte before it is no part of an identifier (a `$`, as
/// in a macro body's `$crate`, is not).
fn word_start(code: &str, i: usize) -> bool {
    code[..i]
        .chars()
        .next_back()
        .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
}

/// The identifier at the start of `text` (possibly empty).
fn ident(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// `text` after the whole word `word` and the whitespace behind it.
fn strip_word<'a>(text: &'a str, word: &str) -> Option<&'a str> {
    let rest = text.strip_prefix(word)?;
    ident(rest).is_empty().then(|| rest.trim_start())
}

/// `text` after a `::` at its start, whitespace allowed around it (`crate ::x`, `crate::\n x`).
fn strip_separator(text: &str) -> Option<&str> {
    Some(text.trim_start().strip_prefix("::")?.trim_start())
}

/// The items of the `{…}` group `text` starts with, split at its own commas.
fn group_items(text: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 1);
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    items.push(&text[start..i]);
                    return items;
                }
            }
            ',' if depth == 1 => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&text[start..]);
    items
}

/// The names `code` imports the crate root under: `use crate as c;`, `use crate::{self as c};`
/// and `extern crate self as c;`, whose `c::x` then names `x` as `crate::x` does.
fn crate_aliases(code: &str) -> Vec<String> {
    let alias = |text: &str| {
        let name = ident(strip_word(text, "as")?);
        (!name.is_empty() && name != "_").then(|| name.to_owned())
    };
    let mut aliases = Vec::new();
    for (i, _) in code.match_indices("crate") {
        let Some(rest) = strip_word(&code[i..], "crate").filter(|_| word_start(code, i)) else {
            continue;
        };
        match strip_separator(rest) {
            Some(group) if group.starts_with('{') => {
                let items = group_items(group).into_iter();
                aliases.extend(items.filter_map(|item| alias(strip_word(item.trim(), "self")?)));
            }
            Some(_) => {} // `crate::x as y` renames `x`, not the root
            None => aliases.extend(alias(strip_word(rest, "self").unwrap_or(rest))),
        }
    }
    aliases
}

/// Adds the top-level modules named by `tail`, a path that starts at the crate root: `x::…`
/// names `x`, a group `{x, y::z}` each item's head.
fn from_root(tail: &str, found: &mut Vec<String>) {
    if tail.starts_with('{') {
        for item in group_items(tail) {
            from_root(item.trim_start(), found);
        }
    } else {
        let head = ident(tail);
        if !head.is_empty() && head != "self" {
            found.push(head.to_owned());
        }
    }
}

/// Adds the top-level modules named by `tail`, a path that follows `climbs` `super`s from a
/// module `depth` below the crate root: more `super`s climb further, in groups too
/// (`super::{super::x}`), and once at the root the path names modules as [`from_root`] reads.
fn from_supers(tail: &str, climbs: usize, depth: usize, found: &mut Vec<String>) {
    if let Some(rest) = strip_word(tail, "super").and_then(strip_separator) {
        from_supers(rest, climbs + 1, depth, found);
    } else if climbs >= depth {
        from_root(tail, found);
    } else if tail.starts_with('{') {
        for item in group_items(tail) {
            if let Some(rest) = strip_word(item.trim_start(), "super").and_then(strip_separator) {
                from_supers(rest, climbs + 1, depth, found);
            }
        }
    }
}

/// The top-level modules `code` names by a path from the crate root: `crate::x`,
/// `crate::{x, y}` and `$crate::x`, the same through an alias of the crate root
/// ([`crate_aliases`]), and `super::…::x` where the `super`s climb from the file's `depth`
/// (plus the inline `mod name { … }` blocks around them) to the root. Whitespace may surround
/// any `::`.
fn named_modules(code: &str, depth: usize) -> Vec<String> {
    let aliases = crate_aliases(code);
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    // Brace depth, and the depths at which inline modules opened.
    let (mut braces, mut inline_mods) = (0usize, Vec::<usize>::new());
    let mut mod_pending = false;
    let mut i = 0;
    while i < code.len() {
        match bytes[i] {
            b'{' => {
                if std::mem::take(&mut mod_pending) {
                    inline_mods.push(braces);
                }
                braces += 1;
            }
            b'}' => {
                braces = braces.saturating_sub(1);
                if inline_mods.last() == Some(&braces) {
                    inline_mods.pop();
                }
            }
            b';' => mod_pending = false,
            _ => {}
        }
        let word = ident(&code[i..]);
        if word.is_empty() || !word_start(code, i) {
            i += code[i..].chars().next().map_or(1, char::len_utf8);
            continue;
        }
        // `a::crate`, `a::super` and `a::c` do not start at the root.
        let continues_a_path = code[..i].trim_end().ends_with("::");
        let depth = depth + inline_mods.len();
        let after = strip_separator(&code[i + word.len()..]);
        match (word, after) {
            ("mod", _) => mod_pending = true,
            (_, Some(tail)) if !continues_a_path && word == "super" && depth > 0 => {
                from_supers(tail, 1, depth, &mut found);
            }
            (_, Some(tail))
                if !continues_a_path && (word == "crate" || aliases.iter().any(|a| a == word)) =>
            {
                from_root(tail, &mut found);
            }
            _ => {}
        }
        i += word.len();
    }
    found
}

/// The modules `code` (a crate root) declares from files: `mod x;` with any visibility, outside
/// every block (not an inline `mod x { … }`, nor a declaration inside one).
fn declared_modules(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    for (i, c) in code.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            'm' if depth == 0 && word_start(code, i) => {
                if let Some(rest) = strip_word(&code[i..], "mod") {
                    let name = ident(rest);
                    if !name.is_empty() && rest[name.len()..].trim_start().starts_with(';') {
                        out.push(name.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// src/lib.rs declares exactly the modules of ARCHITECTURE.md's layer table: a module added to
/// one and not the other fails here.
#[test]
fn architecture_layer_table_lists_the_modules_of_lib_rs() {
    let lib = std::fs::read_to_string(Path::new(ROOT).join("src/lib.rs")).unwrap();
    let declared: BTreeSet<String> = declared_modules(&code_only(&lib)).into_iter().collect();
    let listed: BTreeSet<String> = layers().into_keys().collect();
    let unlisted: Vec<_> = declared.difference(&listed).collect();
    let undeclared: Vec<_> = listed.difference(&declared).collect();
    assert!(
        unlisted.is_empty(),
        "src/lib.rs declares {unlisted:?}, which ARCHITECTURE.md's layer table does not list"
    );
    assert!(
        undeclared.is_empty(),
        "ARCHITECTURE.md's layer table lists {undeclared:?}, which src/lib.rs does not declare"
    );
}

#[test]
fn architecture_layers_import_only_downwards() {
    let layers = layers();
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut seen_modules = BTreeSet::new();
    for file in &files {
        let (module, depth) = module_of(&src, file);
        let Some(module) = module else {
            continue; // the crate root wires everything together
        };
        let Some(&own) = layers.get(&module) else {
            violations.push(format!(
                "{}: module `{module}` is not in ARCHITECTURE.md's layer table",
                file.display()
            ));
            continue;
        };
        seen_modules.insert(module.clone());
        let code = code_only(&std::fs::read_to_string(file).unwrap());
        for named in named_modules(&code, depth) {
            if named == module {
                continue;
            }
            match layers.get(&named) {
                Some(&layer) if layer < own => {}
                Some(&layer) => violations.push(format!(
                    "{}: `{module}` (layer {own}) names `crate::{named}` (layer {layer})",
                    file.display()
                )),
                None => violations.push(format!(
                    "{}: `{module}` names `crate::{named}`, which is not in the layer table",
                    file.display()
                )),
            }
        }
    }
    for listed in layers.keys() {
        assert!(
            seen_modules.contains(listed),
            "ARCHITECTURE.md lists `{listed}`, which is no module under src/"
        );
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// The checker itself, on the forms it must catch and the ones it must ignore.
#[test]
fn architecture_check_reads_every_path_form() {
    let code = code_only(
        "use crate::hub::Topic;\nuse crate::gateway as g;\nfn f() { crate::server::run(); }\n\
         use crate::{metrics::{A, B}, config, self};\n// crate::admin in a comment\n\
         let s = \"crate::reload\"; let r = r#\"crate::auth\"#; let c = '\"'; let q = '\\'';\n\
         use super::super::source::X;\nuse super::sibling;\n\
         fn g() { let n = '\\n'; }\nuse crate::admin::Z;\n",
    );
    let mut named = named_modules(&code, 2);
    named.sort();
    assert_eq!(
        named,
        [
            "admin", "config", "gateway", "hub", "metrics", "server", "source"
        ]
    );
    assert!(named_modules(&code_only("use super::sibling;"), 2).is_empty());
    assert_eq!(named_modules("use super::gateway::X;", 1), ["gateway"]);
    // Inside an inline module, `super` is the file's module.
    assert!(named_modules("mod tests { use super::*; }", 1).is_empty());
    assert_eq!(
        named_modules("mod tests { use super::super::hub::X; }", 1),
        ["hub"]
    );
    assert_eq!(named_modules("mod a; use super::hub::X;", 1), ["hub"]);
    assert_eq!(
        module_of(Path::new("/s"), Path::new("/s/hub/ring.rs")),
        (Some("hub".into()), 2)
    );
    assert_eq!(
        module_of(Path::new("/s"), Path::new("/s/hub/mod.rs")),
        (Some("hub".into()), 1)
    );
    assert_eq!(
        module_of(Path::new("/s"), Path::new("/s/admin.rs")),
        (Some("admin".into()), 1)
    );
}

/// The checker follows a name the crate root is imported under: `use crate as c;`,
/// `use crate::{self as c};`, `extern crate self as c;`; a renamed item is no alias of the root.
#[test]
fn architecture_check_follows_aliases_of_the_crate_root() {
    assert_eq!(
        named_modules(
            &code_only("use crate as c;\nfn f() { c::admin::run(); }"),
            1
        ),
        ["admin"]
    );
    assert_eq!(
        named_modules(
            "use crate::{self as root, config};\nfn f() { root::reload::x(); }",
            1
        ),
        ["config", "reload"]
    );
    assert_eq!(
        named_modules("extern crate self as me;\nuse me::{hub, server};", 1),
        ["hub", "server"]
    );
    assert_eq!(
        crate_aliases("use crate as c; extern crate self as d;"),
        ["c", "d"]
    );
    // `c` renames a type here, and `x::c` is a path of its own.
    assert_eq!(
        named_modules(
            "use crate::hub::Topic as c;\nfn f() { c::new(); x::c::y(); }",
            1
        ),
        ["hub"]
    );
    assert!(crate_aliases("use crate::hub::Topic as c; let crate_as = 1;").is_empty());
}

/// Whitespace around `::` changes nothing in Rust, nor here.
#[test]
fn architecture_check_reads_paths_spaced_around_their_separators() {
    assert_eq!(
        named_modules("fn f() { crate ::admin::x(); }", 1),
        ["admin"]
    );
    assert_eq!(
        named_modules("fn f() { crate::\n    reload::y(); }", 1),
        ["reload"]
    );
    assert_eq!(
        named_modules("use crate :: { gateway, server };", 1),
        ["gateway", "server"]
    );
    assert_eq!(named_modules("use super :: super :: hub::X;", 2), ["hub"]);
    assert!(named_modules("use super :: sibling;", 2).is_empty());
}

/// A `super` inside a group climbs on from where the path outside it has climbed to.
#[test]
fn architecture_check_climbs_through_super_in_nested_groups() {
    assert_eq!(
        named_modules("use super::{super::admin::X, sibling::Y};", 2),
        ["admin"]
    );
    assert_eq!(
        named_modules("use super::{super::{super::hub::X}};", 3),
        ["hub"]
    );
    assert_eq!(
        named_modules("use super::{super::{admin, config}};", 2),
        ["admin", "config"]
    );
    // Two levels up from three below the root is not the root.
    assert!(named_modules("use super::{super::sibling};", 3).is_empty());
}

/// `$crate` in a macro body names the crate root, as `crate` does.
#[test]
fn architecture_check_reads_dollar_crate_in_macro_bodies() {
    let code = code_only(
        "macro_rules! m {\n    ($e:expr) => { $crate::admin::call($e) };\n    \
         () => { $crate :: server::x() };\n}\n",
    );
    assert_eq!(named_modules(&code, 1), ["admin", "server"]);
}

/// lib.rs's module list as the layer-table check reads it.
#[test]
fn architecture_check_reads_the_modules_a_crate_root_declares() {
    let lib = "pub mod a;\nmod b;\npub(crate) mod c ;\n#[cfg(test)]\nmod tests {\n    mod inner;\n}\n\
               fn f() { let module = 1; }\n";
    assert_eq!(declared_modules(lib), ["a", "b", "c"]);
}

/// The walk's checks find a function in the blocks of the type it is named with, and a free
/// function outside every block.
#[test]
fn architecture_walk_check_finds_functions_in_their_own_blocks() {
    let code = code_only(
        "impl<H: Handler> Socket<H> where H: Send { fn start(&self) {} }\n\
         fn f(h: impl Socket) { fn inner() {} }\n\
         impl<H> Drop for crate::x::Socket<H> { fn drop(&mut self) {} }\n\
         pub trait Socket: Send { fn look(&self); }\n\
         impl Other { fn park() {} }\n\
         enum Slot<P> { Idle, Woken(P) }\n",
    );
    let blocks = blocks_of(&code, &["impl", "trait"], "Socket");
    assert_eq!(blocks.len(), 3, "{blocks:?}");
    for name in ["start", "drop", "look"] {
        assert!(
            blocks.iter().any(|b| has_word(b, &format!("fn {name}"))),
            "{name}"
        );
    }
    for name in ["inner", "park"] {
        assert!(
            !blocks.iter().any(|b| has_word(b, &format!("fn {name}"))),
            "{name}"
        );
    }
    assert!(defines_free_fn(&code, "f"));
    assert!(!defines_free_fn(&code, "start"));
    assert!(!defines_free_fn(&code, "inner"));
    let slot = blocks_of(&code, &["enum"], "Slot");
    assert!(has_word(slot[0], "Woken") && !has_word(slot[0], "Woke"));
}

/// The body (braces included) of the block whose `{` is at `open`.
fn block_at(code: &str, open: usize) -> &str {
    let mut depth = 0usize;
    for (i, c) in code[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &code[open..=open + i];
                }
            }
            _ => {}
        }
    }
    &code[open..]
}

/// The type an `impl` header (the text between `impl` and its `{`) is for: `Socket` in
/// `<H: Handler> Socket<H> where …`, `Current` in `service::Handler for Current`.
fn impl_self_type(header: &str) -> &str {
    let mut rest = header.trim_start();
    if rest.starts_with('<') {
        let mut depth = 0;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                match c {
                    '<' => depth += 1,
                    '>' => depth -= 1,
                    _ => {}
                }
                depth == 0
            })
            .map_or(rest.len(), |(e, _)| e + 1);
        rest = &rest[end..];
    }
    let rest = rest.split(" where ").next().unwrap_or_default();
    let rest = rest.split_once(" for ").map_or(rest, |(_, ty)| ty);
    let path = rest.trim().split('<').next().unwrap_or_default();
    ident(path.rsplit("::").next().unwrap_or_default())
}

/// The bodies of the blocks that define `ty`'s functions in `code`: every item-level `impl`
/// for it (`impl Ty`, `impl<T> Ty<T>`, `impl Trait for Ty`) and `trait Ty`; with `enum`, the
/// body of `enum Ty`. An `impl Trait` in a type's place (`fn f(x: impl Ty)`) is none of them.
fn blocks_of<'a>(code: &'a str, keywords: &[&str], ty: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    for &keyword in keywords {
        for (i, _) in code.match_indices(keyword) {
            if !word_start(code, i) || strip_word(&code[i..], keyword).is_none() {
                continue;
            }
            let before = code[..i].trim_end();
            let item = before.is_empty()
                || before.ends_with(['}', ';', '{', ']'])
                || ["pub", "pub(crate)", "pub(super)", "unsafe"]
                    .iter()
                    .any(|w| before.ends_with(w));
            let Some(open) = code[i..].find(['{', ';']).map(|o| i + o) else {
                continue;
            };
            if (keyword == "impl" && !item) || code.as_bytes()[open] == b';' {
                continue;
            }
            let header = &code[i + keyword.len()..open];
            let named = if keyword == "impl" {
                impl_self_type(header)
            } else {
                ident(header.trim_start())
            };
            if named == ty {
                out.push(block_at(code, open));
            }
        }
    }
    out
}

/// Whether `text` has the whole word `word`.
fn has_word(text: &str, word: &str) -> bool {
    text.match_indices(word)
        .any(|(i, _)| word_start(text, i) && ident(&text[i + word.len()..]).is_empty())
}

/// Whether `code` defines `fn name` outside every block (a free function of its module).
fn defines_free_fn(code: &str, name: &str) -> bool {
    let pattern = format!("fn {name}");
    code.match_indices(&pattern).any(|(i, _)| {
        let depth: isize = code[..i]
            .chars()
            .map(|c| match c {
                '{' => 1,
                '}' => -1,
                _ => 0,
            })
            .sum();
        depth == 0 && word_start(code, i) && ident(&code[i + pattern.len()..]).is_empty()
    })
}

/// How many times `code` (comments and strings removed) names `std::time::Instant`: as
/// `std::time::Instant`, in a `std::time::{…}` group, or as `time::Instant` not after `tokio::`.
fn std_instants(code: &str) -> usize {
    let flat: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    flat.match_indices("time::")
        .filter(|&(at, _)| {
            let before = &flat[..at];
            if before.ends_with("tokio::") || before.ends_with("tokio::{") {
                return false;
            }
            let after = &flat[at + "time::".len()..];
            let is_instant = |name: &str| {
                let rest = name.strip_prefix("Instant");
                rest.is_some_and(|r| !r.starts_with(|c: char| c.is_alphanumeric() || c == '_'))
                    || name.starts_with("Instantas")
            };
            match after.strip_prefix('{') {
                Some(group) => group[..group.find('}').unwrap_or(group.len())]
                    .split(',')
                    .any(is_instant),
                None => is_instant(after),
            }
        })
        .count()
}

/// ARCHITECTURE.md's invariant "one clock: tokio's": no file under `src/` names
/// `std::time::Instant`, so tokio's paused clock drives every deadline, backoff and age.
#[test]
fn monotonic_time_is_tokios_clock() {
    assert_eq!(std_instants("use std::time::Instant;"), 1);
    assert_eq!(std_instants("use std::time::{Duration, Instant};"), 1);
    assert_eq!(
        std_instants("use std::{sync::Arc, time::{Duration, Instant as I}};"),
        1
    );
    assert_eq!(std_instants("let t = std::time::Instant::now();"), 1);
    assert_eq!(
        std_instants("use std::time;\nlet t = time::Instant::now();"),
        1
    );
    let tokio = "use std::time::{Duration, SystemTime};\nuse tokio::time::Instant;\n\
                 let t: tokio::time::Instant = Instant::now();\nuse std::time::InstantLike;";
    assert_eq!(std_instants(tokio), 0);
    let mut files = Vec::new();
    rust_files(&Path::new(ROOT).join("src"), &mut files);
    let offenders: Vec<_> = files
        .iter()
        .filter(|f| std_instants(&code_only(&std::fs::read_to_string(f).unwrap())) > 0)
        .collect();
    assert!(
        offenders.is_empty(),
        "std::time::Instant in {offenders:?}: use tokio::time::Instant (ARCHITECTURE.md, invariants)"
    );
}

/// ARCHITECTURE.md's walk of a held poll on the cleartext HTTP/1.1 path names at most six
/// files, each of them exists, and every function it names is defined where it says: in the
/// file its step opens with (`1. `src/server/conn.rs`: …`) or the file named right after it
/// (`` `Topic::park` in `src/hub/topic.rs` ``, `` `hold` (in `h1/mod.rs`) ``); `Type::name` in
/// an `impl` of `Type` or in `trait Type` there (in the file defining `Type` when the walk names
/// no file); `module::name` as a free function of that module's file. A plain name its step's
/// file does not define must be a method of the contract it crosses (a trait of `service`).
/// Every type it names exists under `src/`, and every `Enum::Variant` is a variant of `Enum`.
#[test]
fn architecture_held_poll_walk_names_what_exists() {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md")).unwrap();
    let start = doc
        .match_indices("\n### ")
        .map(|(i, _)| i)
        .find(|&i| {
            doc[i..]
                .lines()
                .nth(1)
                .is_some_and(|h| h.contains("held poll"))
        })
        .expect("ARCHITECTURE.md has a ### heading with \"held poll\" in it");
    let end = doc[start + 4..]
        .find("\n##")
        .map_or(doc.len(), |e| start + 4 + e);
    let section = &doc[start..end];
    let mut files: Vec<String> = Vec::new();
    for word in section.split(|c: char| c.is_whitespace() || "`(),:".contains(c)) {
        if word.starts_with("src/") && word.ends_with(".rs") && !files.contains(&word.to_owned()) {
            files.push(word.to_owned());
        }
    }
    assert!(!files.is_empty(), "the walk names no src/ file");
    assert!(
        files.len() <= 6,
        "the walk names {} files: {files:?}",
        files.len()
    );
    for f in &files {
        assert!(
            Path::new(ROOT).join(f).is_file(),
            "{f}, named in ARCHITECTURE.md, does not exist"
        );
    }
    // Every file under src/, as code, by its path from the root (`src/hub/topic.rs`).
    let mut all_src = Vec::new();
    rust_files(&Path::new(ROOT).join("src"), &mut all_src);
    let code: BTreeMap<String, String> = all_src
        .iter()
        .map(|f| {
            let rel = f.strip_prefix(ROOT).unwrap().to_string_lossy();
            let rel = rel.trim_start_matches('/').to_owned();
            (rel, code_only(&std::fs::read_to_string(f).unwrap()))
        })
        .collect();
    // A file as the walk writes it: from the root, or its tail (`h1/socket.rs`).
    let resolve = |written: &str| {
        let matching: Vec<&String> = files
            .iter()
            .filter(|f| *f == written || f.ends_with(&format!("/{written}")))
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "ARCHITECTURE.md's walk names `{written}`: one of {files:?} expected"
        );
        matching[0].clone()
    };
    // The files that define the type `ty` (with one of `keywords`).
    let defining = |keywords: &[&str], ty: &str| -> Vec<String> {
        code.iter()
            .filter(|(_, c)| keywords.iter().any(|k| has_word(c, &format!("{k} {ty}"))))
            .map(|(f, _)| f.clone())
            .collect()
    };
    // The bodies of the contract's traits.
    let contract: Vec<&str> = code
        .iter()
        .filter(|(f, _)| f.starts_with("src/service"))
        .flat_map(|(_, c)| {
            let traits = c.match_indices("trait ").filter(|&(i, _)| word_start(c, i));
            traits.flat_map(|(i, _)| blocks_of(c, &["trait"], ident(&c[i + "trait ".len()..])))
        })
        .collect();

    // The quoted names, each with the file its step opens with and the file named after it.
    let quotes: Vec<(usize, &str)> = {
        let ticks: Vec<usize> = section.match_indices('`').map(|(i, _)| i).collect();
        ticks
            .chunks(2)
            .filter(|pair| pair.len() == 2)
            .map(|pair| (pair[0], &section[pair[0] + 1..pair[1]]))
            .collect()
    };
    let step_file = |at: usize| -> Option<String> {
        // A step is a numbered item; it ends at a blank line.
        let before = &section[..at];
        let line_start = before.match_indices('\n').map(|(i, _)| i + 1).rfind(|&i| {
            let line = &section[i..];
            let digits = line.find(|c: char| !c.is_ascii_digit()).unwrap_or(0);
            digits > 0 && line[digits..].starts_with(". ")
        })?;
        if section[line_start..at].contains("\n\n") {
            return None;
        }
        let text = section[line_start..].split_once(". ")?.1;
        let file = text.strip_prefix('`')?.split('`').next()?;
        file.ends_with(".rs").then(|| resolve(file))
    };
    // `in `F``, `(`F`)` or `(in `F`)` right after the quote that closes at `close`, across
    // line breaks.
    let named_after = |close: usize| -> Option<String> {
        let rest = section[close + 1..].trim_start();
        let after_paren = rest.strip_prefix('(').map(str::trim_start);
        let after_in = strip_word(after_paren.unwrap_or(rest), "in");
        if after_paren.is_none() && after_in.is_none() {
            return None;
        }
        let rest = after_in.or(after_paren)?;
        let file = rest.strip_prefix('`')?.split('`').next()?;
        file.ends_with(".rs").then(|| resolve(file))
    };

    let mut checked = 0;
    for &(open, quoted) in &quotes {
        let is_path = quoted
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == ':');
        // Files, prose, and config keys (not functions of ours).
        if quoted.is_empty() || !is_path || ["write_timeout", "max_connections"].contains(&quoted) {
            continue;
        }
        let close = open + 1 + quoted.len();
        let segments: Vec<&str> = quoted.split("::").collect();
        let (qualifier, name) = match segments.as_slice() {
            [name] => (None, *name),
            [qualifier, name] => (Some(*qualifier), *name),
            _ => panic!("ARCHITECTURE.md's walk names `{quoted}`, a path this test cannot check"),
        };
        let file = named_after(close).or_else(|| step_file(open));
        let lower = |s: &str| s.starts_with(|c: char| c.is_lowercase());
        match qualifier {
            // A free function of a module: `h1::serve`.
            Some(module) if lower(module) && lower(name) => {
                let module_file = resolve(&format!("{module}/mod.rs"));
                assert!(
                    defines_free_fn(&code[&module_file], name),
                    "ARCHITECTURE.md names `{quoted}`, but {module_file} has no free `fn {name}`"
                );
            }
            // A method: `Socket::park`, `HeldPoll::expire`.
            Some(ty) if lower(name) => {
                let file = file.unwrap_or_else(|| {
                    let found = defining(&["struct", "enum", "trait"], ty);
                    assert_eq!(found.len(), 1, "`{ty}` is defined in {found:?}");
                    found[0].clone()
                });
                let blocks = blocks_of(&code[&file], &["impl", "trait"], ty);
                assert!(
                    blocks.iter().any(|b| has_word(b, &format!("fn {name}"))),
                    "ARCHITECTURE.md names `{quoted}`, but no `impl {ty}` or `trait {ty}` in \
                     {file} has a `fn {name}`"
                );
            }
            // A variant: `Slot::Woken`.
            Some(ty) => {
                let variant = code
                    .values()
                    .flat_map(|c| blocks_of(c, &["enum"], ty))
                    .any(|body| has_word(body, name));
                assert!(
                    variant,
                    "ARCHITECTURE.md names `{quoted}`: no `enum {ty}` has it"
                );
            }
            // A function of the step's file, or of the contract it calls through.
            None if lower(name) => {
                let own = file
                    .as_ref()
                    .is_some_and(|f| has_word(&code[f], &format!("fn {name}")));
                let through_contract = contract.iter().any(|t| has_word(t, &format!("fn {name}")));
                assert!(
                    own || through_contract,
                    "ARCHITECTURE.md names `{quoted}` in {}, which has no `fn {name}`, nor does \
                     a trait of src/service.rs",
                    file.as_deref().unwrap_or("a passage that names no file")
                );
            }
            // A type.
            None => assert!(
                !defining(&["struct", "enum", "trait", "type"], name).is_empty(),
                "ARCHITECTURE.md names the type `{quoted}`, which src/ does not define"
            ),
        }
        checked += 1;
    }
    assert!(
        checked >= 10,
        "only {checked} names checked: is the walk there?"
    );
}

/// Every relative link in the repository's Markdown opens a file of the repository, and no file
/// points a reader at the briefs outside it: ARCHITECTURE.md and docs/protocol.md are the
/// reference.
#[test]
fn docs_link_only_to_files_in_the_repository() {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') || name == ".ci" {
                    walk(&path, out);
                }
            } else {
                out.push(path);
            }
        }
    }
    let root = Path::new(ROOT);
    let mut files = Vec::new();
    walk(root, &mut files);
    let mut problems = Vec::new();
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue; // not text
        };
        let shown = file.strip_prefix(root).unwrap().display();
        if file.ends_with("tests/integration/architecture.rs") {
            continue; // this test names what it looks for
        }
        for outside in ["PROTOCOL.md", "DESIGN.md", "../shared"] {
            if text.contains(outside) {
                problems.push(format!(
                    "{shown} names {outside}, which is not in the repository"
                ));
            }
        }
        if file.extension().is_none_or(|e| e != "md") {
            continue;
        }
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap_or_default();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let resolved = file.parent().unwrap().join(target);
            if !resolved.exists() {
                problems.push(format!("{shown} links to {target}, which does not exist"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
