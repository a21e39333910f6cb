//! The seed's two layouts dry-run to the groups and MindSpeed-MM commands the seed implies:
//! InternVL3-8B on 1×8 NPUs (TP1 PP4, 6,8,8,6 / 24,0,0,0) and InternVL3-78B on 2×8 NPUs
//! (TP8 PP2, 40,40 / 45,0, unaligned linear). Snapshots pin the whole output; the
//! assertions below name the facts that matter so a snapshot update cannot hide them.

use launch::cluster::ClusterSpec;
use launch::dryrun;
use launch::plan::Plan;
use launch::recipe::Recipe;
use launch::render::{Rendered, Renderer};

fn dry(cluster_file: &str, model: &str, sets: &[&str]) -> (Plan, Rendered) {
    let cluster = ClusterSpec::from_file(cluster_file).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let recipe = Recipe::resolve(model, Some((&cluster.job, &cluster.origin)), None, &sets).unwrap();
    let plan = Plan::build(&cluster, &recipe).unwrap();
    let rendered = Renderer::new(None).unwrap().render_plan(&plan, &cluster).unwrap();
    (plan, rendered)
}

fn script_of(r: &Rendered, node: usize) -> &str {
    &r.nodes[node].units[0].script
}

fn arg_value<'a>(script: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = script.split_whitespace();
    while let Some(w) = words.next() {
        if w == flag {
            return words.next();
        }
    }
    None
}

#[test]
fn seed_8b_on_one_node_of_eight_npus() {
    let (plan, r) = dry("clusters/ascend-1x8-8b.yaml", "8b", &[]);
    assert_eq!((plan.world_size, plan.dims.tp(), plan.dims.pp(), plan.dims.dp()), (8, 1, 4, 2));
    assert_eq!(plan.groups["pp"], vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]);
    assert_eq!(plan.groups["dp"], vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
    assert_eq!(plan.groups["tp"].len(), 8);
    assert_eq!((plan.batch.grad_accumulation, plan.batch.global_batch_size), (64, 128));
    let llm: Vec<usize> = plan.llm_stages.iter().map(|s| s.num_layers).collect();
    let vit: Vec<usize> = plan.vit_stages.iter().map(|s| s.num_layers).collect();
    assert_eq!((llm, vit), (vec![6, 8, 8, 6], vec![24, 0, 0, 0]));

    assert_eq!(r.nodes.len(), 1);
    assert_eq!(r.nodes[0].units.len(), 1, "torchrun starts the 8 local ranks itself");
    let s = script_of(&r, 0);
    assert!(s.contains("source /usr/local/Ascend/ascend-toolkit/set_env.sh"));
    assert!(s.contains("exec env PYTHONUNBUFFERED=1 torchrun --nproc_per_node 8 --nnodes 1 --node_rank 0 --master_addr localhost --master_port 6000 --tee 3 --log-dir launch_generated/torchrun_logs pretrain_vlm.py"));
    for (flag, value) in [
        ("--tensor-model-parallel-size", "1"),
        ("--pipeline-model-parallel-size", "4"),
        ("--micro-batch-size", "1"),
        ("--global-batch-size", "128"),
        ("--seq-length", "4096"),
        ("--lr", "2e-5"),
        ("--min-lr", "0.0"),
        ("--train-iters", "5000"),
        ("--lr-decay-style", "cosine"),
        ("--weight-decay", "0.05"),
        ("--clip-grad", "1.0"),
        ("--save-interval", "5000"),
        ("--load", "pretrained/InternVL3-8B"),
        ("--save", "save_dir"),
        ("--distributed-backend", "nccl"),
    ] {
        assert_eq!(arg_value(s, flag), Some(value), "{flag}");
    }
    for flag in [
        "--variable-seq-lengths",
        "--use-distributed-optimizer",
        "--bf16",
        "--no-load-optim",
        "--no-save-rng",
        "--log-tps",
    ] {
        assert!(s.split_whitespace().any(|w| w == flag), "{flag} missing");
    }
    for absent in [
        "--unaligned-linear",
        "--sequence-parallel",
        "--virtual-pipeline-model-parallel-size",
        "--context-parallel-algo",
    ] {
        assert!(!s.contains(absent), "{absent} must not be there");
    }
    let env = &r.nodes[0].units[0].env;
    assert_eq!(env["HCCL_CONNECT_TIMEOUT"], "1200");
    assert_eq!(env["ASCEND_RT_VISIBLE_DEVICES"], "0,1,2,3,4,5,6,7");
    assert_eq!(env["NPUS_PER_NODE"], "8");
    assert_eq!(env["WORLD_SIZE"], "8");

    let model = launch::render::mindspeed_model_json(&plan);
    assert_eq!(model["text_decoder"]["pipeline_num_layers"], serde_json::json!([6, 8, 8, 6]));
    assert_eq!(model["image_encoder"]["vision_encoder"]["pipeline_num_layers"], serde_json::json!([24, 0, 0, 0]));
    assert_eq!(model["image_encoder"]["vision_encoder"]["freeze"], true);
    let data = launch::render::mindspeed_data_json(&plan);
    assert_eq!(data["dataset_param"]["tokenizer_config"]["from_pretrained"], "raw_ckpt/InternVL3-8B");

    insta::assert_snapshot!("seed_8b_dry_run", dryrun::to_text(&plan, &r));
}

