//! The house rules of docs/architecture.md, checked on the source: the pipeline's
//! stages use only earlier stages, nothing in the pipeline or the libraries below
//! it uses a command or the command line, and `src/cli.rs` uses no command module.
//! References are read from the code (comments left out): `crate::a::b` paths
//! and `super::` paths, braces of `use` lists included.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The module path of a file under src/: `src/pipeline/score/mod.rs` ->
/// ["pipeline", "score"].
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_string());
    }
    parts
}

/// The code of a file without its comments (line comments and doc comments).
fn code(file: &Path) -> String {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first path segments after `prefix::` at each occurrence: `prefix::a::b` gives
/// "a", `prefix::{a::x, b}` gives "a" and "b" (top-level items of the braces).
fn segments_after(text: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let pat = format!("{prefix}::");
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(i) = text[from..].find(&pat) {
        let at = from + i;
        from = at + pat.len();
        // Only whole path starts: `crate::`, not `mycrate::`.
        if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
            continue;
        }
        let rest = &text[from..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            let mut items = Vec::new();
            for ch in inner.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => items.push(std::mem::take(&mut item)),
                    _ if depth == 1 => item.push(ch),
                    _ => {}
                }
            }
            items.push(item);
            for it in items {
                let first: String = it
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !first.is_empty() {
                    out.push(first);
                }
            }
        } else {
            let first: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !first.is_empty() {
                out.push(first);
            }
        }
    }
    out
}

/// The crate-level paths a file refers to, each as its module path from the crate
/// root, as far as it can be told from the text: `crate::pipeline::store::load`
/// gives ["pipeline", "store", "load"]; `super::x` is resolved from the file's module.
fn references(file: &Path) -> BTreeSet<Vec<String>> {
    references_in(&code(file), &module_of(file))
}

/// [`references`] of `text`, the code of `module`.
fn references_in(text: &str, module: &[String]) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    // crate::a and crate::a::b (two levels are enough for the rules below).
    for first in segments_after(text, "crate") {
        out.insert(vec![first.clone()]);
        for second in segments_after(text, &format!("crate::{first}")) {
            out.insert(vec![first.clone(), second]);
        }
    }
    // super::, super::super:: ... resolved against the file's module.
    for ups in (1..=3).rev() {
        let prefix = vec!["super"; ups].join("::");
        if module.len() < ups {
            continue;
        }
        let base = &module[..module.len() - ups];
        for first in segments_after(text, &prefix) {
            if first == "super" {
                continue;
            }
            let mut p = base.to_vec();
            p.push(first);
            out.insert(p);
        }
    }
    out
}

/// The pipeline's stages in the order data flows; a stage may use only stages of
/// a lower or equal rank. The drivers (`in_memory`, `benchmark`) are above them all.
fn stage_rank(name: &str) -> Option<usize> {
    match name {
        "vocab" => Some(0),
        "extract" => Some(1),
        "store" | "import" => Some(2),
        "score" => Some(3),
        "report" => Some(5),
        "in_memory" | "benchmark" => Some(9),
        _ => None,
    }
}

#[test]
fn pipeline_stages_use_only_earlier_stages() {
    let mut violations = Vec::new();
    let mut checked = 0;
    for file in rust_files(&src().join("pipeline")) {
        let module = module_of(&file);
        let Some(own) = module.get(1).and_then(|s| stage_rank(s)) else {
            continue; // pipeline/mod.rs
        };
        checked += 1;
        for r in references(&file) {
            if r.first().map(String::as_str) != Some("pipeline") || r.len() < 2 {
                continue;
            }
            let Some(rank) = stage_rank(&r[1]) else {
                violations.push(format!(
                    "{}: pipeline::{} is not a known stage",
                    file.display(),
                    r[1]
                ));
                continue;
            };
            if rank > own {
                violations.push(format!(
                    "{} (stage {}) uses the later pipeline::{}",
                    file.display(),
                    module[1],
                    r[1]
                ));
            }
        }
    }
    assert!(checked >= 10, "only {checked} stage files found");
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn nothing_below_the_commands_uses_them_or_the_command_line() {
    let mut violations = Vec::new();
    for file in rust_files(&src()) {
        let module = module_of(&file);
        let top = module.first().map(String::as_str).unwrap_or("");
        if matches!(top, "commands" | "cli" | "") {
            continue; // the commands themselves, cli.rs, lib.rs and main.rs
        }
        for r in references(&file).iter().filter(|r| r.len() == 1) {
            let first = r[0].as_str();
            if first == "commands" || first == "cli" {
                violations.push(format!("{} uses crate::{first}", file.display()));
            }
            // Libraries below the pipeline do not use it.
            let below = top != "pipeline";
            if below && first == "pipeline" {
                violations.push(format!("{} uses crate::pipeline", file.display()));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_command_line_uses_no_command_module() {
    let refs = references(&src().join("cli.rs"));
    let bad: Vec<_> = refs.iter().filter(|r| r[0] == "commands").collect();
    assert!(bad.is_empty(), "src/cli.rs uses {bad:?}");
}

#[test]
fn the_reference_reader_sees_use_lists_and_super_paths() {
    // The checks above are only as good as this reader.
    let text = "use crate::pipeline::{extract, score::Method};\nuse super::{self, store};\nlet x = crate::pipeline::report::table(); // crate::pipeline::benchmark\n";
    assert_eq!(
        segments_after(text, "crate::pipeline"),
        ["extract", "score", "report", "benchmark"]
    );
    assert_eq!(segments_after(text, "super"), ["self", "store"]);
    let extract: Vec<String> = vec!["pipeline".into(), "extract".into()];
    let code: String = text
        .lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n");
    let refs = references_in(&code, &extract);
    let has = |p: &[&str]| refs.contains(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert!(
        has(&["pipeline", "score"]) && has(&["pipeline", "store"]),
        "{refs:?}"
    );
    assert!(
        !has(&["pipeline", "benchmark"]),
        "a comment is not a reference: {refs:?}"
    );
    // super::super from a module two levels down.
    let image_pass: Vec<String> = ["pipeline", "score", "image_pass"]
        .map(String::from)
        .to_vec();
    let refs = references_in("use super::super::extract::Outputs;", &image_pass);
    assert!(
        refs.contains(&vec!["pipeline".to_string(), "extract".to_string()]),
        "{refs:?}"
    );
    // And a later stage used by an earlier one is what the stage rule refuses.
    assert!(stage_rank("score") > stage_rank("extract"));
    assert_eq!(
        module_of(&src().join("pipeline/score/mod.rs")),
        ["pipeline", "score"]
    );
    assert_eq!(
        module_of(&src().join("pipeline/extract.rs")),
        ["pipeline", "extract"]
    );
}
