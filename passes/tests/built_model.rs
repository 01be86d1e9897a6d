//! Partition, schedule and report on a graph from the real model builder (SmolLM2-135M's
//! shape: a tied-embedding Llama with 30 layers), where figures can be checked by hand.
use qplc_compiler::{build_forward, load_model_def, BuildOptions, PlanConfig, PlanModel};
use qplc_ops::DType;
use qplc_passes::{compile, render_text, PassContext, PassManager};
use serde_json::json;

#[test]
fn smollm2_shaped_llama_compiles_to_a_four_stage_plan() {
    let cfg = json!({
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": true
    });
    let def = load_model_def(Some("llama"), None).unwrap();
    let opts = BuildOptions {
        seq_len: 2048,
        dtype: DType::BF16,
    };
    let built = build_forward(&def, &cfg, &opts).unwrap();
    let mut cx = PassContext::new(2048, 4, "type:decoderlayer");
    cx.num_layers = Some(built.info.num_layers);
    let (plan, _) = compile(
        built.graph,
        &PassManager::standard(),
        cx,
        PlanConfig::default(),
        PlanModel::from(&built.info),
    )
    .unwrap();
    let r = &plan.report;
    // SmolLM2-135M: 134,515,008 parameters (embedding counted once).
    assert_eq!(r.total_params, 134_515_008);
    // 30 decoder layers over 4 stages: 8, 8, 7, 7 (or a permutation), ±1.
    let decoders: Vec<usize> = plan
        .partition
        .boundaries
        .windows(2)
        .map(|b| {
            plan.partition.layers.entries[b[0]..b[1]]
                .iter()
                .filter(|e| e.layer.is_some())
                .count()
        })
        .collect();
    assert_eq!(decoders.iter().sum::<usize>(), 30);
    assert!(decoders.iter().max().unwrap() - decoders.iter().min().unwrap() <= 1);
    // The tied embedding (49152·576 bf16 = 54 MiB) is held by the first and last stage.
    let table = 49152 * 576 * 2;
    assert!(r.stages[0].weight_bytes >= table);
    assert!(r.stages[3].weight_bytes >= table);
    assert_eq!(r.total_weight_bytes, 2 * r.total_params + table);
    assert_eq!(r.stages.iter().map(|s| s.flops).sum::<u64>(), r.flops);
    let text = render_text(r);
    assert!(text.contains("MiB"), "{text}");
    println!("{text}");
}
