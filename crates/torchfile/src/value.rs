//! The value model shared by reader and writer: dtypes, tensor references and the object tree.

/// Element types torch storages can hold (the ones checkpoints use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub const ALL: [DType; 10] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F64,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U8,
        DType::Bool,
    ];

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The legacy typed-storage class torch pickles, e.g. `FloatStorage` (module `torch`).
    pub fn storage_class(self) -> &'static str {
        match self {
            DType::F32 => "FloatStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::F64 => "DoubleStorage",
            DType::I64 => "LongStorage",
            DType::I32 => "IntStorage",
            DType::I16 => "ShortStorage",
            DType::I8 => "CharStorage",
            DType::U8 => "ByteStorage",
            DType::Bool => "BoolStorage",
        }
    }

    pub fn from_storage_class(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.storage_class() == name)
    }

    /// The torch dtype name without the `torch.` prefix, e.g. `bfloat16`.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F64 => "float64",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }
}

/// A tensor as pickled by torch: a strided view into a storage record `data/<storage>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// In elements.
    pub stride: Vec<usize>,
    /// The storage key: the record is `data/<storage>`.
    pub storage: String,
    /// In elements.
    pub storage_offset: usize,
    /// Elements in the whole storage (its record holds `storage_numel * dtype.size_bytes()` bytes).
    pub storage_numel: usize,
}

impl TensorRef {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size_bytes()
    }

    /// Row-major strides for `shape`.
    pub fn contiguous_stride(shape: &[usize]) -> Vec<usize> {
        let mut stride = vec![0; shape.len()];
        let mut acc = 1usize;
        for i in (0..shape.len()).rev() {
            stride[i] = acc;
            acc = acc.saturating_mul(shape[i]);
        }
        stride
    }

    /// Same rule as torch: strides of size-1 dimensions do not matter; empty tensors are contiguous.
    pub fn is_contiguous(&self) -> bool {
        if self.numel() == 0 {
            return true;
        }
        let mut expected = 1usize;
        for i in (0..self.shape.len()).rev() {
            if self.shape[i] != 1 {
                if self.stride.get(i) != Some(&expected) {
                    return false;
                }
                expected = expected.saturating_mul(self.shape[i]);
            }
        }
        true
    }

    /// One past the highest storage element this view touches (0 for an empty view);
    /// `None` on overflow or a shape/stride rank mismatch.
    pub fn storage_extent(&self) -> Option<usize> {
        if self.shape.len() != self.stride.len() {
            return None;
        }
        if self.shape.contains(&0) {
            return Some(0);
        }
        let mut last = self.storage_offset;
        for (&n, &s) in self.shape.iter().zip(&self.stride) {
            last = last.checked_add((n - 1).checked_mul(s)?)?;
        }
        last.checked_add(1)
    }
}

/// A pickled Python value, as far as checkpoints need it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// A plain `dict`, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A `collections.OrderedDict` (what `state_dict()` returns), in insertion order.
    /// Use [`Value::as_dict`] to accept either kind.
    OrderedDict(Vec<(Value, Value)>),
    Tensor(TensorRef),
    /// A bare reference to a global, not called: e.g. `torch.bfloat16` (a dtype in saved args).
    Global(String),
    /// Any other class or callable, never executed: `class` is `module.qualname`,
    /// `args` what it was called with (REDUCE / NEWOBJ), `state` what BUILD gave it.
    Object {
        class: String,
        args: Vec<Value>,
        state: Option<Box<Value>>,
    },
}

impl Value {
    /// The items of a `dict` or `OrderedDict`.
    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(items) | Value::OrderedDict(items) => Some(items),
            _ => None,
        }
    }

    /// Looks up a string key in a dict/OrderedDict (last binding wins, as in Python).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_dict()?.iter().rev().find(|(k, _)| matches!(k, Value::Str(s) if s == key)).map(|(_, v)| v)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_tensor(&self) -> Option<&TensorRef> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// Calls `f` on every tensor in the tree, in pickle order.
    pub fn visit_tensors<'a>(&'a self, f: &mut dyn FnMut(&'a TensorRef)) {
        match self {
            Value::Tensor(t) => f(t),
            Value::List(v) | Value::Tuple(v) => v.iter().for_each(|x| x.visit_tensors(f)),
            Value::Dict(items) | Value::OrderedDict(items) => {
                for (k, v) in items {
                    k.visit_tensors(f);
                    v.visit_tensors(f);
                }
            }
            Value::Object { args, state, .. } => {
                args.iter().for_each(|x| x.visit_tensors(f));
                if let Some(s) = state {
                    s.visit_tensors(f);
                }
            }
            _ => {}
        }
    }
}
