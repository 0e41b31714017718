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

use super::tensors::Tensor;

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
    /// One element from its little-endian bytes, as f64 (exact for every float type here).
    fn get(self, b: &[u8]) -> f64 {
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
struct TensorRef {
    dtype: DType,
    key: Rc<str>,
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

/// A container's items and how deeply it nests.
struct Seq<T> {
    depth: u32,
    items: Vec<T>,
}

type Shared<T> = Rc<RefCell<Seq<T>>>;

/// A pickled value. Every payload is shared (`Rc`), so the memo and DUP copy a
/// value in O(1) whatever it holds (copying would let 40 GET/PUT rounds double a
/// tuple into gigabytes). Lists and dicts are also mutable because the pickle
/// fills them after memoising them, and later references must see the filled
/// one. Scalars a state dict never reads keep only their kind.
#[derive(Clone)]
enum Value {
    Scalar(&'static str),
    Int(i64),
    Str(Rc<str>),
    Tuple(Rc<Seq<Value>>),
    List(Shared<Value>),
    Dict(Shared<(Value, Value)>),
    Global(Global),
    Storage { dtype: DType, key: Rc<str> },
    Tensor(Rc<TensorRef>),
    Mark,
}

/// Nesting a state dict never comes near (it needs fewer than 10 levels).
const MAX_DEPTH: u32 = 1000;
/// Values created plus memo slots filled: a state dict makes about 30 per tensor,
/// so this is far above the ~1000 tensors of the largest CvT, and bounds memory.
const MAX_VALUES: usize = 2_000_000;
/// Bytes of all strings together (names, storage keys).
const MAX_TEXT: usize = 64 << 20;
/// Dimensions of one tensor (torch itself stops at 64).
const MAX_DIMS: usize = 64;

/// Dropping a value nested a million deep must not recurse once per level: the
/// children of containers this value alone owns move to a heap stack and are
/// dropped from there. (Shared containers are only released; a cycle built
/// through the memo leaks, bounded by MAX_VALUES.)
impl Drop for Value {
    fn drop(&mut self) {
        let mut pending = vec![];
        self.take_children(&mut pending);
        while let Some(mut v) = pending.pop() {
            v.take_children(&mut pending);
        }
    }
}

impl Value {
    fn take_children(&mut self, out: &mut Vec<Value>) {
        match self {
            Value::Tuple(t) => {
                if let Some(t) = Rc::get_mut(t) {
                    out.append(&mut t.items)
                }
            }
            Value::List(l) => {
                if let Some(l) = Rc::get_mut(l) {
                    out.append(&mut l.get_mut().items)
                }
            }
            Value::Dict(d) => {
                if let Some(d) = Rc::get_mut(d) {
                    out.extend(d.get_mut().items.drain(..).flat_map(|(k, v)| [k, v]))
                }
            }
            _ => {}
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            Value::Scalar(kind) => kind,
            Value::Int(_) => "int",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "class",
            Value::Storage { .. } => "storage",
            Value::Tensor(_) => "tensor",
            Value::Mark => "mark",
        }
    }
    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(t) => t.depth,
            Value::List(l) => l.borrow().depth,
            Value::Dict(d) => d.borrow().depth,
            _ => 0,
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
            Value::Tuple(v) => v.items.iter().map(|x| x.int().and_then(|i| usize::try_from(i).map_err(|_| anyhow!("negative size or stride {i}")))).collect(),
            other => bail!("expected a tuple of ints, found a {}", other.kind()),
        }
    }
    fn tuple(items: Vec<Value>) -> Result<Value> {
        Ok(Value::Tuple(Rc::new(Seq { depth: depth_around(&items)?, items })))
    }
    fn list(items: Vec<Value>) -> Result<Value> {
        Ok(Value::List(Rc::new(RefCell::new(Seq { depth: depth_around(&items)?, items }))))
    }
    fn dict(items: Vec<(Value, Value)>) -> Result<Value> {
        Ok(Value::Dict(Rc::new(RefCell::new(Seq { depth: depth_around(&flat(&items))?, items }))))
    }
}

/// The depth of a container holding `items`. It is tracked as values are built
/// bottom-up, the way a pickle builds them; a container filled after it was
/// nested elsewhere updates only its own depth, which is why Drop is iterative.
fn depth_around(items: &[impl std::borrow::Borrow<Value>]) -> Result<u32> {
    let d = items.iter().map(|v| v.borrow().depth()).max().unwrap_or(0);
    if d >= MAX_DEPTH {
        bail!("pickle nests containers more than {MAX_DEPTH} deep; a state dict needs fewer than 10 levels");
    }
    Ok(d + 1)
}

fn flat(pairs: &[(Value, Value)]) -> Vec<&Value> {
    pairs.iter().flat_map(|(k, v)| [k, v]).collect()
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
    /// Values and memo slots made so far, and bytes of text (MAX_VALUES, MAX_TEXT).
    made: usize,
    text: usize,
}

impl<'a> Unpickler<'a> {
    fn new(code: &'a [u8]) -> Self {
        Unpickler { code, pos: 0, stack: vec![], memo: HashMap::new(), made: 0, text: 0 }
    }
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
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| anyhow!("invalid UTF-8 string"))?;
        self.text = self.text.saturating_add(n);
        if self.text > MAX_TEXT {
            bail!("pickle holds more than {MAX_TEXT} bytes of strings; a state dict holds far less");
        }
        Ok(Value::Str(s.into()))
    }
    /// Counts one more value or memo slot against MAX_VALUES.
    fn spend(&mut self) -> Result<()> {
        self.made += 1;
        if self.made > MAX_VALUES {
            bail!("pickle builds more than {MAX_VALUES} values; a state dict builds far fewer");
        }
        Ok(())
    }
    fn push(&mut self, v: Value) -> Result<()> {
        self.spend()?;
        self.stack.push(v);
        Ok(())
    }
    fn memoize(&mut self, i: u32) -> Result<()> {
        let v = self.top()?.clone();
        if self.memo.insert(i, v).is_none() {
            self.spend()?;
        }
        Ok(())
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
    fn pop_pairs(&mut self) -> Result<Vec<(Value, Value)>> {
        let items = self.pop_mark()?;
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
                b'(' => self.push(Value::Mark)?,
                b'N' => self.push(Value::Scalar("None"))?,
                0x88 | 0x89 => self.push(Value::Scalar("bool"))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.push(Value::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))?
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
                    self.push(Value::Int(v))?
                }
                b'I' => {
                    let l = self.line()?;
                    let v = match l.as_str() {
                        "00" | "01" => Value::Scalar("bool"),
                        s => Value::Int(s.parse().map_err(|_| anyhow!("bad INT {s:?}"))?),
                    };
                    self.push(v)?
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Value::Scalar("float"))?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v)?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v)?
                }
                0x8d => {
                    let n = usize::try_from(u64::from_le_bytes(self.take(8)?.try_into().unwrap())).map_err(|_| anyhow!("pickle ends in the middle of an opcode"))?;
                    let v = self.utf8(n)?;
                    self.push(v)?
                }
                // Bytes (SHORT_BINSTRING, BINSTRING, SHORT_BINBYTES, BINBYTES): never read.
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    self.take(n)?;
                    self.push(Value::Scalar("bytes"))?
                }
                b'T' | b'B' => {
                    let n = self.u32()? as usize;
                    self.take(n)?;
                    self.push(Value::Scalar("bytes"))?
                }
                b')' => self.push(Value::tuple(vec![])?)?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::tuple(items)?)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        bail!("pickle builds a tuple from a short stack");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::tuple(items)?)?
                }
                b']' => self.push(Value::list(vec![])?)?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::list(items)?)?
                }
                b'}' => self.push(Value::dict(vec![])?)?,
                b'd' => {
                    let items = self.pop_pairs()?;
                    self.push(Value::dict(items)?)?
                }
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    let depth = depth_around(&items)?;
                    match self.top()? {
                        Value::List(l) => {
                            let mut l = l.borrow_mut();
                            l.depth = l.depth.max(depth);
                            l.items.extend(items)
                        }
                        other => bail!("APPEND to a {}", other.kind()),
                    }
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop()?;
                        vec![(self.pop()?, v)]
                    } else {
                        self.pop_pairs()?
                    };
                    let depth = depth_around(&flat(&items))?;
                    match self.top()? {
                        Value::Dict(d) => {
                            let mut d = d.borrow_mut();
                            d.depth = d.depth.max(depth);
                            d.items.extend(items)
                        }
                        other => bail!("SETITEM on a {}", other.kind()),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memoize(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memoize(i)?
                }
                // MEMOIZE (protocol 4): the next free index.
                0x94 => self.memoize(self.memo.len() as u32)?,
                b'p' => {
                    let i: u32 = self.line()?.parse().map_err(|_| anyhow!("bad PUT index"))?;
                    self.memoize(i)?
                }
                b'h' | b'j' | b'g' => {
                    let i = match op {
                        b'h' => self.u8()? as u32,
                        b'j' => self.u32()?,
                        _ => self.line()?.parse().map_err(|_| anyhow!("bad GET index"))?,
                    };
                    let v = self.memo.get(&i).cloned().ok_or_else(|| anyhow!("pickle reads memo slot {i}, which was never set"))?;
                    self.push(v)?
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(allowed_global(&module, &name)?))?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module, &name) {
                        (Value::Str(m), Value::Str(n)) => self.push(Value::Global(allowed_global(m, n)?))?,
                        _ => bail!("STACK_GLOBAL without module and name strings"),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push(persistent_load(&pid)?)?
                }
                // REDUCE f args, and NEWOBJ cls args (only OrderedDict can be constructed that way).
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    self.push(call(&f, &args)?)?
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

