//! `qplc compile`: TOML config + model folder → built graph → passes → plan on disk, with
//! the report and graph dumps beside it (DESIGN.md "The flow", steps 1–3).
use crate::model::ModelDir;
use anyhow::{Context, Result};
use qplc_compiler::config::{LoadedConfig, Mode};
use qplc_compiler::dump::{render, DumpFormat, DumpView};
use qplc_compiler::{Plan, PlanConfig, PlanModel};
use qplc_ops::DType;
use qplc_passes::{
    AccumulatePass, AutodiffPass, ControlPass, FullFtPass, FuseElementwisePass, FusePass, LoraPass,
    LossPass, PassContext, PassManager, RecomputePass, SimplifyPass,
};
use std::path::{Path, PathBuf};

pub struct CompileOptions {
    /// Where the plan goes.
    pub out: PathBuf,
    /// Compute dtype of weights and activations (bf16 on GPUs; the CPU backend runs f32).
    pub dtype: DType,
    /// Extra dumps after a named pass (`build`, a pass name or `all`).
    pub dump_after: Option<String>,
    /// Formats for the standard dumps and for `dump_after`.
    pub formats: Vec<DumpFormat>,
}

pub struct CompileOutput {
    pub plan: Plan,
    /// Every file written, in order.
    pub files: Vec<PathBuf>,
    /// Dumps that could not be rendered (e.g. SVG without Graphviz), with the reason.
    pub skipped: Vec<String>,
}

pub fn compile(cfg: &LoadedConfig, opts: &CompileOptions) -> Result<CompileOutput> {
    let model_dir = cfg.model_dir()?;
    let model = ModelDir::open(&model_dir, cfg.model_definition().as_deref())?;
    let built = model.build(cfg.sequence_len(), opts.dtype)?;

    let mut passes = PassManager::standard();
    // Training-mode rewrites, then the loss and the backward graph, all before partitioning
    // (spec §1 precedence is in `mode()`).
    match cfg.mode() {
        Mode::Lora => {
            passes.insert_before("partition", LoraPass::from_config(cfg)?)?;
        }
        Mode::FullFineTune => {
            passes.insert_before("partition", FullFtPass::from_config(cfg)?)?;
        }
        Mode::ControlAdapter => {
            passes.insert_before("partition", ControlPass::from_config(cfg)?)?;
        }
    }
    passes.insert_before("partition", LossPass)?;
    passes.insert_before("partition", AutodiffPass)?;
    // After autodiff (DESIGN "The flow"), so the rules fuse the loss's backward too.
    passes.insert_before("partition", FusePass::standard())?;
    passes.insert_before("partition", SimplifyPass)?;
    // Checkpointing after fusion: it copies the kernels that will run, and egg would merge
    // a copy with its original again (passes/src/recompute.rs).
    passes.insert_before("partition", RecomputePass::from_config(cfg)?)?;
    // Sums of bf16 products run in the products' epilogues; after recompute (which decides on
    // the plain graph) and before elementwise fusion, which keeps the adds it chains.
    passes.insert_before("partition", AccumulatePass)?;
    // Elementwise chains become one kernel each. After recompute: a forward value that
    // the backward now reads from its recomputed copy has no reader left but the next op
    // of the forward, so the whole chain (e.g. SwiGLU's add·silu·mul) fuses; groups never
    // mix recomputed and original nodes.
    passes.insert_before("partition", FuseElementwisePass::from_config(cfg))?;
    if let Some(after) = &opts.dump_after {
        for f in &opts.formats {
            passes.dump_after(after, *f, DumpView::Full)?;
        }
    }
    let mut cx = PassContext::new(
        cfg.sequence_len(),
        cfg.config.pipeline_stages as usize,
        &cfg.partition_method(),
    );
    cx.num_layers = Some(built.info.num_layers);
    let plan_config = PlanConfig {
        toml: cfg.text.clone(),
        resolved: serde_json::to_value(&cfg.config)?,
    };
    let (plan, dumps) = qplc_passes::compile(
        built.graph,
        &passes,
        cx,
        plan_config,
        PlanModel::from(&built.info),
    )?;

    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create the plan folder `{}`", opts.out.display()))?;
    let mut files = Vec::new();
    let plan_path = opts.out.join("plan.json");
    plan.write(&plan_path)?;
    files.push(plan_path);
    let report_txt = qplc_passes::report::render_text(&plan.report);
    files.push(write(&opts.out, "report.txt", &report_txt)?);
    let report_json =
        serde_json::to_string_pretty(&qplc_passes::report::render_json(&plan.report))?;
    files.push(write(&opts.out, "report.json", &report_json)?);

    // The final graph in every requested format, full and collapsed (one box per layer).
    let mut skipped = Vec::new();
    for f in &opts.formats {
        for (view, stem) in [
            (DumpView::Full, "graph"),
            (DumpView::Collapsed, "graph.layers"),
        ] {
            let name = format!("{stem}.{}", f.extension());
            match render(&plan.graph, *f, view) {
                Ok(text) => files.push(write(&opts.out, &name, &text)?),
                Err(e) if *f == DumpFormat::Svg => skipped.push(format!("{name}: {e}")),
                Err(e) => return Err(e.into()),
            }
        }
    }
    for d in dumps {
        files.push(write(&opts.out, &d.file_name(), &d.text)?);
    }
    Ok(CompileOutput {
        plan,
        files,
        skipped,
    })
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("cannot write `{}`", p.display()))?;
    Ok(p)
}
