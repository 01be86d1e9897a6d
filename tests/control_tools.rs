//! `qplc export control-to-lora` (spec §11.3, check 51) with its fidelity report checked
//! against scripts/make_ca_fixtures.py, and `qplc analyze` (spec §11.4, check 55).
use qplc_ops::{DType, TensorType};
use qplc_runtime::ca_files::read_control_adapter;
use qplc_runtime::checkpoint::Checkpoint;
use qplc_runtime::export::analyze::analyze_layer;
use qplc_runtime::export::linalg::{control_singular_values, symmetric_eigen};
use qplc_runtime::train::control_reg::init_control_q;
use safetensors::SafeTensors;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}
fn fixture(p: &str) -> PathBuf {
    root().join("tests/fixtures").join(p)
}

fn qplc(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_qplc"))
        .args(args)
        .output()
        .unwrap();
    out
}

fn export(out: &Path, extra: &[&str]) -> Output {
    let adapter = fixture("ca_adapter");
    let model = fixture("llama-gqa");
    let mut args = vec![
        "export",
        "control-to-lora",
        "--adapter",
        adapter.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    qplc(&args)
}

fn f32s(st: &SafeTensors, k: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(k).unwrap_or_else(|_| panic!("no tensor {k}"));
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

#[test]
fn exported_lora_product_equals_q_lambda_qt_w_down() {
    // check 51: B@A = Q diag(expm1(±S)) Qᵀ W_down to 1e-5, --inverse, target lists, file name.
    let dir = tempfile::tempdir().unwrap();
    let ca = read_control_adapter(&fixture("ca_adapter")).unwrap();
    let ckpt = Checkpoint::open(&fixture("llama-gqa")).unwrap();
    for inverse in [false, true] {
        let out = dir.path().join(if inverse { "inv" } else { "fwd" });
        let extra: &[&str] = if inverse { &["--inverse"] } else { &[] };
        let o = export(&out, extra);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["target_modules"], serde_json::json!(["down_proj"]));
        assert_eq!(cfg["r"], 4);
        assert_eq!(cfg["lora_alpha"], 4);
        let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.names().len(), 4, "A and B for two layers");
        for (&l, layer) in &ca.layers {
            let key = format!("base_model.model.model.layers.{l}.mlp.down_proj");
            let (bs, b) = f32s(&st, &format!("{key}.lora_B.weight"));
            let (as_, a) = f32s(&st, &format!("{key}.lora_A.weight"));
            let (h, r) = (bs[0], bs[1]);
            let inf = as_[1];
            assert_eq!((as_[0], r), (4, 4));
            let w = ckpt
                .load(
                    &format!("model.layers.{l}.mlp.down_proj.weight"),
                    &TensorType::new(vec![h, inf], DType::F32),
                )
                .unwrap();
            let (q, s) = (layer.q.as_f32(), layer.s.as_f32());
            let sign = if inverse { -1.0 } else { 1.0 };
            let lam: Vec<f64> = s.iter().map(|&x| (sign * x as f64).exp_m1()).collect();
            // Q diag(λ) Qᵀ W in f64.
            let mut worst = 0f64;
            let mut scale = 0f64;
            for i in 0..h {
                for j in 0..inf {
                    let mut want = 0.0;
                    for k in 0..r {
                        let qtw: f64 = (0..h)
                            .map(|m| q[m * r + k] as f64 * w.as_f32()[m * inf + j] as f64)
                            .sum();
                        want += q[i * r + k] as f64 * lam[k] * qtw;
                    }
                    let got: f64 = (0..r)
                        .map(|k| b[i * r + k] as f64 * a[k * inf + j] as f64)
                        .sum();
                    worst = worst.max((got - want).abs());
                    scale = scale.max(want.abs());
                }
            }
            eprintln!("layer {l} inverse={inverse}: max |BA − QΛQᵀW| {worst:.2e} (max {scale:.3})");
            assert!(scale > 1e-3);
            assert!(worst <= 1e-5, "layer {l}: {worst}");
        }
    }
    let both = dir.path().join("both");
    let o = export(&both, &["--targets", "down_proj,o_proj"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(both.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["down_proj", "o_proj"])
    );
    let bytes = std::fs::read(both.join("adapter_model.safetensors")).unwrap();
    assert_eq!(SafeTensors::deserialize(&bytes).unwrap().names().len(), 8);
    // Mixtral experts on a Llama: a clear error, not a silent empty adapter.
    let o = export(&dir.path().join("x"), &["--targets", "experts"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("experts"), "{e}");
    let o = export(&dir.path().join("y"), &["--targets", "q_proj"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--targets"));
}

#[test]
fn export_fidelity_matches_the_pytorch_kl_divergence() {
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("ca_fidelity.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = fixture("text.txt");
    for (key, extra) in [("forward", vec![]), ("inverse", vec!["--inverse"])] {
        let mut args = vec!["--fidelity-text", text.to_str().unwrap(), "--json"];
        args.extend(extra);
        let o = export(&dir.path().join(key), &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let f = &v["fidelity"];
        assert_eq!(f["tokens"], want["tokens"]);
        for k in ["kl_lora", "kl_base"] {
            let (got, w) = (f[k].as_f64().unwrap(), want[key][k].as_f64().unwrap());
            let rel = (got - w).abs() / w;
            eprintln!("{key} {k}: qplc {got:.8e} torch {w:.8e} rel {rel:.2e}");
            assert!(rel <= 1e-5, "{key} {k}: {got} vs {w}");
        }
        // The export loses the attention part of the delta but keeps most of the effect.
        assert!(f["kl_lora"].as_f64().unwrap() < f["kl_base"].as_f64().unwrap());
    }
}

#[test]
fn analysis_of_lambda_half_and_minus_quarter_is_exact() {
    // check 55: orthonormal Q, S = log(1 + λ), λ = (0.5, −0.25).
    let h = 16;
    let q = init_control_q(h, 2, DType::F32, 5, 5).unwrap();
    let s = [1.5f32.ln(), 0.75f32.ln()];
    let a = analyze_layer(3, &q, h, &s);
    let close = |x: f64, y: f64| (x - y).abs() < 1e-6;
    assert!(close(a.spectral, 0.5), "{a:?}");
    assert!(close(a.nuclear, 0.75), "{a:?}");
    assert!(close(a.effective_rank, 1.8), "{a:?}");
    assert!(close(a.condition.unwrap(), 2.0), "{a:?}");
    assert!(
        a.spectral_error.abs() < 1e-6 && a.nuclear_error.abs() < 1e-6,
        "{a:?}"
    );
    assert!(a.orthogonality < 1e-10);
    // λ = 0 in one direction: infinite condition number.
    let a0 = analyze_layer(0, &q, h, &[0.0, 0.5]);
    assert_eq!(a0.condition, None);
}

#[test]
fn singular_values_without_forming_w_match_the_eigenvalues_of_w() {
    // An independent route for a non-orthonormal Q: form W = Q diag(λ) Qᵀ (h × h) and take
    // its eigenvalues with Jacobi; the r largest |eigenvalues| are the singular values.
    let (h, r) = (12, 3);
    let q: Vec<f64> = (0..h * r)
        .map(|i| ((i * 7919 % 23) as f64 - 11.0) / 10.0)
        .collect();
    let lam = [0.7, -0.3, 0.05];
    let mut w = vec![0.0; h * h];
    for i in 0..h {
        for j in 0..h {
            w[i * h + j] = (0..r).map(|k| q[i * r + k] * lam[k] * q[j * r + k]).sum();
        }
    }
    let (ev, _) = symmetric_eigen(&w, h);
    let mut want: Vec<f64> = ev.iter().map(|x| x.abs()).collect();
    want.sort_by(|a, b| b.total_cmp(a));
    let got = control_singular_values(&q, h, &lam);
    for k in 0..r {
        assert!(
            (got[k] - want[k]).abs() < 1e-9 * want[0],
            "{got:?} vs {want:?}"
        );
    }
    assert!(want[r] < 1e-9 * want[0], "W has rank r");
}

#[test]
fn analyze_prints_a_table_and_json() {
    let a = fixture("ca_adapter");
    let o = qplc(&["analyze", a.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("erank") && text.contains("summary over 2 layers"),
        "{text}"
    );
    let o = qplc(&["analyze", a.to_str().unwrap(), "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["rank"], 4);
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for l in layers {
        // The fixture's Q is orthonormal (float32 rounding only): the estimates are exact.
        assert!(l["orthogonality"].as_f64().unwrap() < 1e-10);
        assert!(l["spectral_error"].as_f64().unwrap().abs() < 1e-5);
    }
    let o = qplc(&["analyze", root().join("tests").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("adapter_config.json"));
}