/// `('storage', StorageClass, key, location, numel)`, as torch.save writes it.
fn persistent_load(pid: &Value) -> Result<Value> {
    let Value::Tuple(t) = pid else { bail!("persistent id is a {}, expected a tuple", pid.kind()) };
    match t.items.as_slice() {
        [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), ..] if &**tag == "storage" => Ok(Value::Storage { dtype: *dtype, key: key.clone() }),
        _ => bail!("unsupported persistent id (expected ('storage', <torch storage class>, key, ...))"),
    }
}

/// Applies an allow-listed callable.
fn call(f: &Value, args: &Value) -> Result<Value> {
    let Value::Tuple(args) = args else { bail!("call arguments are a {}, expected a tuple", args.kind()) };
    let args = args.items.as_slice();
    match f {
        Value::Global(Global::OrderedDict) => Value::dict(vec![]),
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
            if shape.len() > MAX_DIMS {
                bail!("tensor with {} dimensions (at most {MAX_DIMS})", shape.len());
            }
            let offset = usize::try_from(args[1].int()?).map_err(|_| anyhow!("negative storage offset"))?;
            Ok(Value::Tensor(Rc::new(TensorRef { dtype: *dtype, key: key.clone(), offset, shape, stride })))
        }
        Value::Global(Global::RebuildParameter) => match args.first() {
            Some(t @ Value::Tensor(_)) => Ok(t.clone()),
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

/// True when `bytes` are a legacy (before PyTorch 1.6) `torch.save` file: a bare
/// pickle stream that opens with torch's magic number as a 10-byte LONG1.
pub fn is_legacy(bytes: &[u8]) -> bool {
    const MAGIC: [u8; 12] = [0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
    bytes.first() == Some(&0x80) && bytes[..bytes.len().min(32)].windows(MAGIC.len()).any(|w| w == MAGIC)
}

/// Reads a `torch.save` zip: the state dict (raw, or under `state_dict` /
/// `model` / `model_state_dict` / `state_dict_ema`), float tensors only (integer
/// buffers such as `num_batches_tracked` are dropped), `module.` prefixes kept
/// (the caller strips them). Errors are bare reasons; the caller adds the path.
pub fn read(bytes: &[u8]) -> Result<TorchFile> {
    if is_legacy(bytes) {
        bail!("a legacy (before PyTorch 1.6) checkpoint; re-save it with a current torch.save, or convert it to safetensors");
    }
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| anyhow!("not a readable zip archive ({e}); truncated or corrupt?"))?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let pkl = names.iter().filter(|n| n.ends_with("data.pkl")).min_by_key(|n| n.len()).cloned().ok_or_else(|| anyhow!("zip archive without data.pkl: not a torch.save checkpoint"))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let whole = bytes.len() as u64;
    let mut read_entry = |name: &str| -> Result<Vec<u8>> {
        let f = zip.by_name(name).map_err(|e| match e {
            zip::result::ZipError::FileNotFound => anyhow!("the archive lacks {name}"),
            e => anyhow!("cannot read {name} ({e})"),
        })?;
        // A declared size is never an allocation: torch.save stores entries
        // uncompressed (this zip reader has no deflate), so an honest entry is
        // never larger than the archive, and reading stops there regardless.
        if f.size() > whole {
            bail!("{name} declares {} bytes, more than the whole archive ({whole} bytes); corrupt?", f.size());
        }
        let mut v = vec![];
        f.take(whole).read_to_end(&mut v).map_err(|e| anyhow!("cannot read {name} ({e}); truncated or corrupt?"))?;
        Ok(v)
    };
    let order = format!("{prefix}byteorder");
    if names.contains(&order) {
        let s = read_entry(&order)?;
        let s = String::from_utf8_lossy(&s);
        if s.trim() != "little" {
            bail!("storages are {}-endian; only little-endian checkpoints are supported", s.trim());
        }
    }
    let code = read_entry(&pkl)?;
    let root = Unpickler::new(&code).run().context("data.pkl")?;
    let dict = state_dict(&root)?;

    let mut storages: HashMap<Rc<str>, Vec<u8>> = HashMap::new();
    let mut tensors = vec![];
    // Storages shared between tensors could otherwise expand a small file into
    // any number of full-size copies; honest sharing (views, tied weights) reads
    // far fewer elements than this.
    let mut budget = bytes.len().saturating_mul(2);
    for (k, v) in dict.borrow().items.iter() {
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
        tensors.push((name.to_string(), gather(t, data, &mut budget).with_context(|| format!("tensor {name}"))?));
    }
    Ok(TorchFile { tensors })
}

/// Picks the state dict out of what `torch.load` would return.
fn state_dict(root: &Value) -> Result<Shared<(Value, Value)>> {
    let Value::Dict(d) = root else { bail!("the pickle holds a {}, not a state dict", root.kind()) };
    let has_tensors = |d: &Shared<(Value, Value)>| d.borrow().items.iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
    if has_tensors(d) {
        return Ok(d.clone());
    }
    for key in ["state_dict", "model", "model_state_dict", "state_dict_ema", "module"] {
        let inner = d.borrow().items.iter().find(|(k, _)| matches!(k, Value::Str(s) if &**s == key)).map(|(_, v)| v.clone());
        if let Some(Value::Dict(inner)) = &inner {
            if has_tensors(inner) {
                return Ok(inner.clone());
            }
        }
    }
    let keys: Vec<String> = d.borrow().items.iter().filter_map(|(k, _)| if let Value::Str(s) = k { Some(s.to_string()) } else { None }).take(8).collect();
    bail!("no tensors at the top level nor under `state_dict` or `model` (keys: {})", keys.join(", "))
}

/// Copies a strided view of a storage into a dense f32 tensor. Every offset is
/// checked before anything is allocated; `budget` is how many elements the
/// file's tensors may still produce.
fn gather(t: &TensorRef, data: &[u8], budget: &mut usize) -> Result<Tensor> {
    let size = t.dtype.size();
    let elems = data.len() / size;
    let n = if t.shape.contains(&0) {
        0
    } else {
        // Strides are non-negative, so the last element is the furthest one and
        // bounding it bounds every offset the loop below computes.
        let last = t.shape.iter().zip(&t.stride).try_fold(t.offset, |at, (&s, &st)| (s - 1).checked_mul(st)?.checked_add(at));
        match last {
            Some(last) if last < elems => {}
            Some(last) => bail!("view reaches element {last} of a storage of {elems} (truncated storage file?)"),
            None => bail!("view offsets overflow (shape {:?}, strides {:?})", t.shape, t.stride),
        }
        // Zero or overlapping strides (a broadcast view) could make a huge tensor
        // of one stored element; a saved parameter or buffer never is one.
        t.shape.iter().try_fold(1usize, |a, &s| a.checked_mul(s)).filter(|&n| n <= elems).ok_or_else(|| anyhow!("shape {:?} has more elements than its storage ({elems})", t.shape))?
    };
    *budget = budget.checked_sub(n).ok_or_else(|| anyhow!("the tensors read back many times more elements than the archive stores (one storage shared by too many tensors)"))?;
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; t.shape.len()];
    for _ in 0..n {
        let at = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(t.dtype.get(&data[at * size..(at + 1) * size]) as f32);
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
