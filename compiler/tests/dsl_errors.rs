//! Parse and binding errors point at `file:line:column`, underline the span and say what
//! was expected (STYLE.md, "ripgrep / cargo").
use qplc_compiler::{build_forward, BuildOptions, ModelDef};
use qplc_ops::DType;
use serde_json::{json, Value};

/// A small but complete model file; tests break one line of it.
const BASE: &str = "\
model tiny
config {
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int = 1
  eps: float = 1e-5
}
weights {
  model.embed_tokens.weight: [vocab_size, hidden_size]
  model.layers.{i}.proj.weight: [hidden_size, hidden_size]
  model.norm.weight: [hidden_size]
  lm_head.weight: [vocab_size, hidden_size]
}
inputs {
  input_ids: i32[seq_len]
  position_ids: i32[seq_len]
}
block embedding {
  x = embedding(input_ids, model.embed_tokens)
}
block decoder model.layers.{i} repeat num_hidden_layers {
  x = x + linear(x, proj)
}
block norm {
  hidden = rms_norm(x, model.norm, eps=eps)
}
block head {
  logits = linear(hidden, lm_head)
}
outputs { logits, hidden }
";

fn cfg() -> Value {
    json!({"vocab_size": 32, "hidden_size": 8})
}

fn opts() -> BuildOptions {
    BuildOptions {
        seq_len: 4,
        dtype: DType::F32,
    }
}

fn parse_err(text: &str) -> String {
    ModelDef::parse("tiny.qplm", text)
        .map(|_| ())
        .expect_err("should not parse")
        .to_string()
}

fn build_err(text: &str, cfg: &Value) -> String {
    let def = ModelDef::parse("tiny.qplm", text).unwrap_or_else(|e| panic!("{e}"));
    build_forward(&def, cfg, &opts())
        .map(|_| ())
        .expect_err("should not build")
        .to_string()
}

fn edit(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from}");
    BASE.replacen(from, to, 1)
}

#[test]
fn base_model_builds() {
    let def = ModelDef::parse("tiny.qplm", BASE).unwrap();
    let m = build_forward(&def, &cfg(), &opts()).unwrap();
    m.graph.verify().unwrap();
    assert_eq!(m.info.linear_modules, ["proj", "lm_head"]);
}

#[test]
fn unknown_config_type_is_a_parse_error_with_caret() {
    let e = parse_err(&edit("hidden_size: int", "hidden_size: integer"));
    assert!(e.contains("--> tiny.qplm:4:16"), "{e}");
    assert!(
        e.contains("4 |   hidden_size: integer\n  |                ^^^^^^^"),
        "{e}"
    );
    assert!(e.contains("unknown type `integer`"), "{e}");
    assert!(
        e.contains("expected one of: int, float, bool, str, dict, list"),
        "{e}"
    );
}

#[test]
fn syntax_error_says_what_was_expected() {
    let e = parse_err(&edit("x = x + linear(x, proj)", "x = x + linear(x, proj"));
    assert!(e.contains("this `(` is never closed"), "{e}");
    assert!(e.contains("--> tiny.qplm:22:17"), "{e}");
    assert!(
        e.contains("expected `,` or `)` before `}` on line 23"),
        "{e}"
    );
    let e = parse_err(&edit("block norm {", "block normal {"));
    assert!(e.contains("tiny.qplm:24:7"), "{e}");
    assert!(
        e.contains("expected one of: embedding, decoder, norm, head"),
        "{e}"
    );
}

#[test]
fn missing_required_config_key_points_at_its_declaration() {
    let e = build_err(BASE, &json!({"vocab_size": 32}));
    assert!(e.contains("config.json has no `hidden_size`"), "{e}");
    assert!(e.contains("--> tiny.qplm:4:3"), "{e}");
    assert!(e.contains("  |   ^^^^^^^^^^^"), "{e}");
}

#[test]
fn wrong_config_value_type_is_reported() {
    let e = build_err(BASE, &json!({"vocab_size": 32, "hidden_size": "eight"}));
    assert!(
        e.contains("config.json has `\"hidden_size\": \"eight\"`"),
        "{e}"
    );
    assert!(e.contains("declares it `int`"), "{e}");
    assert!(e.contains("tiny.qplm:4:16"), "{e}");
}

