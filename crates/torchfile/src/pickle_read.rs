//! Pickle reading: a restricted VM for protocols 0-5 as torch.save / CPython emit them. It never
//! imports or calls anything. Known globals become values (OrderedDict, tensors rebuilt from
//! storage persistent ids, `_codecs.encode` bytes); every other global becomes an opaque
//! `Value::Object`. Objects live in an arena while unpickling (so memoized containers are shared
//! and mutated like Python's), then the root is copied out under depth and size budgets.

use crate::error::Error;
use crate::value::{DType, TensorRef, Value};
use std::collections::HashMap;

/// Resource bounds for unpickling untrusted data.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deepest container nesting in the result (cycles hit this too).
    pub max_depth: usize,
    /// Budget for the result: one unit per value plus one per 64 bytes of string/bytes data.
    pub max_output_units: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_depth: 100, max_output_units: 1 << 24 }
    }
}

type Id = usize;

#[derive(Debug, Clone)]
enum Node {
    Leaf(Value),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Dict { ordered: bool, items: Vec<(Id, Id)> },
    Global { module: String, name: String },
    Storage { dtype: DType, key: String, numel: usize },
    Tensor(TensorRef),
    Object { class: String, args: Vec<Id>, state: Option<Id> },
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    /// Start offset of the opcode being executed (for error messages).
    op_at: usize,
    arena: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    /// Elements REDUCE / NEWOBJ / OrderedDict may still copy out of shared tuples and lists
    /// (a memoized tuple reduced many times would otherwise cost O(n²) memory).
    copy_budget: usize,
}

/// Unpickles `data` with default [`Limits`]. Tensors refer to storages by key; checking those
/// keys against an archive is [`crate::TorchFile::root`]'s job.
pub fn unpickle(data: &[u8]) -> Result<Value, Error> {
    unpickle_with_limits(data, Limits::default())
}

pub fn unpickle_with_limits(data: &[u8], limits: Limits) -> Result<Value, Error> {
    let mut vm = Vm {
        data,
        pos: 0,
        op_at: 0,
        arena: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        copy_budget: limits.max_output_units,
    };
    let root = vm.run()?;
    let mut budget = limits.max_output_units;
    vm.export(root, 0, &limits, &mut budget)
}

fn int_of(v: &Node) -> Option<i64> {
    match v {
        Node::Leaf(Value::Int(i)) => Some(*i),
        Node::Leaf(Value::Bool(b)) => Some(*b as i64),
        _ => None,
    }
}

fn dtype_of_storage_class(name: &str) -> Option<DType> {
    match name {
        "UntypedStorage" => Some(DType::U8),
        other => DType::from_storage_class(other),
    }
}

impl<'a> Vm<'a> {
    fn spend(&mut self, n: usize) -> Result<(), Error> {
        match self.copy_budget.checked_sub(n) {
            Some(left) => {
                self.copy_budget = left;
                Ok(())
            }
            None => self.err("the pickle copies more values than the output budget allows (a hostile file?)"),
        }
    }

