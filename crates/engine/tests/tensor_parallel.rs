//! The tensor-parallel regions (src/dist/tp.rs, csrc/tp_regions.cpp) compute what one process
//! computes: 2 and 3 real processes of the built mm-engine run `tp-check` over Gloo on
//! 127.0.0.1, each comparing its share of a column/row-parallel MLP, an uneven gather/scatter
//! of the last dim and a sequence-parallel block with the full computation done in the same
//! process (outputs and gradients, f32 within 1e-6 and f64 within 1e-12 relative). A group of
//! one, in this process, shows that bad slice sizes come back as errors.

use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::Duration;

use mm_engine::dist::c10d::{Backend, ProcessGroup, Store};
use tch::{Device, Kind, Tensor};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().unwrap().port()
}

fn rank(rank: usize, world: usize, port: u16) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_mm-engine"))
        .arg("tp-check")
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("MM_DIST_TIMEOUT_S", "60")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn mm-engine")
}

fn text(o: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

const CHECKS: [&str; 6] = [
    "mlp",
    "mlp_group_dropped_before_backward",
    "gather_scatter_last_uneven",
    "gather_scatter_last_even",
    "sequence_parallel_uneven",
    "sequence_parallel_even",
];

fn tp_check(world: usize) {
    let port = free_port();
    let children: Vec<_> = (0..world).map(|r| rank(r, world, port)).collect();
    let outputs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (r, o) in outputs.iter().enumerate() {
        assert!(o.status.success(), "world {world}: rank {r} failed: {}", text(o));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON report");
        assert_eq!(report["rank"], r);
        assert_eq!(report["world_size"], world);
        assert_eq!(report["backend"], "gloo");
        assert_eq!(report["pass"], true, "{report}");
        let checks = report["checks"].as_array().unwrap();
        let got: Vec<(&str, &str)> =
            checks.iter().map(|c| (c["name"].as_str().unwrap(), c["dtype"].as_str().unwrap())).collect();
        let want: Vec<(&str, &str)> =
            ["f32", "f64"].iter().flat_map(|d| CHECKS.iter().map(move |c| (*c, *d))).collect();
        assert_eq!(got, want, "world {world} rank {r}");
        for c in checks {
            let (err, tol) = (c["max_rel_err"].as_f64(), c["tol"].as_f64().unwrap());
            let want_tol = if c["dtype"] == "f64" { 1e-12 } else { 1e-6 };
            assert_eq!(tol, want_tol, "{c}");
            assert!(err.is_some_and(|e| e <= tol), "world {world} rank {r}: {c}");
            assert_eq!(c["pass"], true, "{c}");
        }
        // MindSpeed's unaligned split of 3·w+1 heads (head_dim 2): 4,3 at w = 2, 4,3,3 at w = 3.
        let uneven = checks.iter().find(|c| c["name"] == "gather_scatter_last_uneven").unwrap();
        let heads: Vec<i64> = uneven["sizes"].as_array().unwrap().iter().map(|s| s.as_i64().unwrap() / 2).collect();
        assert_eq!(heads, if world == 2 { vec![4, 3] } else { vec![4, 3, 3] });
        let sp = checks.iter().find(|c| c["name"] == "sequence_parallel_uneven").unwrap();
        let rows: Vec<i64> = sp["sizes"].as_array().unwrap().iter().map(|s| s.as_i64().unwrap()).collect();
        assert_eq!(rows, if world == 2 { vec![3, 2] } else { vec![3, 2, 2] });
    }
}

#[test]
fn two_process_tp_regions_match_one_process_math() {
    tp_check(2);
}

#[test]
fn three_process_tp_regions_match_one_process_math() {
    tp_check(3);
}

/// A group of one in this process: every region is the identity, forward and backward, and
/// slice sizes that do not fit the tensor or the group are errors naming the operation.
#[test]
fn one_rank_regions_are_identities_and_bad_sizes_are_errors() {
    let store = Store::tcp("127.0.0.1", free_port(), 0, 1, Duration::from_secs(30)).unwrap();
    let pg = ProcessGroup::new(&store, Backend::Gloo, 0, 1, Some("127.0.0.1"), Duration::from_secs(30)).unwrap();
    let x = Tensor::randn([3, 2, 5], (Kind::Double, Device::Cpu)).set_requires_grad(true);
    let g = Tensor::randn([3, 2, 5], (Kind::Double, Device::Cpu));
    let y = pg.copy_to_tp_region(&x).unwrap();
    let y = pg.scatter_to_tp_region(&y, Some(&[5])).unwrap();
    let y = pg.scatter_to_sp_region(&y, None).unwrap();
    let y = pg.gather_from_sp_region(&y, Some(&[3])).unwrap();
    let y = pg.reduce_scatter_to_sp_region(&y, None).unwrap();
    let y = pg.gather_from_tp_region(&y, None).unwrap();
    let y = pg.reduce_from_tp_region(&y).unwrap();
    assert!(y.allclose(&x, 0.0, 0.0, false));
    (&y * &g).sum(Kind::Double).f_backward().unwrap();
    assert!(x.grad().allclose(&g, 0.0, 0.0, false));

    let err = |r: Result<Tensor, mm_engine::dist::c10d::DistError>| r.expect_err("an error").to_string();
    let e = err(pg.gather_from_tp_region(&x, Some(&[3, 2])));
    assert!(e.contains("gather_from_tp_region") && e.contains("2 slice sizes for a group of 1 ranks"), "{e}");
    let e = err(pg.scatter_to_tp_region(&x, Some(&[4])));
    assert!(e.contains("slice sizes [4] sum to 4, not to the dimension's 5"), "{e}");
    let e = err(pg.gather_from_sp_region(&x, Some(&[2])));
    assert!(e.contains("rank 0's slice is 3 long, the sizes [2] say 2"), "{e}");
    let e = err(pg.reduce_scatter_to_sp_region(&Tensor::from(1.0), None));
    assert!(e.contains("at least one dimension"), "{e}");
}
