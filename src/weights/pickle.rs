//! Reader for PyTorch `torch.save` checkpoints, built on a small pickle virtual machine
//! that never executes anything. Both formats are read, to the same [`PyValue`]:
//!
//! - the zip format (torch >= 1.6, e.g. the paper's `bit.pth.tar`): a zip holding
//!   `<prefix>/data.pkl` (the pickled object), `<prefix>/data/<key>` (raw storage bytes),
//!   `<prefix>/byteorder` (absent = little) and `<prefix>/version`;
//! - the legacy format (torch < 1.6, or `_use_new_zipfile_serialization=False`, e.g.
//!   torchvision's `resnet50-19c8e357.pth`): one file holding a sequence of pickles (the
//!   magic number 0x1950a86a20f9469cfc6c, the format version 1001, a `sys_info` dict, the
//!   object, the list of storage keys), then for each key an 8-byte little-endian element
//!   count and the storage's bytes.
//!
//! The pickle may only name the globals a tensor checkpoint needs
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_tensor`
//! (torch < 0.4), `torch._utils._rebuild_parameter` and the typed `torch.*Storage` classes);
//! anything else is refused with [`WeightsError::DisallowedGlobal`]. Sets become
//! [`PyValue::List`].
//!
//! Hostile input is bounded: opcodes are interpreted without recursion, every length is
//! checked against the bytes present, tensor views are bounds-checked against their
//! storage, and materializing the result is limited in nesting depth, node count
//! (8 per pickle byte) and bytes (4x the file plus 16 MiB), so shared references cannot
//! blow up into huge copies.

use std::collections::HashMap;
use std::io::{BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::Path;
use std::rc::Rc;

use super::raw::{
    bad, checked_numel, gather_strided, open_zip, read_zip_member, swap_bytes, DType, Problem,
    RawTensor, WeightsError,
};

/// A value read from a pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An int that fits in 64 bits (larger ones are rejected).
    Int(i64),
    /// A float.
    Float(f64),
    /// A str.
    Str(String),
    /// bytes or bytearray.
    Bytes(Vec<u8>),
    /// A list (also used for sets).
    List(Vec<PyValue>),
    /// A tuple.
    Tuple(Vec<PyValue>),
    /// A dict or OrderedDict, in insertion order.
    Dict(Vec<(PyValue, PyValue)>),
    /// A tensor (or nn.Parameter), gathered into C order.
    Tensor(RawTensor),
}

impl PyValue {
    /// For a dict, the value of string key `key`.
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        self.as_dict()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }
    /// The int, if this is one (bools are not ints here).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            PyValue::Int(i) => Some(*i),
            _ => None,
        }
    }
    /// The number as f64, if this is a float or an int.
    pub fn as_float(&self) -> Option<f64> {
        match self {
            PyValue::Float(f) => Some(*f),
            PyValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    /// The bool, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            PyValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            PyValue::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The items of a list or tuple.
    pub fn as_list(&self) -> Option<&[PyValue]> {
        match self {
            PyValue::List(v) | PyValue::Tuple(v) => Some(v),
            _ => None,
        }
    }
    /// The entries of a dict.
    pub fn as_dict(&self) -> Option<&[(PyValue, PyValue)]> {
        match self {
            PyValue::Dict(d) => Some(d),
            _ => None,
        }
    }
    /// The tensor, if this is one.
    pub fn as_tensor(&self) -> Option<&RawTensor> {
        match self {
            PyValue::Tensor(t) => Some(t),
            _ => None,
        }
    }
    /// Python-style name of the variant, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            PyValue::None => "None",
            PyValue::Bool(_) => "bool",
            PyValue::Int(_) => "int",
            PyValue::Float(_) => "float",
            PyValue::Str(_) => "str",
            PyValue::Bytes(_) => "bytes",
            PyValue::List(_) => "list",
            PyValue::Tuple(_) => "tuple",
            PyValue::Dict(_) => "dict",
            PyValue::Tensor(_) => "tensor",
        }
    }
    /// Every tensor below this value with its path: dict keys (str or int) and list
    /// indices joined by `/`, e.g. `model/module.head.conv.weight`.
    pub fn tensors(&self) -> Vec<(String, &RawTensor)> {
        let mut out = Vec::new();
        let mut todo = vec![(String::new(), self)];
        while let Some((path, v)) = todo.pop() {
            let join = |k: String| {
                if path.is_empty() {
                    k
                } else {
                    format!("{path}/{k}")
                }
            };
            match v {
                PyValue::Tensor(t) => out.push((path, t)),
                PyValue::List(items) | PyValue::Tuple(items) => {
                    todo.extend(
                        items
                            .iter()
                            .enumerate()
                            .rev()
                            .map(|(i, x)| (join(i.to_string()), x)),
                    );
                }
                PyValue::Dict(d) => todo.extend(d.iter().rev().filter_map(|(k, x)| {
                    let key = match k {
                        PyValue::Str(s) => s.clone(),
                        PyValue::Int(i) => i.to_string(),
                        _ => return None,
                    };
                    Some((join(key), x))
                })),
                _ => {}
            }
        }
        out
    }
}

/// Bound on the bytes (tensors, strings) a pickle read from `len` bytes may expand to.
fn output_budget(len: u64) -> usize {
    usize::try_from(len.saturating_mul(4).saturating_add(16 << 20)).unwrap_or(usize::MAX)
}

/// Reads a `torch.save` checkpoint (zip or legacy format). Tensors come back as
/// [`PyValue::Tensor`].
pub fn read_torch_checkpoint(path: &Path) -> Result<PyValue, WeightsError> {
    let io = |e| Problem::Io(e).at(path);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut head = Vec::with_capacity(32);
    (&mut file).take(32).read_to_end(&mut head).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    checkpoint_from(BufReader::new(file), len, &head).map_err(|p| p.at(path))
}

/// Like [`read_torch_checkpoint`] on bytes in memory; `origin` only names them in errors.
pub fn read_torch_checkpoint_bytes(data: &[u8], origin: &Path) -> Result<PyValue, WeightsError> {
    checkpoint_from(Cursor::new(data), data.len() as u64, data).map_err(|p| p.at(origin))
}

/// Reads a plain pickle (no persistent ids, so no tensors), e.g. written by `pickle.dump`.
pub fn read_pickle_bytes(data: &[u8], origin: &Path) -> Result<PyValue, WeightsError> {
    let mut vm = Vm::new(data);
    vm.run(&mut Storages::Forbidden)
        .and_then(|top| vm.value(&top, output_budget(data.len() as u64), false))
        .map_err(|p| p.at(origin))
}

fn checkpoint_from<R: Read + Seek>(mut r: R, len: u64, head: &[u8]) -> Result<PyValue, Problem> {
    if is_legacy_torch(head) {
        // The storages follow the pickle that refers to them, so read it all (the zip
        // format holds its members in memory too).
        let mut data = Vec::new();
        r.read_to_end(&mut data).map_err(Problem::Io)?;
        return legacy_from(&data);
    }
    if head.first() == Some(&0x80) {
        return bad(
            "a raw pickle without torch.save's magic number: not a torch.save file (nor one \
             of torch < 1.6), or cut short",
        );
    }
    if !head.starts_with(b"PK") {
        return bad("not a torch.save zip archive (no zip signature)");
    }
    let mut zip = open_zip(r)?;
    let pkl_name = zip
        .file_names()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.len())
        .map(str::to_string)
        .ok_or_else(|| {
            Problem::Malformed("no '<prefix>/data.pkl' member: not a torch.save checkpoint".into())
        })?;
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    let member = |zip: &mut zip::ZipArchive<R>, name: &str| -> Result<Option<Vec<u8>>, Problem> {
        match zip.index_for_name(name) {
            Some(i) => read_zip_member(zip, i, len, true).map(Some),
            None => Ok(None),
        }
    };
    let big_endian = match member(&mut zip, &format!("{prefix}byteorder"))? {
        None => false,
        Some(b) => match String::from_utf8_lossy(&b).trim() {
            "little" => false,
            "big" => true,
            other => {
                return bad(format!(
                    "byteorder member says '{}'",
                    other.escape_default()
                ))
            }
        },
    };
    let pkl = member(&mut zip, &pkl_name)?.unwrap_or_default();
    let mut cache: HashMap<String, Rc<Vec<u8>>> = HashMap::new();
    let mut load = |key: &str| -> Result<Rc<Vec<u8>>, Problem> {
        if let Some(b) = cache.get(key) {
            return Ok(Rc::clone(b));
        }
        let name = format!("{prefix}data/{key}");
        let b = member(&mut zip, &name)?
            .ok_or_else(|| Problem::Malformed(format!("storage member '{name}' is missing")))?;
        let b = Rc::new(b);
        cache.insert(key.to_string(), Rc::clone(&b));
        Ok(b)
    };
    unpickle(&pkl, output_budget(len), &mut load, big_endian).map_err(|p| match p {
        Problem::Malformed(m) => Problem::Malformed(format!("{pkl_name}: {m}")),
        other => other,
    })
}

/// torch.save's magic number 0x1950a86a20f9469cfc6c, the legacy format's first pickle, as
/// protocol >= 2 writes it (LONG1, little-endian) ...
const MAGIC_LONG1: &[u8] = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";
/// ... and as protocols 0 and 1 write it (text LONG).
const MAGIC_TEXT: &[u8] = b"L119547037146038801333356L\n.";
/// The legacy format's version (torch's `PROTOCOL_VERSION`).
const LEGACY_VERSION: i64 = 1001;

/// Where the magic-number pickle that opens a legacy torch.save file ends, if `data`
/// starts with one.
fn legacy_magic_end(data: &[u8]) -> Option<usize> {
    if data.starts_with(MAGIC_TEXT) {
        return Some(MAGIC_TEXT.len());
    }
    let mut at = 0;
    if data.first() == Some(&0x80) {
        at += 2; // PROTO n
        if data.get(at) == Some(&0x95) {
            at += 9; // FRAME (protocol >= 4)
        }
    }
    let end = at + MAGIC_LONG1.len();
    (data.get(at..end) == Some(MAGIC_LONG1)).then_some(end)
}

/// Whether a file starting with `head` (its first 32 bytes suffice) is in torch.save's
/// legacy format.
pub fn is_legacy_torch(head: &[u8]) -> bool {
    legacy_magic_end(head).is_some()
}

/// Prefixes a [`Problem::Malformed`] with the part of the file it concerns.
fn within(part: &str) -> impl Fn(Problem) -> Problem + '_ {
    move |p| match p {
        Problem::Malformed(m) => Problem::Malformed(format!("{part}: {m}")),
        other => other,
    }
}

/// A short description of `v` for messages: the value of a scalar, else its type.
fn brief(v: &PyValue) -> String {
    match v {
        PyValue::None | PyValue::Bool(_) | PyValue::Int(_) | PyValue::Float(_) => {
            format!("{v:?}")
        }
        other => format!("a {}", other.type_name()),
    }
}

/// Reads the legacy torch.save format (see the module docs) from the whole file `data`.
fn legacy_from(data: &[u8]) -> Result<PyValue, Problem> {
    let part = |p| format!("legacy torch.save format, {p}");
    let mut pos = legacy_magic_end(data)
        .ok_or_else(|| Problem::Malformed("no torch.save magic number".into()))?;
    let small = |pos: &mut usize, part: &str| {
        let mut vm = Vm::new(&data[*pos..]);
        let top = vm.run(&mut Storages::Forbidden).map_err(within(part))?;
        *pos += vm.pos;
        vm.value(&top, output_budget(data.len() as u64), false)
            .map_err(within(part))
    };
    let version = small(&mut pos, &part("version pickle"))?;
    if version.as_int() != Some(LEGACY_VERSION) {
        return Err(Problem::Unsupported(format!(
            "legacy torch.save format version {} (only {LEGACY_VERSION} is known)",
            brief(&version)
        )));
    }
    let info = small(&mut pos, &part("sys_info pickle"))?;
    check_sys_info(&info).map_err(within(&part("sys_info")))?;
    let object = part("object pickle");
    let mut vm = Vm::new(&data[pos..]);
    let top = vm.run(&mut Storages::Deferred).map_err(within(&object))?;
    pos += vm.pos;
    let key_list = small(&mut pos, &part("storage key list"))?;
    read_storages(data, pos, &key_list, &mut vm.roots).map_err(within(&part("storages")))?;
    vm.value(&top, output_budget(data.len() as u64), false)
        .map_err(within(&object))
}

/// Reads the storages that follow the legacy format's pickles, from `pos` to the end of
/// `data`, in the order of `key_list`: for each, an 8-byte little-endian element count
/// and the bytes. Every storage the object pickle named (`roots`) must be there, with the
/// element count the pickle gave.
fn read_storages(
    data: &[u8],
    mut pos: usize,
    key_list: &PyValue,
    roots: &mut HashMap<Rc<str>, Root>,
) -> Result<(), Problem> {
    let keys = key_list.as_list().ok_or_else(|| {
        Problem::Malformed(format!("the key list is {}, not a list", brief(key_list)))
    })?;
    for (i, key) in keys.iter().enumerate() {
        let key = key.as_str().ok_or_else(|| {
            Problem::Malformed(format!("key {} is {}, not a str", i + 1, brief(key)))
        })?;
        let what = format!(
            "storage '{}' ({} of {})",
            key.escape_default(),
            i + 1,
            keys.len()
        );
        let root = roots.get_mut(key).ok_or_else(|| {
            Problem::Malformed(format!("{what} is in the key list but no tensor uses it"))
        })?;
        if root.bytes.is_some() {
            return bad(format!("{what} is listed twice"));
        }
        let Some(count) = data.get(pos..pos + 8) else {
            return bad(format!(
                "truncated: the element count of {what} is missing at offset {pos}, {} bytes left",
                data.len() - pos
            ));
        };
        let count = i64::from_le_bytes(count.try_into().expect("8 bytes"));
        if usize::try_from(count).ok() != Some(root.numel) {
            return bad(format!(
                "{what} holds {count} elements in the file, but the pickle says {}",
                root.numel
            ));
        }
        pos += 8;
        // numel * size was checked against the file size when the pickle named it.
        let nbytes = root.numel * root.dtype.size_in_bytes();
        let Some(bytes) = data.get(pos..pos + nbytes) else {
            return bad(format!(
                "truncated: {what} needs {nbytes} bytes ({} elements of {}) at offset {pos}, {} left",
                root.numel,
                root.dtype,
                data.len() - pos
            ));
        };
        root.bytes = Some(Rc::new(bytes.to_vec()));
        pos += nbytes;
    }
    if let Some(key) = roots
        .iter()
        .filter(|(_, r)| r.bytes.is_none())
        .map(|(k, _)| k)
        .min()
    {
        return bad(format!(
            "storage '{}' is used by a tensor but missing from the key list",
            key.escape_default()
        ));
    }
    if pos != data.len() {
        return bad(format!(
            "{} unexpected bytes after the last storage (offset {pos})",
            data.len() - pos
        ));
    }
    Ok(())
}

/// Checks the legacy format's `sys_info` dict: little-endian data and the type sizes
/// torch has always written (`long` is 4 bytes in torch's `struct` standard sizes, 8 in
/// some old files; tensors' `LongStorage` is 8 bytes either way).
fn check_sys_info(info: &PyValue) -> Result<(), Problem> {
    if info.as_dict().is_none() {
        return bad(format!("{}, not a dict", brief(info)));
    }
    match info.get("little_endian") {
        Some(PyValue::Bool(true)) => {}
        Some(PyValue::Bool(false)) => {
            return Err(Problem::Unsupported(
                "legacy torch.save file written on a big-endian machine (sys_info \
                 little_endian=False): re-save it there with torch >= 1.6, which writes \
                 the zip format"
                    .into(),
            ))
        }
        Some(other) => return bad(format!("little_endian is {}, not a bool", brief(other))),
        None => return bad("no little_endian entry"),
    }
    if let Some(v) = info.get("protocol_version") {
        if v.as_int() != Some(LEGACY_VERSION) {
            return Err(Problem::Unsupported(format!(
                "legacy torch.save sys_info: protocol_version {} (only {LEGACY_VERSION} is known)",
                brief(v)
            )));
        }
    }
    let sizes = info
        .get("type_sizes")
        .ok_or_else(|| Problem::Malformed("no type_sizes entry".into()))?;
    for (name, allowed) in [("short", &[2][..]), ("int", &[4]), ("long", &[4, 8])] {
        let size = sizes.get(name).and_then(PyValue::as_int);
        if !size.is_some_and(|n| allowed.contains(&n)) {
            return Err(Problem::Unsupported(format!(
                "legacy torch.save sys_info: type_sizes['{name}'] is {size:?}, expected one of {allowed:?}"
            )));
        }
    }
    Ok(())
}

/// Most values (stack + memo + objects) a pickle may hold; real checkpoints hold ~100k.
const MAX_ITEMS: usize = 1 << 22;

/// Returns the bytes of the storage with the given key.
type Loader<'a> = dyn FnMut(&str) -> Result<Rc<Vec<u8>>, Problem> + 'a;

/// Where the storages a pickle's persistent ids name come from.
enum Storages<'l, 'a> {
    /// Nowhere: a persistent id is an error (a plain pickle).
    Forbidden,
    /// Zip format: archive members, read when first named.
    Members(&'l mut Loader<'a>),
    /// Legacy format: the storages follow the pickle; they are recorded in
    /// [`Vm::roots`] and filled in once the pickle has run.
    Deferred,
}

/// A global the allow-list admits.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Glob {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildParameter,
    Storage(DType),
}

fn resolve_global(module: &str, name: &str) -> Result<Glob, Problem> {
    let storage = |d| Ok(Glob::Storage(d));
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Glob::OrderedDict),
        ("torch._utils", "_rebuild_tensor") => Ok(Glob::RebuildTensor),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Glob::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Ok(Glob::RebuildParameter),
        ("torch", "DoubleStorage") => storage(DType::F64),
        ("torch", "FloatStorage") => storage(DType::F32),
        ("torch", "HalfStorage") => storage(DType::F16),
        ("torch", "BFloat16Storage") => storage(DType::BF16),
        ("torch", "LongStorage") => storage(DType::I64),
        ("torch", "IntStorage") => storage(DType::I32),
        ("torch", "ShortStorage") => storage(DType::I16),
        ("torch", "CharStorage") => storage(DType::I8),
        ("torch", "ByteStorage") => storage(DType::U8),
        ("torch", "BoolStorage") => storage(DType::Bool),
        _ => Err(Problem::Global(
            format!("{module}.{name}").chars().take(200).collect(),
        )),
    }
}

/// A stack value; compound objects live in the VM's arena and are referred to by index,
/// so memo references share (and see mutations of) one object, as in Python.
#[derive(Debug, Clone)]
enum Val {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Global(Glob),
    Obj(usize),
}

#[derive(Debug)]
enum Obj {
    List(Vec<Val>),
    Tuple(Vec<Val>),
    Dict(Vec<(Val, Val)>, HashMap<DictKey, usize>),
    /// Elements `start..start + numel` of root storage `root` (all of it, except for the
    /// storage views of old legacy files).
    Storage {
        root: Rc<str>,
        dtype: DType,
        start: usize,
        numel: usize,
    },
    Tensor(View),
}

/// A storage as its persistent id describes it; `bytes` is `None` until read.
#[derive(Debug)]
struct Root {
    dtype: DType,
    numel: usize,
    bytes: Option<Rc<Vec<u8>>>,
}

/// Key of a dict entry, for replacing entries with an equal str or int key.
#[derive(Debug, PartialEq, Eq, Hash)]
enum DictKey {
    Str(Rc<str>),
    Int(i64),
}

#[derive(Debug)]
struct View {
    dtype: DType,
    /// The root storage's key; `offset` counts elements from its start.
    root: Rc<str>,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Val>,
    marks: Vec<usize>,
    memo: HashMap<u64, Val>,
    objs: Vec<Obj>,
    /// The storages the persistent ids named, by key.
    roots: HashMap<Rc<str>, Root>,
    /// Remaining element copies allowed (bounds quadratic blow-ups).
    work: usize,
}

/// Runs the pickle in `data`. `load` returns the bytes of storage `key`; `budget` bounds
/// the bytes of tensors and strings in the result.
pub(crate) fn unpickle(
    data: &[u8],
    budget: usize,
    load: &mut Loader<'_>,
    big_endian: bool,
) -> Result<PyValue, Problem> {
    let mut vm = Vm::new(data);
    let top = vm.run(&mut Storages::Members(load))?;
    vm.value(&top, budget, big_endian)
}

fn unexpected<T>(what: &str, v: &Val) -> Result<T, Problem> {
    let kind = match v {
        Val::None => "None",
        Val::Bool(_) => "bool",
        Val::Int(_) => "int",
        Val::Float(_) => "float",
        Val::Str(_) => "str",
        Val::Bytes(_) => "bytes",
        Val::Global(_) => "global",
        Val::Obj(_) => "object",
    };
    bad(format!("{what}, found {kind}"))
}

impl<'a> Vm<'a> {
    /// A VM for the pickle at the start of `data` (bytes after its STOP are left alone).
    fn new(data: &'a [u8]) -> Self {
        Vm {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            objs: Vec::new(),
            roots: HashMap::new(),
            work: data.len().saturating_mul(8) + 4096,
        }
    }

    /// Materializes `top` (what [`Vm::run`] returned) within `budget` bytes; every
    /// storage a tensor uses must have its bytes by now.
    fn value(&self, top: &Val, budget: usize, big_endian: bool) -> Result<PyValue, Problem> {
        let mut conv = Convert {
            objs: &self.objs,
            roots: &self.roots,
            bytes_left: budget,
            nodes_left: self.pos.saturating_mul(8) + 1024,
            big_endian,
        };
        conv.value(top, 0)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], Problem> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return bad(format!(
                "truncated pickle: {n} bytes needed at offset {}, {} left",
                self.pos,
                self.data.len() - self.pos
            ));
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], Problem> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn len_u64(&mut self, n: u64) -> Result<&[u8], Problem> {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        self.take(n)
    }
    fn line_bytes(&mut self) -> Result<&[u8], Problem> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().take(1 << 16).position(|&b| b == b'\n') else {
            return bad(format!(
                "truncated pickle: unterminated text line at offset {}",
                self.pos
            ));
        };
        self.pos += n + 1;
        Ok(&rest[..n])
    }
    fn line(&mut self) -> Result<String, Problem> {
        Ok(String::from_utf8_lossy(self.line_bytes()?).into_owned())
    }
    fn charge(&mut self, n: usize) -> Result<(), Problem> {
        self.work = self.work.checked_sub(n).ok_or_else(|| {
            Problem::Malformed("pickle does too much copying for its size".into())
        })?;
        Ok(())
    }
    fn tuple_vec(&mut self, v: &Val, what: &str) -> Result<Vec<Val>, Problem> {
        let t = self
            .tuple(v)
            .map(<[Val]>::to_vec)
            .ok_or_else(|| Problem::Malformed(format!("{what} is not a tuple or list")))?;
        self.charge(t.len())?;
        Ok(t)
    }
    fn pop(&mut self) -> Result<Val, Problem> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return bad("pickle pops past a MARK");
        }
        self.stack
            .pop()
            .ok_or_else(|| Problem::Malformed("pickle stack underflow".into()))
    }
    fn pop_mark(&mut self) -> Result<Vec<Val>, Problem> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| Problem::Malformed("pickle has no MARK to pop to".into()))?;
        Ok(self.stack.split_off(m.min(self.stack.len())))
    }
    fn new_obj(&mut self, o: Obj) -> Val {
        self.objs.push(o);
        Val::Obj(self.objs.len() - 1)
    }
    fn obj_mut(&mut self, v: &Val) -> Option<&mut Obj> {
        match v {
            Val::Obj(i) => self.objs.get_mut(*i),
            _ => None,
        }
    }
    fn tuple(&self, v: &Val) -> Option<&[Val]> {
        match v {
            Val::Obj(i) => match self.objs.get(*i) {
                Some(Obj::Tuple(t) | Obj::List(t)) => Some(t),
                _ => None,
            },
            _ => None,
        }
    }
    fn top(&self) -> Result<Val, Problem> {
        match self.stack.last() {
            Some(v) if self.marks.last().is_none_or(|&m| m < self.stack.len()) => Ok(v.clone()),
            _ => bad("pickle stack underflow"),
        }
    }
    fn memo_get(&self, k: u64) -> Result<Val, Problem> {
        self.memo
            .get(&k)
            .cloned()
            .ok_or_else(|| Problem::Malformed(format!("pickle memo key {k} is not set")))
    }
    fn memo_put(&mut self, k: u64) -> Result<(), Problem> {
        let v = self.top()?;
        self.memo.insert(k, v);
        Ok(())
    }
    fn set_items(&mut self, items: Vec<Val>) -> Result<(), Problem> {
        if items.len() % 2 != 0 {
            return bad("SETITEMS with an odd number of items");
        }
        let key_bytes: usize = items
            .iter()
            .step_by(2)
            .map(|k| if let Val::Str(s) = k { s.len() } else { 1 })
            .sum();
        self.charge(key_bytes)?;
        let target = self.top()?;
        let Some(Obj::Dict(entries, index)) = self.obj_mut(&target) else {
            return unexpected("SETITEM(S) needs a dict", &target);
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let key = match &k {
                Val::Str(s) => Some(DictKey::Str(Rc::clone(s))),
                Val::Int(i) => Some(DictKey::Int(*i)),
                _ => None,
            };
            match key.as_ref().and_then(|key| index.get(key)) {
                Some(&at) => entries[at].1 = v,
                None => {
                    if let Some(key) = key {
                        index.insert(key, entries.len());
                    }
                    entries.push((k, v));
                }
            }
        }
        Ok(())
    }
    fn extend_list(&mut self, items: Vec<Val>) -> Result<(), Problem> {
        let target = self.top()?;
        match self.obj_mut(&target) {
            Some(Obj::List(l)) => {
                l.extend(items);
                Ok(())
            }
            _ => unexpected("APPEND(S)/ADDITEMS needs a list or set", &target),
        }
    }
    fn int(v: &Val, what: &str) -> Result<i64, Problem> {
        match v {
            Val::Int(i) => Ok(*i),
            Val::Bool(b) => Ok(i64::from(*b)),
            _ => unexpected(what, v),
        }
    }
    fn dims(&self, v: &Val, what: &str) -> Result<Vec<usize>, Problem> {
        let t = self
            .tuple(v)
            .ok_or_else(|| Problem::Malformed(format!("{what} is not a tuple")))?;
        if t.len() > 64 {
            return bad(format!("{what} has {} dimensions", t.len()));
        }
        t.iter()
            .map(|d| {
                usize::try_from(Self::int(d, what)?)
                    .or_else(|_| bad(format!("{what} holds a negative value")))
            })
            .collect()
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`
    /// or, from torch < 0.4, `_rebuild_tensor(storage, offset, size, stride)`.
    fn rebuild_tensor(&mut self, args: &[Val], v2: bool) -> Result<Val, Problem> {
        let (name, arity) = if v2 {
            ("_rebuild_tensor_v2", 6..=7)
        } else {
            ("_rebuild_tensor", 4..=4)
        };
        if !arity.contains(&args.len()) {
            return bad(format!(
                "{name} takes {} arguments, got {}",
                if v2 { "6 or 7" } else { "4" },
                args.len()
            ));
        }
        let (root, dtype, start, storage_numel) = match &args[0] {
            Val::Obj(i) => match self.objs.get(*i) {
                Some(Obj::Storage {
                    root,
                    dtype,
                    start,
                    numel,
                }) => (Rc::clone(root), *dtype, *start, *numel),
                _ => return bad(format!("{name}: first argument is not a storage")),
            },
            v => return unexpected(&format!("{name} needs a storage"), v),
        };
        let offset = usize::try_from(Self::int(&args[1], "storage offset")?)
            .or_else(|_| bad("negative storage offset"))?;
        let shape = self.dims(&args[2], "tensor size")?;
        let strides = self.dims(&args[3], "tensor stride")?;
        if shape.len() != strides.len() {
            return bad("tensor size and stride differ in length");
        }
        let numel = checked_numel(&shape);
        if numel != Some(0) {
            let last = shape
                .iter()
                .zip(&strides)
                .try_fold(offset, |acc, (&d, &s)| {
                    acc.checked_add((d.checked_sub(1)?).checked_mul(s)?)
                });
            if numel.is_none() || last.is_none_or(|l| l >= storage_numel) {
                return bad(format!("tensor view (offset {offset}, size {shape:?}, stride {strides:?}) exceeds its storage of {storage_numel} elements"));
            }
        }
        Ok(self.new_obj(Obj::Tensor(View {
            dtype,
            root,
            offset: start + offset,
            shape,
            strides,
        })))
    }

    fn call(&mut self, f: &Val, args: Vec<Val>) -> Result<Val, Problem> {
        match f {
            Val::Global(Glob::OrderedDict) => {
                let d = self.new_obj(Obj::Dict(Vec::new(), HashMap::new()));
                if let Some(items) = args.first() {
                    let pairs = self.tuple_vec(items, "OrderedDict argument")?;
                    self.charge(pairs.len().saturating_mul(2))?;
                    let mut flat = Vec::with_capacity(pairs.len().saturating_mul(2));
                    for p in &pairs {
                        match self.tuple(p) {
                            Some([k, v]) => flat.extend([k.clone(), v.clone()]),
                            _ => return bad("OrderedDict item is not a pair"),
                        }
                    }
                    self.stack.push(d.clone());
                    self.set_items(flat)?;
                    self.stack.pop();
                }
                Ok(d)
            }
            Val::Global(Glob::RebuildTensorV2) => self.rebuild_tensor(&args, true),
            Val::Global(Glob::RebuildTensor) => self.rebuild_tensor(&args, false),
            Val::Global(Glob::RebuildParameter) => match args.first() {
                Some(t @ Val::Obj(i)) if matches!(self.objs.get(*i), Some(Obj::Tensor(_))) => {
                    Ok(t.clone())
                }
                _ => bad("_rebuild_parameter: first argument is not a tensor"),
            },
            Val::Global(g) => bad(format!("{g:?} cannot be called")),
            other => unexpected("REDUCE needs an allowed global", other),
        }
    }

    /// A storage from its persistent id: `('storage', <torch.*Storage>, key, location,
    /// numel)` in the zip format, the same plus `view_metadata` (None, or `(view_key,
    /// offset, size)` for a view of part of the storage) in the legacy format.
    fn persistent_load(&mut self, pid: &Val, storages: &mut Storages) -> Result<Val, Problem> {
        let parts = self.tuple_vec(pid, "persistent id")?;
        let legacy = matches!(storages, Storages::Deferred);
        let arity = if legacy { 6 } else { 5 };
        let [Val::Str(tag), Val::Global(Glob::Storage(dtype)), Val::Str(key), _location, numel, ..] =
            parts.as_slice()
        else {
            return bad(format!(
                "persistent id is not ('storage', <torch storage type>, key, location, numel{})",
                if legacy { ", view_metadata" } else { "" }
            ));
        };
        if parts.len() != arity {
            return bad(format!(
                "persistent id has {} items, not {arity}",
                parts.len()
            ));
        }
        if &**tag != "storage" {
            return bad(format!(
                "persistent id of unknown kind '{}'",
                tag.escape_default()
            ));
        }
        let view = parts.get(5);
        let dtype = *dtype;
        let numel = usize::try_from(Self::int(numel, "storage numel")?)
            .or_else(|_| bad("negative storage numel"))?;
        match self.roots.get(key) {
            Some(r) if (r.dtype, r.numel) == (dtype, numel) => {}
            Some(r) => {
                return bad(format!(
                    "storage '{}' is named as {} elements of {} and as {numel} of {dtype}",
                    key.escape_default(),
                    r.numel,
                    r.dtype
                ))
            }
            None => {
                let bytes = match storages {
                    Storages::Forbidden => {
                        return bad("a persistent id (storage) in a plain pickle")
                    }
                    Storages::Members(load) => {
                        let bytes = load(key)?;
                        if numel.checked_mul(dtype.size_in_bytes()) != Some(bytes.len()) {
                            return bad(format!(
                                "storage '{key}' holds {} bytes, not {numel} elements of {dtype}",
                                bytes.len()
                            ));
                        }
                        Some(bytes)
                    }
                    Storages::Deferred => {
                        // Bound what the file must hold before anything is allocated.
                        let fits = numel
                            .checked_mul(dtype.size_in_bytes())
                            .is_some_and(|n| n <= self.data.len());
                        if !fits {
                            return bad(format!(
                                "storage '{}' claims {numel} elements of {dtype}, more than the file holds",
                                key.escape_default()
                            ));
                        }
                        None
                    }
                };
                let root = Root {
                    dtype,
                    numel,
                    bytes,
                };
                self.roots.insert(Rc::clone(key), root);
            }
        }
        let (start, numel) = match view {
            None | Some(Val::None) => (0, numel),
            Some(v) => {
                let Some([Val::Str(_), Val::Int(offset), Val::Int(size)]) = self.tuple(v) else {
                    return bad("storage view_metadata is not (key, offset, size)");
                };
                let (offset, size) = (*offset, *size);
                let view = usize::try_from(offset)
                    .ok()
                    .zip(usize::try_from(size).ok())
                    .filter(|&(o, n)| o.checked_add(n).is_some_and(|e| e <= numel));
                let Some(view) = view else {
                    return bad(format!(
                        "storage view (offset {offset}, size {size}) exceeds storage '{}' of {numel} elements",
                        key.escape_default()
                    ));
                };
                view
            }
        };
        Ok(self.new_obj(Obj::Storage {
            root: Rc::clone(key),
            dtype,
            start,
            numel,
        }))
    }

    /// Runs the pickle up to its STOP (leaving `pos` after it) and returns its value.
    fn run(&mut self, storages: &mut Storages) -> Result<Val, Problem> {
        loop {
            let at = self.pos;
            if self.stack.len() + self.memo.len() + self.objs.len() > MAX_ITEMS {
                return bad(format!("pickle holds more than {MAX_ITEMS} values"));
            }
            let [op] = self
                .arr::<1>()
                .map_err(|_| Problem::Malformed("truncated pickle (no STOP opcode)".into()))?;
            let v = match op {
                b'.' => return self.pop(), // STOP
                0x80 => {
                    // PROTO
                    let [p] = self.arr::<1>()?;
                    if p > 5 {
                        return Err(Problem::Unsupported(format!("pickle protocol {p}")));
                    }
                    continue;
                }
                0x95 => {
                    // FRAME
                    self.arr::<8>()?;
                    continue;
                }
                b'(' => {
                    // MARK
                    self.marks.push(self.stack.len());
                    continue;
                }
                b'0' => {
                    // POP
                    self.pop()?;
                    continue;
                }
                b'1' => {
                    // POP_MARK
                    self.pop_mark()?;
                    continue;
                }
                b'2' => self.top()?, // DUP
                b'N' => Val::None,
                0x88 => Val::Bool(true),
                0x89 => Val::Bool(false),
                b'K' => Val::Int(i64::from(self.arr::<1>()?[0])),
                b'M' => Val::Int(i64::from(u16::from_le_bytes(self.arr()?))),
                b'J' => Val::Int(i64::from(i32::from_le_bytes(self.arr()?))),
                0x8a => {
                    // LONG1
                    let [n] = self.arr::<1>()?;
                    long(self.take(usize::from(n))?)?
                }
                0x8b => {
                    // LONG4
                    let n = i32::from_le_bytes(self.arr()?);
                    let n = usize::try_from(n).or_else(|_| bad("negative LONG4 length"))?;
                    long(self.take(n)?)?
                }
                b'I' | b'L' => {
                    // INT, LONG (text)
                    let l = self.line()?;
                    match l.as_str() {
                        "01" if op == b'I' => Val::Bool(true),
                        "00" if op == b'I' => Val::Bool(false),
                        s => Val::Int(s.trim_end_matches('L').parse().or_else(|_| {
                            bad(format!("bad or too large integer '{}'", s.escape_default()))
                        })?),
                    }
                }
                b'F' => {
                    let l = self.line()?;
                    Val::Float(l.trim().parse().or_else(|_| bad("bad FLOAT text"))?)
                }
                b'G' => Val::Float(f64::from_be_bytes(self.arr()?)),
                b'X' | 0x8c | 0x8d => {
                    // BINUNICODE, SHORT_, 8
                    let n = match op {
                        b'X' => u64::from(u32::from_le_bytes(self.arr()?)),
                        0x8c => u64::from(self.arr::<1>()?[0]),
                        _ => u64::from_le_bytes(self.arr()?),
                    };
                    let s = std::str::from_utf8(self.len_u64(n)?)
                        .or_else(|_| bad(format!("invalid UTF-8 in a string at offset {at}")))?;
                    Val::Str(Rc::from(s))
                }
                b'V' => Val::Str(Rc::from(raw_unicode_escape(self.line_bytes()?).as_str())),
                b'T' | b'U' => {
                    // BINSTRING, SHORT_
                    let n = if op == b'T' {
                        i32::from_le_bytes(self.arr()?)
                    } else {
                        i32::from(self.arr::<1>()?[0])
                    };
                    let n = usize::try_from(n).or_else(|_| bad("negative BINSTRING length"))?;
                    let b = self.take(n)?;
                    match std::str::from_utf8(b) {
                        Ok(s) => Val::Str(Rc::from(s)),
                        Err(_) => Val::Bytes(Rc::from(b)),
                    }
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    // BINBYTES*, BYTEARRAY8
                    let n = match op {
                        b'B' => u64::from(u32::from_le_bytes(self.arr()?)),
                        b'C' => u64::from(self.arr::<1>()?[0]),
                        _ => u64::from_le_bytes(self.arr()?),
                    };
                    Val::Bytes(Rc::from(self.len_u64(n)?))
                }
                b']' | 0x8f => self.new_obj(Obj::List(Vec::new())), // EMPTY_LIST, EMPTY_SET
                b')' => self.new_obj(Obj::Tuple(Vec::new())),
                b'}' => self.new_obj(Obj::Dict(Vec::new(), HashMap::new())),
                b'l' | 0x91 => {
                    // LIST, FROZENSET
                    let items = self.pop_mark()?;
                    self.new_obj(Obj::List(items))
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.new_obj(Obj::Tuple(items))
                }
                0x85..=0x87 => {
                    // TUPLE1..3
                    let n = usize::from(op - 0x84);
                    let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>, _>>()?;
                    items.reverse();
                    self.new_obj(Obj::Tuple(items))
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = self.new_obj(Obj::Dict(Vec::new(), HashMap::new()));
                    self.stack.push(d);
                    self.set_items(items)?;
                    continue;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_list(vec![v])?;
                    continue;
                }
                b'e' | 0x90 => {
                    // APPENDS, ADDITEMS
                    let items = self.pop_mark()?;
                    self.extend_list(items)?;
                    continue;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                    continue;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                    continue;
                }
                b'q' | b'r' | b'p' | 0x94 => {
                    // BINPUT, LONG_, PUT, MEMOIZE
                    let k = match op {
                        b'q' => u64::from(self.arr::<1>()?[0]),
                        b'r' => u64::from(u32::from_le_bytes(self.arr()?)),
                        b'p' => self.line()?.parse().or_else(|_| bad("bad PUT index"))?,
                        _ => self.memo.len() as u64,
                    };
                    self.memo_put(k)?;
                    continue;
                }
                b'h' => {
                    let k = u64::from(self.arr::<1>()?[0]);
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = u64::from(u32::from_le_bytes(self.arr()?));
                    self.memo_get(k)?
                }
                b'g' => {
                    let k = self.line()?.parse().or_else(|_| bad("bad GET index"))?;
                    self.memo_get(k)?
                }
                b'c' => {
                    // GLOBAL
                    let (m, n) = (self.line()?, self.line()?);
                    Val::Global(resolve_global(&m, &n)?)
                }
                0x93 => {
                    // STACK_GLOBAL
                    let (n, m) = (self.pop()?, self.pop()?);
                    match (&m, &n) {
                        (Val::Str(m), Val::Str(n)) => Val::Global(resolve_global(m, n)?),
                        _ => return bad("STACK_GLOBAL needs two strings"),
                    }
                }
                b'R' => {
                    // REDUCE
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let args = self.tuple_vec(&args, "REDUCE arguments")?;
                    self.call(&f, args)?
                }
                0x81 | 0x92 => {
                    // NEWOBJ, NEWOBJ_EX
                    if op == 0x92 {
                        self.pop()?;
                    }
                    self.pop()?;
                    match self.pop()? {
                        Val::Global(Glob::OrderedDict) => {
                            self.new_obj(Obj::Dict(Vec::new(), HashMap::new()))
                        }
                        other => return unexpected("NEWOBJ needs OrderedDict", &other),
                    }
                }
                b'b' => {
                    // BUILD
                    let _state = self.pop()?;
                    let target = self.top()?;
                    match self.obj_mut(&target) {
                        // OrderedDict attributes (state_dict's `_metadata`) and tensor
                        // state carry nothing we need.
                        Some(Obj::Dict(..) | Obj::Tensor(_)) => continue,
                        _ => return unexpected("BUILD on an unsupported object", &target),
                    }
                }
                b'Q' => {
                    // BINPERSID
                    let pid = self.pop()?;
                    self.persistent_load(&pid, storages)?
                }
                _ => {
                    let what = match op {
                        b'P' => "PERSID (text persistent id)",
                        b'i' | b'o' => "INST/OBJ (class instantiation)",
                        0x82..=0x84 => "EXT1/2/4 (extension registry)",
                        0x97 | 0x98 => "NEXT_BUFFER/READONLY_BUFFER (out-of-band buffers)",
                        b'S' => "STRING (protocol-0 quoted string)",
                        _ => {
                            return bad(format!("unknown pickle opcode 0x{op:02x} at offset {at}"))
                        }
                    };
                    return Err(Problem::Unsupported(format!(
                        "pickle opcode {what} at offset {at}"
                    )));
                }
            };
            self.stack.push(v);
        }
    }
}