#[test]
fn seed_78b_on_two_nodes_of_eight_npus() {
    let (plan, r) = dry("clusters/ascend-2x8-78b.yaml", "78b", &[]);
    assert_eq!((plan.world_size, plan.nnodes, plan.dims.tp(), plan.dims.pp(), plan.dims.dp()), (16, 2, 8, 2, 1));
    assert_eq!(plan.groups["tp"], vec![(0..8).collect::<Vec<_>>(), (8..16).collect()]);
    assert_eq!(plan.groups["pp"], (0..8).map(|i| vec![i, i + 8]).collect::<Vec<_>>());
    for row in &plan.ranks {
        assert_eq!(row.node_rank, row.rank / 8, "tp groups stay on one node");
    }
    let vit: Vec<usize> = plan.vit_stages.iter().map(|s| s.num_layers).collect();
    assert_eq!(vit, vec![45, 0]);

    assert_eq!(r.nodes.len(), 2);
    for (node, s) in [(0, script_of(&r, 0)), (1, script_of(&r, 1))] {
        assert!(
            s.contains(&format!(
                "--nproc_per_node 8 --nnodes 2 --node_rank {node} --master_addr 192.0.2.11 --master_port 6000"
            )),
            "{s}"
        );
        assert!(s.split_whitespace().any(|w| w == "--unaligned-linear"), "the 25-head ViT needs unaligned TP");
        assert_eq!(arg_value(s, "--tensor-model-parallel-size"), Some("8"));
        assert_eq!(arg_value(s, "--pipeline-model-parallel-size"), Some("2"));
        assert_eq!(arg_value(s, "--global-batch-size"), Some("128"));
    }
    let model = launch::render::mindspeed_model_json(&plan);
    assert_eq!(model["text_decoder"]["pipeline_num_layers"], serde_json::json!([40, 40]));
    assert_eq!(model["image_encoder"]["vision_encoder"]["num_attention_heads"], 25);
    assert_eq!(model["image_encoder"]["vision_encoder"]["qk_layernorm"], true);

    insta::assert_snapshot!("seed_78b_dry_run", dryrun::to_text(&plan, &r));
}

