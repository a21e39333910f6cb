//! The data pipeline on real files: video frames through ffmpeg, `<image>` expansion,
//! truncation that never cuts an image, placeholder checks, and the prefetching loader.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use mm_engine::data::records::{self, Record};
use mm_engine::data::{DataConfig, Dataset, Loader, LoaderConfig, Producer, Share, Skip};
use mm_engine::rng::Rng;
use mm_engine::tokenizer::ChatTokenizer;

fn synth() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mm-engine-data");
        let _ = std::fs::remove_dir_all(&dir);
        mm_engine::synth::run(mm_engine::synth::SynthArgs {
            out: dir.clone(),
            model: "tiny".into(),
            samples: 8,
            seed: 3,
            no_video: false,
            llm_layers: None,
            vit_layers: None,
            vit_heads: None,
            llm_heads: None,
            llm_kv_heads: None,
            vit_drop_path_rate: None,
            force: false,
        })
        .unwrap();
        dir
    })
}

fn cfg(seq_length: usize) -> DataConfig {
    DataConfig {
        image_size: 112,
        num_image_token: 16,
        min_dynamic_patch: 1,
        max_dynamic_patch: 4,
        use_thumbnail: true,
        min_num_frame: 2,
        max_num_frame: 5,
        seq_length,
    }
}

fn dataset(records: Vec<Record>, seq_length: usize) -> Dataset {
    let tok = Arc::new(ChatTokenizer::open(&synth().join("model")).unwrap());
    Dataset { records, bad_lines: Vec::new(), tokenizer: tok, cfg: cfg(seq_length) }
}

fn synth_records() -> Vec<Record> {
    let d = synth();
    records::load(&d.join("data/train.jsonl"), Some(&d.join("data"))).unwrap().records
}

fn line(json: &str) -> Record {
    records::parse_line(json, &synth().join("data"), Path::new("t.jsonl"), 1).unwrap()
}

#[test]
fn video_frames_become_tagged_single_tiles() {
    let recs = synth_records();
    let k = recs.iter().position(|r| r.video.is_some()).expect("synth writes a video record");
    let ds = dataset(recs, 4096);
    let s = ds.get(k, &mut Rng::new(1)).unwrap();
    assert!((2..=5).contains(&s.tiles), "{} frames", s.tiles);
    let text = ds.tokenizer.decode(&s.input_ids);
    for f in 1..=s.tiles {
        assert!(text.contains(&format!("Frame-{f}: <img>")), "{text}");
    }
    assert!(!text.contains("<video>"), "{text}");
    let ctx = s.input_ids.iter().filter(|&&i| i == ds.tokenizer.special.img_context).count();
    assert_eq!(ctx, 16 * s.tiles);
    assert_eq!(s.pixels.len(), s.tiles * 3 * 112 * 112);
    // The same RNG stream picks the same frames.
    let again = ds.get(k, &mut Rng::new(1)).unwrap();
    assert_eq!(again.pixels, s.pixels);
}

#[test]
fn images_expand_to_context_tokens_and_a_missing_placeholder_is_prepended() {
    let ds = dataset(
        vec![line(
            r#"{"image": "images/000.png", "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A red circle."}]}"#,
        )],
        4096,
    );
    let s = ds.get(0, &mut Rng::new(0)).unwrap();
    let text = ds.tokenizer.decode(&s.input_ids);
    assert!(text.contains("<|im_start|>user\n<img><IMG_CONTEXT>"), "{text}");
    assert!(text.contains("</img>\nWhat is it?"), "{text}");
    assert_eq!(s.tiles, 1, "a 112 px square image is one tile");
    let sup: Vec<i64> = s.labels.iter().copied().filter(|&l| l != -100).collect();
    assert_eq!(ds.tokenizer.decode(&sup), "A red circle.<|im_end|>");
}