/// Decodes a LONG1/LONG4 little-endian two's-complement integer that must fit in i64.
fn long(b: &[u8]) -> Result<Val, Problem> {
    let neg = b.last().is_some_and(|&x| x & 0x80 != 0);
    let fill = if neg { 0xff } else { 0 };
    if b.len() > 8 && b[8..].iter().any(|&x| x != fill) || b.len() > 8 && (b[7] & 0x80 != 0) != neg
    {
        return bad("integer does not fit in 64 bits");
    }
    let mut a = [fill; 8];
    let n = b.len().min(8);
    a[..n].copy_from_slice(&b[..n]);
    Ok(Val::Int(i64::from_le_bytes(a)))
}

/// Decodes Python's raw-unicode-escape (protocol-0 UNICODE): `\uXXXX`, `\UXXXXXXXX`,
/// everything else Latin-1.
fn raw_unicode_escape(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let n = match (b[i], b.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => 0,
        };
        let hex = b
            .get(i + 2..i + 2 + n)
            .and_then(|h| std::str::from_utf8(h).ok());
        match hex
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .and_then(char::from_u32)
        {
            Some(c) if n > 0 => {
                out.push(c);
                i += 2 + n;
            }
            _ => {
                out.push(char::from(b[i]));
                i += 1;
            }
        }
    }
    out
}