#[test]
fn parallel_mode_flags_follow_the_seed_rules() {
    // TP-SP: --unaligned-linear --sequence-parallel; CP: --context-parallel-algo; VPP: its size.
    let (_, r) = dry(
        "clusters/ascend-2x8-78b.yaml",
        "78b",
        &[
            "parallel.sequence_parallel=true",
            "parallel.vpp=2",
            "parallel.llm_pp_layers=[20,20,20,20]",
            "parallel.vit_pp_layers=[45,0,0,0]",
        ],
    );
    let s = script_of(&r, 0);
    assert!(s.contains("--unaligned-linear --sequence-parallel"));
    assert_eq!(arg_value(s, "--virtual-pipeline-model-parallel-size"), Some("2"));
    let (_, r) = dry(
        "clusters/ascend-1x8-8b.yaml",
        "8b",
        &["parallel.cp=2", "parallel.pp=1", "parallel.llm_pp_layers=null", "parallel.vit_pp_layers=null"],
    );
    let s = script_of(&r, 0);
    assert_eq!(arg_value(s, "--context-parallel-algo"), Some("megatron_cp_algo"));
    assert!(!s.contains("--variable-seq-lengths"), "only pipeline parallelism needs it");
}

/// The generated model.json agrees with MindSpeed-MM's own InternVL3 examples on the fields that
/// change the model or its memory (compared field by field with examples/internvl3/model_78B.json
/// of MindSpeed-MM, as facts): InternViT-6B's q/k RMSNorm, the LLM's rope scaling, full
/// recomputation and ViT drop path 0.4 for the 78B; none of them for the 8B's InternViT-300M.
#[test]
fn generated_model_json_matches_mindspeed_mm_examples() {
    let (plan, _) = dry("clusters/ascend-2x8-78b.yaml", "78b", &[]);
    let m = launch::render::mindspeed_model_json(&plan);
    let (t, v) = (&m["text_decoder"], &m["image_encoder"]["vision_encoder"]);
    assert_eq!(t["rope_scaling"], serde_json::json!({"type": "dynamic", "factor": 2.0}));
    assert_eq!(
        (&t["recompute_granularity"], &t["recompute_method"], &t["recompute_num_layers"]),
        (&"full".into(), &"uniform".into(), &1.into())
    );
    assert_eq!(
        (&v["q_layernorm"], &v["k_layernorm"], &v["qk_layernorm"]),
        (&"RMSNorm".into(), &"RMSNorm".into(), &true.into())
    );
    assert_eq!(v["drop_path_rate"], 0.4);
    assert_eq!(
        (&v["normalization"], &v["add_qkv_bias"], &v["num_attention_heads"]),
        (&"RMSNorm".into(), &false.into(), &25.into())
    );
    assert_eq!((&t["num_query_groups"], &t["add_qkv_bias"], &t["rotary_base"]), (&8.into(), &true.into(), &1e6.into()));

    let (plan, _) = dry("clusters/ascend-1x8-8b.yaml", "8b", &[]);
    let m = launch::render::mindspeed_model_json(&plan);
    let (t, v) = (&m["text_decoder"], &m["image_encoder"]["vision_encoder"]);
    assert!(t.get("rope_scaling").is_none() && v.get("q_layernorm").is_none(), "{m}");
    assert_eq!(
        (&v["normalization"], &v["add_qkv_bias"], &v["drop_path_rate"]),
        (&"LayerNorm".into(), &true.into(), &0.0.into())
    );
    // The recipe decides, documented in recipe.rs: --set overrides both.
    let (plan, _) = dry("clusters/ascend-1x8-8b.yaml", "8b", &["train.vit_drop_path_rate=0.1", "train.recompute=true"]);
    let m = launch::render::mindspeed_model_json(&plan);
    assert_eq!(m["image_encoder"]["vision_encoder"]["drop_path_rate"], 0.1);
    assert_eq!(m["text_decoder"]["recompute_granularity"], "full");
    // Megatron's three settings, spelled out, reach both MindSpeed-MM's model.json and mm-engine.
    let sets = ["train.recompute_granularity=full", "train.recompute_method=block", "train.recompute_num_layers=2"];
    let (plan, _) = dry("clusters/ascend-1x8-8b.yaml", "8b", &sets);
    let t = &launch::render::mindspeed_model_json(&plan)["text_decoder"];
    assert_eq!(
        (&t["recompute_granularity"], &t["recompute_method"], &t["recompute_num_layers"]),
        (&"full".into(), &"block".into(), &2.into())
    );
    let a = launch::render::engine_args(&plan).join(" ");
    assert!(a.contains("--recompute-granularity full --recompute-method block --recompute-num-layers 2"), "{a}");
    let (plan, _) = dry("clusters/ascend-1x8-8b.yaml", "8b", &["train.recompute_granularity=selective"]);
    let a = launch::render::engine_args(&plan).join(" ");
    assert!(a.contains("--recompute-granularity selective") && !a.contains("--recompute-method"), "{a}");
    let (plan, _) = dry("clusters/ascend-1x8-8b.yaml", "8b", &[]);
    let a = launch::render::engine_args(&plan).join(" ");
    assert!(!a.contains("--recompute") && !a.contains("--vit-drop-path-rate"), "off by default for the 8B: {a}");
    // The recipe's ViT drop path reaches mm-engine too (it used to reach MindSpeed-MM only).
    let (plan, _) = dry("clusters/ascend-1x8-8b.yaml", "8b", &["train.vit_drop_path_rate=0.4"]);
    assert!(launch::render::engine_args(&plan).join(" ").contains("--vit-drop-path-rate 0.4"));
}

