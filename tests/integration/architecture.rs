//! The layering of ARCHITECTURE.md, checked: every file under `src/` is read whole (inline test
//! modules included), every path into the crate (`use crate::x`, `use crate::{x, y}`,
//! `crate::x::f()`, `super::` paths that climb to the crate root) is resolved to the top-level
//! module it names, and a module may name only modules of lower layers. The layer table is read
//! from ARCHITECTURE.md itself, so the document and the check cannot drift apart.

use std::collections::BTreeMap;
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

/// The first segments of the paths in a `{a::b, c, d::{e, f}}` group.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let (mut depth, mut start) = (0, 0);
    let inner = &group[1..group.len() - 1];
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                heads.push(inner[start..i].to_owned());
                start = i + 1;
            }
            _ => {}
        }
    }
    heads.push(inner[start..].to_owned());
    heads
        .iter()
        .map(|p| {
            let p = p.trim();
            let end = p
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(p.len());
            p[..end].to_owned()
        })
        .filter(|h| !h.is_empty() && h != "self")
        .collect()
}

/// The top-level modules `code` names by a path from the crate root: `crate::x` and
/// `crate::{x, y}`, and `super::…::x` where the `super`s climb from the file's `depth` (plus
/// the inline `mod name { … }` blocks around them) to the root.
fn named_modules(code: &str, depth: usize) -> Vec<String> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let word_start =
        |i: usize| i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
    // Brace depth, and the depths at which inline modules opened.
    let (mut braces, mut inline_mods) = (0usize, Vec::<usize>::new());
    let mut mod_pending = false;
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
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
            _ if rest.starts_with("mod ") && word_start(i) => mod_pending = true,
            _ => {}
        }
        let depth = depth + inline_mods.len();
        let after_root = if rest.starts_with("crate::") && word_start(i) {
            Some(i + "crate::".len())
        } else if rest.starts_with("super::")
            && word_start(i)
            && (i < 2 || &bytes[i - 2..i] != b"::")
        {
            let mut j = i;
            let mut climbs = 0;
            while code[j..].starts_with("super::") {
                climbs += 1;
                j += "super::".len();
            }
            (climbs >= depth && depth > 0).then_some(j)
        } else {
            None
        };
        let Some(at) = after_root else {
            i += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        let tail = code[at..].trim_start();
        if tail.starts_with('{') {
            let mut depth_b = 0;
            let end = tail
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '{' => depth_b += 1,
                        '}' => depth_b -= 1,
                        _ => {}
                    }
                    depth_b == 0
                })
                .map_or(tail.len(), |(e, _)| e + 1);
            found.extend(group_heads(&tail[..end]));
        } else {
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            found.push(tail[..end].to_owned());
        }
        i = at;
    }
    found
}

#[test]
fn architecture_layers_import_only_downwards() {
    let layers = layers();
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut seen_modules = std::collections::BTreeSet::new();
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

/// ARCHITECTURE.md's walk of a held poll on the cleartext HTTP/1.1 path names at most six
/// files, each of them exists, and every function it names (`name`, `Type::name`) is defined in
/// one of them; every type it names exists somewhere under `src/`.
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

#[test]
fn architecture_held_poll_walk_names_what_exists() {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md")).unwrap();
    let start = doc
        .find("\n### ")
        .and_then(|_| {
            doc.match_indices("\n### ").map(|(i, _)| i).find(|&i| {
                doc[i..]
                    .lines()
                    .nth(1)
                    .is_some_and(|h| h.contains("held poll"))
            })
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
    let texts: Vec<String> = files
        .iter()
        .map(|f| {
            std::fs::read_to_string(Path::new(ROOT).join(f))
                .unwrap_or_else(|_| panic!("{f}, named in ARCHITECTURE.md, does not exist"))
        })
        .collect();
    let mut all_src = Vec::new();
    rust_files(&Path::new(ROOT).join("src"), &mut all_src);
    let everything: String = all_src
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let defines = |text: &str, keyword: &str, name: &str| {
        text.match_indices(&format!("{keyword} {name}"))
            .any(|(i, m)| {
                let after = text[i + m.len()..].chars().next();
                after.is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
            })
    };
    let mut checked = 0;
    for (i, quoted) in section.split('`').enumerate() {
        if i % 2 == 0 {
            continue;
        }
        let is_path = |s: &str| {
            s.chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == ':')
        };
        if quoted.is_empty() || !is_path(quoted) || quoted.starts_with("src") {
            continue;
        }
        let last = quoted.rsplit("::").next().unwrap();
        if last.chars().next().is_some_and(char::is_lowercase) {
            let known = ["write_timeout", "max_connections", "http1", "http2"];
            if known.contains(&last) {
                continue; // config keys and hyper's modules, not functions of ours
            }
            assert!(
                texts.iter().any(|t| defines(t, "fn", last)),
                "ARCHITECTURE.md names `{quoted}`, but no `fn {last}` is in {files:?}"
            );
        } else {
            let variant = [format!("{last}("), format!("{last} {{"), format!("{last},")]
                .iter()
                .any(|v| everything.contains(v.as_str()));
            assert!(
                variant
                    || ["struct", "enum", "trait", "type"].iter().any(|k| defines(
                        &everything,
                        k,
                        last
                    )),
                "ARCHITECTURE.md names the type or variant `{quoted}`, which src/ does not define"
            );
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
