//! Hostile and broken inputs: every one is a clear error (or an inert Object), never a panic,
//! never an executed call. Also writer misuse. Needs no Python.

use torchfile::{unpickle, unpickle_with_limits, DType, Limits, TorchFile, Value, Writer};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A small valid file: several dtypes, a view, nested containers.
fn valid_file() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.pt");
    let mut w = Writer::create(&path).unwrap();
    let a = w.new_tensor(DType::F32, &[2, 3]);
    let b = w.new_tensor(DType::BF16, &[4]);
    let mut at = a.clone();
    at.shape = vec![3, 2];
    at.stride = vec![1, 3];
    let root = Value::Dict(vec![
        (
            Value::Str("model".into()),
            Value::OrderedDict(vec![
                (Value::Str("a".into()), Value::Tensor(a.clone())),
                (Value::Str("b".into()), Value::Tensor(b.clone())),
                (Value::Str("at".into()), Value::Tensor(at)),
            ]),
        ),
        (Value::Str("checkpoint_version".into()), Value::Float(3.0)),
        (Value::Str("l".into()), Value::List(vec![Value::Int(1 << 40), Value::None, Value::Bytes(vec![1, 2])])),
    ]);
    w.write_root(&root).unwrap();
    for t in [&a, &b] {
        w.begin_storage(&t.storage).unwrap();
        w.write(&vec![0x3f; t.nbytes()]).unwrap();
        w.end_storage().unwrap();
    }
    w.finish().unwrap();
    std::fs::read(&path).unwrap()
}

/// Everything a consumer would touch; errors are fine, panics are not.
fn exercise(bytes: Vec<u8>) {
    let Ok(f) = TorchFile::from_bytes("fuzz.pt", bytes) else {
        return;
    };
    let _ = f.verify_crc();
    if let Ok(root) = f.root() {
        let mut ts = Vec::new();
        root.visit_tensors(&mut |t| ts.push(t.clone()));
        for t in ts {
            let _ = f.tensor_bytes(&t);
            let _ = f.storage(&t.storage);
        }
    }
}