/// Recomputation settings Megatron would refuse are refused when the recipe is resolved, naming
/// the key and the fix; a uniform group size that does not divide a stage's layers (which
/// Megatron would index past) is refused for the MindSpeed-MM templates at plan time.
#[test]
fn inconsistent_recompute_settings_name_the_key() {
    let cluster = ClusterSpec::from_file("clusters/ascend-1x8-8b.yaml").unwrap();
    let sets: Vec<String> =
        ["train.recompute_granularity=full", "train.recompute_method=uniform", "train.recompute_num_layers=4"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let recipe = Recipe::resolve("8b", Some((&cluster.job, &cluster.origin)), None, &sets).unwrap();
    let e = Plan::build(&cluster, &recipe).unwrap_err();
    assert!(e.layout && e.to_string().contains("train.recompute_num_layers 4 with the uniform method"), "{e}");
    assert!(e.to_string().contains("(6,8,8,6)"), "{e}");
    for (sets, key, hint) in [
        (&["train.recompute_granularity=full"][..], "train.recompute_method", "needs a method"),
        (
            &["train.recompute_granularity=selective", "train.recompute_method=uniform"][..],
            "train.recompute_method",
            "takes no method",
        ),
        (&["train.recompute_num_layers=2"][..], "train.recompute_granularity", "need recompute_granularity full"),
        (
            &["train.recompute_granularity=full", "train.recompute_method=block", "train.recompute_num_layers=0"][..],
            "train.recompute_num_layers",
            "0 recomputed layers per stage",
        ),
        (
            &["train.recompute_granularity=full", "train.recompute_method=uniform", "train.recompute_num_layers=0"][..],
            "train.recompute_num_layers",
            "at least 1",
        ),
    ] {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let e = Recipe::resolve("8b", None, None, &sets).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(hint), "{sets:?}: {e}");
    }
}

#[test]
fn msrun_template_renders_the_mindspore_launch() {
    let cluster = ClusterSpec::from_file("clusters/ascend-2x8-78b.yaml").unwrap();
    let mut cluster = cluster;
    cluster.template = launch::cluster::Template::MindspeedMmMsrun;
    let recipe = Recipe::resolve("78b", Some((&cluster.job, &cluster.origin)), None, &[]).unwrap();
    let plan = Plan::build(&cluster, &recipe).unwrap();
    let r = Renderer::new(None).unwrap().render_plan(&plan, &cluster).unwrap();
    let s = script_of(&r, 1);
    assert!(s.contains("exec msrun --local_worker_num 8 --worker_num 16 --node_rank 1 --master_addr 192.0.2.11 --master_port 6000 --log_dir msrun_log --bind_core=True --join=True pretrain_vlm.py"), "{s}");
    assert!(s.trim_end().ends_with("--ai-framework mindspore"));
}

