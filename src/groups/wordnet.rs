//! WordNet 3.0's noun hierarchy, read from its database files (`data.noun`,
//! `index.noun`; Debian's `wordnet-base` installs them in `/usr/share/wordnet`),
//! for the taxonomy grouping of `mos make-groups` (docs/grouping.md).
//!
//! `data.noun` has one synset per line,
//! `offset lex_filenum ss_type w_cnt word lex_id ... p_cnt [symbol offset pos st]... | gloss`
//! (w_cnt two hex digits, p_cnt three decimal digits); lines starting with two
//! spaces are the licence header. `index.noun` has one lemma per line,
//! `lemma pos synset_cnt p_cnt [symbol]... sense_cnt tagsense_cnt offset...`, its
//! offsets in sense order. ImageNet names a noun synset `n` + its 8-digit offset
//! (`n01440764`, tench). Every line is checked against this syntax, and every
//! hypernym and index entry must point at a synset of `data.noun`, so a
//! truncated or corrupt file is an error naming file and line.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where `wordnet-base` installs the database.
pub const DEFAULT_DIR: &str = "/usr/share/wordnet";

/// One noun synset: its first lemma and its hypernym to follow upwards.
#[derive(Debug, Clone)]
pub struct Synset {
    /// The first word of the synset (`animal`, `geological_formation`).
    pub lemma: String,
    /// The first-listed hypernym (`@`), or, for a synset with none, the first
    /// instance hypernym (`@i`); `None` at the root (`entity`).
    pub hypernym: Option<u32>,
}

/// The noun hierarchy.
#[derive(Debug)]
pub struct WordNet {
    pub dir: PathBuf,
    synsets: HashMap<u32, Synset>,
    /// Lemma (lower case, `_` for spaces) -> synset offsets in sense order.
    index: HashMap<String, Vec<u32>>,
}

/// The 8-digit offset of a WordNet noun id `n01440764`, or `None` if `name` is
/// not of that form.
pub fn parse_wnid(name: &str) -> Option<u32> {
    let digits = name.strip_prefix('n')?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The id `n01440764` of an offset.
pub fn wnid(offset: u32) -> String {
    format!("n{offset:08}")
}

fn corrupt(file: &Path, line: usize, what: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "{}:{line}: {what} (not a WordNet 3.0 noun database file, or a corrupt one)",
        file.display()
    )
}

fn read(file: &Path) -> Result<Vec<u8>> {
    std::fs::read(file).with_context(|| {
        format!(
            "cannot read WordNet file {} (install Debian's wordnet-base, or point --wordnet-dir at a directory with data.noun and index.noun)",
            file.display()
        )
    })
}

/// A decimal or hex field of a database line.
fn num(file: &Path, line: usize, field: Option<&str>, radix: u32, what: &str) -> Result<u32> {
    let f = field.ok_or_else(|| corrupt(file, line, format!("the line ends before its {what}")))?;
    u32::from_str_radix(f, radix)
        .map_err(|_| corrupt(file, line, format!("{what} '{f}' is not a number")))
}

fn offset_field(file: &Path, line: usize, f: Option<&str>, what: &str) -> Result<u32> {
    match f {
        Some(s) if s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(s.parse()?),
        Some(s) => Err(corrupt(
            file,
            line,
            format!("{what} '{s}' is not an 8-digit synset offset"),
        )),
        None => Err(corrupt(
            file,
            line,
            format!("the line ends before its {what}"),
        )),
    }
}

/// Parses `data.noun`.
fn parse_data(file: &Path, bytes: &[u8]) -> Result<HashMap<u32, Synset>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| corrupt(file, 1 + count_lines(&bytes[..e.valid_up_to()]), "not text"))?;
    let mut synsets = HashMap::with_capacity(90_000);
    let mut pointers: Vec<(u32, u32, usize)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.starts_with("  ") {
            continue;
        }
        let head = line.split(" | ").next().unwrap_or("");
        let mut f = head.split(' ').filter(|s| !s.is_empty());
        let offset = offset_field(file, n, f.next(), "synset offset")?;
        num(file, n, f.next(), 10, "lexicographer file number")?;
        match f.next() {
            Some("n") => {}
            other => {
                return Err(corrupt(
                    file,
                    n,
                    format!("synset type {:?}, expected n (noun)", other.unwrap_or("")),
                ))
            }
        }
        let words = num(file, n, f.next(), 16, "word count")?;
        if words == 0 {
            return Err(corrupt(file, n, "a synset without words"));
        }
        let mut lemma = None;
        for _ in 0..words {
            let w = f
                .next()
                .ok_or_else(|| corrupt(file, n, "the line ends inside its words"))?;
            lemma.get_or_insert_with(|| w.to_string());
            num(file, n, f.next(), 16, "lex id")?;
        }
        let ptrs = num(file, n, f.next(), 10, "pointer count")?;
        let (mut hyper, mut instance) = (None, None);
        for _ in 0..ptrs {
            let sym = f
                .next()
                .ok_or_else(|| corrupt(file, n, "the line ends inside its pointers"))?;
            let target = offset_field(file, n, f.next(), "pointer target")?;
            let pos = f
                .next()
                .ok_or_else(|| corrupt(file, n, "the line ends inside its pointers"))?;
            num(file, n, f.next(), 16, "pointer source/target")?;
            if pos == "n" {
                match sym {
                    "@" if hyper.is_none() => hyper = Some(target),
                    "@i" if instance.is_none() => instance = Some(target),
                    _ => {}
                }
            }
        }
        let hypernym = hyper.or(instance);
        if let Some(h) = hypernym {
            pointers.push((offset, h, n));
        }
        let lemma = lemma.unwrap_or_default();
        if synsets.insert(offset, Synset { lemma, hypernym }).is_some() {
            return Err(corrupt(
                file,
                n,
                format!("synset {} appears twice", wnid(offset)),
            ));
        }
    }
    if synsets.is_empty() {
        bail!("{}: no synsets (an empty or wrong file)", file.display());
    }
    for (from, to, n) in pointers {
        if !synsets.contains_key(&to) {
            return Err(corrupt(
                file,
                n,
                format!(
                    "synset {} has hypernym {}, which is not in the file",
                    wnid(from),
                    wnid(to)
                ),
            ));
        }
    }
    Ok(synsets)
}

