//! PyTorch checkpoints (`torch.save` since 1.6: a zip of `data.pkl` plus one file
//! per storage) read without Python and without executing anything.
//!
//! `data.pkl` is a pickle program. Instead of running it, [`Unpickler`] interprets
//! the opcodes that a state dict uses and builds plain values; the only callables
//! it knows are an allow-list (`collections.OrderedDict`, the tensor rebuild
//! functions and the storage classes), and any other global (`os.system`,
//! `builtins.eval`, a user class...) stops the read with an error naming it.
//! Tensors are rebuilt from (storage, offset, shape, stride), so views,
//! non-contiguous tensors and storages shared between tensors read correctly.

use anyhow::{anyhow, bail, Context, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::rc::Rc;

use super::weights::Tensor;

/// Element type of a torch storage.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    U8,
}

impl DType {
    fn from_storage(name: &str) -> Option<DType> {
        Some(match name {
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "DoubleStorage" => DType::F64,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ByteStorage" => DType::U8,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F64 | DType::I64 => 8,
            DType::U8 => 1,
        }
    }
    fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }
    /// Element `i` of little-endian `bytes`, as f64 (exact for every float type here).
    fn get(self, bytes: &[u8], i: usize) -> f64 {
        let b = &bytes[i * self.size()..(i + 1) * self.size()];
        match self {
            DType::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
            DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
            DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
            DType::F64 => f64::from_le_bytes(b.try_into().unwrap()),
            DType::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f64,
            DType::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f64,
            DType::U8 => b[0] as f64,
        }
    }
}

/// A tensor as the pickle describes it: a view of a storage.
#[derive(Clone, Debug)]
struct TensorRef {
    dtype: DType,
    key: String,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// The callables a state dict's pickle may name.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(DType),
}

/// A pickled value. Lists and dicts are shared (`Rc`) because the pickle fills
/// them after memoising them, and later references must see the filled one.
/// (Scalars other than ints are kept for `Debug` only: a state dict ignores them.)
#[derive(Clone, Debug)]
#[allow(dead_code)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage { dtype: DType, key: String },
    Tensor(TensorRef),
    Mark,
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "class",
            Value::Storage { .. } => "storage",
            Value::Tensor(_) => "tensor",
            Value::Mark => "mark",
        }
    }
    fn int(&self) -> Result<i64> {
        match self {
            Value::Int(i) => Ok(*i),
            other => bail!("expected an int, found a {}", other.kind()),
        }
    }
    fn ints(&self) -> Result<Vec<usize>> {
        match self {
            Value::Tuple(v) => v.iter().map(|x| x.int().and_then(|i| usize::try_from(i).map_err(|_| anyhow!("negative size or stride {i}")))).collect(),
            other => bail!("expected a tuple of ints, found a {}", other.kind()),
        }
    }
}

fn allowed_global(module: &str, name: &str) -> Result<Global> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", s) if DType::from_storage(s).is_some() => Global::Storage(DType::from_storage(s).unwrap()),
        _ => bail!("refuses the Python global `{module}.{name}`: a PyTorch state dict needs only tensors, storages and OrderedDict, and nothing in a checkpoint is ever executed"),
    })
}