#[test]
fn json_dry_run_is_the_same_plan_with_secrets_redacted() {
    let text = std::fs::read_to_string("clusters/gpu-node.yaml").unwrap();
    let text = text.replacen("\nenv:\n", "\nenv:\n  HF_TOKEN: hf_very_secret_value\n", 1);
    assert!(text.contains("HF_TOKEN"), "the example has an env map to extend");
    let cluster = ClusterSpec::from_str(&text, std::path::Path::new("gpu.yaml")).unwrap();
    // The seed's 8B recipe is TP1 × PP4: mm-engine runs it as 4 pipeline stages (the seed's
    // split) × 4 data-parallel replicas on the 16 GPUs.
    let recipe = Recipe::resolve("8b", Some((&cluster.job, &cluster.origin)), None, &[]).unwrap();
    let plan = Plan::build(&cluster, &recipe).unwrap();
    assert_eq!((plan.dims.pp(), plan.dims.dp()), (4, 4));
    let args = launch::render::engine_args(&plan).join(" ");
    assert!(args.contains("--pipeline-model-parallel-size 4"), "{args}");
    assert!(args.contains("--llm-pp-layers 6,8,8,6 --vit-pp-layers 24,0,0,0"), "{args}");
    // The seed's 78B, TP 8 × PP 2 with unaligned linear, runs too (the 16 GPUs).
    let recipe_tp = Recipe::resolve("78b", Some((&cluster.job, &cluster.origin)), None, &[]).unwrap();
    let tp_plan = Plan::build(&cluster, &recipe_tp).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((tp_plan.dims.tp(), tp_plan.dims.pp(), tp_plan.dims.dp()), (8, 2, 1));
    let args = launch::render::engine_args(&tp_plan).join(" ");
    assert!(args.contains("--tensor-model-parallel-size 8") && args.contains("--unaligned-linear"), "{args}");
    // MindSpeed-MM's torch files split tensor-parallel ranks their own way: refused from mm-engine.
    let torch = ["checkpoint.save_format=torch".to_string()];
    let recipe_torch = Recipe::resolve("78b", Some((&cluster.job, &cluster.origin)), None, &torch).unwrap();
    let err = Plan::build(&cluster, &recipe_torch).unwrap_err().to_string();
    assert!(err.contains("checkpoint.save_format torch with parallel.tp 8"), "{err}");
    // Context parallelism runs (megatron_cp_algo); other algorithms are refused with the fix.
    let cp = ["parallel.cp=2".to_string()];
    let recipe_cp = Recipe::resolve("8b", Some((&cluster.job, &cluster.origin)), None, &cp).unwrap();
    let cp_plan = Plan::build(&cluster, &recipe_cp).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((cp_plan.dims.cp(), cp_plan.dims.pp(), cp_plan.dims.dp()), (2, 4, 2));
    let args = launch::render::engine_args(&cp_plan).join(" ");
    assert!(args.contains("--context-parallel-size 2 --context-parallel-algo megatron_cp_algo"), "{args}");
    let ulysses = ["parallel.cp=2".to_string(), "parallel.context_parallel_algo=ulysses_cp_algo".to_string()];
    let recipe_u = Recipe::resolve("8b", Some((&cluster.job, &cluster.origin)), None, &ulysses).unwrap();
    let err = Plan::build(&cluster, &recipe_u).unwrap_err().to_string();
    assert!(
        err.contains("the mm-engine template cannot run this layout (parallel.context_parallel_algo ulysses_cp_algo)"),
        "{err}"
    );
    assert!(
        err.contains(
            "--set parallel.context_parallel_algo=megatron_cp_algo`, or set `template: mindspeed-mm-torchrun`"
        ),
        "{err}"
    );
    let r = Renderer::new(None).unwrap().render_plan(&plan, &cluster).unwrap();
    let json = dryrun::to_json(&plan, &r);
    let text_out = dryrun::to_text(&plan, &r);
    for out in [&json, &text_out] {
        assert!(!out.contains("hf_very_secret_value"), "secret leaked");
        assert!(out.contains("HF_TOKEN"));
    }
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["plan"]["world_size"], plan.world_size);
    assert_eq!(v["launch"]["nodes"][0]["units"][0]["env"]["HF_TOKEN"], "<redacted>");
    assert_eq!(v["plan"]["ranks"].as_array().unwrap().len(), plan.world_size);
}

