//! Pickle writing: protocol 2, the subset torch.save emits for checkpoints. Tensors become
//! `torch._utils._rebuild_tensor_v2(<persistent storage id>, offset, size, stride, False, OrderedDict())`;
//! globals are memoized once and fetched with BINGET/LONG_BINGET afterwards.

use crate::value::{TensorRef, Value};
use std::collections::HashMap;

const BATCH: usize = 1000; // items per APPENDS / SETITEMS, as CPython's pickler

struct Pickler {
    out: Vec<u8>,
    memo: HashMap<(String, String), u32>,
    next_memo: u32,
}

/// Pickles `v` (protocol 2), the way torch.save would pickle the same Python object.
pub fn pickle(v: &Value) -> Vec<u8> {
    let mut p = Pickler { out: vec![0x80, 2], memo: HashMap::new(), next_memo: 0 };
    p.value(v);
    p.out.push(b'.');
    p.out
}

impl Pickler {
    fn global(&mut self, module: &str, name: &str) {
        let key = (module.to_string(), name.to_string());
        if let Some(&i) = self.memo.get(&key) {
            if i < 256 {
                self.out.extend_from_slice(&[b'h', i as u8]);
            } else {
                self.out.push(b'j');
                self.out.extend_from_slice(&i.to_le_bytes());
            }
            return;
        }
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
        let i = self.next_memo;
        self.next_memo += 1;
        if i < 256 {
            self.out.extend_from_slice(&[b'q', i as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&i.to_le_bytes());
        }
        self.memo.insert(key, i);
    }

    fn int(&mut self, v: i64) {
        if (0..=0xFF).contains(&v) {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if (0..=0xFFFF).contains(&v) {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: minimal little-endian two's complement.
            let bytes = v.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let top = bytes[n - 1];
                let next_sign = bytes[n - 2] & 0x80;
                if (top == 0 && next_sign == 0) || (top == 0xFF && next_sign != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[0x8a, n as u8]);
            self.out.extend_from_slice(&bytes[..n]);
        }
    }

    fn usize(&mut self, v: usize) {
        self.int(i64::try_from(v).expect("size beyond i64"));
    }

    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn tuple(&mut self, items: &[Value]) {
        match items.len() {
            0 => self.out.push(b')'),
            1..=3 => {
                items.iter().for_each(|x| self.value(x));
                self.out.push([0x85, 0x86, 0x87][items.len() - 1]);
            }
            _ => {
                self.out.push(b'(');
                items.iter().for_each(|x| self.value(x));
                self.out.push(b't');
            }
        }
    }

    fn usize_tuple(&mut self, items: &[usize]) {
        let v: Vec<Value> = items.iter().map(|&x| Value::Int(x as i64)).collect();
        self.tuple(&v);
    }

    fn items(&mut self, items: &[(Value, Value)]) {
        for chunk in items.chunks(BATCH) {
            self.out.push(b'(');
            for (k, v) in chunk {
                self.value(k);
                self.value(v);
            }
            self.out.push(b'u');
        }
    }

    fn tensor(&mut self, t: &TensorRef) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'(');
        // Persistent id: ('storage', torch.XStorage, key, 'cpu', numel)
        self.out.push(b'(');
        self.str("storage");
        self.global("torch", t.dtype.storage_class());
        self.str(&t.storage);
        self.str("cpu");
        self.usize(t.storage_numel);
        self.out.push(b't');
        self.out.push(b'Q');
        self.usize(t.storage_offset);
        self.usize_tuple(&t.shape);
        self.usize_tuple(&t.stride);
        self.out.push(0x89); // requires_grad = False
        self.global("collections", "OrderedDict");
        self.out.extend_from_slice(b")R"); // backward_hooks = OrderedDict()
        self.out.push(b't');
        self.out.push(b'R');
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::None => self.out.push(b'N'),
            Value::Bool(b) => self.out.push(if *b { 0x88 } else { 0x89 }),
            Value::Int(i) => self.int(*i),
            Value::Float(f) => {
                self.out.push(b'G');
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            Value::Str(s) => self.str(s),
            Value::Bytes(b) => {
                // Protocol 2 has no bytes opcode: CPython writes _codecs.encode(latin1 str, 'latin1').
                self.global("_codecs", "encode");
                let s: String = b.iter().map(|&c| c as char).collect();
                self.str(&s);
                self.str("latin1");
                self.out.extend_from_slice(&[0x86, b'R']);
            }
            Value::List(items) => {
                self.out.push(b']');
                for chunk in items.chunks(BATCH) {
                    self.out.push(b'(');
                    chunk.iter().for_each(|x| self.value(x));
                    self.out.push(b'e');
                }
            }
            Value::Tuple(items) => self.tuple(items),
            Value::Dict(items) => {
                self.out.push(b'}');
                self.items(items);
            }
            Value::OrderedDict(items) => {
                self.global("collections", "OrderedDict");
                self.out.extend_from_slice(b")R");
                self.items(items);
            }
            Value::Tensor(t) => self.tensor(t),
            Value::Global(path) => {
                let (module, name) = path.rsplit_once('.').unwrap_or(("builtins", path));
                self.global(module, name);
            }
            Value::Object { class, args, state } => {
                let (module, name) = class.rsplit_once('.').unwrap_or(("builtins", class));
                self.global(module, name);
                self.tuple(args);
                self.out.push(b'R');
                if let Some(s) = state {
                    self.value(s);
                    self.out.push(b'b');
                }
            }
        }
    }
}
