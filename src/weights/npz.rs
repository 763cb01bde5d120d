//! Reader for NumPy `.npz` archives (`np.savez`, `np.savez_compressed`) and `.npy` files,
//! such as Google's BiT pretrained weights.
//!
//! Supported element types: little-endian `f8 f4 f2 i8 i4 i2` and the one-byte `i1 u1 b1`
//! (`|`, `=` or no byte-order mark). Big-endian arrays are byte-swapped and
//! `fortran_order` arrays are reordered, so every result is little-endian C order.
//! Object, string, complex, structured and unsigned multi-byte arrays are rejected.

use std::io::{BufReader, Cursor, Read, Seek};
use std::path::Path;

use super::raw::{
    bad, checked_numel, gather_strided, open_zip, read_zip_member, swap_bytes, DType, Problem,
    RawTensor, WeightsError,
};

/// Reads every array of an `.npz` file, in archive order, named without the `.npy` suffix.
pub fn read_npz(path: &Path) -> Result<Vec<(String, RawTensor)>, WeightsError> {
    let file = std::fs::File::open(path).map_err(|e| Problem::Io(e).at(path))?;
    let len = file.metadata().map_err(|e| Problem::Io(e).at(path))?.len();
    npz_from(BufReader::new(file), len).map_err(|p| p.at(path))
}

/// Like [`read_npz`] on bytes already in memory; `origin` only names them in errors.
pub fn read_npz_bytes(
    data: &[u8],
    origin: &Path,
) -> Result<Vec<(String, RawTensor)>, WeightsError> {
    npz_from(Cursor::new(data), data.len() as u64).map_err(|p| p.at(origin))
}

/// Reads a single `.npy` file.
pub fn read_npy(path: &Path) -> Result<RawTensor, WeightsError> {
    let data = std::fs::read(path).map_err(|e| Problem::Io(e).at(path))?;
    parse_npy(data, "the .npy file").map_err(|p| p.at(path))
}

/// Like [`read_npy`] on bytes already in memory; `origin` only names them in errors.
pub fn read_npy_bytes(data: &[u8], origin: &Path) -> Result<RawTensor, WeightsError> {
    parse_npy(data.to_vec(), "the .npy data").map_err(|p| p.at(origin))
}

fn npz_from<R: Read + Seek>(r: R, len: u64) -> Result<Vec<(String, RawTensor)>, Problem> {
    let mut zip = open_zip(r)?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let name = zip.name_for_index(i).unwrap_or_default().to_string();
        if name.ends_with('/') {
            continue; // a directory entry
        }
        let bytes = read_zip_member(&mut zip, i, len, false)?;
        let tensor = parse_npy(bytes, &format!("member '{name}'"))?;
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        out.push((key, tensor));
    }
    Ok(out)
}

