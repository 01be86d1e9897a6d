use anyhow::{Context, Result};
use qplc_compiler::config::LoadedConfig;
use qplc_compiler::dump::DumpFormat;
use qplc_ops::DType;
use qplc_runtime::compile::{compile, CompileOptions};
use std::path::PathBuf;

/// Compile a training config into a plan: graph, partition, memory plan, report, dumps.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    qplc compile examples/tiny-lora.toml\n  \
    qplc compile config.toml --out plans/run1 --format svg\n  \
    qplc compile config.toml --dump-after partition --format text")]
pub struct Args {
    /// qlora-pipe-lite TOML config.
    config: PathBuf,
    /// Output folder for plan.json, report.txt/json and the graph dumps
    /// [default: target/plans/<config file stem>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also dump the graph after this pass (`build` = before any pass, or `all`).
    #[arg(long, value_name = "PASS")]
    dump_after: Option<String>,
    /// Dump formats, comma-separated: dot, svg, json, text [default: dot,json plus svg when
    /// Graphviz is installed].
    #[arg(long, value_delimiter = ',')]
    format: Vec<String>,
    /// Compute dtype the plan is sized for: bf16 (GPU), f32 (CPU reference), f16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = LoadedConfig::from_file(&a.config)?;
    let dtype = DType::parse(&a.dtype)
        .filter(|d| d.is_float() && *d != DType::NF4)
        .with_context(|| format!("--dtype `{}`: expected bf16, f16 or f32", a.dtype))?;
    let formats: Vec<DumpFormat> = if a.format.is_empty() {
        let mut f = vec![DumpFormat::Dot, DumpFormat::Json];
        if which_dot() {
            f.push(DumpFormat::Svg);
        }
        f
    } else {
        a.format
            .iter()
            .map(|s| s.parse::<DumpFormat>())
            .collect::<Result<_, _>>()?
    };
    let out = a.out.unwrap_or_else(|| {
        let stem = a
            .config
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plan".into());
        PathBuf::from("target/plans").join(stem)
    });
    let result = compile(
        &cfg,
        &CompileOptions {
            out: out.clone(),
            dtype,
            dump_after: a.dump_after,
            formats,
        },
    )?;
    print!("{}", qplc_passes::report::render_text(&result.plan.report));
    println!("\nwrote {}:", out.display());
    for f in &result.files {
        println!("  {}", f.file_name().unwrap_or_default().to_string_lossy());
    }
    for s in &result.skipped {
        eprintln!("warning: skipped {s}");
    }
    Ok(())
}

fn which_dot() -> bool {
    std::process::Command::new("dot")
        .arg("-V")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