fn count_lines(b: &[u8]) -> usize {
    b.iter().filter(|&&c| c == b'\n').count()
}

/// Parses `index.noun`, checking that its synsets are in `data.noun`.
fn parse_index(
    file: &Path,
    bytes: &[u8],
    synsets: &HashMap<u32, Synset>,
) -> Result<HashMap<String, Vec<u32>>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| corrupt(file, 1 + count_lines(&bytes[..e.valid_up_to()]), "not text"))?;
    let mut index = HashMap::with_capacity(120_000);
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.starts_with("  ") {
            continue;
        }
        let mut f = line.split(' ').filter(|s| !s.is_empty());
        let lemma = f.next().ok_or_else(|| corrupt(file, n, "an empty line"))?;
        if f.next() != Some("n") {
            return Err(corrupt(file, n, "part of speech is not n (noun)"));
        }
        let count = num(file, n, f.next(), 10, "synset count")?;
        let ptrs = num(file, n, f.next(), 10, "pointer count")?;
        for _ in 0..ptrs {
            f.next()
                .ok_or_else(|| corrupt(file, n, "the line ends inside its pointer symbols"))?;
        }
        num(file, n, f.next(), 10, "sense count")?;
        num(file, n, f.next(), 10, "tagged sense count")?;
        let mut offsets = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let o = offset_field(file, n, f.next(), "synset offset")?;
            if !synsets.contains_key(&o) {
                return Err(corrupt(
                    file,
                    n,
                    format!("'{lemma}' names synset {}, which data.noun lacks", wnid(o)),
                ));
            }
            offsets.push(o);
        }
        index.insert(lemma.to_string(), offsets);
    }
    if index.is_empty() {
        bail!("{}: no lemmas (an empty or wrong file)", file.display());
    }
    Ok(index)
}

impl WordNet {
    /// Reads `data.noun` and `index.noun` from `dir`.
    pub fn open(dir: &Path) -> Result<WordNet> {
        let data_file = dir.join("data.noun");
        let index_file = dir.join("index.noun");
        let data = read(&data_file)?;
        let index_bytes = read(&index_file)?;
        let synsets = parse_data(&data_file, &data)?;
        let index = parse_index(&index_file, &index_bytes, &synsets)?;
        Ok(WordNet {
            dir: dir.to_path_buf(),
            synsets,
            index,
        })
    }

    /// Number of noun synsets.
    pub fn len(&self) -> usize {
        self.synsets.len()
    }

    /// Whether there are no synsets (never, for an opened database).
    pub fn is_empty(&self) -> bool {
        self.synsets.is_empty()
    }

    /// The synset at `offset`.
    pub fn synset(&self, offset: u32) -> Option<&Synset> {
        self.synsets.get(&offset)
    }

    /// The synset offset a name stands for: an id `n00015388`, or `lemma.n.NN`
    /// (sense NN of the lemma in `index.noun`, as NLTK spells synsets).
    pub fn resolve(&self, name: &str) -> Result<u32> {
        if let Some(o) = parse_wnid(name) {
            if self.synsets.contains_key(&o) {
                return Ok(o);
            }
            bail!(
                "{name}: no such synset in {}",
                self.dir.join("data.noun").display()
            );
        }
        let parts: Vec<&str> = name.rsplitn(3, '.').collect();
        if let [sense, "n", lemma] = parts[..] {
            if let Ok(k) = sense.parse::<usize>() {
                let key = lemma.to_lowercase().replace(' ', "_");
                let senses = self.index.get(&key).with_context(|| {
                    format!(
                        "{name}: no noun '{lemma}' in {}",
                        self.dir.join("index.noun").display()
                    )
                })?;
                if k == 0 || k > senses.len() {
                    bail!("{name}: '{lemma}' has noun senses 1..{}", senses.len());
                }
                return Ok(senses[k - 1]);
            }
        }
        bail!("'{name}' is not a WordNet noun synset: give an id like n00015388 or a sense like animal.n.01")
    }

