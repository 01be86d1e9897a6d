use super::*;

fn t(shape: &[usize], dtype: DType) -> TensorType {
    TensorType::new(shape.to_vec(), dtype)
}

#[test]
fn linear_infers_out_features_and_checks_bias() {
    let out = Op::Linear
        .infer(&[t(&[4, 8], DType::F32), t(&[16, 8], DType::F32)])
        .unwrap();
    assert_eq!(out, t(&[4, 16], DType::F32));
    let e = Op::Linear
        .infer(&[
            t(&[4, 8], DType::F32),
            t(&[16, 8], DType::F32),
            t(&[8], DType::F32),
        ])
        .unwrap_err();
    assert!(e.to_string().contains("bias must be [16]"), "{e}");
}

#[test]
fn linear_mismatch_names_op_and_shapes() {
    let e = Op::Linear
        .infer(&[t(&[4, 8], DType::F32), t(&[16, 9], DType::F32)])
        .unwrap_err();
    let s = e.to_string();
    assert!(s.starts_with("linear(f32[4, 8], f32[16, 9])"), "{s}");
}

#[test]
fn attention_requires_grouped_heads_to_divide() {
    let q = t(&[5, 6, 4], DType::F32);
    let kv = t(&[5, 4, 4], DType::F32);
    let op = Op::Attention {
        scale: 0.5,
        sliding_window: None,
        softcap: None,
    };
    assert!(op.infer(&[q.clone(), kv.clone(), kv]).is_err());
    let kv = t(&[5, 3, 4], DType::F32);
    assert_eq!(op.infer(&[q.clone(), kv.clone(), kv]).unwrap(), q);
}

#[test]
fn broadcasting_aligns_on_the_right() {
    assert_eq!(
        broadcast(&Shape::new([4, 1, 3]), &Shape::new([5, 1])),
        Some(Shape::new([4, 5, 3]))
    );
    assert_eq!(broadcast(&Shape::new([2]), &Shape::new([3])), None);
}

#[test]
fn reshape_and_transpose_validate() {
    let x = t(&[2, 3, 4], DType::BF16);
    let r = Op::Reshape {
        shape: Shape::new([6, 4]),
    };
    assert_eq!(
        r.infer(std::slice::from_ref(&x)).unwrap(),
        t(&[6, 4], DType::BF16)
    );
    let bad = Op::Transpose {
        perm: vec![0, 0, 1],
    };
    assert!(bad.infer(std::slice::from_ref(&x)).is_err());
    let ok = Op::Transpose {
        perm: vec![1, 0, 2],
    };
    assert_eq!(ok.infer(&[x]).unwrap(), t(&[3, 2, 4], DType::BF16));
}

#[test]
fn llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones() {
    let rope = Rope {
        theta: 500000.0,
        rotary_dim: 64,
        scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        },
        interleaved: false,
    };
    let plain = Rope {
        scaling: RopeScaling::None,
        ..rope.clone()
    };
    let (a, b) = (rope.inv_freq(), plain.inv_freq());
    assert_eq!(a[0], b[0]);
    assert!((a[31] - b[31] / 8.0).abs() < 1e-15);
}

#[test]
fn wrong_arity_is_an_error_not_a_panic() {
    assert!(Op::Linear.infer(&[]).is_err());
    assert!(Op::Softmax.infer(&[]).is_err());
    assert!(Op::Concat { axis: 0 }.infer(&[]).is_err());
    assert!(Op::Slice {
        axis: 3,
        start: 0,
        end: 1
    }
    .infer(&[t(&[2], DType::F32)])
    .is_err());
}