/// `finetune MODEL` takes a checkpoint folder as well as a preset: the architecture comes from
/// its config.json through mm-spec, and a `checkpoint.load` of another model is refused with
/// what differs.
#[test]
fn a_checkpoint_folder_is_a_model_and_a_mismatched_load_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("My-InternVL3");
    std::fs::create_dir_all(&folder).unwrap();
    let mut arch = mm_spec::preset("tiny").unwrap();
    arch.llm.num_hidden_layers = 3;
    let cfg = mm_spec::hf::config_for_layout(&arch, None, mm_spec::HfLayout::Hf, None);
    std::fs::write(folder.join("config.json"), cfg.to_string()).unwrap();
    // An HF folder holds weights beside its config (the plan reads only the config).
    mm_spec::io::SafetensorsWriter::create(&folder.join("model.safetensors"), vec![], &[]).unwrap().finish().unwrap();
    let model = folder.display().to_string();

    let cluster = ClusterSpec::from_file("clusters/local.yaml").unwrap();
    // Not a preset's architecture: the plain data-parallel recipe (bf16), so fp32 for the CPU.
    let fp32 = ["train.precision=fp32".to_string()];
    let recipe = Recipe::resolve(&model, Some((&cluster.job, &cluster.origin)), None, &fp32).unwrap();
    assert_eq!(recipe.checkpoint.load.as_deref(), Some(folder.as_path()));
    assert_eq!(recipe.checkpoint.tokenizer.as_deref(), Some(folder.as_path()));
    let plan = Plan::build(&cluster, &recipe).unwrap();
    assert_eq!(plan.model.llm.num_hidden_layers, 3, "the folder's own depth, not a preset's");
    assert_eq!(plan.model.name, "My-InternVL3");
    assert_eq!(recipe.checkpoint.save.as_deref(), Some(std::path::Path::new("save_dir/My-InternVL3")));
    assert_eq!(plan.llm_stages[0].num_layers, 3);

    let set = [format!("checkpoint.load={model}")];
    let recipe = Recipe::resolve("tiny", Some((&cluster.job, &cluster.origin)), None, &set).unwrap();
    let err = Plan::build(&cluster, &recipe).unwrap_err().to_string();
    assert!(err.contains("holds another model than `tiny` (llm_config.num_hidden_layers 2 → 3)"), "{err}");
    assert!(err.contains(&format!("(`finetune {model}`)")), "{err}");

    let err = Recipe::resolve(&dir.path().join("nothing").display().to_string(), None, None, &[]).unwrap_err();
    assert!(err.to_string().contains("nothing: no such folder"), "{err}");
    // A preset name wins over a folder of that name; a folder MODEL is for the mm-engine template.
    assert!(!launch::recipe::is_model_folder("8b") && launch::recipe::is_model_folder("./8b"));
    let npu = ClusterSpec::from_file("clusters/ascend-1x8-8b.yaml").unwrap();
    let recipe = Recipe::resolve(&model, Some((&npu.job, &npu.origin)), None, &[]).unwrap();
    let err = Plan::build(&npu, &recipe).unwrap_err().to_string();
    assert!(err.contains("a checkpoint folder as MODEL plans for mm-engine"), "{err}");
}

