//! Render: plan → the exact processes to start on each host. Pure: the same plan gives the
//! same scripts, so the dry run shows precisely what a launch runs.
//!
//! A launch unit is one process the node agent starts: one per rank for mm-engine, one per
//! node for torchrun/msrun (they spawn the local ranks themselves). Each unit is a bash
//! script plus an environment. Templates are handlebars (embedded; `--templates DIR`
//! overrides by file name) whose escape function is shell quoting, so every `{{value}}` is
//! quoted whatever it holds; only the cluster's `setup:` lines are inserted raw
//! (`{{{...}}}`), because they are shell by design.

use std::collections::BTreeMap;
use std::path::Path;

use handlebars::Handlebars;
use serde::Serialize;
use serde_json::json;

use crate::cluster::{Accelerator, ClusterSpec, Template};
use crate::plan::{NodePlan, Plan};
use crate::recipe::{Precision, Recipe};

const EMBEDDED: &[(&str, &str)] = &[
    ("mm-engine", include_str!("../templates/mm-engine.hbs")),
    ("mindspeed-mm-torchrun", include_str!("../templates/mindspeed-mm-torchrun.hbs")),
    ("mindspeed-mm-msrun", include_str!("../templates/mindspeed-mm-msrun.hbs")),
    ("slurm-sbatch", include_str!("../templates/slurm-sbatch.hbs")),
];

/// Where the MindSpeed templates write the data/model JSON they generate (in the workdir).
const GENERATED_DIR: &str = "launch_generated";