#[test]
fn unknown_op_suggests_the_closest_name() {
    let e = build_err(&edit("linear(x, proj)", "lineer(x, proj)"), &cfg());
    assert!(e.contains("unknown op or function `lineer`"), "{e}");
    assert!(e.contains("--> tiny.qplm:22:11"), "{e}");
    assert!(e.contains("  |           ^^^^^^"), "{e}");
    assert!(e.contains("did you mean `linear`?"), "{e}");
}

#[test]
fn wrong_argument_count_shows_the_signature() {
    let e = build_err(&edit("linear(x, proj)", "linear(x, proj, x)"), &cfg());
    assert!(
        e.contains("`linear` takes 2 positional argument(s), got 3"),
        "{e}"
    );
    assert!(e.contains("tiny.qplm:22:11"), "{e}");
    assert!(e.contains("expected `linear(x, module)`"), "{e}");
    let e = build_err(&edit("eps=eps", "epsilon=eps"), &cfg());
    assert!(
        e.contains("`rms_norm` has no argument named `epsilon`"),
        "{e}"
    );
    let e = build_err(&edit(", eps=eps", ""), &cfg());
    assert!(e.contains("`rms_norm` needs the argument `eps=…`"), "{e}");
}

#[test]
fn undefined_variable_is_located() {
    let e = build_err(
        &edit("x = x + linear(x, proj)", "x = y + linear(x, proj)"),
        &cfg(),
    );
    assert!(e.contains("undefined variable `y`"), "{e}");
    assert!(e.contains("tiny.qplm:22:7"), "{e}");
}

#[test]
fn shape_error_from_op_inference_names_op_shapes_and_module() {
    let e = build_err(
        &edit(
            "model.layers.{i}.proj.weight: [hidden_size, hidden_size]",
            "model.layers.{i}.proj.weight: [hidden_size, 2 * hidden_size]",
        ),
        &cfg(),
    );
    assert!(
        e.contains("shape error: linear(f32[4, 8], f32[8, 16])"),
        "{e}"
    );
    assert!(
        e.contains("does not match the weight's in-features 16"),
        "{e}"
    );
    assert!(e.contains("tiny.qplm:22:11"), "{e}");
    assert!(e.contains("in module `model.layers.0.proj`"), "{e}");
}

#[test]
fn undeclared_and_unused_weights_are_errors() {
    let e = build_err(
        &edit("linear(hidden, lm_head)", "linear(hidden, lm_hed)"),
        &cfg(),
    );
    assert!(e.contains("no weight `lm_hed.weight` is declared"), "{e}");
    assert!(e.contains("tiny.qplm:28:27"), "{e}");
    let e = build_err(
        &edit(
            "  model.norm.weight: [hidden_size]\n",
            "  model.norm.weight: [hidden_size]\n  extra.weight: [4]\n",
        ),
        &cfg(),
    );
    assert!(
        e.contains("weight `extra.weight` is declared but the forward never uses it"),
        "{e}"
    );
    assert!(e.contains("tiny.qplm:12:3"), "{e}");
}

#[test]
fn missing_contract_output_is_an_error() {
    let e = build_err(
        &edit("outputs { logits, hidden }", "outputs { logits }"),
        &cfg(),
    );
    assert!(e.contains("the model has no output `hidden`"), "{e}");
}

#[test]
fn readme_example_builds_tied_and_untied() {
    let readme = include_str!("../../models/README.md");
    let start = readme.find("```\nmodel tiny").expect("example") + 4;
    let end = start + readme[start..].find("```").unwrap();
    let def = ModelDef::parse("README.md", &readme[start..end]).unwrap_or_else(|e| panic!("{e}"));
    for tie in [false, true] {
        let cfg = json!({"vocab_size": 32, "hidden_size": 8, "use_bias": true,
                         "tie_word_embeddings": tie});
        let m = build_forward(&def, &cfg, &opts()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.info.tie_word_embeddings, tie);
        assert_eq!(m.info.num_layers, 2);
    }
}

#[test]
fn diagnostic_renders_like_rustc() {
    let e = parse_err("model m\nconfig {\n  a: int = (1 +\n}\n");
    assert_eq!(
        e,
        "error: expected an expression, found `}`\n --> tiny.qplm:4:1\n  |\n4 | }\n  | ^"
    );
}