#[test]
fn gradient_ops_refuse_bad_shapes_with_errors() {
    let z = t(&[4, 10], DType::F32);
    let e = Op::CrossEntropy
        .infer(&[z.clone(), t(&[5], DType::I32)])
        .unwrap_err();
    assert!(
        e.to_string().contains("labels must be an integer [4]"),
        "{e}"
    );
    assert_eq!(
        Op::CrossEntropy
            .infer(&[z.clone(), t(&[4], DType::I32)])
            .unwrap(),
        t(&[], DType::F32)
    );
    let att = Op::AttentionBackward {
        scale: 0.5,
        sliding_window: None,
        softcap: None,
    };
    let q = t(&[5, 4, 8], DType::BF16);
    let kv = t(&[5, 2, 8], DType::BF16);
    assert_eq!(
        att.infer(&[q.clone(), kv.clone(), kv.clone(), q.clone()])
            .unwrap(),
        t(&[5, 8, 8], DType::BF16)
    );
    let e = att
        .infer(&[q.clone(), kv.clone(), kv.clone(), kv.clone()])
        .unwrap_err();
    assert!(e.to_string().contains("output gradient"), "{e}");
    let e = Op::EmbeddingBackward { vocab: 7 }
        .infer(&[t(&[3], DType::I32), t(&[4, 2], DType::F32)])
        .unwrap_err();
    assert!(e.to_string().contains("gradient must be [ids.., H]"), "{e}");
}

#[test]
fn integer_operands_have_no_gradient_and_gradient_ops_have_no_rule() {
    let ids = t(&[3], DType::I32);
    let table = t(&[7, 2], DType::F32);
    let out = t(&[3, 2], DType::F32);
    let ops = [ids.clone(), table.clone()];
    assert_eq!(Op::Embedding.vjp(0, &ops, &out).unwrap(), None);
    let rule = Op::Embedding.vjp(1, &ops, &out).unwrap().unwrap();
    assert_eq!(rule.infer(&ops, &out).unwrap(), table);
    let e = Op::EmbeddingBackward { vocab: 7 }
        .vjp(1, &[ids, out.clone()], &table)
        .unwrap_err();
    assert!(e.to_string().contains("second-order"), "{e}");
    assert!(Op::Linear.vjp(5, std::slice::from_ref(&out), &out).is_err());
}

#[test]
fn every_rule_produces_its_operands_type() {
    // bf16 activations keep bf16 gradients; broadcasting is summed away.
    let a = t(&[2, 3, 4], DType::BF16);
    let b = t(&[3, 1], DType::BF16);
    let out = Op::Binary(BinaryOp::Mul)
        .infer(&[a.clone(), b.clone()])
        .unwrap();
    for i in 0..2 {
        let r = Op::Binary(BinaryOp::Mul)
            .vjp(i, &[a.clone(), b.clone()], &out)
            .unwrap()
            .unwrap();
        assert_eq!(
            r.infer(&[a.clone(), b.clone()], &out).unwrap(),
            [&a, &b][i].clone()
        );
    }
    let x = t(&[4, 8], DType::F32);
    let cast = Op::Cast { to: DType::BF16 };
    let xs = std::slice::from_ref(&x);
    let y = cast.infer(xs).unwrap();
    let r = cast.vjp(0, xs, &y).unwrap().unwrap();
    assert_eq!(r.infer(xs, &y).unwrap(), x);
}

#[test]
fn matmul_accumulates_an_operand_of_its_own_type() {
    let mm = Op::MatMul {
        ta: true,
        tb: false,
    };
    let (a, b) = (t(&[2, 5, 3], DType::BF16), t(&[2, 5, 4], DType::BF16));
    let c = t(&[2, 3, 4], DType::BF16);
    let ops = [a.clone(), b.clone(), c.clone()];
    let out = mm.infer(&ops).unwrap();
    assert_eq!(out, c);
    // One add per element on top of the product's 2·k per element.
    assert_eq!(mm.flops(&ops, &out), 2 * 24 * 5 + 24);
    for wrong in [t(&[2, 3, 4], DType::F32), t(&[2, 4, 3], DType::BF16)] {
        let e = mm.infer(&[a.clone(), b.clone(), wrong]).unwrap_err();
        assert!(e.to_string().contains("accumulated operand"), "{e}");
    }
    // The accumulated operand's gradient is the output's, and every rule keeps its type.
    for (i, want) in ops.iter().enumerate() {
        let r = mm.vjp(i, &ops, &out).unwrap().unwrap();
        assert_eq!(&r.infer(&ops, &out).unwrap(), want, "operand {i}");
    }
}