#[derive(Debug, Clone, Serialize)]
pub struct Rendered {
    pub template: Template,
    pub nodes: Vec<NodeLaunch>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeLaunch {
    pub node_rank: usize,
    pub host: String,
    pub address: String,
    pub units: Vec<LaunchUnit>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LaunchUnit {
    /// Global ranks this process hosts (one for mm-engine, the node's ranks for torchrun).
    pub ranks: Vec<usize>,
    pub env: BTreeMap<String, String>,
    /// Run as `bash -c SCRIPT`.
    pub script: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("template {name}: {message}")]
    Template { name: String, message: String },
    #[error("cannot read the template override {path}: {source}")]
    Override { path: String, source: std::io::Error },
}

/// POSIX shell quoting: bare when only safe characters, else single quotes.
pub fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./:=,+@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The words that make a variable secret when one of its name's segments (split at `_`, `-`,
/// `.` and lower→upper case changes) is one of them: `HF_TOKEN`, `API_KEY`, `KEY_FILE`,
/// `AWS_SECRET_ACCESS_KEY`, `hfToken`; not `MONKEY_PATCH` or `TOKENIZERS_PARALLELISM`, whose
/// words only contain one.
const SECRET_WORDS: [&str; 5] = ["TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD"];
/// Glued spellings that end a segment (`HFTOKEN`, `OPENAI_APIKEY`, `COS_SECRETKEY`): every
/// secret word but the bare KEY, which would take `MONKEY`.
const SECRET_ENDINGS: [&str; 8] =
    ["TOKEN", "SECRET", "PASSWORD", "PASSWD", "APIKEY", "ACCESSKEY", "SECRETKEY", "PRIVATEKEY"];

/// Names that must never be printed: they name a token, key, secret or password.
pub fn is_secret_name(name: &str) -> bool {
    let mut segments: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut prev_lower = false;
    for c in name.chars() {
        if matches!(c, '_' | '-' | '.') || (prev_lower && c.is_ascii_uppercase()) {
            segments.push(std::mem::take(&mut cur));
        }
        if !matches!(c, '_' | '-' | '.') {
            cur.push(c.to_ascii_uppercase());
        }
        prev_lower = c.is_ascii_lowercase();
    }
    segments.push(cur);
    segments.iter().any(|seg| SECRET_WORDS.contains(&seg.as_str()) || SECRET_ENDINGS.iter().any(|e| seg.ends_with(e)))
}

pub fn redact_env(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    env.iter().map(|(k, v)| (k.clone(), if is_secret_name(k) { "<redacted>".to_string() } else { v.clone() })).collect()
}

/// One shell word's value as written: quoted pieces and bare characters glued together
/// (`'a b'`, `"x\"y"`, `ab'c d'"e"`), stopping at blanks and control operators.
const WORD: &str = r#"(?:'[^']*'|"(?:[^"\\]|\\.)*"|\\.|[^\s;&|()'"\\])+"#;
/// A flag's value: a [`WORD`] that does not start with `-` (`--password --stdin` has none).
const FLAG_VALUE: &str =
    r#"(?:'[^']*'|"(?:[^"\\]|\\.)*"|\\.|[^\s;&|()'"\\-])(?:'[^']*'|"(?:[^"\\]|\\.)*"|\\.|[^\s;&|()'"\\])*"#;

/// Secret-bearing pieces of a shell line: assignments (`NAME=value`, `export NAME=value`,
/// several per line) and long flags (`--token VALUE`, `--api-key=VALUE`): (name, byte range of
/// the value as written, quotes included, whether it came from a flag), in line order. The two
/// are found in separate passes, so a flag before an assignment (`--env HF_TOKEN=x`) hides
/// nothing: such a "flag value" is the assignment's, not the flag's.
fn assignments(line: &str) -> Vec<(&str, std::ops::Range<usize>, bool)> {
    static ASSIGN: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    static FLAG: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    static NAME_EQ: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let assign = ASSIGN.get_or_init(|| {
        regex::Regex::new(&format!(r#"(?:^|[\s;&|(])([A-Za-z_][A-Za-z0-9_]*)=({WORD})?"#)).expect("a valid pattern")
    });
    let flag = FLAG.get_or_init(|| {
        regex::Regex::new(&format!(r#"(?:^|[\s;&|(])--([A-Za-z][A-Za-z0-9_.-]*)(?:=({WORD})|\s+({FLAG_VALUE}))"#))
            .expect("a valid pattern")
    });
    let name_eq = NAME_EQ.get_or_init(|| regex::Regex::new(r"^[A-Za-z_][A-Za-z0-9_]*=").expect("a valid pattern"));
    let mut out: Vec<(&str, std::ops::Range<usize>, bool)> = assign
        .captures_iter(line)
        .filter_map(|c| {
            let name = c.get(1)?;
            Some((name.as_str(), c.get(2).map_or(name.end() + 1..name.end() + 1, |v| v.range()), false))
        })
        .collect();
    for c in flag.captures_iter(line) {
        let (Some(name), Some(v)) = (c.get(1), c.get(2).or(c.get(3))) else { continue };
        if c.get(3).is_some() && name_eq.is_match(v.as_str()) {
            continue;
        }
        if out.iter().all(|(_, r, _)| r.end <= v.start() || v.end() <= r.start) {
            out.push((name.as_str(), v.range(), true));
        }
    }
    out.sort_by_key(|(_, r, _)| r.start);
    out
}

/// A shell word without its quoting: what the program receives (inside double quotes a
/// backslash escapes only `$`, `` ` ``, `"`, `\` and a newline, as in the shell).
fn unquote(word: &str) -> String {
    let mut out = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => out.extend(chars.by_ref().take_while(|&c| c != '\'')),
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.peek() {
                            Some(&n) if matches!(n, '$' | '`' | '"' | '\\' | '\n') => {
                                out.push(n);
                                chars.next();
                            }
                            _ => out.push('\\'),
                        },
                        c => out.push(c),
                    }
                }
            }
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// The values given to secret names in a shell line (unquoted), for scrubbing output. Flag
/// values shorter than 4 characters are left out: `--key-count 2` would otherwise redact every
/// `2` in the logs, and no real secret is that short.
pub fn setup_secrets(line: &str) -> Vec<String> {
    assignments(line)
        .into_iter()
        .filter(|(name, r, _)| is_secret_name(name) && !r.is_empty())
        .filter_map(|(_, r, flag)| {
            let v = unquote(&line[r]);
            (!v.is_empty() && (!flag || v.chars().count() >= 4)).then_some(v)
        })
        .collect()
}

/// `line` with the value of every secret-named assignment replaced by `<redacted>`
/// (`export HF_TOKEN=<redacted>`), by the same rule as `env:`.
pub fn redact_line(line: &str) -> String {
    let mut out = line.to_string();
    for (name, r, _) in assignments(line).into_iter().rev() {
        if is_secret_name(name) && !r.is_empty() {
            out.replace_range(r, "<redacted>");
        }
    }
    out
}

/// Every line of a script through [`redact_line`].
pub fn redact_script(script: &str) -> String {
    script.split_inclusive('\n').map(redact_line).collect()
}

pub struct Renderer {
    hb: Handlebars<'static>,
}

impl Renderer {
    /// The embedded templates, each replaced by `<dir>/<name>.hbs` when that file exists.
    pub fn new(override_dir: Option<&Path>) -> Result<Renderer, RenderError> {
        let mut hb = Handlebars::new();
        hb.set_strict_mode(true);
        hb.register_escape_fn(shell_quote);
        for (name, text) in EMBEDDED {
            let text = match override_dir.map(|d| d.join(format!("{name}.hbs"))).filter(|p| p.exists()) {
                Some(p) => std::fs::read_to_string(&p)
                    .map_err(|source| RenderError::Override { path: p.display().to_string(), source })?,
                None => text.to_string(),
            };
            hb.register_template_string(name, text)
                .map_err(|e| RenderError::Template { name: name.to_string(), message: e.to_string() })?;
        }
        Ok(Renderer { hb })
    }

    fn render(&self, name: &str, ctx: &serde_json::Value) -> Result<String, RenderError> {
        let out = self
            .hb
            .render(name, ctx)
            .map_err(|e| RenderError::Template { name: name.to_string(), message: e.to_string() })?;
        // Templates keep their block helpers on lines of their own; drop the blank lines they leave.
        Ok(out.lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().join("\n") + "\n")
    }

    /// `launch submit`'s batch script (templates/slurm-sbatch.hbs) from its context.
    pub fn render_sbatch(&self, ctx: &serde_json::Value) -> Result<String, RenderError> {
        self.render("slurm-sbatch", ctx)
    }

    pub fn render_plan(&self, plan: &Plan, cluster: &ClusterSpec) -> Result<Rendered, RenderError> {
        let nodes = plan
            .nodes
            .iter()
            .map(|node| {
                let units = match plan.template {
                    Template::MmEngine => self.engine_units(plan, cluster, node)?,
                    t => vec![self.mindspeed_unit(plan, cluster, node, t)?],
                };
                Ok(NodeLaunch {
                    node_rank: node.node_rank,
                    host: node.host.name.clone(),
                    address: node.host.address.clone(),
                    units,
                })
            })
            .collect::<Result<Vec<_>, RenderError>>()?;
        Ok(Rendered { template: plan.template, nodes })
    }

    fn engine_units(
        &self,
        plan: &Plan,
        cluster: &ClusterSpec,
        node: &NodePlan,
    ) -> Result<Vec<LaunchUnit>, RenderError> {
        let engine = cluster.engine_command();
        let args = engine_args(plan);
        node.ranks
            .iter()
            .enumerate()
            .map(|(local, &rank)| {
                let ctx = json!({
                    "setup": cluster.setup,
                    "workdir": cluster.workdir.as_ref().map(|p| p.display().to_string()),
                    "engine": engine,
                    "args": args,
                    "rank": rank,
                });
                let mut env = node_env(plan, cluster, node);
                env.insert("RANK".into(), rank.to_string());
                env.insert("LOCAL_RANK".into(), local.to_string());
                Ok(LaunchUnit { ranks: vec![rank], env, script: self.render("mm-engine", &ctx)? })
            })
            .collect()
    }

    fn mindspeed_unit(
        &self,
        plan: &Plan,
        cluster: &ClusterSpec,
        node: &NodePlan,
        t: Template,
    ) -> Result<LaunchUnit, RenderError> {
        let model = plan.model.name.as_str();
        let data_json_path = format!("{GENERATED_DIR}/data_{model}.json");
        let model_json_path = format!("{GENERATED_DIR}/model_{model}.json");
        let ctx = json!({
            "setup": cluster.setup,
            "workdir": cluster.workdir.as_ref().map(|p| p.display().to_string()),
            "generated_dir": GENERATED_DIR,
            "data_json": mindspeed_data_json(plan).to_string(),
            "model_json": mindspeed_model_json(plan).to_string(),
            "data_json_path": data_json_path,
            "model_json_path": model_json_path,
            "nproc_per_node": node.ranks.len(),
            "nnodes": plan.nnodes,
            "node_rank": node.node_rank,
            "world_size": plan.world_size,
            "master_addr": plan.master_addr,
            "master_port": plan.master_port,
            "args": megatron_args(plan, &data_json_path, &model_json_path),
        });
        let env = node_env(plan, cluster, node);
        Ok(LaunchUnit { ranks: node.ranks.clone(), env, script: self.render(t.as_str(), &ctx)? })
    }
}

/// The environment every unit on `node` starts with: the cluster's, the host's, then the
/// layout (which wins: the plan is the source of truth for ranks and sizes).
fn node_env(plan: &Plan, cluster: &ClusterSpec, node: &NodePlan) -> BTreeMap<String, String> {
    let mut env = cluster.env.clone();
    env.extend(node.host.env.clone());
    let layout = [
        ("WORLD_SIZE", plan.world_size.to_string()),
        ("LOCAL_WORLD_SIZE", node.ranks.len().to_string()),
        ("NODE_RANK", node.node_rank.to_string()),
        ("NNODES", plan.nnodes.to_string()),
        ("MASTER_ADDR", plan.master_addr.clone()),
        ("MASTER_PORT", plan.master_port.to_string()),
    ];
    env.extend(layout.into_iter().map(|(k, v)| (k.to_string(), v)));
    if let Some(var) = plan.accelerator.visible_devices_var() {
        let list: Vec<String> = node.host.devices.iter().map(|d| d.to_string()).collect();
        env.insert(var.to_string(), list.join(","));
    }
    if plan.accelerator == Accelerator::Npu {
        env.insert("NPUS_PER_NODE".into(), node.ranks.len().to_string());
    }
    if plan.template == Template::MmEngine {
        // Gloo binds to the address the other hosts reach this one at.
        env.insert("MM_BIND_ADDR".into(), if cluster.local { "127.0.0.1".into() } else { node.host.address.clone() });
        let timeout = cluster.env.get("HCCL_CONNECT_TIMEOUT").cloned().unwrap_or_else(|| "600".into());
        env.entry("MM_DIST_TIMEOUT_S".into()).or_insert(timeout);
    }
    env
}

fn path_arg(args: &mut Vec<String>, flag: &str, p: &Option<std::path::PathBuf>) {
    if let Some(p) = p {
        args.push(flag.into());
        args.push(p.display().to_string());
    }
}

fn flag(args: &mut Vec<String>, name: &str, on: bool) {
    if on {
        args.push(name.into());
    }
}

fn kv(args: &mut Vec<String>, name: &str, value: impl ToString) {
    args.push(name.into());
    args.push(value.to_string());
}

/// Floats as Python/Megatron users write them: 2e-5, 0.05, 1.0.
fn fnum(x: f64) -> String {
    format!("{x:?}")
}

fn list(v: &[usize]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

/// The flags shared by mm-engine and Megatron/MindSpeed (same names, same meaning).
fn common_args(plan: &Plan) -> Vec<String> {
    let r: &Recipe = &plan.recipe;
    let (p, t, c, o) = (&r.parallel, &r.train, &r.checkpoint, &r.output);
    let mut a = Vec::new();
    let d = &plan.dims;
    kv(&mut a, "--tensor-model-parallel-size", d.tp());
    kv(&mut a, "--pipeline-model-parallel-size", d.pp());
    kv(&mut a, "--context-parallel-size", d.cp());
    if let Some(v) = d.vpp() {
        kv(&mut a, "--virtual-pipeline-model-parallel-size", v);
    }
    flag(&mut a, "--unaligned-linear", p.unaligned_linear);
    flag(&mut a, "--sequence-parallel", p.sequence_parallel);
    if d.cp() > 1 {
        kv(&mut a, "--context-parallel-algo", &p.context_parallel_algo);
    }
    kv(&mut a, "--micro-batch-size", plan.batch.micro_batch_size);
    kv(&mut a, "--global-batch-size", plan.batch.global_batch_size);
    kv(&mut a, "--seq-length", t.seq_length);
    kv(&mut a, "--lr", fnum(t.lr));
    kv(&mut a, "--min-lr", fnum(t.min_lr));
    kv(&mut a, "--train-iters", t.train_iters);
    kv(&mut a, "--lr-decay-style", format!("{:?}", t.lr_decay_style).to_lowercase());
    if t.lr_warmup_fraction > 0.0 {
        kv(&mut a, "--lr-warmup-fraction", fnum(t.lr_warmup_fraction));
    }
    kv(&mut a, "--weight-decay", fnum(t.weight_decay));
    kv(&mut a, "--clip-grad", fnum(t.clip_grad));
    kv(&mut a, "--adam-beta1", fnum(t.adam_beta1));
    kv(&mut a, "--adam-beta2", fnum(t.adam_beta2));
    kv(&mut a, "--adam-eps", fnum(t.adam_eps));
    kv(&mut a, "--seed", t.seed);
    flag(&mut a, "--no-load-optim", c.no_load_optim);
    flag(&mut a, "--no-load-rng", c.no_load_rng);
    flag(&mut a, "--no-save-optim", c.no_save_optim);
    flag(&mut a, "--no-save-rng", c.no_save_rng);
    flag(&mut a, "--use-distributed-optimizer", p.distributed_optimizer);
    flag(&mut a, "--use-flash-attn", t.flash_attention);
    match t.precision {
        Precision::Bf16 => a.push("--bf16".into()),
        Precision::Fp16 => a.push("--fp16".into()),
        Precision::Fp32 => {}
    }
    // Checked when the recipe was resolved.
    if let Ok(Some(r)) = t.recompute_setting() {
        kv(&mut a, "--recompute-granularity", r.granularity());
        if let Some(m) = r.method() {
            kv(&mut a, "--recompute-method", m);
        }
        if let Some(n) = r.num_layers() {
            kv(&mut a, "--recompute-num-layers", n);
        }
    }
    path_arg(&mut a, "--load", &c.load);
    // The seed: pipeline parallelism needs --variable-seq-lengths.
    flag(&mut a, "--variable-seq-lengths", d.pp() > 1);
    kv(&mut a, "--num-workers", t.num_workers);
    kv(&mut a, "--log-interval", o.log_interval);
    kv(&mut a, "--save-interval", o.save_interval);
    kv(&mut a, "--eval-interval", o.eval_interval);
    kv(&mut a, "--eval-iters", o.eval_iters);
    path_arg(&mut a, "--save", &c.save);
    flag(&mut a, "--log-tps", o.log_tps);
    path_arg(&mut a, "--tensorboard-dir", &o.tensorboard_dir);
    a
}

/// mm-engine train's arguments: the common Megatron flags plus what MindSpeed keeps in its
/// data/model JSON files (model, data, tokenizer, pipeline split, loss, freezing).
pub fn engine_args(plan: &Plan) -> Vec<String> {
    let r = &plan.recipe;
    let mut a = vec!["--model".to_string(), r.model.clone()];
    path_arg(&mut a, "--data-path", &r.data.data_path);
    path_arg(&mut a, "--data-folder", &r.data.data_folder);
    path_arg(&mut a, "--tokenizer", &r.checkpoint.tokenizer);
    a.extend(common_args(plan));
    // The checked stage split, whenever there is more than one chunk.
    if plan.llm_stages.len() > 1 {
        let counts = |stages: &[mm_spec::layout::StageLayers]| stages.iter().map(|s| s.num_layers).collect::<Vec<_>>();
        kv(&mut a, "--llm-pp-layers", list(&counts(&plan.llm_stages)));
        kv(&mut a, "--vit-pp-layers", list(&counts(&plan.vit_stages)));
    }
    kv(&mut a, "--grad-accumulation", plan.batch.grad_accumulation);
    kv(&mut a, "--loss-reduction", serde_plain(&r.train.loss_reduction));
    kv(&mut a, "--precision", serde_plain(&r.train.precision));
    if let Some(d) = r.train.vit_drop_path_rate {
        kv(&mut a, "--vit-drop-path-rate", fnum(d));
    }
    flag(&mut a, "--freeze-vision", r.train.freeze_vision);
    flag(&mut a, "--freeze-projector", r.train.freeze_projector);
    flag(&mut a, "--freeze-llm", r.train.freeze_llm);
    if let Some(p) = r.output.peak_tflops {
        kv(&mut a, "--peak-tflops", fnum(p));
    }
    kv(&mut a, "--template", &r.data.template);
    kv(&mut a, "--min-dynamic-patch", r.data.min_dynamic_patch);
    kv(&mut a, "--max-dynamic-patch", r.data.max_dynamic_patch);
    flag(&mut a, "--use-thumbnail", r.data.use_thumbnail);
    kv(&mut a, "--min-num-frame", r.data.min_num_frame);
    kv(&mut a, "--max-num-frame", r.data.max_num_frame);
    kv(&mut a, "--max-bad-fraction", fnum(r.data.max_bad_fraction));
    if r.checkpoint.save_format == Some(crate::recipe::SaveFormat::Torch) {
        kv(&mut a, "--ckpt-format", "torch");
    }
    flag(&mut a, "--auto-resume", r.checkpoint.auto_resume && r.checkpoint.save.is_some());
    a
}

/// pretrain_vlm.py's arguments as the seed's scripts pass them (GPT_ARGS, MM_ARGS, OUTPUT_ARGS).
pub fn megatron_args(plan: &Plan, data_json: &str, model_json: &str) -> Vec<String> {
    let m = &plan.model;
    let mut a = common_args(plan);
    let model_specific = [
        ("--tokenizer-type", "NullTokenizer".to_string()),
        ("--vocab-size", m.llm.vocab_size.to_string()),
        ("--position-embedding-type", "rope".to_string()),
        ("--rotary-base", format!("{}", m.llm.rope_theta as u64)),
        ("--normalization", "RMSNorm".to_string()),
    ];
    for (k, v) in model_specific {
        kv(&mut a, k, v);
    }
    a.extend(["--swiglu", "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion"].map(String::from));
    kv(&mut a, "--ckpt-format", "torch");
    kv(&mut a, "--mm-data", data_json);
    kv(&mut a, "--mm-model", model_json);
    kv(&mut a, "--mm-tool", "./mindspeed_mm/tools/tools.json");
    a
}

fn serde_plain<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// MindSpeed-MM's data JSON (examples/internvl3/data_*.json) for this recipe.
pub fn mindspeed_data_json(plan: &Plan) -> serde_json::Value {
    let r = &plan.recipe;
    let v = &plan.model.vision;
    let s = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    json!({
        "dataset_param": {
            "dataset_type": "multimodal",
            "basic_parameters": {
                "data_path": s(&r.data.data_path),
                "data_folder": s(&r.data.data_folder),
                "repeat_time": 1
            },
            "preprocess_parameters": {
                "image_reader_type": "torchvision",
                "train_pipeline": {"image": [
                    {"trans_type": "Pad2Square", "param": {"mean": [0.485, 0.456, 0.406]}},
                    {"trans_type": "Resize", "param": {"size": [v.image_size, v.image_size], "interpolation": "BICUBIC"}},
                    {"trans_type": "ToTensor"},
                    {"trans_type": "norm_fun", "param": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
                ]}
            },
            "tokenizer_config": {
                "hub_backend": "hf",
                "autotokenizer_name": "AutoTokenizer",
                "from_pretrained": s(&r.checkpoint.tokenizer),
                "add_eos_token": false,
                "use_fast": false
            },
            "use_text_processer": true,
            "template_name": r.data.template,
            "patch_size": v.patch_size,
            "image_size": v.image_size,
            "down_sample_ratio": plan.model.downsample_ratio,
            "group_by_length": true,
            "dynamic_image_size": true,
            "use_thumbnail": r.data.use_thumbnail,
            "min_dynamic_patch": r.data.min_dynamic_patch,
            "max_dynamic_patch": r.data.max_dynamic_patch,
            "min_num_frame": r.data.min_num_frame,
            "max_num_frame": r.data.max_num_frame,
            "sampling_method": "rand"
        },
        "dataloader_param": {
            "dataloader_mode": "sampler",
            "shuffle": true,
            "drop_last": true,
            "pin_memory": true,
            "sampler_type": "BaseRandomBatchSampler",
            "collate_param": {"model_name": "internvl", "pad_id": 151643}
        }
    })
}

/// `pipeline_num_layers` as MindSpeed reads it: a flat list, or one list per VPP chunk.
fn pipeline_layers(stages: &[mm_spec::layout::StageLayers], pp: usize, vpp: Option<usize>) -> serde_json::Value {
    let counts: Vec<usize> = stages.iter().map(|s| s.num_layers).collect();
    match vpp {
        Some(_) => json!(counts.chunks(pp).map(|c| c.to_vec()).collect::<Vec<_>>()),
        None => json!(counts),
    }
}

/// MindSpeed-MM's model JSON (examples/internvl3/model_*.json) for this model and split. Where
/// each value comes from: sizes, norms, qkv bias, qk layernorm (InternViT-6B), rope θ and
/// `rope_scaling` from the model (the preset, or the checkpoint's config.json); the pipeline
/// split from the plan; precision, recomputation (`train.recompute`: full, uniform, 1 layer, as
/// the 78B example, or `train.recompute_granularity`/`_method`/`_num_layers`), ViT drop path (`train.vit_drop_path_rate`, else the model's) and freezing
/// from the recipe.
pub fn mindspeed_model_json(plan: &Plan) -> serde_json::Value {
    let m = &plan.model;
    let (l, v) = (&m.llm, &m.vision);
    let (pp, vpp) = (plan.dims.pp(), plan.dims.vpp());
    let bf16 = plan.recipe.train.precision == Precision::Bf16;
    let dtype = if bf16 { "bf16" } else { "fp32" };
    let rms = v.norm_type == mm_spec::presets::NormType::RmsNorm;
    let recompute = plan.recipe.train.recompute_setting().ok().flatten();
    let mut text_decoder = json!({
        "model_id": "internllm",
        "num_layers": l.num_hidden_layers,
        "pipeline_num_layers": pipeline_layers(&plan.llm_stages, pp, vpp),
        "hidden_size": l.hidden_size,
        "ffn_hidden_size": l.intermediate_size,
        "num_attention_heads": l.num_attention_heads,
        "num_key_value_heads": l.num_key_value_heads,
        "max_position_embeddings": l.max_position_embeddings,
        "vocab_size": l.vocab_size,
        "rotary_percent": 1.0,
        "rotary_base": l.rope_theta,
        "attention_dropout": 0.0,
        "init_method_std": 0.02,
        "hidden_dropout": 0.0,
        "position_embedding_type": "rope",
        "normalization": "RMSNorm",
        "activation_func": "silu",
        "attention_softmax_in_fp32": true,
        "use_fused_rotary_pos_emb": false,
        "params_dtype": dtype,
        "bf16": bf16,
        "fp16_lm_cross_entropy": false,
        "parallel_output": true,
        "group_query_attention": true,
        "num_query_groups": l.num_key_value_heads,
        "gated_linear_unit": true,
        "layernorm_epsilon": l.rms_norm_eps,
        "add_bias_linear": false,
        "add_qkv_bias": true,
        "reset_attention_mask": false,
        "variable_seq_lengths": plan.dims.pp() > 1,
        "recompute_granularity": recompute.map(|r| r.granularity()),
        "recompute_method": recompute.and_then(|r| r.method()),
        "recompute_num_layers": recompute.and_then(|r| r.num_layers())
    });
    // From the checkpoint's config (InternVL3-78B: dynamic, factor 2.0).
    if let Some(r) = &l.rope_scaling {
        text_decoder["rope_scaling"] = json!({"type": r.kind, "factor": r.factor});
    }
    let mut image_encoder = json!({
        "vision_encoder": {
            "model_id": "InternViT",
            "num_layers": v.num_hidden_layers,
            "pipeline_num_layers": pipeline_layers(&plan.vit_stages, pp, vpp),
            "hidden_size": v.hidden_size,
            "ffn_hidden_size": v.intermediate_size,
            "num_attention_heads": v.num_attention_heads,
            "num_channels": v.num_channels,
            "patch_size": v.patch_size,
            "image_size": v.image_size,
            "add_qkv_bias": v.qkv_bias,
            "qk_layernorm": v.qk_normalization,
            "activation_func": "gelu",
            "normalization": if rms { "RMSNorm" } else { "LayerNorm" },
            "layernorm_epsilon": v.layer_norm_eps,
            "hidden_dropout": 0.0,
            "drop_path_rate": plan.recipe.train.vit_drop_path_rate.unwrap_or(v.drop_path_rate),
            "attention_dropout": 0.0,
            "init_method_std": 0.02,
            "initializer_factor": 1.0,
            "output_hidden_states": false,
            "context_parallel_size": plan.dims.cp(),
            "sequence_parallel": plan.recipe.parallel.sequence_parallel,
            "use_return_dict": false,
            "params_dtype": dtype,
            "post_layer_norm": false,
            "downsample_ratio": m.downsample_ratio,
            "bf16": bf16,
            "select_layer": -1,
            "ps_version": m.ps_version,
            "freeze": plan.recipe.train.freeze_vision
        },
        "vision_projector": {
            "model_id": "InternVLMLP",
            "downsample_ratio": m.downsample_ratio,
            "vit_hidden_size": v.hidden_size,
            "llm_hidden_size": l.hidden_size,
            "freeze": plan.recipe.train.freeze_projector
        }
    });
    // InternViT-6B normalizes q and k (RMSNorm over the full width).
    if v.qk_normalization {
        image_encoder["vision_encoder"]["q_layernorm"] = json!("RMSNorm");
        image_encoder["vision_encoder"]["k_layernorm"] = json!("RMSNorm");
    }
    json!({
        "model_id": "InternVL3",
        "pre_process": true,
        "post_process": true,
        "add_text_encoder": false,
        "img_embedding_idx": 1,
        "downsample_ratio": m.downsample_ratio,
        "select_layer": -1,
        "ps_version": m.ps_version,
        "add_rmsnorm_offset": false,
        "img_context_token_id": 151667,
        "text_decoder": text_decoder,
        "image_encoder": image_encoder,
        "text_encoder": null,
        "video_encoder": null
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_is_bare_only_for_safe_words() {
        assert_eq!(shell_quote("abc-1.2/x:y"), "abc-1.2/x:y");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("$(touch /tmp/pwned)"), "'$(touch /tmp/pwned)'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("~root"), "'~root'");
    }

    #[test]
    fn quoted_values_reach_bash_literally() {
        let nasty = ["$(touch /tmp/pwned)", "a'b\"c", "x; rm -rf /", "line1\nline2", "`id`", "*", "~", "-n", ""];
        let script: String =
            format!("printf '%s\\0'{}", nasty.iter().map(|s| format!(" {}", shell_quote(s))).collect::<String>());
        let out = std::process::Command::new("bash").arg("-c").arg(&script).output().unwrap();
        let got: Vec<String> = out.stdout.split(|b| *b == 0).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
        let want: Vec<String> = nasty.iter().map(|s| s.to_string()).chain([String::new()]).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn secrets_are_recognised_by_name_segments() {
        for n in [
            "HF_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
            "api_key",
            "DB_PASSWORD",
            "KEY_FILE",
            "MY_API_KEY",
            "TOKEN",
            "HFTOKEN",
            "OPENAI_APIKEY",
            "COS_SECRETKEY",
            "AWS_ACCESSKEY",
            "PRIVATEKEY",
            "hfToken",
            "apiKey",
        ] {
            assert!(is_secret_name(n), "{n}");
        }
        for n in ["HCCL_CONNECT_TIMEOUT", "PATH", "MASTER_ADDR", "TOKENIZERS_PARALLELISM", "MONKEY_PATCH", "KEYBOARD"] {
            assert!(!is_secret_name(n), "{n}");
        }
    }

    #[test]
    fn secret_assignments_in_setup_lines_are_redacted() {
        let cases = [
            ("export MY_API_KEY=abc123", "export MY_API_KEY=<redacted>"),
            ("HF_TOKEN='hf x' python x.py", "HF_TOKEN=<redacted> python x.py"),
            ("export A=1 DB_PASSWORD=\"p w\"; echo ok", "export A=1 DB_PASSWORD=<redacted>; echo ok"),
            ("export MONKEY_PATCH=1 PATH=/x:$PATH", "export MONKEY_PATCH=1 PATH=/x:$PATH"),
            ("source /opt/set_env.sh", "source /opt/set_env.sh"),
            ("cd /w && KEY_FILE=/k/id cmd", "cd /w && KEY_FILE=<redacted> cmd"),
            ("export HF_TOKEN=ab'c d'\"e f\"g; ls", "export HF_TOKEN=<redacted>; ls"),
            ("huggingface-cli login --token hf_abc --add", "huggingface-cli login --token <redacted> --add"),
            ("tool --api-key='k 1' --password=\"p\"w x", "tool --api-key=<redacted> --password=<redacted> x"),
            ("tool --password --stdin", "tool --password --stdin"),
            ("tool --password --token abc1", "tool --password --token <redacted>"),
            ("docker run --env HF_TOKEN=hf_x img", "docker run --env HF_TOKEN=<redacted> img"),
            ("cmd --verbose API_KEY=abc", "cmd --verbose API_KEY=<redacted>"),
            ("tool --password=-xyz1 go", "tool --password=<redacted> go"),
            ("tool --tokenizer /m/tok --seed 1", "tool --tokenizer /m/tok --seed 1"),
            ("export EMPTY_KEY= NEXT=1", "export EMPTY_KEY= NEXT=1"),
        ];
        for (line, want) in cases {
            assert_eq!(redact_line(line), want, "{line}");
        }
        assert_eq!(setup_secrets("export A=1 DB_PASSWORD=\"p w\" HF_TOKEN=t0k"), ["p w", "t0k"]);
        assert_eq!(setup_secrets("export HF_TOKEN=ab'c d'\"e\\\"f\""), ["abc de\"f"]);
        assert_eq!(setup_secrets("login --token hf_abc --key-count 2"), ["hf_abc"]);
        assert_eq!(setup_secrets(r#"export DB_PASSWORD="a\b\$c""#), [r"a\b$c"]);
        assert_eq!(setup_secrets("docker run --env HF_TOKEN=hf_x img"), ["hf_x"]);
        assert_eq!(
            redact_script("set -e\nexport HF_TOKEN=t\nexec x\n"),
            "set -e\nexport HF_TOKEN=<redacted>\nexec x\n"
        );
    }

    #[test]
    fn auto_resume_is_rendered_only_with_a_save_folder() {
        let cluster = crate::cluster::ClusterSpec::embedded_local().unwrap();
        let with = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            let recipe = crate::recipe::Recipe::resolve("tiny", None, None, &sets).unwrap();
            engine_args(&crate::plan::Plan::build(&cluster, &recipe).unwrap())
        };
        assert!(with(&[]).contains(&"--auto-resume".to_string()));
        assert!(!with(&["checkpoint.auto_resume=false"]).contains(&"--auto-resume".to_string()));
        assert!(!with(&["checkpoint.save=null"]).iter().any(|a| a == "--auto-resume" || a == "--save"));
        // checkpoint.save_format torch: mm-engine saves MindSpeed-MM's files; unset: its own.
        let torch = with(&["checkpoint.save_format=torch"]);
        assert!(torch.windows(2).any(|w| w == ["--ckpt-format", "torch"]), "{torch:?}");
        assert!(!with(&[]).contains(&"--ckpt-format".to_string()));
    }
}