/// Interprets a pickle program (protocols 2 to 5) over the allow-listed globals.
struct Unpickler<'a> {
    code: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.code.len()).ok_or_else(|| anyhow!("pickle ends in the middle of an opcode"))?;
        let s = &self.code[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.code[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| anyhow!("pickle ends inside a text line"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<Value> {
        Ok(Value::Str(String::from_utf8(self.take(n)?.to_vec()).map_err(|_| anyhow!("invalid UTF-8 string"))?))
    }
    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().ok_or_else(|| anyhow!("pickle pops an empty stack"))
    }
    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().ok_or_else(|| anyhow!("pickle reads an empty stack"))
    }
    /// Pops everything down to the last MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self.stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or_else(|| anyhow!("pickle has no MARK to pop to"))?;
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items)
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO n
                }
                0x95 => {
                    self.take(8)?; // FRAME length
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64))
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        bail!("integer of {n} bytes is too large");
                    }
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v))
                }
                b'I' => {
                    let l = self.line()?;
                    let v = match l.as_str() {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => Value::Int(s.parse().map_err(|_| anyhow!("bad INT {s:?}"))?),
                    };
                    self.stack.push(v)
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.utf8(n)?;
                    self.stack.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.utf8(n)?;
                    self.stack.push(v)
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.take(8)?.try_into().unwrap()) as usize;
                    let v = self.utf8(n)?;
                    self.stack.push(v)
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b))
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b))
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b))
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b))
                }
                b')' => self.stack.push(Value::Tuple(vec![])),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        bail!("pickle builds a tuple from a short stack");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items))
                }
                b']' => self.stack.push(Value::List(Rc::new(RefCell::new(vec![])))),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))))
                }
                b'}' => self.stack.push(Value::Dict(Rc::new(RefCell::new(vec![])))),
                b'd' => {
                    let items = self.pop_mark()?;
                    let dict = pairs(items)?;
                    self.stack.push(Value::Dict(Rc::new(RefCell::new(dict))))
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().push(v),
                        other => bail!("APPEND to a {}", other.kind()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        other => bail!("APPENDS to a {}", other.kind()),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => d.borrow_mut().push((k, v)),
                        other => bail!("SETITEM on a {}", other.kind()),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let kv = pairs(items)?;
                    match self.top()? {
                        Value::Dict(d) => d.borrow_mut().extend(kv),
                        other => bail!("SETITEMS on a {}", other.kind()),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    // MEMOIZE (protocol 4): the next free index.
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'p' => {
                    let i: u32 = self.line()?.parse().map_err(|_| anyhow!("bad PUT index"))?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' | b'g' => {
                    let i = match op {
                        b'h' => self.u8()? as u32,
                        b'j' => self.u32()?,
                        _ => self.line()?.parse().map_err(|_| anyhow!("bad GET index"))?,
                    };
                    let v = self.memo.get(&i).cloned().ok_or_else(|| anyhow!("pickle reads memo slot {i}, which was never set"))?;
                    self.stack.push(v)
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(allowed_global(&module, &name)?))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(allowed_global(&m, &n)?)),
                        _ => bail!("STACK_GLOBAL without module and name strings"),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent_load(pid)?)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    self.stack.push(call(f, args)?)
                }
                0x81 => {
                    // NEWOBJ cls args: only OrderedDict can be constructed this way.
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.stack.push(call(cls, args)?)
                }
                b'b' => {
                    // BUILD: object state. OrderedDict's state (a state dict's
                    // `_metadata` attribute) and a tensor's are not needed.
                    self.pop()?;
                }
                other => bail!("unsupported pickle opcode 0x{other:02x} at byte {}", self.pos - 1),
            }
        }
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    if items.len() % 2 != 0 {
        bail!("odd number of items for a dict");
    }
    let mut it = items.into_iter();
    let mut out = vec![];
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// `('storage', StorageClass, key, location, numel)`, as torch.save writes it.
fn persistent_load(pid: Value) -> Result<Value> {
    let Value::Tuple(t) = pid else { bail!("persistent id is a {}, expected a tuple", pid.kind()) };
    match t.as_slice() {
        [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), ..] if tag == "storage" => Ok(Value::Storage { dtype: *dtype, key: key.clone() }),
        _ => bail!("unsupported persistent id (expected ('storage', <torch storage class>, key, ...))"),
    }
}

/// Applies an allow-listed callable.
fn call(f: Value, args: Value) -> Result<Value> {
    let Value::Tuple(args) = args else { bail!("call arguments are a {}, expected a tuple", args.kind()) };
    match f {
        Value::Global(Global::OrderedDict) => Ok(Value::Dict(Rc::new(RefCell::new(vec![])))),
        Value::Global(Global::RebuildTensorV2) => {
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            if args.len() < 4 {
                bail!("_rebuild_tensor_v2 with {} arguments", args.len());
            }
            let Value::Storage { dtype, key } = &args[0] else { bail!("_rebuild_tensor_v2 on a {}, expected a storage", args[0].kind()) };
            let shape = args[2].ints()?;
            let stride = args[3].ints()?;
            if shape.len() != stride.len() {
                bail!("tensor with {} sizes and {} strides", shape.len(), stride.len());
            }
            let offset = usize::try_from(args[1].int()?).map_err(|_| anyhow!("negative storage offset"))?;
            Ok(Value::Tensor(TensorRef { dtype: *dtype, key: key.clone(), offset, shape, stride }))
        }
        Value::Global(Global::RebuildParameter) => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => bail!("_rebuild_parameter without a tensor"),
        },
        other => bail!("a pickle calls a {}, which is not callable here", other.kind()),
    }
}

/// A read PyTorch checkpoint: its float tensors in file order, as f32.
pub struct TorchFile {
    pub tensors: Vec<(String, Tensor)>,
}

