//! The `lora` and `full_ft` passes and the target rules they share (spec §3.2, §6.1, §6.3,
//! checks 4 and 8), on graphs from the real model builder.
use qplc_compiler::config::LoadedConfig;
use qplc_compiler::{build_forward, load_model_def, BlockKind, Graph, NodeId};
use qplc_ops::{DType, Op};
use qplc_passes::targets::{full_ft_selects, layer_of_param};
use qplc_passes::{
    FullFtPass, LoraPass, LoraSelection, ModuleMatch, Pass, PassContext, PassManager,
};
use serde_json::json;
use std::collections::BTreeSet;
use std::path::Path;

/// A 3-layer Llama with biases on the attention projections and an untied head.
fn llama(tied: bool, dtype: DType) -> Graph {
    let cfg = json!({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "attention_bias": true, "tie_word_embeddings": tied
    });
    let def = load_model_def(Some("llama"), None).unwrap();
    let opts = qplc_compiler::BuildOptions { seq_len: 8, dtype };
    build_forward(&def, &cfg, &opts).unwrap().graph
}

fn config(body: &str) -> LoadedConfig {
    let text = format!(
        "model_dir = \"m\"\noutput_dir = \"o\"\nsequence_len = 64\nlr = 1e-4\n{body}\n[[datasets]]\ndataset_path = \"d.txt\"\n"
    );
    LoadedConfig::from_str(Path::new("t.toml"), &text).unwrap()
}

fn adapted_modules(g: &Graph) -> BTreeSet<String> {
    g.weights()
        .into_iter()
        .filter_map(|(n, _)| n.strip_suffix(".lora_A.weight").map(str::to_string))
        .collect()
}

fn run(pass: impl Pass + 'static, g: Graph) -> (Graph, PassContext) {
    let mut m = PassManager::new();
    m.verify_each(true).add(pass);
    let mut cx = PassContext::new(8, 1, "uniform");
    let out = m.run(g, &mut cx).unwrap();
    (out.graph, cx)
}

#[test]
fn lora_without_target_modules_adapts_every_linear_except_the_head() {
    let cfg = config("lora_rank = 4");
    let (g, _) = run(
        LoraPass::from_config(&cfg).unwrap(),
        llama(false, DType::F32),
    );
    let got = adapted_modules(&g);
    assert_eq!(got.len(), 3 * 7, "{got:?}");
    assert!(got.contains("model.layers.2.mlp.down_proj"));
    assert!(!got.iter().any(|m| m.contains("lm_head")));
    // Only A and B are trainable: 7 modules × 3 layers × r·(in + out).
    let trainable: Vec<String> = g
        .weights()
        .into_iter()
        .filter(|(_, id)| g.node(*id).trainable)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(trainable.len(), 2 * 21);
    assert!(trainable.iter().all(|n| n.contains(".lora_")));
}

#[test]
fn lora_target_names_match_module_suffixes_within_selected_layers() {
    let cfg = config(
        "lora_rank = 2\ntarget_modules = [\"q_proj\", \"mlp.up_proj\", \"proj\"]\nlayers_to_transform = \"0, 2\"",
    );
    let (g, _) = run(
        LoraPass::from_config(&cfg).unwrap(),
        llama(false, DType::F32),
    );
    let want: BTreeSet<String> = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.2.self_attn.q_proj",
        "model.layers.2.mlp.up_proj",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    // `proj` is not a whole segment of any module path, so it matches nothing.
    assert_eq!(adapted_modules(&g), want);
}

#[test]
fn exact_module_paths_ignore_layers_to_transform_as_in_peft() {
    let sel = LoraSelection::new(
        ModuleMatch::Names(vec!["model.layers.1.mlp.gate_proj".into()]),
        Some([0].into()),
    );
    let g = llama(false, DType::F32);
    let ids = sel.resolve(&g).unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(g.node(ids[0]).module, "model.layers.1.mlp.gate_proj");
}

#[test]
fn lora_targets_that_match_nothing_are_an_error_listing_the_modules() {
    let sel = LoraSelection::new(ModuleMatch::Names(vec!["qkv_proj".into()]), None);
    let e = sel
        .resolve(&llama(false, DType::F32))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("matched no linear layer") && e.contains("q_proj"),
        "{e}"
    );
}