/// `checkpoint.load` in the format the template's engine cannot load is refused at plan time
/// with the conversion command for this very split: an HF (or mm-engine) folder for the seed's
/// MindSpeed-MM 8B, MindSpeed-MM's torch files for mm-engine.
#[test]
fn a_load_in_the_wrong_format_for_the_template_names_the_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("InternVL3-8B");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::copy("crates/spec/tests/configs/internvl3-8b.json", hf.join("config.json")).unwrap();
    mm_spec::io::SafetensorsWriter::create(&hf.join("model.safetensors"), vec![], &[]).unwrap().finish().unwrap();
    let cluster = ClusterSpec::from_file("clusters/ascend-1x8-8b.yaml").unwrap();
    let set = [format!("checkpoint.load={}", hf.display())];
    let recipe = Recipe::resolve("8b", Some((&cluster.job, &cluster.origin)), None, &set).unwrap();
    let err = Plan::build(&cluster, &recipe).unwrap_err().to_string();
    assert!(err.contains("is an HF folder; MindSpeed-MM loads its converted checkpoints"), "{err}");
    assert!(
        err.contains("--format mindspeed --hf-dir")
            && err.contains("--tp 1 --llm-pp-layers 6,8,8,6 --vit-pp-layers 24,0,0,0"),
        "{err}"
    );
    assert!(!err.contains("holds another model"), "the same architecture: {err}");

    let ms = dir.path().join("ms-save");
    std::fs::create_dir_all(ms.join("iter_0000020/mp_rank_00")).unwrap();
    std::fs::write(ms.join("latest_checkpointed_iteration.txt"), "20").unwrap();
    std::fs::write(ms.join("iter_0000020/mp_rank_00/model_optim_rng.pt"), b"PK").unwrap();
    // mm-engine loads MindSpeed-MM's files given a config.json: the tokenizer folder's (the HF
    // folder they came from) or the save's hf_assets/ (mm-engine's --ckpt-format torch saves).
    let local = ClusterSpec::from_file("clusters/local.yaml").unwrap();
    let plan = |set: &[String]| {
        let recipe = Recipe::resolve("tiny", Some((&local.job, &local.origin)), None, set).unwrap();
        Plan::build(&local, &recipe).map_err(|e| e.to_string())
    };
    let load = format!("checkpoint.load={}", ms.display());
    let err = plan(&[load.clone(), "checkpoint.tokenizer=null".into()]).unwrap_err();
    assert!(err.contains("holds MindSpeed-MM's torch files, which carry no config.json"), "{err}");
    assert!(err.contains("--set checkpoint.tokenizer=<HF folder>"), "{err}");
    let with_tokenizer = plan(&[load.clone(), format!("checkpoint.tokenizer={}", hf.display())]);
    assert!(
        with_tokenizer.as_ref().is_err_and(|e| !e.contains("MindSpeed")) || with_tokenizer.is_ok(),
        "{with_tokenizer:?}"
    );
    std::fs::create_dir_all(ms.join("iter_0000020/hf_assets")).unwrap();
    std::fs::write(ms.join("iter_0000020/hf_assets/config.json"), "{}").unwrap();
    let own_assets = plan(&[load.clone(), "checkpoint.tokenizer=null".into()]);
    assert!(own_assets.as_ref().is_err_and(|e| !e.contains("MindSpeed")) || own_assets.is_ok(), "{own_assets:?}");

    // MindSpeed-MM saves torch files only.
    let set = ["checkpoint.save_format=mm".to_string()];
    let recipe = Recipe::resolve("8b", Some((&cluster.job, &cluster.origin)), None, &set).unwrap();
    let err = Plan::build(&cluster, &recipe).unwrap_err().to_string();
    assert!(err.contains("checkpoint.save_format mm: MindSpeed-MM saves its own torch files only"), "{err}");
}

