mod common;
use common::*;
use qplc_compiler::{BlockKind, LayerList};
use qplc_passes::{partition, PartitionError};

#[test]
fn every_node_gets_the_stage_of_its_pipeline_layer() {
    let g = toy_model(6); // 11 layers: inputs, embedding, 6 decoders, norm, head, loss
    let p = partition(&g, "uniform", 3, None).unwrap();
    assert_eq!(p.layers.len(), 11);
    assert_eq!(p.boundaries, [0, 4, 8, 11]);
    assert_eq!(p.node_stage.len(), g.g.node_count());
    for id in g.g.node_indices() {
        let n = g.node(id);
        let want = match (n.block, n.layer) {
            (BlockKind::Inputs | BlockKind::Embedding, _) => 0,
            (BlockKind::Decoder, Some(i)) if i < 2 => 0,
            (BlockKind::Decoder, Some(i)) if i < 6 => 1,
            _ => 2,
        };
        assert_eq!(p.stage_of(id), Some(want), "{}", n.module);
    }
}

#[test]
fn loss_entry_exists_without_loss_nodes() {
    let g = toy_model(2);
    let p = partition(&g, "uniform", 1, None).unwrap();
    assert_eq!(p.layers.entries.last().unwrap().class(), "LossPipe");
    assert_eq!(p.boundaries, [0, 7]);
}

#[test]
fn parameters_counts_all_weights_while_nothing_is_trainable_and_says_so() {
    let g = toy_model(4);
    let p = partition(&g, "parameters", 2, None).unwrap();
    let list = LayerList::of_graph(&g);
    assert_eq!(p.layer_weights, list.params_per_entry(&g, false));
    assert!(
        p.notes[0].contains("no parameter is trainable"),
        "{:?}",
        p.notes
    );
    // Embedding and head weigh V·H each (the tied table counts in both), decoders
    // 8H² + H each; the balanced split puts two decoders on each side.
    assert_eq!(p.boundaries, [0, 4, 9]);
}

#[test]
fn parameters_balances_trainable_weights_once_some_are_trainable() {
    let mut g = toy_model(4);
    // Only layer 3's down_proj is trainable: everything before it on stage 0.
    let (_, w) = g
        .weights()
        .into_iter()
        .find(|(n, _)| n == "model.layers.3.mlp.down_proj.weight")
        .unwrap();
    g.node_mut(w).trainable = true;
    let p = partition(&g, "parameters", 2, None).unwrap();
    assert!(p.notes.is_empty());
    assert_eq!(p.layer_weights[5], (4 * H * H) as u64);
    assert_eq!(p.layer_weights.iter().sum::<u64>(), (4 * H * H) as u64);
    // Spread is |part0 − part1| = 1024 whichever side layer 3 is on, except an exact
    // tie; the latest split point wins among equal costs.
    assert_eq!(p.boundaries, [0, 8, 9]);
}

#[test]
fn type_decoderlayer_on_a_graph_puts_equal_decoder_counts_on_each_stage() {
    let g = toy_model(8);
    let p = partition(&g, "type:decoderlayer", 4, None).unwrap();
    for s in 0..4 {
        let r = p.layer_range(s);
        let decoders = p.layers.entries[r]
            .iter()
            .filter(|e| e.block == BlockKind::Decoder)
            .count();
        assert_eq!(decoders, 2, "stage {s}: {:?}", p.boundaries);
    }
}

#[test]
fn explicit_layer_count_overrides_the_graph() {
    let g = toy_model(2);
    let p = partition(&g, "uniform", 4, Some(32)).unwrap();
    assert_eq!(p.boundaries, [0, 10, 19, 28, 37]);
    // The head (entry 35) is on the last stage.
    let head =
        g.g.node_indices()
            .find(|&i| g.node(i).module == "lm_head")
            .unwrap();
    assert_eq!(p.stage_of(head), Some(3));
}

#[test]
fn bad_method_and_zero_stages_are_refused() {
    let g = toy_model(1);
    let e = partition(&g, "layers", 2, None).unwrap_err();
    assert!(matches!(e, PartitionError::UnknownMethod(_)));
    assert!(matches!(
        partition(&g, "uniform", 0, None).unwrap_err(),
        PartitionError::NoStages
    ));
}

#[test]
fn decoder_node_beyond_the_layer_count_is_reported_by_module() {
    let g = toy_model(3);
    let e = partition(&g, "uniform", 2, Some(2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.layers.2"), "{e}");
}