    /// The hypernym path of `offset` following first-listed hypernyms, from the
    /// synset itself to the root.
    pub fn path(&self, offset: u32) -> Result<Vec<u32>> {
        let mut out = vec![offset];
        let mut cur = offset;
        while let Some(h) = self.synsets.get(&cur).and_then(|s| s.hypernym) {
            if out.len() > 100 {
                bail!(
                    "{}: the hypernyms of {} form a cycle (a corrupt file)",
                    self.dir.join("data.noun").display(),
                    wnid(offset)
                );
            }
            out.push(h);
            cur = h;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excerpt() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wordnet")
    }

    #[test]
    fn reads_the_excerpt_and_follows_first_hypernyms() {
        let wn = WordNet::open(&excerpt()).unwrap();
        // tench > cyprinid > ... > animal > organism > ... > entity
        let path = wn.path(parse_wnid("n01440764").unwrap()).unwrap();
        let names: Vec<&str> = path
            .iter()
            .map(|o| wn.synset(*o).unwrap().lemma.as_str())
            .collect();
        assert_eq!(names.first(), Some(&"tench"));
        assert_eq!(names.last(), Some(&"entity"));
        assert!(names.contains(&"animal"), "{names:?}");
        // handkerchief's first hypernym chain: piece_of_cloth > piece > part > ...,
        // not its second (piece_of_cloth > fabric > artifact).
        let path = wn.path(parse_wnid("n03485794").unwrap()).unwrap();
        let names: Vec<&str> = path
            .iter()
            .map(|o| wn.synset(*o).unwrap().lemma.as_str())
            .collect();
        assert_eq!(
            &names[..4],
            &["handkerchief", "piece_of_cloth", "piece", "part"]
        );
        assert!(!names.contains(&"artifact"));
    }

    #[test]
    fn resolves_ids_and_senses() {
        let wn = WordNet::open(&excerpt()).unwrap();
        assert_eq!(wn.resolve("n00015388").unwrap(), 15388);
        assert_eq!(wn.resolve("animal.n.01").unwrap(), 15388);
        assert_eq!(wn.resolve("flower.n.01").unwrap(), 11669921);
        let e = wn.resolve("flower.n.99").unwrap_err().to_string();
        assert!(e.contains("senses 1.."), "{e}");
        let e = wn.resolve("n99999999").unwrap_err().to_string();
        assert!(
            e.contains("no such synset") && e.contains("data.noun"),
            "{e}"
        );
        let e = wn.resolve("dog").unwrap_err().to_string();
        assert!(e.contains("not a WordNet noun synset"), "{e}");
        assert_eq!(parse_wnid("n0144076"), None);
        assert_eq!(parse_wnid("x01440764"), None);
        assert_eq!(wnid(15388), "n00015388");
    }

    #[test]
    fn corrupt_and_missing_files_are_errors_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", WordNet::open(dir.path()).unwrap_err());
        assert!(e.contains("data.noun") && e.contains("wordnet-base"), "{e}");
        let data = std::fs::read_to_string(excerpt().join("data.noun")).unwrap();
        let index = std::fs::read(excerpt().join("index.noun")).unwrap();
        std::fs::write(dir.path().join("index.noun"), &index).unwrap();
        // A truncated last line.
        let cut = &data[..data.len() - 30];
        std::fs::write(dir.path().join("data.noun"), cut).unwrap();
        let e = format!("{:#}", WordNet::open(dir.path()).unwrap_err());
        let last = cut.lines().count();
        assert!(e.contains(&format!("data.noun:{last}:")), "{e}");
        // A line removed: a dangling hypernym.
        let lines: Vec<&str> = data.lines().collect();
        let animal = lines
            .iter()
            .position(|l| l.starts_with("00015388 "))
            .unwrap();
        let without: String = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != animal)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        std::fs::write(dir.path().join("data.noun"), without).unwrap();
        let e = format!("{:#}", WordNet::open(dir.path()).unwrap_err());
        assert!(e.contains("n00015388") && e.contains("data.noun:"), "{e}");
        // Garbage in a field.
        std::fs::write(
            dir.path().join("data.noun"),
            data.replacen(" 05 n ", " 05 v ", 1),
        )
        .unwrap();
        let e = format!("{:#}", WordNet::open(dir.path()).unwrap_err());
        assert!(e.contains("expected n (noun)"), "{e}");
        // index.noun pointing outside data.noun.
        std::fs::write(dir.path().join("data.noun"), &data).unwrap();
        let mut idx = String::from_utf8(index).unwrap();
        idx.push_str("zzz n 1 0 1 0 99999999  \n");
        std::fs::write(dir.path().join("index.noun"), idx).unwrap();
        let e = format!("{:#}", WordNet::open(dir.path()).unwrap_err());
        assert!(e.contains("index.noun:") && e.contains("n99999999"), "{e}");
    }
}