/// Parses one `.npy` image (`what` names it in messages), reusing `bytes` for the data.
pub(crate) fn parse_npy(mut bytes: Vec<u8>, what: &str) -> Result<RawTensor, Problem> {
    if bytes.len() < 10 || !bytes.starts_with(b"\x93NUMPY") {
        let msg = if bytes.len() < 10 {
            "truncated"
        } else {
            "bad magic"
        };
        return bad(format!("{what}: not a .npy array ({msg})"));
    }
    let (hlen, start): (usize, usize) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => {
            let n = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (usize::try_from(n).unwrap_or(usize::MAX), 12)
        }
        2 | 3 => return bad(format!("{what}: truncated .npy header")),
        v => {
            return Err(Problem::Unsupported(format!(
                ".npy format version {v} in {what}"
            )))
        }
    };
    let end = start.checked_add(hlen).filter(|&e| e <= bytes.len());
    let Some(end) = end else {
        return bad(format!(
            "{what}: truncated .npy header ({hlen} bytes claimed)"
        ));
    };
    let header = parse_header(&bytes[start..end])
        .map_err(|m| Problem::Malformed(format!("{what}: .npy header: {m}")))?;
    let (dtype, big) = parse_descr(&header.descr, what)?;
    let item = dtype.size_in_bytes();
    let nbytes = checked_numel(&header.shape).and_then(|n| n.checked_mul(item));
    let have = bytes.len() - end;
    if nbytes != Some(have) {
        let claim = nbytes.map_or("more than 2^64".to_string(), |n| n.to_string());
        let kind = if nbytes.is_none_or(|n| n > have) {
            "truncated"
        } else {
            "has trailing bytes"
        };
        return bad(format!(
            "{what}: {kind}: shape {:?} of {} needs {claim} bytes of data, found {have}",
            header.shape, header.descr
        ));
    }
    bytes.drain(..end);
    if big {
        swap_bytes(&mut bytes, item);
    }
    if header.fortran && header.shape.len() > 1 {
        let shape = &header.shape;
        let mut strides = vec![1usize; shape.len()];
        for i in 1..shape.len() {
            strides[i] = strides[i - 1].saturating_mul(shape[i - 1]); // exact unless numel == 0
        }
        bytes = gather_strided(&bytes, item, 0, shape, &strides)
            .ok_or_else(|| Problem::Malformed(format!("{what}: bad fortran-order layout")))?;
    }
    Ok(RawTensor {
        dtype,
        shape: header.shape,
        data: bytes,
    })
}

/// Maps a numpy `descr` to a dtype and whether the data is big-endian.
fn parse_descr(descr: &str, what: &str) -> Result<(DType, bool), Problem> {
    let unsupported = |why: &str| Problem::Unsupported(format!("dtype '{descr}' in {what}{why}"));
    if descr == "|O" || descr == "O" {
        return Err(unsupported(
            " (object arrays need pickle and are never read)",
        ));
    }
    let (order, code) = match descr.as_bytes().first() {
        Some(c @ (b'<' | b'>' | b'|' | b'=')) => (*c, &descr[1..]),
        _ => (b'=', descr),
    };
    let dtype = match code {
        "f8" => DType::F64,
        "f4" => DType::F32,
        "f2" => DType::F16,
        "i8" => DType::I64,
        "i4" => DType::I32,
        "i2" => DType::I16,
        "i1" => DType::I8,
        "u1" => DType::U8,
        "b1" => DType::Bool,
        _ => return Err(unsupported("")),
    };
    match (order, dtype.size_in_bytes()) {
        (_, 1) | (b'<', _) => Ok((dtype, false)),
        (b'>', _) => Ok((dtype, true)),
        _ => Err(unsupported(
            " (byte order not stated for a multi-byte type)",
        )),
    }
}

struct Header {
    descr: String,
    fortran: bool,
    shape: Vec<usize>,
}

/// A value of the Python-literal subset that `.npy` headers use.
enum Lit {
    Str(String),
    Bool(bool),
    Int(usize),
    Seq(Vec<Lit>),
    Dict(Vec<(String, Lit)>),
}

fn parse_header(text: &[u8]) -> Result<Header, String> {
    let mut p = LitParser { s: text, i: 0 };
    let lit = p.value(0)?;
    p.ws();
    if p.i != text.len() {
        return Err("unexpected text after the dictionary".into());
    }
    let Lit::Dict(entries) = lit else {
        return Err("not a dictionary".into());
    };
    let find = |k: &str| entries.iter().find(|(n, _)| n == k).map(|(_, v)| v);
    let descr = match find("descr") {
        Some(Lit::Str(s)) => s.clone(),
        Some(_) => return Err("structured (non-string) 'descr' is not supported".into()),
        None => return Err("no 'descr'".into()),
    };
    let Some(Lit::Bool(fortran)) = find("fortran_order") else {
        return Err("no boolean 'fortran_order'".into());
    };
    let Some(Lit::Seq(dims)) = find("shape") else {
        return Err("no 'shape' tuple".into());
    };
    let mut shape = Vec::with_capacity(dims.len());
    for d in dims {
        let Lit::Int(d) = d else {
            return Err("'shape' holds a non-integer".into());
        };
        shape.push(*d);
    }
    Ok(Header {
        descr,
        fortran: *fortran,
        shape,
    })
}

