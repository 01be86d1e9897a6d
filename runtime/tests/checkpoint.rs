//! Checkpoint loading: single file, shards, dtype conversion, prefix stripping, and the
//! errors a user sees for a broken model folder.
use half::bf16;
use qplc_compiler::{BlockKind, Graph, Scope};
use qplc_ops::{DType, Op, TensorType};
use qplc_runtime::checkpoint::Checkpoint;
use safetensors::tensor::{serialize_to_file, Dtype, TensorView};
use std::path::Path;

fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    serialize_to_file(views, None, path).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn ty(shape: &[usize], dtype: DType) -> TensorType {
    TensorType::new(shape.to_vec(), dtype)
}

#[test]
fn single_file_loads_and_converts_bf16_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let vals = [1.5f32, -2.25, 3.0];
    let bytes: Vec<u8> = vals
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
        .collect();
    write(
        &dir.path().join("model.safetensors"),
        &[("w", Dtype::BF16, vec![3], bytes)],
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    let t = ck.load("w", &ty(&[3], DType::F32)).unwrap();
    assert_eq!(t.as_f32(), &vals);
}

#[test]
fn f32_loaded_as_bf16_is_rounded() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("model.safetensors"),
        &[("w", Dtype::F32, vec![1], f32_bytes(&[1.0 + 1.0 / 1024.0]))],
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    let t = ck.load("w", &ty(&[1], DType::BF16)).unwrap();
    assert_eq!(t.as_f32(), &[1.0]);
    assert_eq!(t.ty.dtype, DType::BF16);
}

#[test]
fn sharded_folder_uses_the_index_and_strips_language_model_prefix() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("model-00001-of-00002.safetensors"),
        &[("a", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0]))],
    );
    write(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &[("language_model.b", Dtype::F32, vec![1], f32_bytes(&[3.0]))],
    );
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors",
                           "language_model.b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(
        ck.load("a", &ty(&[2], DType::F32)).unwrap().as_f32(),
        &[1.0, 2.0]
    );
    assert_eq!(
        ck.load("b", &ty(&[1], DType::F32)).unwrap().as_f32(),
        &[3.0]
    );
}

#[test]
fn missing_tensor_names_tensor_expected_shape_and_files() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("model.safetensors"),
        &[("a", Dtype::F32, vec![1], f32_bytes(&[1.0]))],
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    let e = ck
        .load("model.norm.weight", &ty(&[64], DType::F32))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`model.norm.weight`"), "{e}");
    assert!(e.contains("f32[64]"), "{e}");
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn wrong_shape_names_tensor_file_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("model.safetensors"),
        &[("w", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0]))],
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    let e = ck.load("w", &ty(&[3], DType::F32)).unwrap_err().to_string();
    assert!(
        e.contains("`w`") && e.contains("[2]") && e.contains("[3]"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn unsupported_stored_dtype_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("model.safetensors"),
        &[("w", Dtype::I8, vec![2], vec![1, 2])],
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    let e = ck.load("w", &ty(&[2], DType::F32)).unwrap_err().to_string();
    assert!(e.contains("I8") && e.contains("F32, BF16 and F16"), "{e}");
}

#[test]
fn folder_without_weights_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = Checkpoint::open(dir.path()).err().unwrap().to_string();
    assert!(
        e.contains("neither model.safetensors nor model.safetensors.index.json"),
        "{e}"
    );
}

#[test]
fn index_pointing_at_a_missing_shard_names_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let e = format!("{:#}", Checkpoint::open(dir.path()).err().unwrap());
    assert!(e.contains("model-00001-of-00002.safetensors"), "{e}");
}

#[test]
fn missing_folder_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = Checkpoint::open(&dir.path().join("nope"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not exist") && e.contains("nope"), "{e}");
}

#[test]
fn info_reports_shape_stored_dtype_and_file_without_loading() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("model.safetensors"),
        &[("language_model.w", Dtype::F16, vec![2, 3], vec![0; 12])],
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    let info = ck.info("w").unwrap();
    assert_eq!(info.shape, vec![2, 3]);
    assert_eq!(info.dtype, Dtype::F16);
    assert_eq!(info.stored_name, "language_model.w");
    assert_eq!(info.file, dir.path().join("model.safetensors"));
    assert!(ck.info("language_model.w").is_none());
    assert_eq!(ck.names().collect::<Vec<_>>(), vec!["w"]);
}

fn tied_folder(config: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("model.safetensors"),
        &[(
            "model.embed_tokens.weight",
            Dtype::F32,
            vec![2, 2],
            f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
        )],
    );
    if let Some(c) = config {
        std::fs::write(dir.path().join("config.json"), c).unwrap();
    }
    dir
}

#[test]
fn tied_head_missing_from_the_checkpoint_reads_the_embedding() {
    let dir = tied_folder(Some(r#"{"tie_word_embeddings": true}"#));
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert!(ck.tied_embeddings());
    let head = ck.load("lm_head.weight", &ty(&[2, 2], DType::F32)).unwrap();
    assert_eq!(head.as_f32(), &[1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn forced_tying_without_config_key_also_reads_the_embedding() {
    let dir = tied_folder(Some(r#"{"model_type": "gemma2"}"#));
    let mut ck = Checkpoint::open(dir.path()).unwrap();
    assert!(!ck.tied_embeddings());
    ck.set_tied_embeddings(true);
    assert!(ck.load("lm_head.weight", &ty(&[2, 2], DType::F32)).is_ok());
}

#[test]
fn untied_head_missing_is_an_error_that_mentions_tying() {
    let dir = tied_folder(Some(r#"{"tie_word_embeddings": false}"#));
    let ck = Checkpoint::open(dir.path()).unwrap();
    let e = ck
        .load("lm_head.weight", &ty(&[2, 2], DType::F32))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`lm_head.weight`") && e.contains("tie_word_embeddings"),
        "{e}"
    );
}

#[test]
fn tied_head_with_the_wrong_shape_says_it_read_the_embedding() {
    let dir = tied_folder(Some(r#"{"tie_word_embeddings": true}"#));
    let ck = Checkpoint::open(dir.path()).unwrap();
    let e = ck
        .load("lm_head.weight", &ty(&[3, 2], DType::F32))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("[3, 2]"),
        "{e}"
    );
}

#[test]
fn graph_weights_load_only_what_the_graph_reads() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("model.safetensors"),
        &[
            (
                "model.norm.weight",
                Dtype::F32,
                vec![2],
                f32_bytes(&[1.0, 2.0]),
            ),
            ("model.layers.0.w", Dtype::F32, vec![1], f32_bytes(&[5.0])),
        ],
    );
    let mut g = Graph::new();
    let s = Scope::new("model.norm", BlockKind::Norm, None);
    let w = Op::Weight {
        name: "model.norm.weight".into(),
        ty: ty(&[2], DType::BF16),
    };
    g.add(w, &[], &s).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let weights = ck.load_graph_weights(&g).unwrap();
    assert_eq!(weights.len(), 1);
    let t = &weights["model.norm.weight"];
    assert_eq!((t.ty.dtype, t.as_f32()), (DType::BF16, &[1.0f32, 2.0][..]));
}
