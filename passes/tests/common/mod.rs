//! Small graphs built by hand for pass tests (the DSL builder makes real ones).
#![allow(dead_code)]
use qplc_compiler::{BlockKind, Graph, NodeId, Scope};
use qplc_ops::{BinaryOp, DType, Op, TensorType, UnaryOp};

pub const T: usize = 8;
pub const H: usize = 16;
pub const V: usize = 32;

pub fn weight<const N: usize>(g: &mut Graph, s: &Scope, shape: [usize; N]) -> NodeId {
    g.add(
        Op::Weight {
            name: format!("{}.weight", s.module),
            ty: TensorType::new(shape, DType::BF16),
        },
        &[],
        s,
    )
    .unwrap()
}

fn rms_norm(g: &mut Graph, x: NodeId, s: &Scope) -> NodeId {
    let w = weight(g, s, [H]);
    g.add(
        Op::RmsNorm {
            eps: 1e-5,
            offset: 0.0,
        },
        &[x, w],
        s,
    )
    .unwrap()
}

/// A toy decoder with tied embeddings: inputs → embedding → `layers` × (norm, up/down
/// linear with silu, residual add) → final norm → head reading the embedding table.
pub fn toy_model(layers: usize) -> Graph {
    let mut g = Graph::new();
    let inp = Scope::new("", BlockKind::Inputs, None);
    let ids = g
        .add(
            Op::Input {
                name: "input_ids".into(),
                ty: TensorType::new([T], DType::I32),
            },
            &[],
            &inp,
        )
        .unwrap();
    let emb = Scope::new("model.embed_tokens", BlockKind::Embedding, None);
    let table = weight(&mut g, &emb, [V, H]);
    let mut x = g.add(Op::Embedding, &[ids, table], &emb).unwrap();
    for i in 0..layers {
        let s = Scope::new(format!("model.layers.{i}"), BlockKind::Decoder, Some(i));
        let y = rms_norm(&mut g, x, &s.child("post_attention_layernorm"));
        let up = s.child("mlp").child("up_proj");
        let w = weight(&mut g, &up, [4 * H, H]);
        let y = g.add(Op::Linear, &[y, w], &up).unwrap();
        let y = g
            .add(Op::Unary(UnaryOp::Silu), &[y], &s.child("mlp"))
            .unwrap();
        let down = s.child("mlp").child("down_proj");
        let w = weight(&mut g, &down, [H, 4 * H]);
        let y = g.add(Op::Linear, &[y, w], &down).unwrap();
        x = g.add(Op::Binary(BinaryOp::Add), &[x, y], &s).unwrap();
    }
    let x = rms_norm(&mut g, x, &Scope::new("model.norm", BlockKind::Norm, None));
    let head = Scope::new("lm_head", BlockKind::Head, None);
    let logits = g.add(Op::Linear, &[x, table], &head).unwrap();
    g.set_output("hidden", x);
    g.set_output("logits", logits);
    g.verify().unwrap();
    g
}

/// `n` elementwise ops in a chain on one f32 [T, H] input, all in decoder layer 0.
pub fn chain(n: usize) -> Graph {
    let mut g = Graph::new();
    let s = Scope::new("model.layers.0", BlockKind::Decoder, Some(0));
    let mut x = g
        .add(
            Op::Input {
                name: "x".into(),
                ty: TensorType::new([T, H], DType::F32),
            },
            &[],
            &Scope::new("", BlockKind::Inputs, None),
        )
        .unwrap();
    for _ in 0..n {
        x = g.add(Op::Unary(UnaryOp::Silu), &[x], &s).unwrap();
    }
    g.set_output("y", x);
    g
}

pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A random DAG of unary/binary ops over f32 tensors of a few widths (row count T),
/// spread over `layers` decoder layers in order, with a few outputs.
pub fn random_dag(rng: &mut XorShift, nodes: usize, layers: usize) -> Graph {
    let mut g = Graph::new();
    let widths = [4usize, 16, 64];
    let inp = Scope::new("", BlockKind::Inputs, None);
    let mut vals: Vec<NodeId> = widths
        .iter()
        .map(|&w| {
            g.add(
                Op::Input {
                    name: format!("x{w}"),
                    ty: TensorType::new([T, w], DType::F32),
                },
                &[],
                &inp,
            )
            .unwrap()
        })
        .collect();
    for i in 0..nodes {
        let layer = i * layers / nodes;
        let s = Scope::new(
            format!("model.layers.{layer}"),
            BlockKind::Decoder,
            Some(layer),
        );
        let a = vals[rng.below(vals.len())];
        let same: Vec<NodeId> = vals
            .iter()
            .copied()
            .filter(|&v| g.node(v).ty == g.node(a).ty)
            .collect();
        let id = if rng.below(2) == 0 {
            let b = same[rng.below(same.len())];
            g.add(Op::Binary(BinaryOp::Add), &[a, b], &s).unwrap()
        } else {
            g.add(Op::Unary(UnaryOp::Exp), &[a], &s).unwrap()
        };
        vals.push(id);
    }
    let last = *vals.last().unwrap();
    g.set_output("out", last);
    let mid = vals[vals.len() / 2];
    g.set_output("mid", mid);
    g.verify().unwrap();
    g
}
