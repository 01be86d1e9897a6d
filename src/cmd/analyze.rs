use anyhow::Result;
use qplc_runtime::ca_files::read_control_adapter;
use qplc_runtime::export::analyze::{analyze, render_table};
use std::path::PathBuf;

/// Per-layer spectral analysis of a Control Adapter (spec §11.4).
#[derive(clap::Args)]
#[command(
    after_help = "For W = Q diag(expm1 S) Qᵀ: ‖QᵀQ − I‖²_F, ‖W‖_F, ‖W‖₂, nuclear norm, \
effective rank ‖W‖_*²/‖W‖_F², condition number, and the relative errors of the estimates \
max|λ| ≈ ‖W‖₂ and Σ|λ| ≈ ‖W‖_*.\n\nExample:\n  qplc analyze target/runs/control-adapter/<run>/epoch1 --json"
)]
pub struct Args {
    /// Control Adapter folder.
    adapter: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let ca = read_control_adapter(&a.adapter)?;
    let rows = analyze(&ca);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"rank": ca.rank(), "layers": rows}))?
        );
    } else {
        print!("{}", render_table(&rows, ca.rank()));
    }
    Ok(())
}
