//! Interop with real torch (the project venv): Rust-written files load in torch.load (plain,
//! mmap, forced zip64), and torch.save files read back in Rust with the same values and bytes.

mod common;

use common::{assert_json_eq, encode, run_python, script};
use std::path::Path;
use torchfile::{DType, TensorRef, TorchFile, Value, Writer};

fn s(x: &str) -> Value {
    Value::Str(x.to_string())
}

/// Deterministic storage contents: valid for every dtype (bools are 0/1).
fn pattern(t: &TensorRef) -> Vec<u8> {
    let n = t.storage_numel * t.dtype.size_bytes();
    let k: usize = t.storage.parse().unwrap();
    (0..n)
        .map(|j| match t.dtype {
            DType::Bool => (j % 2) as u8,
            _ => ((j * 7 + k * 13 + 1) % 256) as u8,
        })
        .collect()
}

fn write_sample(path: &Path, zip64: bool, chunk: usize) -> Value {
    let mut w = Writer::create(path).unwrap();
    if zip64 {
        w.force_zip64();
    }
    let mut model = Vec::new();
    let mut tensors = Vec::new();
    for (name, dtype, shape) in [
        ("a.weight", DType::F32, vec![3, 4]),
        ("b.bias", DType::BF16, vec![5]),
        ("c", DType::F16, vec![2, 3]),
        ("d", DType::F64, vec![2]),
        ("e", DType::I64, vec![3]),
        ("f", DType::I32, vec![2, 2]),
        ("g", DType::I16, vec![3]),
        ("h", DType::I8, vec![4]),
        ("i", DType::U8, vec![5]),
        ("j", DType::Bool, vec![6]),
        ("empty", DType::F32, vec![0, 4]),
        ("scalar", DType::F32, vec![]),
    ] {
        let t = w.new_tensor(dtype, &shape);
        tensors.push(t.clone());
        model.push((s(name), Value::Tensor(t)));
    }
    // Views into existing storages: an offset slice and a transpose.
    let mut view = tensors[4].clone();
    view.shape = vec![2];
    view.stride = vec![1];
    view.storage_offset = 1;
    model.push((s("e.view"), Value::Tensor(view)));
    let mut tr = tensors[0].clone();
    tr.shape = vec![4, 3];
    tr.stride = vec![1, 4];
    model.push((s("a.t"), Value::Tensor(tr)));
    let root = Value::Dict(vec![
        (s("model"), Value::OrderedDict(model)),
        (s("checkpoint_version"), Value::Float(3.0)),
        (s("iteration"), Value::Int(1000)),
        (s("big"), Value::Int(1 << 40)),
        (s("neg"), Value::Int(-70000)),
        (s("min"), Value::Int(i64::MIN)),
        (s("name"), s("héllo ✓")),
        (s("none"), Value::None),
        (s("t"), Value::Bool(true)),
        (s("f"), Value::Bool(false)),
        (s("list"), Value::List(vec![Value::Int(1), Value::Float(2.5), s("x"), Value::None])),
        (s("tuple"), Value::Tuple((1..=5).map(Value::Int).collect())),
        (s("bytes"), Value::Bytes(vec![0, 255, 10, 128])),
        (s("nested"), Value::Dict(vec![(Value::Int(7), Value::OrderedDict(vec![]))])),
    ]);
    w.write_root(&root).unwrap();
    // Write storages in reverse order: order is free.
    for t in tensors.iter().rev() {
        w.begin_storage(&t.storage).unwrap();
        for c in pattern(t).chunks(chunk) {
            w.write(c).unwrap();
        }
        w.end_storage().unwrap();
    }
    w.finish().unwrap();
    root
}

fn rust_to_torch(zip64: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model_optim_rng.pt");
    let root = write_sample(&path, zip64, 3);
    // Expected values computed from the patterns, independently of the reader.
    let file = TorchFile::open(&path).unwrap();
    file.verify_crc().unwrap();
    assert_eq!(file.prefix(), "model_optim_rng");
    let expected = encode(&root, Some(&file));
    let read_back = file.root().unwrap();
    assert_eq!(read_back, root, "Rust round trip");
    let exp_path = dir.path().join("expected.json");
    std::fs::write(&exp_path, expected.to_string()).unwrap();
    let mut args =
        vec![script("check_rust_written.py").into_os_string(), path.into_os_string(), exp_path.into_os_string()];
    if zip64 {
        args.push("zip64".into());
    }
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run_python(&refs);
}

#[test]
fn rust_written_file_loads_in_torch() {
    rust_to_torch(false);
}

#[test]
fn forced_zip64_file_loads_in_torch() {
    rust_to_torch(true);
}

#[test]
fn sample_storage_bytes_match_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.pt");
    let root = write_sample(&path, false, 1 << 20);
    let f = TorchFile::open(&path).unwrap();
    let model = root.get("model").unwrap().as_dict().unwrap();
    let a = model[0].1.as_tensor().unwrap();
    assert_eq!(f.storage("0").unwrap(), pattern(a).as_slice());
    // The transpose gathers: element [i][j] = a[j][i].
    let at = model.iter().find(|(k, _)| k.as_str() == Some("a.t")).unwrap().1.as_tensor().unwrap();
    let src = pattern(a);
    let got = f.tensor_bytes(at).unwrap();
    assert!(matches!(got, std::borrow::Cow::Owned(_)));
    for i in 0..4 {
        for j in 0..3 {
            let e = j * 4 + i;
            assert_eq!(&got[(i * 3 + j) * 4..][..4], &src[e * 4..][..4]);
        }
    }
    let ev = model.iter().find(|(k, _)| k.as_str() == Some("e.view")).unwrap().1.as_tensor().unwrap();
    let got = f.tensor_bytes(ev).unwrap();
    assert!(matches!(got, std::borrow::Cow::Borrowed(_)));
    assert_eq!(&*got, &f.storage("4").unwrap()[8..24]);
}

#[test]
fn torch_written_files_read_in_rust() {
    let dir = tempfile::tempdir().unwrap();
    run_python(&[script("make_torch_files.py").as_os_str(), dir.path().as_os_str()]);
    let mut checked = 0;
    for name in ["megatron_like", "protocol4", "many"] {
        let pt = dir.path().join(format!("{name}.pt"));
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(format!("{name}.json"))).unwrap()).unwrap();
        let f = TorchFile::open(&pt).unwrap();
        f.verify_crc().unwrap();
        assert_eq!(f.prefix(), name);
        let root = f.root().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_json_eq(&encode(&root, Some(&f)), &want, name);
        checked += 1;
        if name == "megatron_like" {
            let args = root.get("args").unwrap();
            match args {
                Value::Object { class, state, .. } => {
                    assert_eq!(class, "argparse.Namespace");
                    let st = state.as_deref().unwrap();
                    assert_eq!(st.get("params_dtype"), Some(&Value::Global("torch.bfloat16".into())));
                }
                other => panic!("args: {other:?}"),
            }
            assert_eq!(root.get("checkpoint_version"), Some(&Value::Float(3.0)));
            // view_a / view_b share one storage with offsets.
            let model = root.get("model").unwrap();
            let va = model.get("view_a").unwrap().as_tensor().unwrap();
            let vb = model.get("view_b").unwrap().as_tensor().unwrap();
            assert_eq!(va.storage, vb.storage);
            assert_eq!((va.storage_offset, vb.storage_offset), (5, 12));
            assert!(!model.get("transposed").unwrap().as_tensor().unwrap().is_contiguous());
        }
    }
    assert_eq!(checked, 3);
}