/// True when `bytes` look like a zip archive (what `torch.save` writes).
pub fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06")
}

/// Reads a `torch.save` zip: the state dict (raw, or under `state_dict` /
/// `model` / `model_state_dict` / `state_dict_ema`), float tensors only (integer
/// buffers such as `num_batches_tracked` are dropped), `module.` prefixes kept
/// (the caller strips them). Errors are bare reasons; the caller adds the path.
pub fn read(bytes: &[u8]) -> Result<TorchFile> {
    if bytes.starts_with(&[0x80, 0x02, 0x8a, 0x0a]) {
        bail!("a legacy (before PyTorch 1.6) checkpoint; re-save it with a current torch.save, or convert it to safetensors");
    }
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| anyhow!("not a readable zip archive ({e}); truncated or corrupt?"))?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let pkl = names.iter().filter(|n| n.ends_with("data.pkl")).min_by_key(|n| n.len()).cloned().ok_or_else(|| anyhow!("zip archive without data.pkl: not a torch.save checkpoint"))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    if let Some(order) = names.iter().find(|n| **n == format!("{prefix}byteorder")) {
        let mut s = String::new();
        zip.by_name(order)?.read_to_string(&mut s).ok();
        if s.trim() != "little" {
            bail!("storages are {}-endian; only little-endian checkpoints are supported", s.trim());
        }
    }
    let mut read_entry = |name: &str| -> Result<Vec<u8>> {
        let mut f = zip.by_name(name).map_err(|e| match e {
            zip::result::ZipError::FileNotFound => anyhow!("the archive lacks {name}"),
            e => anyhow!("cannot read {name} ({e})"),
        })?;
        let mut v = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut v).map_err(|e| anyhow!("cannot read {name} ({e}); truncated or corrupt?"))?;
        Ok(v)
    };
    let code = read_entry(&pkl)?;
    let root = Unpickler { code: &code, pos: 0, stack: vec![], memo: HashMap::new() }.run().context("data.pkl")?;
    let dict = state_dict(root)?;

    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensors = vec![];
    for (k, v) in dict.borrow().iter() {
        let Value::Str(name) = k else { bail!("state dict key is a {}, expected a string", k.kind()) };
        let t = match v {
            Value::Tensor(t) => t,
            _ => continue, // e.g. a stored hyper-parameter next to the tensors
        };
        if !t.dtype.is_float() {
            continue;
        }
        if !storages.contains_key(&t.key) {
            let data = read_entry(&format!("{prefix}data/{}", t.key))?;
            storages.insert(t.key.clone(), data);
        }
        let data = &storages[&t.key];
        tensors.push((name.clone(), gather(t, data).with_context(|| format!("tensor {name}"))?));
    }
    Ok(TorchFile { tensors })
}

/// Picks the state dict out of what `torch.load` would return.
fn state_dict(root: Value) -> Result<Rc<RefCell<Vec<(Value, Value)>>>> {
    let Value::Dict(d) = root else { bail!("the pickle holds a {}, not a state dict", root.kind()) };
    let has_tensors = d.borrow().iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
    if has_tensors {
        return Ok(d);
    }
    for key in ["state_dict", "model", "model_state_dict", "state_dict_ema", "module"] {
        let inner = d.borrow().iter().find(|(k, _)| matches!(k, Value::Str(s) if s == key)).map(|(_, v)| v.clone());
        if let Some(Value::Dict(inner)) = inner {
            if inner.borrow().iter().any(|(_, v)| matches!(v, Value::Tensor(_))) {
                return Ok(inner);
            }
        }
    }
    let keys: Vec<String> = d.borrow().iter().filter_map(|(k, _)| if let Value::Str(s) = k { Some(s.clone()) } else { None }).take(8).collect();
    bail!("no tensors at the top level nor under `state_dict` or `model` (keys: {})", keys.join(", "))
}

/// Copies a strided view of a storage into a dense f32 tensor.
fn gather(t: &TensorRef, data: &[u8]) -> Result<Tensor> {
    let n: usize = t.shape.iter().product();
    let elems = data.len() / t.dtype.size();
    if n > 0 {
        let last = t.offset + t.shape.iter().zip(&t.stride).map(|(s, st)| (s - 1) * st).sum::<usize>();
        if last >= elems {
            bail!("view reaches element {last} of a storage of {elems} (truncated storage file?)");
        }
    }
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; t.shape.len()];
    for _ in 0..n {
        let at = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(t.dtype.get(data, at) as f32);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(Tensor::new(t.shape.clone(), out))
}