/// Turns VM values into [`PyValue`]s within the depth, node and byte budgets.
struct Convert<'a> {
    objs: &'a [Obj],
    roots: &'a HashMap<Rc<str>, Root>,
    bytes_left: usize,
    nodes_left: usize,
    big_endian: bool,
}

impl Convert<'_> {
    fn charge(&mut self, bytes: usize) -> Result<(), Problem> {
        if self.nodes_left == 0 || bytes > self.bytes_left {
            return bad("the pickle expands to far more data than the file holds (shared references or broadcast views)");
        }
        self.nodes_left -= 1;
        self.bytes_left -= bytes;
        Ok(())
    }

    fn value(&mut self, v: &Val, depth: usize) -> Result<PyValue, Problem> {
        if depth > 100 {
            return bad("pickle nests deeper than 100 levels (or is cyclic)");
        }
        let seq = |c: &mut Self, items: &[Val]| {
            items
                .iter()
                .map(|x| c.value(x, depth + 1))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(match v {
            Val::None => self.charge(0).map(|_| PyValue::None)?,
            Val::Bool(b) => self.charge(0).map(|_| PyValue::Bool(*b))?,
            Val::Int(i) => self.charge(0).map(|_| PyValue::Int(*i))?,
            Val::Float(f) => self.charge(0).map(|_| PyValue::Float(*f))?,
            Val::Str(s) => self.charge(s.len()).map(|_| PyValue::Str(s.to_string()))?,
            Val::Bytes(b) => self.charge(b.len()).map(|_| PyValue::Bytes(b.to_vec()))?,
            Val::Global(g) => return bad(format!("global {g:?} used as a value")),
            Val::Obj(i) => {
                self.charge(0)?;
                match self.objs.get(*i) {
                    Some(Obj::List(items)) => PyValue::List(seq(self, items)?),
                    Some(Obj::Tuple(items)) => PyValue::Tuple(seq(self, items)?),
                    Some(Obj::Dict(entries, _)) => {
                        let mut out = Vec::with_capacity(entries.len());
                        for (k, x) in entries {
                            out.push((self.value(k, depth + 1)?, self.value(x, depth + 1)?));
                        }
                        PyValue::Dict(out)
                    }
                    Some(Obj::Tensor(t)) => PyValue::Tensor(self.tensor(t)?),
                    Some(Obj::Storage { .. }) => {
                        return bad("a bare storage (not inside a tensor) is not supported")
                    }
                    None => return bad("dangling object reference"),
                }
            }
        })
    }

    fn tensor(&mut self, t: &View) -> Result<RawTensor, Problem> {
        let item = t.dtype.size_in_bytes();
        let nbytes = checked_numel(&t.shape)
            .and_then(|n| n.checked_mul(item))
            .unwrap_or(usize::MAX);
        self.charge(nbytes)?;
        let Some(bytes) = self.roots.get(&t.root).and_then(|r| r.bytes.as_ref()) else {
            return bad(format!("storage '{}' has no data", t.root.escape_default()));
        };
        let mut data = gather_strided(bytes, item, t.offset, &t.shape, &t.strides)
            .ok_or_else(|| Problem::Malformed("tensor view exceeds its storage".into()))?;
        if self.big_endian {
            swap_bytes(&mut data, item);
        }
        Ok(RawTensor {
            dtype: t.dtype,
            shape: t.shape.clone(),
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::raw::test_util::{check_tensor, expected, fixture, zip_of, Rng};
    use super::*;

    fn read(name: &str) -> PyValue {
        read_torch_checkpoint(&fixture(name)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err_of(r: Result<PyValue, WeightsError>) -> WeightsError {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e,
        }
    }

    /// data.pkl and storages of a fixture checkpoint.
    fn parts(name: &str) -> (Vec<u8>, HashMap<String, Vec<u8>>) {
        let mut zip = zip::ZipArchive::new(std::fs::File::open(fixture(name)).expect("fixture"))
            .expect("zip");
        let (mut pkl, mut blobs) = (Vec::new(), HashMap::new());
        for i in 0..zip.len() {
            let mut f = zip.by_index(i).expect("member");
            let name = f.name().to_string();
            let mut b = Vec::new();
            f.read_to_end(&mut b).expect("read");
            if name.ends_with("/data.pkl") {
                pkl = b;
            } else if let Some((_, key)) = name.split_once("/data/") {
                blobs.insert(key.to_string(), b);
            }
        }
        (pkl, blobs)
    }

    fn run_vm(pkl: &[u8], blobs: &HashMap<String, Vec<u8>>) -> Result<PyValue, Problem> {
        let mut load = |k: &str| {
            blobs
                .get(k)
                .map(|b| Rc::new(b.clone()))
                .ok_or_else(|| Problem::Malformed(format!("no storage {k}")))
        };
        unpickle(pkl, 1 << 20, &mut load, false)
    }

    /// BINUNICODE.
    fn s(text: &str) -> Vec<u8> {
        let mut v = vec![b'X'];
        v.extend_from_slice(&(text.len() as u32).to_le_bytes());
        v.extend_from_slice(text.as_bytes());
        v
    }

    /// LONG1 with 8 bytes.
    fn int(i: i64) -> Vec<u8> {
        let mut v = vec![0x8a, 8];
        v.extend_from_slice(&i.to_le_bytes());
        v
    }

    fn tuple(items: &[i64]) -> Vec<u8> {
        let mut v = vec![b'('];
        items.iter().for_each(|&i| v.extend(int(i)));
        v.push(b't');
        v
    }

    /// `_rebuild_tensor_v2(storage '0' of `numel` elements, offset, size, stride, False, OrderedDict())`.
    fn tensor_call(
        storage: &str,
        numel: i64,
        offset: i64,
        size: &[i64],
        stride: &[i64],
    ) -> Vec<u8> {
        rebuild_call(true, storage, "0", numel, None, offset, size, stride)
    }

    /// A tensor rebuilt by `_rebuild_tensor_v2` (`v2`) or `_rebuild_tensor` from storage
    /// `key`, whose persistent id ends in the pickled `view_metadata` if given (the
    /// legacy format) and at numel otherwise (the zip format).
    #[allow(clippy::too_many_arguments)]
    fn rebuild_call(
        v2: bool,
        storage: &str,
        key: &str,
        numel: i64,
        view_metadata: Option<&[u8]>,
        offset: i64,
        size: &[i64],
        stride: &[i64],
    ) -> Vec<u8> {
        let f = if v2 {
            "_rebuild_tensor_v2"
        } else {
            "_rebuild_tensor"
        };
        let mut p = format!("ctorch._utils\n{f}\n((").into_bytes();
        p.extend(s("storage"));
        p.extend(format!("ctorch\n{storage}\n").bytes());
        p.extend(s(key));
        p.extend(s("cpu"));
        p.extend(int(numel));
        p.extend(view_metadata.unwrap_or_default());
        p.extend(b"tQ");
        p.extend(int(offset));
        p.extend(tuple(size));
        p.extend(tuple(stride));
        if v2 {
            p.extend(b"\x89ccollections\nOrderedDict\n)R");
        }
        p.extend(b"tR");
        p
    }

    /// A legacy-format file: magic number, `version`, a sys_info dict saying
    /// little-endian `little` and type size `long`, the object pickle `obj` (a body), the
    /// storage key list and, per storage, an element count and bytes.
    fn legacy_file(
        version: u16,
        little: bool,
        long: u8,
        obj: &[u8],
        keys: &[&str],
        storages: &[(i64, &[u8])],
    ) -> Vec<u8> {
        let mut f = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.".to_vec();
        f.extend(framed(&[&b"M"[..], &version.to_le_bytes()].concat()));
        let mut info = b"}(".to_vec();
        info.extend(s("protocol_version"));
        info.extend(b"M\xe9\x03");
        info.extend(s("little_endian"));
        info.push(if little { 0x88 } else { 0x89 });
        info.extend(s("type_sizes"));
        info.extend(b"}(");
        for (name, size) in [("short", 2), ("int", 4), ("long", long)] {
            info.extend(s(name));
            info.extend([b'K', size]);
        }
        info.extend(b"uu");
        f.extend(framed(&info));
        f.extend(framed(obj));
        let mut list = b"](".to_vec();
        keys.iter().for_each(|k| list.extend(s(k)));
        list.push(b'e');
        f.extend(framed(&list));
        for (count, bytes) in storages {
            f.extend(count.to_le_bytes());
            f.extend(*bytes);
        }
        f
    }

    fn framed(body: &[u8]) -> Vec<u8> {
        [&b"\x80\x02"[..], body, b"."].concat()
    }

    fn ckpt_zip(pkl: &[u8], storage: &[u8], byteorder: Option<&[u8]>) -> Vec<u8> {
        let mut m: Vec<(&str, &[u8], bool)> = vec![
            ("archive/data.pkl", pkl, false),
            ("archive/data/0", storage, false),
        ];
        if let Some(b) = byteorder {
            m.push(("archive/byteorder", b, false));
        }
        zip_of(&m)
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn checkpoint_tensors_match_torch() {
        let exp = expected();
        let files = [
            ("model/", "checkpoint.pth.tar"),
            ("optim/", "checkpoint.pth.tar"),
            ("p4/", "checkpoint_p4.pth"),
            ("nocrc/", "checkpoint_nocrc.pth"),
        ];
        let mut checked = 0;
        for (prefix, file) in files {
            let v = read(file);
            let ts: HashMap<String, &RawTensor> = v.tensors().into_iter().collect();
            for rec in exp
                .get("torch")
                .arr()
                .iter()
                .filter(|r| r.get("name").str().starts_with(prefix))
            {
                let name = rec.get("name").str();
                let key = if prefix == "model/" || prefix == "optim/" {
                    name
                } else {
                    &name[prefix.len()..]
                };
                let t = ts
                    .get(key)
                    .unwrap_or_else(|| panic!("{file}: no tensor {key}"));
                check_tensor(&format!("{file}:{key}"), t, rec);
                checked += 1;
            }
        }
        assert!(checked >= 25, "{checked}");
    }

    #[test]
    fn checkpoint_structure() {
        let v = read("checkpoint.pth.tar");
        assert_eq!(v.get("step").and_then(PyValue::as_int), Some(7));
        let model = v.get("model").and_then(PyValue::as_dict).expect("model");
        let keys: Vec<&str> = model.iter().filter_map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys[..5],
            [
                "module.root.weight",
                "module.gn1.weight",
                "module.gn1.bias",
                "module.head.weight",
                "module.head.bias"
            ]
        );
        let row = v
            .get("model")
            .and_then(|m| m.get("module.extra.shared_row"))
            .and_then(PyValue::as_tensor)
            .expect("row");
        assert_eq!(row.to_f32_vec(), Some(vec![0.5, 0.625, 0.75, 0.875]));
        let col = v
            .get("model")
            .and_then(|m| m.get("module.extra.shared_col"))
            .and_then(PyValue::as_tensor)
            .expect("col");
        assert_eq!(col.to_f32_vec(), Some(vec![0.25, 0.75, 1.25]));
        let exp = v
            .get("model")
            .and_then(|m| m.get("module.extra.expanded"))
            .and_then(PyValue::as_tensor)
            .expect("expanded");
        assert_eq!(exp.to_f32_vec(), Some(vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0]));
        let optim = v.get("optim").expect("optim");
        let state = optim
            .get("state")
            .and_then(PyValue::as_dict)
            .expect("state");
        assert_eq!(state.len(), 5);
        assert_eq!(state[0].0, PyValue::Int(0));
        assert!(state[0]
            .1
            .get("momentum_buffer")
            .and_then(PyValue::as_tensor)
            .is_some());
        let group = &optim
            .get("param_groups")
            .and_then(PyValue::as_list)
            .expect("groups")[0];
        assert_eq!(group.get("lr").and_then(PyValue::as_float), Some(0.003));
        assert_eq!(group.get("momentum").and_then(PyValue::as_float), Some(0.9));
        assert_eq!(
            group.get("nesterov").and_then(PyValue::as_bool),
            Some(false)
        );
        assert_eq!(group.get("foreach"), Some(&PyValue::None));
        let params: Vec<i64> = group
            .get("params")
            .and_then(PyValue::as_list)
            .expect("params")
            .iter()
            .filter_map(PyValue::as_int)
            .collect();
        assert_eq!(params, [0, 1, 2, 3, 4]);
        let meta = v.get("meta").expect("meta");
        let ints: Vec<i64> = meta
            .get("ints")
            .and_then(PyValue::as_list)
            .expect("ints")
            .iter()
            .filter_map(PyValue::as_int)
            .collect();
        assert_eq!(
            ints,
            [
                0,
                -1,
                255,
                256,
                65536,
                -(1 << 31),
                1 << 31,
                1 << 62,
                i64::MIN
            ]
        );
        assert_eq!(
            meta.get("floats"),
            Some(&PyValue::List(vec![
                PyValue::Float(0.5),
                PyValue::Float(-1e300),
                PyValue::Float(3.0)
            ]))
        );
        assert_eq!(
            meta.get("name").and_then(PyValue::as_str),
            Some("BiT-S-R101x1 \u{e9}\u{4e2d}")
        );
        assert_eq!(meta.get("flag"), Some(&PyValue::Bool(true)));
        assert_eq!(meta.get("off"), Some(&PyValue::Bool(false)));
        assert_eq!(meta.get("nothing"), Some(&PyValue::None));
        assert_eq!(
            meta.get("pair"),
            Some(&PyValue::Tuple(vec![
                PyValue::Int(1),
                PyValue::Str("a".into())
            ]))
        );
        assert_eq!(meta.get("empty_tuple"), Some(&PyValue::Tuple(vec![])));
        let p4 = read("checkpoint_p4.pth");
        assert_eq!(p4.get("n").and_then(PyValue::as_int), Some(3));
        assert_eq!(p4.get("s").and_then(PyValue::as_str), Some("p4"));
    }

    #[test]
    fn plain_pickles_protocol_0_and_5() {
        for (file, has_bytes) in [("plain_p0.pkl", false), ("plain_p5.pkl", true)] {
            let data = std::fs::read(fixture(file)).expect("fixture");
            let v = read_pickle_bytes(&data, Path::new(file)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(v.get("a"), Some(&PyValue::Int(1)), "{file}");
            let b = vec![
                PyValue::Float(1.5),
                PyValue::Int(-2),
                PyValue::Str("x\u{e9}\u{4e2d}".into()),
            ];
            assert_eq!(v.get("b"), Some(&PyValue::List(b)), "{file}");
            let k = PyValue::Tuple(vec![
                PyValue::None,
                PyValue::Bool(true),
                PyValue::Bool(false),
            ]);
            assert_eq!(v.get("c").and_then(|c| c.get("k")), Some(&k), "{file}");
            assert_eq!(v.get("big"), Some(&PyValue::Int(1 << 62)), "{file}");
            assert_eq!(v.get("neg"), Some(&PyValue::Int(i64::MIN)), "{file}");
            let nested = PyValue::List(vec![
                PyValue::List(vec![]),
                PyValue::Dict(vec![]),
                PyValue::Tuple(vec![]),
            ]);
            assert_eq!(v.get("nested"), Some(&nested), "{file}");
            assert_eq!(v.get("bytes").is_some(), has_bytes, "{file}");
            if has_bytes {
                assert_eq!(v.get("bytes"), Some(&PyValue::Bytes(vec![0, 1, 255])));
            }
        }
    }

    #[test]
    fn legacy_format_reads_like_the_zip_format() {
        let zip = read("legacy_state_zip.pth");
        let names: Vec<String> = zip.tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 11, "{names:?}");
        for file in [
            "legacy_state.pth",
            "legacy_state_p1.pth",
            "legacy_state_p4.pth",
        ] {
            // The same structure, tensor for tensor (dtype, shape, values).
            assert_eq!(read(file), zip, "{file}");
        }
        let legacy = read("legacy_state.pth");
        let mut checked = 0;
        for rec in expected().get("torch").arr() {
            let Some(name) = rec.get("name").str().strip_prefix("legacy/") else {
                continue;
            };
            for (file, v) in [
                ("legacy_state.pth", &legacy),
                ("legacy_state_zip.pth", &zip),
            ] {
                let t = v.get(name).and_then(PyValue::as_tensor);
                check_tensor(&format!("{file}:{name}"), t.expect(name), rec);
            }
            checked += 1;
        }
        assert_eq!(checked, 11);
        let t = |name| legacy.get(name).and_then(PyValue::as_tensor).expect(name);
        assert_eq!(
            t("shared_row").to_f32_vec(),
            Some(vec![0.5, 0.625, 0.75, 0.875])
        );
        assert_eq!(t("shared_col").to_f32_vec(), Some(vec![0.25, 0.75, 1.25]));
        assert_eq!(t("transposed").shape, [5, 3]);
        assert_eq!((t("scalar").shape.len(), t("empty").numel()), (0, 0));
        // The fixture written by the first version of make_interop_fixtures.py.
        let path = fixture("legacy.pth");
        let head = std::fs::read(&path).expect("fixture");
        assert!(head.starts_with(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"));
        let w = read("legacy.pth");
        let w = w.get("w").and_then(PyValue::as_tensor).expect("w");
        assert_eq!(w.to_f32_vec(), Some(vec![1.0, 1.0]));
    }

    #[test]
    fn legacy_checkpoint_dict() {
        let v = read("legacy_checkpoint.pth.tar");
        assert_eq!(v.get("epoch"), Some(&PyValue::Int(3)));
        assert_eq!(v.get("arch").and_then(PyValue::as_str), Some("x"));
        assert_eq!(v.get("best_acc1"), Some(&PyValue::Float(76.25)));
        let sd = v.get("state_dict").and_then(PyValue::as_dict).expect("sd");
        let zip = read("legacy_state_zip.pth");
        let want = zip.as_dict().expect("dict");
        assert_eq!(sd.len(), want.len());
        for ((k, t), (wk, wt)) in sd.iter().zip(want) {
            let wk = wk.as_str().expect("key");
            assert_eq!(k.as_str(), Some(format!("module.{wk}").as_str()));
            assert_eq!(t, wt, "{wk}");
        }
    }

    #[test]
    fn foreign_files_are_named_errors() {
        // A raw pickle that is not a legacy torch.save file.
        let msg = err_of(read_torch_checkpoint(&fixture("plain_p5.pkl"))).to_string();
        assert!(
            msg.contains("plain_p5.pkl") && msg.contains("without torch.save's magic number"),
            "{msg}"
        );
        let npz = err_of(read_torch_checkpoint(&fixture("bit_stored.npz"))).to_string();
        assert!(
            npz.contains("data.pkl") && npz.contains("bit_stored.npz"),
            "{npz}"
        );
        let missing = err_of(read_torch_checkpoint(&fixture("nope.pth"))).to_string();
        assert!(missing.contains("nope.pth"), "{missing}");
        for junk in [&b""[..], b"hello", b"PK\x03\x04", b"\x80\x02N."] {
            assert!(read_torch_checkpoint_bytes(junk, Path::new("j")).is_err());
        }
    }

    #[test]
    fn truncated_legacy_files_name_the_file_and_the_missing_part() {
        let full = std::fs::read(fixture("legacy_state.pth")).expect("fixture");
        let dir = tempfile::tempdir().expect("tempdir");
        let cut = dir.path().join("cut.pth");
        let cut_at = |n: usize| {
            std::fs::write(&cut, &full[..n]).expect("write");
            err_of(read_torch_checkpoint(&cut)).to_string()
        };
        let msg = cut_at(200);
        assert!(
            msg.contains("cut.pth") && msg.contains("object pickle: truncated pickle"),
            "{msg}"
        );
        for n in 1..full.len() {
            let r = read_torch_checkpoint_bytes(&full[..n], Path::new("p.pth"));
            let msg = err_of(r).to_string();
            assert!(
                msg.contains("p.pth") && (msg.contains("truncated") || msg.contains("cut short")),
                "prefix {n}: {msg}"
            );
        }
        // Cut in the storages: in an element count, in the bytes.
        let storage = f32s(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let obj = rebuild_call(true, "FloatStorage", "7", 6, Some(b"N"), 0, &[6], &[1]);
        let file = legacy_file(1001, true, 4, &obj, &["7"], &[(6, &storage)]);
        let n = file.len();
        for (cut, needle) in [
            (
                n - 27,
                "the element count of storage '7' (1 of 1) is missing",
            ),
            (
                n - 5,
                "storage '7' (1 of 1) needs 24 bytes (6 elements of f32)",
            ),
        ] {
            let msg = err_of(read_torch_checkpoint_bytes(
                &file[..cut],
                Path::new("c.pth"),
            ));
            let msg = msg.to_string();
            assert!(
                msg.contains("c.pth") && msg.contains("truncated") && msg.contains(needle),
                "{msg}"
            );
        }
        assert!(read_torch_checkpoint_bytes(&full, Path::new("p")).is_ok());
    }

    #[test]
    fn crafted_legacy_files() {
        let storage = f32s(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let whole = rebuild_call(true, "FloatStorage", "7", 6, Some(b"N"), 1, &[2], &[2]);
        let with = |obj: &[u8]| legacy_file(1001, true, 4, obj, &["7"], &[(6, &storage)]);
        let ok = |file: Vec<u8>| {
            let v = read_torch_checkpoint_bytes(&file, Path::new("l.pth"))
                .unwrap_or_else(|e| panic!("{e}"));
            v.as_tensor().expect("tensor").to_f32_vec().expect("f32")
        };
        assert_eq!(ok(with(&whole)), [1.0, 3.0]);
        assert_eq!(
            ok(legacy_file(1001, true, 8, &whole, &["7"], &[(6, &storage)])),
            [1.0, 3.0]
        );
        // A storage view (old torch): elements 2..5 of the storage; offset 1 within it.
        let mut view = b"(".to_vec();
        view.extend(s("v"));
        view.extend(int(2));
        view.extend(int(3));
        view.push(b't');
        let viewed = rebuild_call(true, "FloatStorage", "7", 6, Some(&view), 1, &[2], &[1]);
        assert_eq!(ok(with(&viewed)), [3.0, 4.0]);
        // torch < 0.4: _rebuild_tensor(storage, offset, size, stride).
        let v1 = rebuild_call(
            false,
            "FloatStorage",
            "7",
            6,
            Some(b"N"),
            2,
            &[2, 2],
            &[1, 2],
        );
        assert_eq!(ok(with(&v1)), [2.0, 4.0, 3.0, 5.0]);

        let mut view_past = b"(".to_vec();
        view_past.extend(s("v"));
        view_past.extend(int(4));
        view_past.extend(int(3));
        view_past.push(b't');
        let zip_pid = tensor_call("FloatStorage", 6, 0, &[1], &[1]);
        let mut v1_six = whole.clone();
        let at = v1_six.windows(3).position(|w| w == b"_v2").expect("v2");
        v1_six.drain(at..at + 3);
        let two = [
            &b"("[..],
            &whole,
            &rebuild_call(true, "FloatStorage", "8", 1, Some(b"N"), 0, &[1], &[1]),
            b"l",
        ]
        .concat();
        let bad_cases: Vec<(Vec<u8>, &str)> = vec![
            (
                legacy_file(1001, false, 4, &whole, &["7"], &[(6, &storage)]),
                "big-endian",
            ),
            (
                legacy_file(1001, true, 2, &whole, &["7"], &[(6, &storage)]),
                "type_sizes['long']",
            ),
            (
                legacy_file(1000, true, 4, &whole, &["7"], &[(6, &storage)]),
                "version",
            ),
            (
                legacy_file(1001, true, 4, &whole, &[], &[]),
                "storages: storage '7' is used by a tensor but missing from the key list",
            ),
            (
                legacy_file(1001, true, 4, &two, &["7"], &[(6, &storage)]),
                "storage '8' is used by a tensor but missing",
            ),
            (
                legacy_file(1001, true, 4, &whole, &["7", "9"], &[(6, &storage)]),
                "storage '9' (2 of 2) is in the key list but no tensor uses it",
            ),
            (
                legacy_file(
                    1001,
                    true,
                    4,
                    &whole,
                    &["7", "7"],
                    &[(6, &storage), (6, &storage)],
                ),
                "listed twice",
            ),
            (
                legacy_file(1001, true, 4, &whole, &["7"], &[(5, &storage)]),
                "holds 5 elements in the file, but the pickle says 6",
            ),
            (
                legacy_file(1001, true, 4, &whole, &["7"], &[(-1, &storage)]),
                "holds -1 elements",
            ),
            (
                legacy_file(
                    1001,
                    true,
                    4,
                    &whole,
                    &["7"],
                    &[(6, &[&storage[..], b"x"].concat())],
                ),
                "1 unexpected bytes after the last storage",
            ),
            (
                with(&rebuild_call(
                    true,
                    "FloatStorage",
                    "7",
                    1 << 40,
                    Some(b"N"),
                    0,
                    &[1],
                    &[1],
                )),
                "more than the file holds",
            ),
            (
                with(&rebuild_call(
                    true,
                    "FloatStorage",
                    "7",
                    6,
                    Some(&view_past),
                    0,
                    &[1],
                    &[1],
                )),
                "exceeds storage '7'",
            ),
            (
                with(&rebuild_call(
                    true,
                    "FloatStorage",
                    "7",
                    6,
                    Some(&view),
                    0,
                    &[4],
                    &[1],
                )),
                "exceeds its storage of 3 elements",
            ),
            (with(&zip_pid), "persistent id has 5 items, not 6"),
            (with(&v1_six), "_rebuild_tensor takes 4 arguments, got 6"),
        ];
        for (file, needle) in bad_cases {
            let msg = err_of(read_torch_checkpoint_bytes(&file, Path::new("l.pth"))).to_string();
            assert!(
                msg.contains(needle) && msg.contains("l.pth"),
                "{needle}: {msg}"
            );
        }
        // The zip format refuses the legacy persistent id.
        let legacy_pid = rebuild_call(true, "FloatStorage", "0", 6, Some(b"N"), 0, &[1], &[1]);
        let r = read_torch_checkpoint_bytes(
            &ckpt_zip(&framed(&legacy_pid), &storage, None),
            Path::new("c"),
        );
        assert!(err_of(r)
            .to_string()
            .contains("persistent id has 6 items, not 5"));
    }

    #[test]
    fn disallowed_globals_are_named() {
        for (file, global) in [
            ("evil_global.pth", "os.system"),
            ("evil_stack_global.pth", "builtins.eval"),
        ] {
            let err = err_of(read_torch_checkpoint(&fixture(file)));
            let msg = err.to_string();
            assert!(
                matches!(&err, WeightsError::DisallowedGlobal { global: g, .. } if g == global),
                "{msg}"
            );
            assert!(
                msg.contains(&format!("'{global}'")) && msg.contains(file),
                "{msg}"
            );
        }
        let p = framed(b"c__builtin__\ngetattr\n)R");
        assert!(matches!(
            read_pickle_bytes(&p, Path::new("x")),
            Err(WeightsError::DisallowedGlobal { .. })
        ));
    }

    #[test]
    fn crafted_tensors() {
        let storage = f32s(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let ok = |pkl: Vec<u8>, bytes: &[u8], order: Option<&[u8]>| {
            let v = read_torch_checkpoint_bytes(&ckpt_zip(&pkl, bytes, order), Path::new("c.pth"))
                .unwrap_or_else(|e| panic!("{e}"));
            v.as_tensor().expect("tensor").clone()
        };
        let t = ok(
            framed(&tensor_call("FloatStorage", 6, 1, &[2, 2], &[1, 3])),
            &storage,
            None,
        );
        assert_eq!(
            (t.shape.clone(), t.to_f32_vec()),
            (vec![2, 2], Some(vec![1.0, 4.0, 2.0, 5.0]))
        );
        let big: Vec<u8> = storage
            .chunks(4)
            .flat_map(|c| [c[3], c[2], c[1], c[0]])
            .collect();
        let t = ok(
            framed(&tensor_call("FloatStorage", 6, 0, &[3], &[2])),
            &big,
            Some(b"big"),
        );
        assert_eq!(t.to_f32_vec(), Some(vec![0.0, 2.0, 4.0]));
        let mut param = b"ctorch._utils\n_rebuild_parameter\n(".to_vec();
        param.extend(tensor_call("FloatStorage", 6, 5, &[], &[]));
        param.extend(b"\x88ccollections\nOrderedDict\n)RtR");
        let t = ok(framed(&param), &storage, Some(b"little"));
        assert_eq!((t.shape.clone(), t.to_f32_vec()), (vec![], Some(vec![5.0])));
        let empty = tensor_call("FloatStorage", 6, 9, &[1 << 40, 1 << 40, 0], &[1, 1, 1]);
        let t = ok(framed(&empty), &storage, None);
        assert_eq!((t.numel(), t.data.len()), (0, 0));
        let bad_cases: Vec<(Vec<u8>, &[u8], &str)> = vec![
            (
                tensor_call("FloatStorage", 6, 0, &[7], &[1]),
                &storage,
                "exceeds its storage",
            ),
            (
                tensor_call("FloatStorage", 6, 5, &[2], &[1]),
                &storage,
                "exceeds its storage",
            ),
            (
                tensor_call("FloatStorage", 6, 0, &[2, 2], &[3, i64::MAX / 2]),
                &storage,
                "exceeds its storage",
            ),
            (
                tensor_call("FloatStorage", 6, 0, &[-1], &[1]),
                &storage,
                "negative",
            ),
            (
                tensor_call("FloatStorage", 6, -1, &[1], &[1]),
                &storage,
                "negative",
            ),
            (
                tensor_call("FloatStorage", 6, 0, &[1, 1], &[1]),
                &storage,
                "differ in length",
            ),
            (
                tensor_call("FloatStorage", 7, 0, &[1], &[1]),
                &storage,
                "not 7 elements",
            ),
            (
                tensor_call("DoubleStorage", 6, 0, &[1], &[1]),
                &storage,
                "not 6 elements",
            ),
            (
                tensor_call("FloatStorage", 6, 0, &[1 << 40], &[0]),
                &storage,
                "expands",
            ),
            (
                tensor_call("FloatStorage", 6, 0, &[i64::MAX, 2], &[0, 0]),
                &storage,
                "expands",
            ),
        ];
        for (body, bytes, needle) in bad_cases {
            let r = read_torch_checkpoint_bytes(
                &ckpt_zip(&framed(&body), bytes, None),
                Path::new("c.pth"),
            );
            let msg = err_of(r).to_string();
            assert!(
                msg.contains(needle) && msg.contains("c.pth"),
                "{needle}: {msg}"
            );
        }
        let r = read_torch_checkpoint_bytes(
            &ckpt_zip(
                &framed(&tensor_call("FloatStorage", 6, 0, &[1], &[1])),
                &storage,
                Some(b"middle"),
            ),
            Path::new("c"),
        );
        assert!(err_of(r).to_string().contains("byteorder"));
        let no_storage = zip_of(&[(
            "archive/data.pkl",
            &framed(&tensor_call("FloatStorage", 6, 0, &[1], &[1])),
            false,
        )]);
        let msg = err_of(read_torch_checkpoint_bytes(&no_storage, Path::new("c"))).to_string();
        assert!(
            msg.contains("archive/data/0") && msg.contains("missing"),
            "{msg}"
        );
    }

    #[test]
    fn hostile_pickles_fail_cleanly() {
        let blobs = HashMap::new();
        let mut laughs = b"\x80\x02]q\x00".to_vec();
        for _ in 0..60 {
            laughs.extend(b"(h\x00h\x00lq\x00");
        }
        laughs.push(b'.');
        let mut deep = b"\x80\x02".to_vec();
        deep.extend(std::iter::repeat_n(b']', 5000));
        deep.extend(std::iter::repeat_n(b'a', 4999));
        deep.push(b'.');
        let mut quadratic = b"\x80\x02ccollections\nOrderedDict\nq\x01(".to_vec();
        for i in 0..2000u32 {
            quadratic.extend(b"J");
            quadratic.extend(i.to_le_bytes());
            quadratic.extend(b"N\x86");
        }
        quadratic.extend(b"l\x85q\x02");
        for _ in 0..2000 {
            quadratic.extend(b"h\x01h\x02R0");
        }
        quadratic.extend(b"N.");
        let mut many = b"\x80\x02".to_vec();
        many.extend(std::iter::repeat_n(b'N', (1 << 22) + 10));
        let mut rehash = b"\x80\x02}q\x00".to_vec();
        rehash.extend(s(&"k".repeat(60000)));
        rehash.extend(b"q\x010");
        for _ in 0..200 {
            rehash.extend(b"h\x01Ns");
        }
        rehash.push(b'.');
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (laughs, "expands"),
            (many, "more than 4194304 values"),
            (rehash, "copying"),
            (b"\x80\x02]q\x00h\x00a.".to_vec(), "deeper"),
            (deep, "deeper"),
            (quadratic, "copying"),
            (b"\x80\x02\x8b\xff\xff\xff\x7f.".to_vec(), "truncated"),
            (b"\x80\x02\x8b\xff\xff\xff\xff.".to_vec(), "negative"),
            (
                b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\x7f.".to_vec(),
                "truncated",
            ),
            (
                b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.".to_vec(),
                "64 bits",
            ),
            (b"\x80\x02h\x05.".to_vec(), "memo key 5"),
            (b"\x80\x02a.".to_vec(), "underflow"),
            (b"\x80\x02(K\x01K\x02s.".to_vec(), "underflow"),
            (b"\x80\x02K\x00K\x01K\x02s.".to_vec(), "needs a dict"),
            (b"\x80\x02\xfe.".to_vec(), "unknown pickle opcode 0xfe"),
            (b"\x80\x02(iposix\nsystem\n.".to_vec(), "INST"),
            (b"\x80\x06N.".to_vec(), "protocol 6"),
            (b"\x80\x02N".to_vec(), "no STOP"),
            (b"\x80\x02X\x02\x00\x00\x00\xff\xfe.".to_vec(), "UTF-8"),
            (
                b"\x80\x02ctorch\nFloatStorage\n.".to_vec(),
                "used as a value",
            ),
            (b"\x80\x02K\x01Q.".to_vec(), "persistent id"),
            (
                b"\x80\x02ccollections\nOrderedDict\nK\x01R.".to_vec(),
                "not a tuple",
            ),
            (b"\x80\x02I99999999999999999999\n.".to_vec(), "too large"),
        ];
        for (pkl, needle) in cases {
            let msg = match run_vm(&pkl, &blobs) {
                Ok(v) => panic!("{needle}: parsed as {v:?}"),
                Err(p) => p.at(Path::new("h.pkl")).to_string(),
            };
            assert!(msg.contains(needle), "{needle}: {msg}");
        }
    }

    #[test]
    fn every_prefix_is_an_error() {
        let full = std::fs::read(fixture("checkpoint.pth.tar")).expect("fixture");
        for n in 0..full.len() {
            assert!(
                read_torch_checkpoint_bytes(&full[..n], Path::new("p")).is_err(),
                "prefix {n} parsed"
            );
        }
        let (pkl, blobs) = parts("checkpoint.pth.tar");
        assert!(run_vm(&pkl, &blobs).is_ok());
        for n in 0..pkl.len() {
            assert!(
                run_vm(&pkl[..n], &blobs).is_err(),
                "pickle prefix {n} parsed"
            );
        }
    }

    #[test]
    fn mutated_input_never_panics() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for len in [1usize, 2, 14, 100, 5000] {
            let junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            assert!(read_torch_checkpoint_bytes(&junk, Path::new("junk")).is_err());
            assert!(read_pickle_bytes(&junk, Path::new("junk")).is_err());
        }
        let full = std::fs::read(fixture("checkpoint.pth.tar")).expect("fixture");
        let mut rejected = 0;
        for _ in 0..1000 {
            let mut b = full.clone();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(b.len());
                b[at] ^= 1 << rng.below(8);
            }
            rejected += usize::from(read_torch_checkpoint_bytes(&b, Path::new("m")).is_err());
        }
        assert!(
            rejected > 500,
            "only {rejected} mutated files were rejected"
        );
        // The legacy format has no checksum: most flips land in storage bytes and read.
        let full = std::fs::read(fixture("legacy_state.pth")).expect("fixture");
        let mut rejected = 0;
        for _ in 0..2000 {
            let mut b = full.clone();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(b.len());
                b[at] ^= 1 << rng.below(8);
            }
            rejected += usize::from(read_torch_checkpoint_bytes(&b, Path::new("m")).is_err());
        }
        assert!(
            rejected > 500,
            "only {rejected} mutated legacy files were rejected"
        );
        // Mutate the pickle itself, behind the zip's CRC.
        let (pkl, blobs) = parts("checkpoint.pth.tar");
        let ops = b"().NKMJGXhqjrtseuabR\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x93\x94\x95Q]})0";
        let mut rejected = 0;
        for _ in 0..8000 {
            let mut b = pkl.clone();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(b.len());
                match rng.below(4) {
                    0 => b[at] ^= 1 << rng.below(8),
                    1 => b[at] = rng.next() as u8,
                    2 => b[at] = ops[rng.below(ops.len())],
                    _ => {
                        let n = rng.below(8).min(b.len() - at);
                        b.drain(at..at + n);
                    }
                }
            }
            rejected += usize::from(run_vm(&b, &blobs).is_err());
        }
        assert!(
            rejected > 2000,
            "only {rejected} mutated pickles were rejected"
        );
    }
}