#[test]
fn lora_branch_has_the_weight_shapes_dtypes_and_scopes_of_its_linear() {
    let cfg =
        config("lora_rank = 4\nlora_weight_dtype = \"float32\"\ntarget_modules = [\"k_proj\"]");
    let (g, cx) = run(
        LoraPass::from_config(&cfg).unwrap(),
        llama(false, DType::BF16),
    );
    let w = |name: &str| -> NodeId {
        g.weights()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no weight {name}"))
            .1
    };
    let a = g.node(w("model.layers.1.self_attn.k_proj.lora_A.weight"));
    let b = g.node(w("model.layers.1.self_attn.k_proj.lora_B.weight"));
    // k_proj: in = hidden 32, out = 2 KV heads × head_dim 8 = 16.
    assert_eq!(a.ty.shape.dims(), &[4, 32]);
    assert_eq!(b.ty.shape.dims(), &[16, 4]);
    assert_eq!((a.ty.dtype, b.ty.dtype), (DType::F32, DType::F32));
    assert!(a.trainable && b.trainable);
    assert_eq!((a.block, a.layer), (BlockKind::Decoder, Some(1)));
    assert_eq!(a.module, "model.layers.1.self_attn.k_proj.lora_A");
    // Each branch: cast to f32, two linears, scale, cast back to bf16, add.
    let casts =
        g.g.node_indices()
            .filter(|&id| matches!(g.node(id).op, Op::Cast { .. }))
            .count();
    assert_eq!(casts, 2 * 3);
    let scales: Vec<f64> =
        g.g.node_indices()
            .filter_map(|id| match g.node(id).op {
                Op::Scale { factor } if g.node(id).module.ends_with("k_proj") => Some(factor),
                _ => None,
            })
            .collect();
    // α = r: scaling exactly 1 for any rank (spec §6.1.2, check 24).
    assert_eq!(scales, vec![1.0; 3]);
    assert!(cx.notes.iter().any(|n| n.starts_with("lora: 3 adapted")));
}

#[test]
fn lora_branch_output_replaces_the_linear_for_all_its_users() {
    let g0 = llama(false, DType::F32);
    let pass =
        LoraPass::from_config(&config("lora_rank = 2\ntarget_modules = [\"o_proj\"]")).unwrap();
    let mut g = g0.clone();
    pass.apply(&mut g).unwrap();
    g.verify().unwrap();
    for id in g.g.node_indices() {
        let n = g.node(id);
        if matches!(n.op, Op::Linear) && n.module == "model.layers.0.self_attn.o_proj" {
            let users = g.users(id);
            assert_eq!(users.len(), 1, "only the branch add reads the base linear");
            assert!(matches!(g.node(users[0]).op, Op::Binary(_)));
        }
    }
    // 3 layers × (2 weights + 2 linears + scale + add); f32 everywhere, so no casts.
    assert_eq!(g.g.node_count(), g0.g.node_count() + 3 * 6);
}

#[test]
fn lora_dropout_puts_one_dropout_on_every_branch_input() {
    let cfg = config("lora_rank = 2\nlora_dropout = 0.1");
    let (g, cx) = run(
        LoraPass::from_config(&cfg).unwrap(),
        llama(false, DType::F32),
    );
    assert!(
        cx.notes.iter().any(|n| n.contains("dropout p = 0.1")),
        "{:?}",
        cx.notes
    );
    let drops: Vec<_> =
        g.g.node_indices()
            .filter(|&id| matches!(g.node(id).op, Op::Dropout { p, .. } if p == 0.1))
            .collect();
    let branches =
        g.g.node_indices()
            .filter(|&id| g.node(id).op == Op::Linear && g.node(id).module.ends_with(".lora_A"))
            .count();
    assert!(branches > 0);
    assert_eq!(drops.len(), branches, "one dropout per LoRA branch");
}

#[test]
fn full_ft_trains_everything_by_default_with_tied_embeddings_once() {
    let cfg = config("full_fine_tune = true");
    let (g, _) = run(
        FullFtPass::from_config(&cfg).unwrap(),
        llama(true, DType::BF16),
    );
    assert_eq!(g.trainable_param_count(), g.param_count());
}

#[test]
fn full_ft_filters_by_name_substring_and_layer() {
    let cfg = config(
        "full_fine_tune = true\ntarget_modules = [\"mlp\", \"norm\"]\nlayers_to_transform = 1",
    );
    let pass = FullFtPass::from_config(&cfg).unwrap();
    let mut g = llama(false, DType::BF16);
    let names = pass.apply(&mut g).unwrap();
    let want = [
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.post_attention_layernorm.weight",
        // Outside the decoder layers: unaffected by layers_to_transform.
        "model.norm.weight",
    ];
    assert_eq!(names, want);
}

#[test]
fn full_ft_name_rule_reads_the_layer_index_from_the_name() {
    assert_eq!(
        layer_of_param("model.layers.12.mlp.up_proj.weight"),
        Some(12)
    );
    assert_eq!(layer_of_param("model.norm.weight"), None);
    let layers: BTreeSet<usize> = [3].into();
    assert!(!full_ft_selects(
        "model.layers.31.x.weight",
        None,
        Some(&layers)
    ));
    assert!(full_ft_selects(
        "model.layers.3.x.weight",
        None,
        Some(&layers)
    ));
    assert!(full_ft_selects("lm_head.weight", None, Some(&layers)));
    assert!(!full_ft_selects(
        "lm_head.weight",
        Some(&["mlp".into()]),
        None
    ));
}

#[test]
fn regex_target_modules_must_match_the_whole_path() {
    let sel = LoraSelection::new(ModuleMatch::Regex(r".*\.1\..*_proj".into()), None);
    let g = llama(false, DType::F32);
    assert_eq!(sel.resolve(&g).unwrap().len(), 7);
    let sel = LoraSelection::new(ModuleMatch::Regex("q_proj".into()), None);
    assert!(sel.resolve(&g).is_err());
}