struct LitParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl LitParser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<Lit, String> {
        if depth > 8 {
            return Err("nested too deeply".into());
        }
        self.ws();
        let c = *self.s.get(self.i).ok_or("unexpected end")?;
        match c {
            b'{' | b'(' | b'[' => {
                self.i += 1;
                let close = match c {
                    b'{' => b'}',
                    b'(' => b')',
                    _ => b']',
                };
                let (mut seq, mut dict) = (Vec::new(), Vec::new());
                loop {
                    self.ws();
                    if self.s.get(self.i) == Some(&close) {
                        self.i += 1;
                        return Ok(if c == b'{' {
                            Lit::Dict(dict)
                        } else {
                            Lit::Seq(seq)
                        });
                    }
                    let v = self.value(depth + 1)?;
                    if c == b'{' {
                        let Lit::Str(k) = v else {
                            return Err("non-string key".into());
                        };
                        self.ws();
                        if self.s.get(self.i) != Some(&b':') {
                            return Err("expected ':'".into());
                        }
                        self.i += 1;
                        dict.push((k, self.value(depth + 1)?));
                    } else {
                        seq.push(v);
                    }
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(&x) if x == close => {}
                        None => return Err("unexpected end".into()),
                        _ => return Err("expected ',' or a closing bracket".into()),
                    }
                }
            }
            b'\'' | b'"' => {
                self.i += 1;
                let start = self.i;
                while *self.s.get(self.i).ok_or("unterminated string")? != c {
                    if self.s[self.i] == b'\\' {
                        return Err("escapes in strings are not supported".into());
                    }
                    self.i += 1;
                }
                let text = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.i += 1;
                Ok(Lit::Str(text))
            }
            b'0'..=b'9' => {
                let mut n: usize = 0;
                while let Some(d @ b'0'..=b'9') = self.s.get(self.i) {
                    n = n
                        .checked_mul(10)
                        .and_then(|n| n.checked_add(usize::from(d - b'0')))
                        .ok_or("dimension too large")?;
                    self.i += 1;
                }
                if self.s.get(self.i) == Some(&b'L') {
                    self.i += 1; // Python 2 long suffix
                }
                Ok(Lit::Int(n))
            }
            _ => {
                let rest = &self.s[self.i..];
                for (word, lit) in [("True", true), ("False", false)] {
                    if rest.starts_with(word.as_bytes()) {
                        self.i += word.len();
                        return Ok(Lit::Bool(lit));
                    }
                }
                Err(format!(
                    "unexpected character '{}'",
                    char::from(c).escape_default()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::raw::test_util::{check_tensor, expected, fixture, zip_of, Rng};
    use super::*;

    fn read(name: &str) -> Vec<(String, RawTensor)> {
        read_npz(&fixture(name)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A version-1 `.npy` image with the given header dict.
    fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut h = dict.as_bytes().to_vec();
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(b' ');
        }
        h.push(b'\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend(h);
        out.extend_from_slice(data);
        out
    }

    fn one(dict: &str, data: &[u8]) -> Result<RawTensor, Problem> {
        parse_npy(npy(dict, data), "test")
    }

    /// Invariant every successful parse must satisfy.
    fn consistent(t: &RawTensor) {
        assert_eq!(t.data.len(), t.numel() * t.dtype.size_in_bytes());
    }

    #[test]
    fn stored_and_compressed_match_numpy() {
        let exp = expected();
        let records = exp.get("npz").arr();
        for file in ["bit_stored.npz", "bit_compressed.npz"] {
            let got = read(file);
            let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
            let want: Vec<&str> = records.iter().map(|r| r.get("name").str()).collect();
            assert_eq!(names, want, "{file}: names in archive order");
            for ((name, t), rec) in got.iter().zip(records) {
                consistent(t);
                check_tensor(&format!("{file}:{name}"), t, rec);
            }
        }
    }

    #[test]
    fn layout_conversions() {
        let got = read("bit_stored.npz");
        let find = |n: &str| &got.iter().find(|(k, _)| k == n).expect(n).1;
        let f = find("extra/fortran").to_f32_vec().expect("f32");
        assert_eq!(f, (0..24).map(|x| x as f32).collect::<Vec<_>>());
        assert_eq!(
            find("extra/big_endian").to_f32_vec().expect("f32")[..3],
            [1.5, -2.0, 3.0]
        );
        assert_eq!(find("extra/scalar").shape, Vec::<usize>::new());
        assert_eq!(find("extra/empty").shape, vec![0, 3]);
        assert_eq!(find("extra/bool").to_i64_vec(), Some(vec![1, 0, 1]));
    }

    #[test]
    fn header_variants() {
        let t = one(
            "{'descr': '<i4', 'fortran_order': True, 'shape': (2, 3), }",
            &[
                0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 2, 0, 0, 0, 5, 0, 0, 0,
            ],
        )
        .expect("fortran i4");
        assert_eq!(t.to_i64_vec(), Some(vec![0, 1, 2, 3, 4, 5]));
        let t = one(
            "{\"shape\": [2], \"descr\": \">i2\", \"fortran_order\": False}",
            &[1, 2, 0xff, 0xfe],
        )
        .expect("big i2");
        assert_eq!(t.to_i64_vec(), Some(vec![258, -2]));
        let empty = "{'descr': '<f4', 'fortran_order': True, 'shape': (4294967296, 4294967296, 0)}";
        assert_eq!(one(empty, &[]).expect("empty fortran").data.len(), 0);
        for d in ["|u1", "u1", "=u1", ">u1"] {
            let t = one(
                &format!("{{'descr': '{d}', 'fortran_order': False, 'shape': (1L,)}}"),
                &[7],
            )
            .expect(d);
            assert_eq!(t.dtype, DType::U8);
        }
        // Versions 2 and 3 have a 4-byte header length.
        for v in [2u8, 3] {
            let mut b = npy(
                "{'descr': '<f2', 'fortran_order': False, 'shape': ()}",
                &[0, 0x3c],
            );
            b[6] = v;
            let hlen = u16::from_le_bytes([b[8], b[9]]);
            b.splice(8..10, u32::from(hlen).to_le_bytes());
            let t = parse_npy(b, "v").expect("v2/v3");
            assert_eq!(t.to_f32_vec(), Some(vec![1.0]));
        }
    }

    #[test]
    fn bad_headers_are_errors() {
        let cases: &[(&str, &[u8], &str)] = &[
            ("{'descr': '|O', 'fortran_order': False, 'shape': (1,)}", &[0; 8], "'|O'"),
            ("{'descr': '<c8', 'fortran_order': False, 'shape': (1,)}", &[0; 8], "'<c8'"),
            ("{'descr': '=f4', 'fortran_order': False, 'shape': (1,)}", &[0; 4], "'=f4'"),
            ("{'descr': '<u4', 'fortran_order': False, 'shape': (1,)}", &[0; 4], "'<u4'"),
            ("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}", &[0; 4], "structured"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2)}", &[0; 4], "truncated"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}", &[0; 5], "trailing"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4611686018427387904)}", &[0; 4], "truncated"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,)}", &[], "too large"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}", &[], "unexpected character"),
            ("{'descr': '<f4', 'shape': (1,)}", &[0; 4], "fortran_order"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': ((((((((((1,),),),),),),),),),)}", &[0; 4], "deeply"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)", &[0; 4], "unexpected end"),
            ("{'descr': '<f\\x34', 'fortran_order': False, 'shape': (1,)}", &[0; 4], "escapes"),
            ("['descr']", &[], "not a dictionary"),
        ];
        for (dict, data, needle) in cases {
            let err = match one(dict, data) {
                Ok(t) => panic!("{dict}: parsed as {t:?}"),
                Err(p) => p.at(Path::new("w.npz")).to_string(),
            };
            assert!(
                err.contains(needle) && err.contains("w.npz"),
                "{dict}: {err}"
            );
        }
        for short in [
            &b""[..],
            b"\x93NUMPY",
            b"\x93NUMPY\x01\x00\xff\xff{",
            b"\x93NUMPY\x02\x00\x01",
            b"PK\x03\x04 nope",
        ] {
            assert!(parse_npy(short.to_vec(), "s").is_err());
        }
        assert!(matches!(
            parse_npy(b"\x93NUMPY\x09\x00\x00\x00".to_vec(), "s"),
            Err(Problem::Unsupported(_))
        ));
    }

    #[test]
    fn crafted_archives() {
        let a = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)}",
            &[0, 0, 0x80, 0x3f, 0, 0, 0, 0x40],
        );
        let zip = zip_of(&[
            ("x.npy", &a, false),
            ("dir/", b"", false),
            ("y/z.npy", &a, true),
        ]);
        let got = read_npz_bytes(&zip, Path::new("mem.npz")).expect("crafted");
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x", "y/z"]);
        assert_eq!(got[1].1.to_f32_vec(), Some(vec![1.0, 2.0]));
        let zip = zip_of(&[("x.npy", b"not an array at all", false)]);
        let err = read_npz_bytes(&zip, Path::new("mem.npz"))
            .expect_err("not npy")
            .to_string();
        assert!(
            err.contains("member 'x.npy'") && err.contains("mem.npz"),
            "{err}"
        );
    }

    #[test]
    fn io_and_empty_errors_name_the_file() {
        let missing = fixture("no-such-file.npz");
        let err = read_npz(&missing).expect_err("missing").to_string();
        assert!(err.contains("no-such-file.npz"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.npz");
        std::fs::write(&empty, b"").expect("write");
        let err = read_npz(&empty).expect_err("empty").to_string();
        assert!(err.contains("empty.npz") && err.contains("zip"), "{err}");
        assert!(read_npy(&empty).is_err());
    }

    #[test]
    fn every_prefix_is_an_error() {
        for file in ["bit_stored.npz", "bit_compressed.npz"] {
            let full = std::fs::read(fixture(file)).expect("fixture");
            for n in 0..full.len() {
                assert!(
                    read_npz_bytes(&full[..n], Path::new(file)).is_err(),
                    "{file}: prefix {n} parsed"
                );
            }
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for len in [1usize, 4, 22, 100, 4096] {
            let junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            assert!(read_npz_bytes(&junk, Path::new("junk")).is_err());
            assert!(parse_npy(junk, "junk").is_err());
        }
        let mut errors = 0;
        for file in ["bit_stored.npz", "bit_compressed.npz"] {
            let full = std::fs::read(fixture(file)).expect("fixture");
            for _ in 0..2000 {
                let mut b = full.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(b.len());
                    match rng.below(3) {
                        0 => b[at] ^= 1 << rng.below(8),
                        1 => b[at] = rng.next() as u8,
                        _ => b[at] = [0, 0xff, b'0', b'(', b','][rng.below(5)],
                    }
                }
                match read_npz_bytes(&b, Path::new(file)) {
                    Ok(ts) => ts.iter().for_each(|(_, t)| consistent(t)),
                    Err(_) => errors += 1,
                }
            }
        }
        assert!(
            errors > 1000,
            "only {errors} mutated archives were rejected"
        );
        // Mutations focused on the .npy header, without the zip's CRC in the way.
        let base = npy(
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3, 1), }",
            &[1; 24],
        );
        for _ in 0..20000 {
            let mut b = base.clone();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(b.len());
                b[at] = match rng.below(3) {
                    0 => b[at] ^ (1 << rng.below(8)),
                    1 => rng.next() as u8,
                    _ => b"'(),:{}0123456789 TF<|>"[rng.below(23)],
                };
            }
            if let Ok(t) = parse_npy(b, "fuzz") {
                consistent(&t);
            }
        }
    }
}
