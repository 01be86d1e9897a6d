//! Our optimiser maths against the PyTorch rendition of optimi's Adam, the RMS-ratio schedule,
//! clipping and the LoRA decay written by scripts/check_optimizer.py
//! (tests/fixtures/optimizer_reference.json).
use qplc_ops::DType;
use qplc_runtime::train::adam::round_one;
use qplc_runtime::train::lora_decay::LoraShape;
use qplc_runtime::train::{
    clip_global_norm, decay_lora_pair, rms_ratio, Adam, AdamHyper, Schedule,
};
use serde_json::Value;
use std::path::Path;

fn fixture() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/optimizer_reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn schedule_matches_python_values() {
    let fx = fixture();
    for (s, want) in fx["schedule_beta2_0.99"].as_object().unwrap() {
        let s: u64 = s.parse().unwrap();
        assert!(
            (rms_ratio(s, 0.99) - want.as_f64().unwrap()).abs() < 1e-12,
            "f({s})"
        );
    }
}

/// Every case, every step: parameters and moments within 1e-6 (relative above 1; f32) or within one unit in the
/// last place of the 16-bit dtype (bf16/f16: a 1-ulp difference in an f32 intermediate can flip
/// one rounding; we count such flips and require them to be rare).
#[test]
fn adam_trajectories_match_pytorch_reference() {
    let fx = fixture();
    for case in fx["adam"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let dtype = DType::parse(case["dtype"].as_str().unwrap()).unwrap();
        let hyper = AdamHyper {
            beta1: case["beta1"].as_f64().unwrap(),
            beta2: case["beta2"].as_f64().unwrap(),
            eps: case["eps"].as_f64().unwrap(),
        };
        let clip = case["clip"].as_bool().unwrap();
        let a = floats(&case["a"]);
        let t = floats(&case["target"]);
        let mut p = floats(&case["param0"]);
        let n = p.len();
        let mut adam = Adam::new(hyper, &[(n, dtype)]);
        let mut sched = Schedule::new(case["lr"].as_f64().unwrap(), hyper.beta2);
        let mut flips = 0usize;
        for step in case["steps"].as_array().unwrap() {
            let k = step["step"].as_u64().unwrap();
            let mut g: Vec<f32> = (0..n)
                .map(|i| round_one(a[i] * (p[i] - t[i]), dtype))
                .collect();
            if clip {
                let out = clip_global_norm(&mut [(&mut g[..], dtype)]);
                let want = step["clipped_norm"].as_f64().unwrap();
                assert!(
                    (out.norm - want).abs() < 1e-6 * want,
                    "{name} step {k}: norm {} vs {want}",
                    out.norm
                );
            }
            adam.step(sched.current_lr(), &mut [&mut p[..]], &[&g[..]]);
            sched.advance();

            let st = &adam.params[0];
            let mut pairs = vec![
                ("param", p.clone(), floats(&step["param"])),
                ("exp_avg", st.exp_avg.clone(), floats(&step["exp_avg"])),
                (
                    "exp_avg_sq",
                    st.exp_avg_sq.clone(),
                    floats(&step["exp_avg_sq"]),
                ),
            ];
            if let Some(c) = &st.kahan_comp {
                pairs.push(("kahan_comp", c.clone(), floats(&step["kahan_comp"])));
            }
            for (what, ours, want) in pairs {
                if dtype == DType::F32 {
                    // 1e-6, relative for the large second moments (g² reaches ~400 here).
                    for (x, y) in ours.iter().zip(&want) {
                        let d = (x - y).abs();
                        assert!(
                            d <= 1e-6 * y.abs().max(1.0),
                            "{name} step {k} {what}: {x} vs {y}"
                        );
                    }
                } else {
                    for (x, y) in ours.iter().zip(&want) {
                        if x != y {
                            flips += 1;
                            // One ulp of the 16-bit type at this magnitude, at most.
                            let ulp = (y.abs().max(1e-3)
                                * if dtype == DType::BF16 {
                                    2f32.powi(-7)
                                } else {
                                    2f32.powi(-10)
                                })
                            .max(1e-7);
                            assert!(
                                (x - y).abs() <= ulp * 1.01,
                                "{name} step {k} {what}: {x} vs {y}"
                            );
                        }
                    }
                }
            }
        }
        // At the time of writing the 16-bit trajectories match PyTorch bit for bit (0 flips).
        assert!(flips <= 4, "{name}: {flips} rounding flips against PyTorch");
    }
}

#[test]
fn lora_decay_matches_float64_reference() {
    let fx = fixture();
    let c = &fx["lora_decay"];
    let shape = LoraShape {
        rank: c["rank"].as_u64().unwrap() as usize,
        in_features: c["in_features"].as_u64().unwrap() as usize,
        out_features: c["out_features"].as_u64().unwrap() as usize,
    };
    let mut a = floats(&c["a"]);
    let mut b = floats(&c["b"]);
    let m = decay_lora_pair(
        &mut a,
        &mut b,
        shape,
        c["eta"].as_f64().unwrap(),
        c["lambda"].as_f64().unwrap(),
    );
    assert!(max_abs_diff(&a, &floats(&c["a_new"])) < 1e-6);
    assert!(max_abs_diff(&b, &floats(&c["b_new"])) < 1e-6);
    assert!((m.norm - c["norm_after"].as_f64().unwrap()).abs() < 1e-6);
    assert!((m.weight_decay.unwrap() - c["weight_decay"].as_f64().unwrap()).abs() < 1e-6);
}