fn pickle_in_archive(pkl: &[u8], extra: &[(&str, &[u8])]) -> TorchFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.pt");
    let mut recs: Vec<(&str, &[u8])> = vec![("data.pkl", pkl)];
    recs.extend_from_slice(extra);
    torchfile::testing::write_raw_archive(&path, "h", &recs).unwrap();
    TorchFile::from_bytes("h.pt", std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn truncated_files_are_errors() {
    let good = valid_file();
    TorchFile::from_bytes("good", good.clone()).unwrap().root().unwrap();
    for cut in (0..good.len()).step_by(7) {
        let r = TorchFile::from_bytes("cut.pt", good[..cut].to_vec());
        let err = r.err().unwrap_or_else(|| panic!("truncated at {cut} opened"));
        assert!(err.to_string().contains("cut.pt"), "{err}");
    }
}

#[test]
fn garbage_is_an_error() {
    let mut rng = Rng(7);
    for n in [0usize, 1, 21, 22, 100, 10_000] {
        let g: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        let e = TorchFile::from_bytes("garbage.pt", g).err().expect("garbage opened");
        assert!(e.to_string().starts_with("garbage.pt: not a valid torch.save zip"), "{e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pt");
    std::fs::write(&empty, b"").unwrap();
    assert!(TorchFile::open(&empty).is_err());
}

#[test]
fn os_system_becomes_an_inert_object() {
    let marker = std::env::temp_dir().join(format!("torchfile_pwned_{}", std::process::id()));
    let cmd = format!("touch {}", marker.display());
    let mut p = vec![0x80, 2, b'c'];
    p.extend_from_slice(b"os\nsystem\n");
    p.push(b'X');
    p.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    p.extend_from_slice(cmd.as_bytes());
    p.extend_from_slice(&[0x85, b'R', b'.']);
    let want = Value::Object { class: "os.system".into(), args: vec![Value::Str(cmd.clone())], state: None };
    assert_eq!(unpickle(&p).unwrap(), want);
    assert_eq!(pickle_in_archive(&p, &[]).root().unwrap(), want);
    assert!(!marker.exists());
}

#[test]
fn bad_pickles_are_clear_errors() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0x80, 2, 0xff], "unknown opcode 0xff"),
        (vec![0x80, 2, b'X', 0xf0, 0xff, 0xff, 0xff, b'a'], "remain"),
        ([vec![0x80, 4, 0x8e], u64::MAX.to_le_bytes().to_vec()].concat(), "remain"),
        (vec![0x80, 2, b'N'], "without STOP"),
        (vec![0x80, 2, b'.'], "underflow"),
        (vec![0x80, 2, b'h', 3, b'.'], "memo key 3"),
        (vec![0x80, 2, b'K', 1, b'Q', b'.'], "not a torch storage"),
        (vec![0x80, 9], "protocol 9"),
        (vec![0x80, 2, b'N', b'N', b'R', b'.'], "not a tuple"),
        (vec![0x80, 2, b'K', 1, b')', b'R', b'.'], "not a global"),
        (vec![0x80, 2, b'K', 1, b'K', 2, b'a', b'.'], "not a list"),
        (vec![0x80, 2, b'e', b'.'], "no MARK"),
    ];
    for (p, want) in cases {
        let e = unpickle(&p).expect_err(want).to_string();
        assert!(e.contains(want), "{p:?}: {e}");
    }
    // Deep nesting and self-reference stop at the depth limit instead of overflowing the stack.
    let mut deep = vec![0x80, 2];
    deep.extend(std::iter::repeat_n(b']', 100_000));
    deep.extend(std::iter::repeat_n(b'a', 99_999));
    deep.push(b'.');
    assert!(unpickle(&deep).unwrap_err().to_string().contains("nested deeper"));
    let cyclic = vec![0x80, 2, b']', b'q', 0, b'h', 0, b'a', b'.'];
    assert!(unpickle(&cyclic).unwrap_err().to_string().contains("nested deeper"));
    // Shared references doubling 60 times: the output budget refuses, quickly.
    let mut bomb = vec![0x80, 2, b'N'];
    for _ in 0..60 {
        bomb.extend_from_slice(&[b'2', 0x86]); // DUP, TUPLE2: (x, x)
    }
    bomb.push(b'.');
    let small = Limits { max_output_units: 1 << 16, ..Limits::default() };
    let e = unpickle_with_limits(&bomb, small).unwrap_err().to_string();
    assert!(e.contains("budget"), "{e}");
    // …and with the default limits, in well under a second.
    let e = unpickle(&bomb).unwrap_err().to_string();
    assert!(e.contains("budget"), "{e}");
    // A memoized 100k-item tuple reduced 10k times (O(n²) copies): refused by the budget.
    let mut reduce_bomb = vec![0x80, 2, b'('];
    reduce_bomb.extend(std::iter::repeat_n(b'N', 100_000));
    reduce_bomb.extend_from_slice(&[b't', b'q', 0, b'0']); // TUPLE, BINPUT 0, POP
    for _ in 0..10_000 {
        reduce_bomb.extend_from_slice(b"cbuiltins\nset\n");
        reduce_bomb.extend_from_slice(&[b'h', 0, b'R', b'0']); // BINGET 0, REDUCE, POP
    }
    reduce_bomb.extend_from_slice(b"N.");
    let e = unpickle(&reduce_bomb).unwrap_err().to_string();
    assert!(e.contains("budget"), "{e}");
}