#[test]
fn truncation_never_cuts_an_image_and_placeholders_must_match() {
    let img = r#"{"image": "images/000.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A red circle."}]}"#;
    let short = dataset(vec![line(img)], 60);
    match short.get(0, &mut Rng::new(0)) {
        Err(Skip::Rejected(m)) => assert!(m.contains("--seq-length 60"), "{m}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    let text = r#"{"conversations": [{"from": "human", "value": "Tell me a long story please."}, {"from": "gpt", "value": "Once upon a time there was a red circle and a blue square and a green triangle."}]}"#;
    let full = dataset(vec![line(text)], 4096).get(0, &mut Rng::new(0)).unwrap();
    let cut_at = full.input_ids.len() - 5;
    let cut = dataset(vec![line(text)], cut_at).get(0, &mut Rng::new(0)).unwrap();
    assert_eq!(cut.input_ids, full.input_ids[..cut_at]);
    let two = r#"{"image": ["images/000.png", "images/002.png"], "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}"#;
    match dataset(vec![line(two)], 4096).get(0, &mut Rng::new(0)) {
        Err(Skip::Bad(m)) => assert!(m.contains("1 <image> placeholders in the human turns but 2 images"), "{m}"),
        other => panic!("expected a bad record, got {other:?}"),
    }
    let broken = r#"{"image": "images/nothere.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}"#;
    match dataset(vec![line(broken)], 4096).get(0, &mut Rng::new(0)) {
        Err(Skip::Bad(m)) => assert!(m.contains("nothere.png"), "{m}"),
        other => panic!("expected a bad record, got {other:?}"),
    }
}

#[test]
fn the_prefetching_loader_gives_the_inline_sequence_from_any_position() {
    let ds = Arc::new(dataset(synth_records(), 4096));
    let cfg = LoaderConfig {
        seed: 9,
        micro_batch: 3,
        prefetch: 2,
        workers: 1,
        max_bad_fraction: 0.0,
        shuffle: true,
        share: Share::ALL,
    };
    let mut inline = Producer::new(ds.clone(), cfg.clone(), 0).unwrap();
    let want: Vec<_> = (0..4).map(|_| inline.next_batch().unwrap()).collect();
    let mut loader = Loader::start(ds.clone(), cfg.clone(), 0).unwrap();
    for w in &want {
        let b = loader.next_batch().unwrap();
        assert_eq!((&b.input_ids, &b.origins, b.end_position), (&w.input_ids, &w.origins, w.end_position));
    }
    drop(loader);
    // Resuming at a batch boundary continues the same stream (across the epoch boundary too).
    let mut resumed = Loader::start(ds, cfg, want[1].end_position).unwrap();
    for w in &want[2..] {
        let b = resumed.next_batch().unwrap();
        assert_eq!(b.input_ids, w.input_ids);
        assert_eq!(b.pixels, w.pixels);
    }
}

/// Data parallelism splits the stream of one rank: rank r's micro batches of each global batch
/// are exactly the ones one rank builds at those places, an unreadable record included (its
/// slot gets the same substitute everywhere), and a share resumes at a global batch boundary.
#[test]
fn two_and_four_rank_shares_tile_the_one_rank_stream() {
    let mut recs = synth_records();
    recs.push(line(
        r#"{"image": "images/nothere.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}"#,
    ));
    let n = recs.len();
    let ds = Arc::new(dataset(recs, 4096));
    let cfg = |share: Share| LoaderConfig {
        seed: 4,
        micro_batch: 1,
        prefetch: 1,
        workers: 1,
        max_bad_fraction: 0.5,
        shuffle: true,
        share,
    };
    // 3 global batches of 4 micro batches: more slots than records, so the broken one comes up.
    let per_step = 4;
    let mut one = Producer::new(ds.clone(), cfg(Share { rank: 0, size: 1, micro_batches: per_step }), 0).unwrap();
    let want: Vec<_> = (0..12).map(|_| one.next_batch().unwrap()).collect();
    let mut order = mm_engine::data::loader::Order::new(4, n, true);
    let broken_slot = (0..12).find(|&s| order.at(s).1 == n - 1).expect("the broken record is in the first epoch");
    assert_ne!(want[broken_slot as usize].origins[0], "t.jsonl:1", "its slot holds a substitute");
    assert!(want.iter().all(|b| b.origins[0] != "t.jsonl:1"));
    assert_eq!(want[3].end_position, 4);
    for dp in [2usize, 4] {
        let m = per_step / dp;
        for r in 0..dp {
            let share = Share { rank: r, size: dp, micro_batches: m };
            let mut p = Producer::new(ds.clone(), cfg(share), 0).unwrap();
            for step in 0..3 {
                for j in 0..m {
                    let b = p.next_batch().unwrap();
                    let w = &want[step * per_step + r * m + j];
                    assert_eq!(
                        (&b.origins, &b.input_ids),
                        (&w.origins, &w.input_ids),
                        "dp {dp} rank {r} step {step} micro batch {j}"
                    );
                    if j + 1 == m {
                        assert_eq!(b.end_position, ((step + 1) * per_step) as u64, "resume position of step {step}");
                    }
                }
            }
            // Resuming at the second global batch continues the same share.
            let mut resumed = Producer::new(ds.clone(), cfg(share), per_step as u64).unwrap();
            let b = resumed.next_batch().unwrap();
            assert_eq!(b.origins, want[per_step + r * m].origins, "dp {dp} rank {r} resumed");
        }
    }
}

/// `--num-workers`: any number of loader threads gives the stream of one, for a data-parallel
/// share and from a resume position, a broken record (and its substitute) included.
#[test]
fn several_workers_give_the_one_worker_stream() {
    let mut recs = synth_records();
    recs.push(line(
        r#"{"image": "images/nothere.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}"#,
    ));
    let ds = Arc::new(dataset(recs, 4096));
    let cfg = |workers: usize| LoaderConfig {
        seed: 5,
        micro_batch: 2,
        prefetch: 4,
        workers,
        max_bad_fraction: 0.5,
        shuffle: true,
        share: Share { rank: 1, size: 2, micro_batches: 3 },
    };
    for start in [0u64, 12] {
        let mut one = Loader::start(ds.clone(), cfg(1), start).unwrap();
        let want: Vec<_> = (0..10).map(|_| one.next_batch().unwrap()).collect();
        for workers in [2, 3] {
            let mut many = Loader::start(ds.clone(), cfg(workers), start).unwrap();
            for (j, w) in want.iter().enumerate() {
                let b = many.next_batch().unwrap();
                assert_eq!(
                    (&b.origins, &b.input_ids, b.end_position),
                    (&w.origins, &w.input_ids, w.end_position),
                    "{workers} workers from slot {start}: micro batch {j}"
                );
                assert!(b.pixels == w.pixels, "{workers} workers from slot {start}: pixels of micro batch {j}");
            }
        }
    }
}
