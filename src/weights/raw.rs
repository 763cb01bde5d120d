//! Plain in-memory tensors read from weight files, and the error type of the readers.
//!
//! A [`RawTensor`] is a dtype, a shape and little-endian, C-contiguous bytes: exactly
//! what the `.npz` and `torch.save` readers produce, independent of libtorch.

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

/// Element type of a [`RawTensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 64-bit IEEE float.
    F64,
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float (half).
    F16,
    /// bfloat16 (the upper half of an f32).
    BF16,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 16-bit signed integer.
    I16,
    /// 8-bit signed integer.
    I8,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean, one byte per element.
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Short lowercase name (`"f32"`, `"bf16"`, `"bool"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I16 => "i16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }

    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A dense tensor: `data` holds `numel() * dtype.size_in_bytes()` bytes,
/// little-endian, in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Element type.
    pub dtype: DType,
    /// Dimensions; empty for a 0-d scalar.
    pub shape: Vec<usize>,
    /// Element bytes, little-endian, C order.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Number of elements (1 for a 0-d tensor; saturates instead of overflowing).
    pub fn numel(&self) -> usize {
        checked_numel(&self.shape).unwrap_or(usize::MAX)
    }

    /// The values as f32, converted exactly as a cast would (`F64` rounds to nearest),
    /// or `None` if the dtype is not a float type.
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        let d = &self.data;
        let v = match self.dtype {
            DType::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F64 => d
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            DType::F16 => d
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            DType::BF16 => d
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                .collect(),
            _ => return None,
        };
        Some(v)
    }

    /// The values as i64 for the integer and bool dtypes, or `None` for float dtypes.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        let d = &self.data;
        let v = match self.dtype {
            DType::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            DType::I32 => d
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            DType::I16 => d
                .chunks_exact(2)
                .map(|c| i64::from(i16::from_le_bytes([c[0], c[1]])))
                .collect(),
            DType::I8 => d.iter().map(|&b| i64::from(b as i8)).collect(),
            DType::U8 => d.iter().map(|&b| i64::from(b)).collect(),
            DType::Bool => d.iter().map(|&b| i64::from(b != 0)).collect(),
            _ => return None,
        };
        Some(v)
    }
}

/// Number of elements of `shape`: 0 if any dimension is 0 (even if the others would
/// overflow), `None` if the product overflows.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Exact IEEE half -> single conversion.
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = man * 2^-24, exactly representable in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000); // 2^-24
            return if sign != 0 { -v } else { v };
        }
        (0x1f, _) => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// Error of the weight-file readers. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file could not be opened or read.
    #[error("cannot read weight file '{path}'")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is damaged, truncated or not of the expected kind.
    #[error("weight file '{path}' is malformed: {detail}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong (names the archive member where there is one).
        detail: String,
    },
    /// The file is well formed but uses something this reader does not support.
    #[error("weight file '{path}': unsupported {detail}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is unsupported, e.g. `dtype '<c8' in member 'x.npy'`.
        detail: String,
    },
    /// The pickle names a global outside the allow-list; nothing was executed.
    #[error(
        "weight file '{path}': disallowed pickle global '{global}' (only the classes a \
         tensor checkpoint needs are allowed; nothing from the file is executed)"
    )]
    DisallowedGlobal {
        /// The file.
        path: PathBuf,
        /// `module.name` of the global.
        global: String,
    },
}

/// A reader-internal failure, turned into a [`WeightsError`] once the path is known.
#[derive(Debug)]
pub(crate) enum Problem {
    Malformed(String),
    Unsupported(String),
    Global(String),
    Io(std::io::Error),
}

impl Problem {
    /// Attaches the file path.
    pub(crate) fn at(self, path: &Path) -> WeightsError {
        let path = path.to_path_buf();
        match self {
            Problem::Malformed(detail) => WeightsError::Malformed { path, detail },
            Problem::Unsupported(detail) => WeightsError::Unsupported { path, detail },
            Problem::Global(global) => WeightsError::DisallowedGlobal { path, global },
            Problem::Io(source) => WeightsError::Io { path, source },
        }
    }
}

/// Shorthand for a [`Problem::Malformed`].
pub(crate) fn bad<T>(msg: impl Into<String>) -> Result<T, Problem> {
    Err(Problem::Malformed(msg.into()))
}

/// Opens a zip archive, mapping failures to a [`Problem`].
pub(crate) fn open_zip<R: Read + Seek>(r: R) -> Result<zip::ZipArchive<R>, Problem> {
    zip::ZipArchive::new(r).map_err(|e| {
        Problem::Malformed(format!(
            "not a valid zip archive (truncated or corrupt?): {e}"
        ))
    })
}

/// Reads member `index` of a zip fully, never trusting its declared size for allocation
/// beyond what a valid member of this archive could hold. When `allow_no_crc` is set, a
/// stored member whose recorded CRC is 0 is read without the CRC check (torch.save with
/// `set_crc32_options(False)` writes such members).
pub(crate) fn read_zip_member<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    index: usize,
    archive_len: u64,
    allow_no_crc: bool,
) -> Result<Vec<u8>, Problem> {
    let zerr = |name: &str, e: &dyn std::fmt::Display| {
        Problem::Malformed(format!("member '{name}': {e} (truncated or corrupt?)"))
    };
    let (name, size, stored, no_crc) = {
        let f = zip.by_index_raw(index).map_err(|e| zerr("?", &e))?;
        let stored = f.compression() == zip::CompressionMethod::Stored;
        (f.name().to_string(), f.size(), stored, f.crc32() == 0)
    };
    // A stored member cannot exceed the archive; deflate expands at most ~1032:1.
    let limit = if stored {
        archive_len
    } else {
        archive_len.saturating_mul(1100).saturating_add(1024)
    };
    if size > limit {
        return bad(format!(
            "member '{name}' claims {size} bytes, more than the archive can hold"
        ));
    }
    let cap = usize::try_from(size.min(archive_len))
        .map_err(|_| Problem::Malformed(format!("member '{name}' is too large")))?;
    let mut buf = Vec::with_capacity(cap);
    let res = if allow_no_crc && stored && no_crc && size > 0 {
        let f = zip.by_index_raw(index).map_err(|e| zerr(&name, &e))?;
        f.take(size.saturating_add(1)).read_to_end(&mut buf)
    } else {
        let f = zip.by_index(index).map_err(|e| zerr(&name, &e))?;
        f.take(size.saturating_add(1)).read_to_end(&mut buf)
    };
    res.map_err(|e| zerr(&name, &e))?;
    if buf.len() as u64 != size {
        return bad(format!(
            "member '{name}' is truncated or corrupt: declared {size} bytes, found {}",
            buf.len()
        ));
    }
    Ok(buf)
}

/// Copies the elements of a strided view of `src` (element size `item`, offsets and
/// strides in elements) into a new C-contiguous buffer. The caller must have checked
/// that every addressed element lies inside `src`; this function re-checks and returns
/// `None` rather than panicking if one does not.
pub(crate) fn gather_strided(
    src: &[u8],
    item: usize,
    offset: usize,
    shape: &[usize],
    strides: &[usize],
) -> Option<Vec<u8>> {
    let numel = checked_numel(shape)?;
    if numel == 0 {
        return Some(Vec::new());
    }
    let total = numel.checked_mul(item)?;
    let mut c_strides = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        c_strides[i] = c_strides[i + 1].checked_mul(shape[i + 1])?;
    }
    let contiguous = (0..shape.len()).all(|i| shape[i] == 1 || strides[i] == c_strides[i]);
    if contiguous {
        let start = offset.checked_mul(item)?;
        return src
            .get(start..start.checked_add(total)?)
            .map(<[u8]>::to_vec);
    }
    let mut out = Vec::with_capacity(total);
    let mut idx = vec![0usize; shape.len()];
    let mut pos = offset;
    loop {
        let b = pos.checked_mul(item)?;
        out.extend_from_slice(src.get(b..b.checked_add(item)?)?);
        // Advance the multi-index (last axis fastest), keeping `pos` in step.
        let mut ax = shape.len();
        loop {
            if ax == 0 {
                return Some(out);
            }
            ax -= 1;
            idx[ax] += 1;
            pos = pos.checked_add(strides[ax])?;
            if idx[ax] < shape[ax] {
                break;
            }
            pos -= strides[ax] * shape[ax];
            idx[ax] = 0;
        }
    }
}

/// Reverses the byte order of every `item`-byte element in place.
pub(crate) fn swap_bytes(data: &mut [u8], item: usize) {
    if item > 1 {
        data.chunks_exact_mut(item).for_each(<[u8]>::reverse);
    }
}

/// Helpers shared by the reader tests: fixture paths, a tiny JSON reader for
/// `expected.json`, and a deterministic pseudo-random generator.
#[cfg(test)]
pub(crate) mod test_util {
    /// Path of a file in `tests/fixtures/interop/`.
    pub(crate) fn fixture(name: &str) -> std::path::PathBuf {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/interop");
        std::path::Path::new(dir).join(name)
    }

    /// xorshift64* generator.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Minimal JSON value; numbers keep their text.
    #[derive(Debug, Clone)]
    pub(crate) enum Json {
        Null,
        True,
        False,
        Num(String),
        Str(String),
        Arr(Vec<Json>),
        Obj(Vec<(String, Json)>),
    }

    impl Json {
        pub(crate) fn get(&self, k: &str) -> &Json {
            match self {
                Json::Obj(m) => m.iter().find(|(a, _)| a == k).map(|(_, v)| v),
                _ => None,
            }
            .unwrap_or_else(|| panic!("expected.json: no key {k}"))
        }
        pub(crate) fn arr(&self) -> &[Json] {
            match self {
                Json::Arr(v) => v,
                _ => panic!("expected.json: not an array"),
            }
        }
        pub(crate) fn str(&self) -> &str {
            match self {
                Json::Str(s) => s,
                _ => panic!("expected.json: not a string"),
            }
        }
        pub(crate) fn f64(&self) -> f64 {
            match self {
                Json::Num(s) => s.parse().expect("number"),
                _ => panic!("expected.json: not a number"),
            }
        }
        pub(crate) fn i64(&self) -> i64 {
            match self {
                Json::Num(s) => s.parse().expect("integer"),
                _ => panic!("expected.json: not an integer"),
            }
        }
    }

    /// Parses a JSON document (test fixtures only; panics on bad input).
    pub(crate) fn parse_json(text: &str) -> Json {
        let b = text.as_bytes();
        let mut i = 0;
        let v = value(b, &mut i);
        skip_ws(b, &mut i);
        assert_eq!(i, b.len(), "trailing JSON");
        v
    }

    fn skip_ws(b: &[u8], i: &mut usize) {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    }

    fn value(b: &[u8], i: &mut usize) -> Json {
        skip_ws(b, i);
        match b[*i] {
            b'{' | b'[' => {
                let obj = b[*i] == b'{';
                *i += 1;
                let (mut o, mut a) = (Vec::new(), Vec::new());
                loop {
                    skip_ws(b, i);
                    if b[*i] == b'}' || b[*i] == b']' {
                        *i += 1;
                        return if obj { Json::Obj(o) } else { Json::Arr(a) };
                    }
                    if b[*i] == b',' {
                        *i += 1;
                        continue;
                    }
                    if obj {
                        let Json::Str(k) = value(b, i) else {
                            panic!("key")
                        };
                        skip_ws(b, i);
                        assert_eq!(b[*i], b':');
                        *i += 1;
                        o.push((k, value(b, i)));
                    } else {
                        a.push(value(b, i));
                    }
                }
            }
            b'"' => {
                *i += 1;
                let mut s = String::new();
                while b[*i] != b'"' {
                    if b[*i] == b'\\' {
                        *i += 1;
                        match b[*i] {
                            b'n' => s.push('\n'),
                            b'u' => {
                                let h = std::str::from_utf8(&b[*i + 1..*i + 5]).expect("hex");
                                let c = u32::from_str_radix(h, 16).expect("hex");
                                s.push(char::from_u32(c).expect("char"));
                                *i += 4;
                            }
                            c => s.push(c as char),
                        }
                        *i += 1;
                    } else {
                        let start = *i;
                        while b[*i] != b'"' && b[*i] != b'\\' {
                            *i += 1;
                        }
                        s.push_str(std::str::from_utf8(&b[start..*i]).expect("utf8"));
                    }
                }
                *i += 1;
                Json::Str(s)
            }
            b't' | b'f' | b'n' => {
                let word = [&b"true"[..], b"false", b"null"]
                    .into_iter()
                    .find(|w| b[*i..].starts_with(w))
                    .expect("literal");
                *i += word.len();
                match word[0] {
                    b't' => Json::True,
                    b'f' => Json::False,
                    _ => Json::Null,
                }
            }
            _ => {
                let start = *i;
                while *i < b.len()
                    && matches!(b[*i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    *i += 1;
                }
                Json::Num(String::from_utf8_lossy(&b[start..*i]).into_owned())
            }
        }
    }

    /// An in-memory zip of `(name, bytes, deflate)` members.
    pub(crate) fn zip_of(members: &[(&str, &[u8], bool)]) -> Vec<u8> {
        use std::io::Write;
        use zip::write::SimpleFileOptions;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, bytes, deflate) in members {
            let method = if *deflate {
                zip::CompressionMethod::Deflated
            } else {
                zip::CompressionMethod::Stored
            };
            let opts = SimpleFileOptions::default().compression_method(method);
            if name.ends_with('/') {
                w.add_directory(*name, opts).expect("zip dir");
            } else {
                w.start_file(*name, opts).expect("zip start");
                w.write_all(bytes).expect("zip write");
            }
        }
        w.finish().expect("zip finish").into_inner()
    }

    /// The values as f64 (exact for every dtype except i64 beyond 2^53).
    pub(crate) fn values_f64(t: &super::RawTensor) -> Vec<f64> {
        if t.dtype == super::DType::F64 {
            return t
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
        }
        match t.to_f32_vec() {
            Some(v) => v.into_iter().map(f64::from).collect(),
            None => t
                .to_i64_vec()
                .expect("ints")
                .into_iter()
                .map(|i| i as f64)
                .collect(),
        }
    }

    /// Compares a tensor with its `expected.json` record (dtype, shape, first values, sum).
    pub(crate) fn check_tensor(what: &str, t: &super::RawTensor, rec: &Json) {
        assert_eq!(t.dtype.name(), rec.get("dtype").str(), "{what}: dtype");
        let shape: Vec<usize> = rec
            .get("shape")
            .arr()
            .iter()
            .map(|d| d.i64() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{what}: shape");
        assert_eq!(
            t.data.len(),
            t.numel() * t.dtype.size_in_bytes(),
            "{what}: size"
        );
        let first = rec.get("first").arr();
        if t.dtype.is_float() {
            let v = values_f64(t);
            for (i, e) in first.iter().enumerate() {
                assert_eq!(v[i], e.f64(), "{what}: value {i}");
            }
        } else {
            let v = t.to_i64_vec().expect("ints");
            for (i, e) in first.iter().enumerate() {
                assert_eq!(v[i], e.i64(), "{what}: value {i}");
            }
        }
        let sum: f64 = values_f64(t).iter().sum();
        let want = rec.get("sum").f64();
        assert!(
            (sum - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{what}: sum {sum} vs {want}"
        );
    }

    /// Reads `expected.json`.
    pub(crate) fn expected() -> Json {
        let text = std::fs::read_to_string(fixture("expected.json")).expect("expected.json");
        parse_json(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x8000).to_bits(), 0x8000_0000);
    }

    #[test]
    fn gather_transposes() {
        // 2x3 matrix 0..6 (u8); view its transpose (3x2, strides (1, 3)).
        let src: Vec<u8> = (0..6).collect();
        let out = gather_strided(&src, 1, 0, &[3, 2], &[1, 3]);
        assert_eq!(out, Some(vec![0, 3, 1, 4, 2, 5]));
        assert_eq!(gather_strided(&src, 1, 1, &[3, 2], &[1, 3]), None);
        assert_eq!(
            gather_strided(&src, 2, 0, &[3], &[1]),
            Some(vec![0, 1, 2, 3, 4, 5])
        );
    }
}