#[test]
fn archive_and_pickle_disagreements_are_errors() {
    // A tensor whose storage record is missing / has the wrong size / is too small for the view.
    let tensor_pickle = |numel: u8, size: u8| {
        let mut p = vec![0x80, 2, b'c'];
        p.extend_from_slice(b"torch._utils\n_rebuild_tensor_v2\n(");
        p.extend_from_slice(b"(X\x07\0\0\0storagectorch\nFloatStorage\nX\x01\0\0\09X\x03\0\0\0cpuK");
        p.extend_from_slice(&[numel, b't', b'Q', b'K', 0, b'K', size, 0x85, b'K', 1, 0x85, 0x89]);
        p.extend_from_slice(b"ccollections\nOrderedDict\n)Rt");
        p.extend_from_slice(b"R.");
        p
    };
    let f = pickle_in_archive(&tensor_pickle(2, 2), &[]);
    let e = f.root().unwrap_err().to_string();
    assert!(e.contains("h.pt") && e.contains("no record h/data/9"), "{e}");
    let f = pickle_in_archive(&tensor_pickle(2, 2), &[("data/9", &[0u8; 4])]);
    assert!(f.root().unwrap_err().to_string().contains("need 8 bytes"));
    let e = unpickle(&tensor_pickle(2, 3)).unwrap_err().to_string();
    assert!(e.contains("does not fit its storage"), "{e}");
    let f = pickle_in_archive(&tensor_pickle(2, 2), &[("data/9", &[0u8; 8])]);
    let root = f.root().unwrap();
    assert_eq!(f.tensor_bytes(root.as_tensor().unwrap()).unwrap().len(), 8);
    // Mixed prefixes and compressed records are refused.
    let big_endian = pickle_in_archive(&[0x80, 2, b'N', b'.'], &[("byteorder", b"big")]);
    assert!(big_endian.root().unwrap_err().to_string().contains("little-endian"));
}

#[test]
fn random_mutations_never_panic() {
    let good = valid_file();
    let f = TorchFile::from_bytes("g", good.clone()).unwrap();
    let pkl = f.record("data.pkl").unwrap().to_vec();
    let pkl_at = good.windows(pkl.len()).position(|w| w == pkl).unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for i in 0..2000 {
        let mut b = good.clone();
        for _ in 0..1 + rng.below(4) {
            // Half the mutations hit the pickle, the rest anywhere (headers, directory, data).
            let at = if i % 2 == 0 { pkl_at + rng.below(pkl.len()) } else { rng.below(b.len()) };
            b[at] = match rng.below(3) {
                0 => rng.next() as u8,
                1 => b[at] ^ (1 << rng.below(8)),
                _ => [0, 0xff, 0x7f, 0x80][rng.below(4)],
            };
        }
        if rng.below(10) == 0 {
            b.truncate(rng.below(b.len()));
        }
        exercise(b);
        // The pickle alone, mutated.
        let mut p = pkl.clone();
        let at = rng.below(p.len());
        p[at] = rng.next() as u8;
        let _ = unpickle(&p);
    }
}

#[test]
fn writer_misuse_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mk = |name: &str| {
        let mut w = Writer::create(&dir.path().join(name)).unwrap();
        let t = w.new_tensor(DType::I32, &[2]);
        w.write_root(&Value::List(vec![Value::Tensor(t)])).unwrap();
        w
    };
    let mut w = mk("a.pt");
    assert!(w.begin_storage("7").is_err(), "unknown key");
    w.begin_storage("0").unwrap();
    assert!(w.write(&[0; 9]).is_err(), "too many bytes");
    let mut w = mk("b.pt");
    w.begin_storage("0").unwrap();
    w.write(&[0; 7]).unwrap();
    assert!(w.end_storage().is_err(), "short");
    let w = mk("c.pt");
    let e = w.finish().unwrap_err().to_string();
    assert!(e.contains("never written") && e.contains("c.pt"), "{e}");
    let mut w = mk("d.pt");
    assert!(w.write_root(&Value::None).is_err(), "root twice");
    let mut w = Writer::create(&dir.path().join("e.pt")).unwrap();
    let mut t = w.new_tensor(DType::F32, &[4]);
    t.storage_offset = 1;
    assert!(w.write_root(&Value::Tensor(t)).is_err(), "view beyond storage");
}