    fn err<T>(&self, msg: impl Into<String>) -> Result<T, Error> {
        Err(Error::Pickle { path: Default::default(), offset: self.op_at, msg: msg.into() })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let data = self.data;
        if n > data.len() - self.pos {
            return self.err(format!(
                "needs {n} bytes but only {} remain (truncated or corrupt length)",
                data.len() - self.pos
            ));
        }
        let s = &data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn len(&mut self, n: u64) -> Result<usize, Error> {
        match usize::try_from(n) {
            Ok(n) => Ok(n),
            Err(_) => self.err(format!("length {n} is beyond this machine")),
        }
    }
    fn line(&mut self) -> Result<&'a str, Error> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&c| c == b'\n') else {
            return self.err("unterminated text argument");
        };
        self.pos += end + 1;
        match std::str::from_utf8(&rest[..end]) {
            Ok(s) => Ok(s.strip_suffix('\r').unwrap_or(s)),
            Err(_) => self.err("text argument is not UTF-8"),
        }
    }
    fn utf8(&self, b: &[u8]) -> Result<String, Error> {
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => self.err("string is not valid UTF-8"),
        }
    }

    fn alloc(&mut self, n: Node) -> Id {
        self.arena.push(n);
        self.arena.len() - 1
    }
    fn push(&mut self, n: Node) {
        let id = self.alloc(n);
        self.stack.push(id);
    }
    fn push_leaf(&mut self, v: Value) {
        self.push(Node::Leaf(v));
    }
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }
    fn pop(&mut self) -> Result<Id, Error> {
        if self.stack.len() <= self.floor() {
            return self.err("stack underflow");
        }
        Ok(self.stack.pop().unwrap())
    }
    fn top(&self) -> Result<Id, Error> {
        if self.stack.len() <= self.floor() {
            return self.err("stack underflow");
        }
        Ok(*self.stack.last().unwrap())
    }
    fn pop_mark(&mut self) -> Result<Vec<Id>, Error> {
        let Some(m) = self.marks.pop() else {
            return self.err("no MARK on the stack");
        };
        Ok(self.stack.split_off(m))
    }
    fn memo_put(&mut self, key: u64) -> Result<(), Error> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }
    fn memo_get(&mut self, key: u64) -> Result<(), Error> {
        match self.memo.get(&key) {
            Some(&id) => {
                self.stack.push(id);
                Ok(())
            }
            None => self.err(format!("memo key {key} was never stored")),
        }
    }
    fn text_int(&self, s: &str) -> Result<i64, Error> {
        let t = s.trim().trim_end_matches('L');
        match t.parse::<i64>() {
            Ok(v) => Ok(v),
            Err(_) => self.err(format!("bad integer literal {s:?}")),
        }
    }
    fn long_bytes(&self, b: &[u8]) -> Result<i64, Error> {
        if b.is_empty() {
            return Ok(0);
        }
        let neg = b[b.len() - 1] & 0x80 != 0;
        let fill = if neg { 0xFF } else { 0 };
        if b.len() > 8 && b[8..].iter().any(|&c| c != fill) {
            return self.err(format!("integer of {} bytes does not fit in i64", b.len()));
        }
        let mut buf = [fill; 8];
        let n = b.len().min(8);
        buf[..n].copy_from_slice(&b[..n]);
        let v = i64::from_le_bytes(buf);
        if (v < 0) != neg {
            return self.err("integer does not fit in i64");
        }
        Ok(v)
    }

    fn run(&mut self) -> Result<Id, Error> {
        loop {
            self.op_at = self.pos;
            let op = match self.take(1) {
                Ok(b) => b[0],
                Err(_) => return self.err("ends without STOP (truncated)"),
            };
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return self.err(format!("unsupported pickle protocol {p}"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => {
                    let id = self.pop()?;
                    return Ok(id);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    if self.stack.len() == self.floor() && !self.marks.is_empty() {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let id = self.top()?;
                    self.stack.push(id);
                }
                b'N' => self.push_leaf(Value::None),
                0x88 => self.push_leaf(Value::Bool(true)),
                0x89 => self.push_leaf(Value::Bool(false)),
                b'I' => {
                    let s = self.line()?;
                    let v = match s {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        _ => Value::Int(self.text_int(s)?),
                    };
                    self.push_leaf(v);
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push_leaf(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push_leaf(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push_leaf(Value::Int(v as i64));
                }
                b'L' => {
                    let s = self.line()?;
                    let v = self.text_int(s)?;
                    self.push_leaf(Value::Int(v));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let v = self.long_bytes(b)?;
                    self.push_leaf(Value::Int(v));
                }
                0x8b => {
                    let n = self.u32()? as i32;
                    if n < 0 {
                        return self.err("LONG4 with a negative length");
                    }
                    let b = self.take(n as usize)?;
                    let v = self.long_bytes(b)?;
                    self.push_leaf(Value::Int(v));
                }
                b'F' => {
                    let s = self.line()?;
                    match s.trim().parse::<f64>() {
                        Ok(v) => self.push_leaf(Value::Float(v)),
                        Err(_) => return self.err(format!("bad float literal {s:?}")),
                    }
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push_leaf(Value::Float(v));
                }
                b'S' => {
                    let s = self.line()?;
                    let t = s.trim();
                    let q = t.len() >= 2
                        && (t.starts_with('\'') && t.ends_with('\'') || t.starts_with('"') && t.ends_with('"'));
                    if !q {
                        return self.err("STRING argument is not quoted");
                    }
                    self.push_leaf(Value::Str(t[1..t.len() - 1].to_string()));
                }
                b'V' => {
                    let s = self.line()?.to_string();
                    self.push_leaf(Value::Str(s));
                }
                b'T' | b'U' => {
                    let n = if op == b'T' { self.u32()? as usize } else { self.u8()? as usize };
                    let b = self.take(n)?;
                    // Python 2 str: decoded as latin-1.
                    self.push_leaf(Value::Str(b.iter().map(|&c| c as char).collect()));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as u64,
                        0x8c => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?;
                    let s = self.utf8(b)?;
                    self.push_leaf(Value::Str(s));
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as u64,
                        b'C' => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?;
                    self.push_leaf(Value::Bytes(b.to_vec()));
                }
                b')' => self.push(Node::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < self.floor() + n {
                        return self.err("stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Node::Tuple(items));
                }
                b']' => self.push(Node::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items));
                }
                b'a' => {
                    let v = self.pop()?;
                    let list = self.top()?;
                    self.extend_list(list, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.extend_list(list, items)?;
                }
                b'}' => self.push(Node::Dict { ordered: false, items: Vec::new() }),
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push(Node::Dict { ordered: false, items: pairs });
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.extend_dict(d, vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    let d = self.top()?;
                    self.extend_dict(d, pairs)?;
                }
                0x8f => {
                    let l = self.alloc(Node::List(Vec::new()));
                    self.push(Node::Object { class: "builtins.set".into(), args: vec![l], state: None });
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    let set = self.top()?;
                    match &self.arena[set] {
                        Node::Object { class, args, .. } if class == "builtins.set" && args.len() == 1 => {
                            let l = args[0];
                            self.extend_list(l, items)?;
                        }
                        _ => return self.err("ADDITEMS on something that is not a set"),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let l = self.alloc(Node::List(items));
                    self.push(Node::Object { class: "builtins.frozenset".into(), args: vec![l], state: None });
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.push(Node::Global { module, name });
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&self.arena[module], &self.arena[name]) {
                        (Node::Leaf(Value::Str(m)), Node::Leaf(Value::Str(n))) => {
                            let g = Node::Global { module: m.clone(), name: n.clone() };
                            self.push(g);
                        }
                        _ => return self.err("STACK_GLOBAL needs two strings"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let args = match &self.arena[args] {
                        Node::Tuple(a) => a.clone(),
                        _ => return self.err("REDUCE arguments are not a tuple"),
                    };
                    self.spend(args.len() + 1)?;
                    let id = self.call(func, args)?;
                    self.stack.push(id);
                }
                0x81 | 0x92 => {
                    let kwargs = if op == 0x92 { Some(self.pop()?) } else { None };
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let mut args = match &self.arena[args] {
                        Node::Tuple(a) => a.clone(),
                        _ => return self.err("NEWOBJ arguments are not a tuple"),
                    };
                    self.spend(args.len() + 1)?;
                    if let Some(kw) = kwargs {
                        if !matches!(&self.arena[kw], Node::Dict { items, .. } if items.is_empty()) {
                            args.push(kw);
                        }
                    }
                    let id = self.call(cls, args)?;
                    self.stack.push(id);
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    match &mut self.arena[target] {
                        Node::Object { state: s, .. } => *s = Some(state),
                        // Tensor/Parameter metadata and empty dict state carry nothing we model.
                        Node::Tensor(_) => {}
                        // A state_dict() OrderedDict carries its `_metadata` (module versions)
                        // as BUILD state: nothing a checkpoint reader needs.
                        Node::Dict { .. } => {}
                        _ => return self.err("BUILD on a value that takes no state"),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.storage_pid(pid)?;
                    self.push(storage);
                }
                b'q' => {
                    let k = self.u8()? as u64;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.u32()? as u64;
                    self.memo_put(k)?;
                }
                b'p' => {
                    let s = self.line()?;
                    let k = self.text_int(s)? as u64;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()? as u64;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.u32()? as u64;
                    self.memo_get(k)?;
                }
                b'g' => {
                    let s = self.line()?;
                    let k = self.text_int(s)? as u64;
                    self.memo_get(k)?;
                }
                b'P' => return self.err("text persistent ids (PERSID) are not torch storages"),
                b'i' | b'o' | 0x82..=0x84 => {
                    return self.err(format!("opcode 0x{op:02x} (INST/OBJ/EXT) is not supported"))
                }
                0x97 | 0x98 => return self.err("out-of-band buffers (protocol 5) are not supported"),
                _ => return self.err(format!("unknown opcode 0x{op:02x}")),
            }
        }
    }

    fn pairs(&self, items: Vec<Id>) -> Result<Vec<(Id, Id)>, Error> {
        if items.len() % 2 != 0 {
            return self.err("odd number of items for a dict");
        }
        Ok(items.chunks(2).map(|c| (c[0], c[1])).collect())
    }

    fn extend_list(&mut self, list: Id, items: Vec<Id>) -> Result<(), Error> {
        match &mut self.arena[list] {
            Node::List(v) => {
                v.extend(items);
                Ok(())
            }
            _ => self.err("APPEND(S) on something that is not a list"),
        }
    }

    fn extend_dict(&mut self, d: Id, pairs: Vec<(Id, Id)>) -> Result<(), Error> {
        match &mut self.arena[d] {
            Node::Dict { items, .. } => {
                items.extend(pairs);
                Ok(())
            }
            _ => self.err("SETITEM(S) on something that is not a dict"),
        }
    }

    fn storage_pid(&self, pid: Id) -> Result<Node, Error> {
        let bad = |why: &str| {
            self.err::<Node>(format!(
                "persistent id is not a torch storage ('storage', torch.XStorage, key, location, numel): {why}"
            ))
        };
        let Node::Tuple(t) = &self.arena[pid] else {
            return bad("not a tuple");
        };
        if t.len() != 5 {
            return bad(&format!("tuple of {}", t.len()));
        }
        if !matches!(&self.arena[t[0]], Node::Leaf(Value::Str(s)) if s == "storage") {
            return bad("first item is not 'storage'");
        }
        let dtype = match &self.arena[t[1]] {
            Node::Global { module, name } if module == "torch" => match dtype_of_storage_class(name) {
                Some(d) => d,
                None => return bad(&format!("unsupported storage class torch.{name}")),
            },
            _ => return bad("second item is not a torch storage class"),
        };
        let key = match &self.arena[t[2]] {
            Node::Leaf(Value::Str(s)) => s.clone(),
            _ => return bad("key is not a string"),
        };
        if !matches!(&self.arena[t[3]], Node::Leaf(Value::Str(_))) {
            return bad("location is not a string");
        }
        let numel = match int_of(&self.arena[t[4]]).map(usize::try_from) {
            Some(Ok(n)) => n,
            _ => return bad("numel is not a non-negative int"),
        };
        Ok(Node::Storage { dtype, key, numel })
    }

    fn usizes(&self, id: Id, what: &str) -> Result<Vec<usize>, Error> {
        let items = match &self.arena[id] {
            Node::Tuple(v) | Node::List(v) => v,
            _ => return self.err(format!("tensor {what} is not a tuple")),
        };
        items
            .iter()
            .map(|&i| match int_of(&self.arena[i]).map(usize::try_from) {
                Some(Ok(n)) => Ok(n),
                _ => self.err(format!("tensor {what} holds a value that is not a size")),
            })
            .collect()
    }

    fn rebuild_tensor(&mut self, args: &[Id]) -> Result<Id, Error> {
        if args.len() < 4 {
            return self.err("_rebuild_tensor needs (storage, offset, size, stride, ...)");
        }
        let (dtype, key, numel) = match &self.arena[args[0]] {
            Node::Storage { dtype, key, numel } => (*dtype, key.clone(), *numel),
            _ => return self.err("_rebuild_tensor's first argument is not a storage persistent id"),
        };
        let offset = match int_of(&self.arena[args[1]]).map(usize::try_from) {
            Some(Ok(n)) => n,
            _ => return self.err("tensor storage offset is not a non-negative int"),
        };
        let shape = self.usizes(args[2], "size")?;
        let stride = self.usizes(args[3], "stride")?;
        let t = TensorRef { dtype, shape, stride, storage: key, storage_offset: offset, storage_numel: numel };
        match t.storage_extent() {
            Some(e) if e <= numel => {}
            _ => {
                return self.err(format!(
                    "tensor of size {:?} stride {:?} offset {} does not fit its storage {:?} of {} elements",
                    t.shape, t.stride, t.storage_offset, t.storage, numel
                ))
            }
        }
        Ok(self.alloc(Node::Tensor(t)))
    }

    /// REDUCE / NEWOBJ: never calls anything; known callables become values.
    fn call(&mut self, func: Id, args: Vec<Id>) -> Result<Id, Error> {
        let (module, name) = match &self.arena[func] {
            Node::Global { module, name } => (module.clone(), name.clone()),
            _ => return self.err("REDUCE/NEWOBJ target is not a global"),
        };
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict" | "defaultdict") => {
                let ordered = name == "OrderedDict";
                let mut items = Vec::new();
                if let Some(Node::List(pairs) | Node::Tuple(pairs)) = args.first().map(|&a| &self.arena[a]) {
                    let n = pairs.len();
                    self.spend(n)?;
                }
                if ordered && args.len() == 1 {
                    if let Node::List(pairs) | Node::Tuple(pairs) = &self.arena[args[0]] {
                        for &p in pairs {
                            match &self.arena[p] {
                                Node::Tuple(kv) | Node::List(kv) if kv.len() == 2 => items.push((kv[0], kv[1])),
                                _ => return self.err("OrderedDict argument is not (key, value) pairs"),
                            }
                        }
                    }
                }
                return Ok(self.alloc(Node::Dict { ordered, items }));
            }
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                return self.rebuild_tensor(&args);
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                if let Some(&t) = args.first() {
                    if matches!(self.arena[t], Node::Tensor(_)) {
                        return Ok(t);
                    }
                }
            }
            ("_codecs", "encode") | ("builtins" | "__builtin__", "bytes" | "bytearray") => {
                let bytes = match args.as_slice() {
                    [] => Some(Vec::new()),
                    [s, enc] => match (&self.arena[*s], &self.arena[*enc]) {
                        (Node::Leaf(Value::Str(s)), Node::Leaf(Value::Str(enc))) => {
                            match enc.to_ascii_lowercase().as_str() {
                                "latin1" | "latin-1" | "iso-8859-1" => {
                                    s.chars().map(|c| u8::try_from(c as u32).ok()).collect::<Option<Vec<u8>>>()
                                }
                                "utf-8" | "utf8" | "ascii" => Some(s.as_bytes().to_vec()),
                                _ => None,
                            }
                        }
                        _ => None,
                    },
                    [l] if module != "_codecs" => match &self.arena[*l] {
                        Node::List(v) => {
                            v.iter().map(|&i| int_of(&self.arena[i]).and_then(|x| u8::try_from(x).ok())).collect()
                        }
                        Node::Leaf(Value::Bytes(b)) => Some(b.clone()),
                        _ => None,
                    },
                    _ => None,
                };
                if let Some(b) = bytes {
                    return Ok(self.alloc(Node::Leaf(Value::Bytes(b))));
                }
            }
            _ => {}
        }
        Ok(self.alloc(Node::Object { class: format!("{module}.{name}"), args, state: None }))
    }

    fn export(&self, id: Id, depth: usize, limits: &Limits, budget: &mut usize) -> Result<Value, Error> {
        let over =
            |what: &str| Error::Pickle { path: Default::default(), offset: self.data.len(), msg: what.to_string() };
        if depth > limits.max_depth {
            return Err(over(&format!("values nested deeper than {} (cyclic or hostile pickle)", limits.max_depth)));
        }
        let node = &self.arena[id];
        let cost = 1 + match node {
            Node::Leaf(Value::Str(s)) => s.len() / 64,
            Node::Leaf(Value::Bytes(b)) => b.len() / 64,
            _ => 0,
        };
        if *budget < cost {
            return Err(over("the unpickled value is larger than the output budget (shared references expanding?)"));
        }
        *budget -= cost;
        let all = |ids: &[Id], budget: &mut usize| -> Result<Vec<Value>, Error> {
            ids.iter().map(|&i| self.export(i, depth + 1, limits, budget)).collect()
        };
        Ok(match node {
            Node::Leaf(v) => v.clone(),
            Node::List(v) => Value::List(all(v, budget)?),
            Node::Tuple(v) => Value::Tuple(all(v, budget)?),
            Node::Dict { ordered, items } => {
                let mut out = Vec::with_capacity(items.len());
                for &(k, v) in items {
                    out.push((self.export(k, depth + 1, limits, budget)?, self.export(v, depth + 1, limits, budget)?));
                }
                if *ordered {
                    Value::OrderedDict(out)
                } else {
                    Value::Dict(out)
                }
            }
            Node::Global { module, name } => Value::Global(format!("{module}.{name}")),
            Node::Storage { dtype, key, numel } => Value::Tensor(TensorRef {
                dtype: *dtype,
                shape: vec![*numel],
                stride: vec![1],
                storage: key.clone(),
                storage_offset: 0,
                storage_numel: *numel,
            }),
            Node::Tensor(t) => Value::Tensor(t.clone()),
            Node::Object { class, args, state } => Value::Object {
                class: class.clone(),
                args: all(args, budget)?,
                state: match state {
                    Some(s) => Some(Box::new(self.export(*s, depth + 1, limits, budget)?)),
                    None => None,
                },
            },
        })
    }
}
