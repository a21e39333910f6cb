//! Shared test helpers: the tagged-JSON form of values that the Python reference scripts also
//! produce, so both directions compare the same way.
#![allow(dead_code)]

use serde_json::{json, Value as J};
use std::path::PathBuf;
use torchfile::{TorchFile, Value};

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The project venv's python; a missing venv fails the test (it never skips).
pub fn python() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: these tests need the project venv with torch (python -m venv .venv && .venv/bin/pip install torch numpy)",
        p.display()
    );
    p
}

pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference").join(name)
}

pub fn run_python(args: &[&std::ffi::OsStr]) {
    let out = std::process::Command::new(python()).args(args).output().expect("run python");
    assert!(
        out.status.success(),
        "python {:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        args,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Tagged JSON of a value; tensors carry their row-major bytes as hex (read through `file`).
pub fn encode(v: &Value, file: Option<&TorchFile>) -> J {
    let all = |xs: &[Value]| J::Array(xs.iter().map(|x| encode(x, file)).collect());
    let pairs =
        |xs: &[(Value, Value)]| J::Array(xs.iter().map(|(k, v)| json!([encode(k, file), encode(v, file)])).collect());
    match v {
        Value::None => json!({"t": "none"}),
        Value::Bool(b) => json!({"t": "bool", "v": b}),
        Value::Int(i) => json!({"t": "int", "v": i}),
        Value::Float(f) => json!({"t": "float", "v": f}),
        Value::Str(s) => json!({"t": "str", "v": s}),
        Value::Bytes(b) => json!({"t": "bytes", "hex": hex(b)}),
        Value::List(x) => json!({"t": "list", "items": all(x)}),
        Value::Tuple(x) => json!({"t": "tuple", "items": all(x)}),
        Value::Dict(x) => json!({"t": "dict", "items": pairs(x)}),
        Value::OrderedDict(x) => json!({"t": "odict", "items": pairs(x)}),
        Value::Global(g) => json!({"t": "global", "v": g}),
        Value::Tensor(t) => {
            let mut j = json!({"t": "tensor", "dtype": t.dtype.torch_name(), "shape": t.shape,
                               "stride": t.stride, "offset": t.storage_offset});
            if let Some(f) = file {
                j["hex"] = J::String(hex(&f.tensor_bytes(t).expect("tensor bytes")));
            }
            j
        }
        Value::Object { class, args, state } => {
            // numpy arrays: _reconstruct(...) then BUILD (version, shape, dtype, fortran, data).
            if class.ends_with("multiarray._reconstruct") {
                if let Some(Value::Tuple(s)) = state.as_deref() {
                    if let (Some(Value::Tuple(shape)), Some(Value::Bytes(data))) = (s.get(1), s.get(4)) {
                        let shape: Vec<J> = shape.iter().map(|x| encode(x, file)["v"].clone()).collect();
                        return json!({"t": "ndarray", "shape": shape, "hex": hex(data)});
                    }
                }
            }
            json!({"t": "object", "class": class, "args": all(args),
                   "state": state.as_ref().map(|s| encode(s, file))})
        }
    }
}

/// Panics with the path of the first difference.
pub fn assert_json_eq(got: &J, want: &J, path: &str) {
    match (got, want) {
        (J::Object(a), J::Object(b)) => {
            let mut keys: Vec<_> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => assert_json_eq(x, y, &format!("{path}.{k}")),
                    _ => panic!("{path}: key {k:?} only on one side:\n got  {got}\n want {want}"),
                }
            }
        }
        (J::Array(a), J::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{path}: lengths differ:\n got  {got}\n want {want}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_json_eq(x, y, &format!("{path}[{i}]"));
            }
        }
        (J::Number(a), J::Number(b)) => {
            assert_eq!(a.as_f64(), b.as_f64(), "{path}: {a} != {b}");
            assert_eq!(a.is_f64(), b.is_f64(), "{path}: int/float kind {a} vs {b}");
        }
        _ => assert_eq!(got, want, "{path}"),
    }
}