/// A layout that does not fit exits 3 (as in mm-convert), a bad key 2; `--set` takes the
/// layer list as `7,7,7,7`, the spelling the layout error itself suggests.
#[test]
fn layout_mismatch_exits_3_and_the_suggested_list_is_accepted() {
    let run = |sets: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_launch"));
        c.args(["--cluster", concat!(env!("CARGO_MANIFEST_DIR"), "/clusters/ascend-1x8-8b.yaml"), "finetune", "8b"]);
        for s in sets {
            c.args(["--set", s]);
        }
        let o = c.arg("--dry-run").output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (code, err) = run(&["parallel.llm_pp_layers=7,7,7,6"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("llm_pp_layers sums to 27 but the LLM has 28 layers") && err.contains("e.g. 7,7,7,7"),
        "{err}"
    );
    assert_eq!(run(&["parallel.llm_pp_layers=7,7,7,7"]).0, Some(0));
    assert_eq!(run(&["train.lrr=1"]).0, Some(2));
    // A configuration problem the plan finds (no batch size) is 2, not a layout misfit.
    let (code, err) = run(&["train.global_batch_size=null", "train.grad_accumulation=null"]);
    assert_eq!(code, Some(2), "{err}");
}

/// `launch submit`'s batch script for the seed's 8B on one node of 8 GPUs (clusters/slurm.yaml,
/// `--nodes 1 --partition gpu --time 24:00:00`): one node, one task, 8 GPUs, whole node, the
/// warning signal and requeue, and the launcher exec'd on the Slurm executor.
#[test]
fn seed_8b_sbatch_script_on_a_one_by_eight_gpu_partition() {
    let env: std::collections::BTreeMap<String, String> =
        [("SLURM_JOB_NODELIST".to_string(), "node[1-1]".to_string())].into();
    let cluster = ClusterSpec::from_file_with_env("clusters/slurm.yaml", &env).unwrap();
    assert_eq!(cluster.executor, launch::cluster::Executor::Slurm, "hosts_from: slurm runs agents as steps");
    let recipe = Recipe::resolve("8b", Some((&cluster.job, &cluster.origin)), None, &[]).unwrap();
    let plan = Plan::build(&cluster, &recipe).unwrap();
    let opts = launch::submit::SubmitOptions {
        partition: Some("gpu".into()),
        time: Some("24:00:00".into()),
        warn_secs: 120,
        ..Default::default()
    };
    let args = ["--cluster", "/scratch/job/slurm.yaml", "finetune", "8b", "--set", "train.train_iters=10"];
    let job = launch::submit::SubmitJob {
        launch: std::path::Path::new("/opt/mm/bin/launch"),
        cwd: std::path::Path::new("/scratch/job"),
        args: args.iter().map(|s| s.to_string()).collect(),
    };
    let script = launch::submit::script(&Renderer::new(None).unwrap(), &plan, &cluster, &opts, &job).unwrap();
    for line in [
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --exclusive",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --output=/scratch/job/logs/slurm-%j.out",
        "exec /opt/mm/bin/launch --cluster /scratch/job/slurm.yaml finetune 8b --set train.train_iters=10",
    ] {
        assert!(script.lines().any(|l| l == line), "`{line}` missing:\n{script}");
    }
    assert!(!script.contains("--nodelist"), "hosts_from: slurm lets Slurm pick the nodes");
    insta::assert_snapshot!("seed_8b_sbatch", script);

    // A cluster not run by Slurm (this one is localhost) has no Slurm nodes to allocate: refused.
    let (plan, _) = dry("clusters/ascend-1x8-8b.yaml", "8b", &[]);
    let ssh = ClusterSpec::from_file("clusters/ascend-1x8-8b.yaml").unwrap();
    let e = launch::submit::script(&Renderer::new(None).unwrap(), &plan, &ssh, &opts, &job).unwrap_err();
    assert!(e.contains("the cluster's executor is local") && e.contains("hosts_from: slurm"), "{e}");
}

/// `launch submit` without --nodes on a `hosts_from: slurm` cluster (outside an allocation):
/// the one hint is --nodes, not "run inside an allocation", which submit itself makes.
#[test]
fn submit_without_nodes_asks_for_nodes() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_launch"))
        .args(["--cluster", "clusters/slurm.yaml", "submit", "--dry-run", "finetune", "8b"])
        .env_remove("SLURM_JOB_NODELIST")
        .env_remove("SLURM_NODELIST")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.starts_with("error: clusters/slurm.yaml:11:13: hosts_from:"), "{err}");
    assert!(err.contains("hint: `launch submit` makes the allocation: pass --nodes N"), "{err}");
    assert!(!err.contains("inside a Slurm allocation"), "{err}");
}
