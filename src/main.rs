//! The qplc command line. Only argument parsing and printing live here; the work is done
//! by the library crates.
mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "qplc",
    version,
    about = "A training compiler for LoRA, QLoRA, Control Adapters and full fine-tunes of LLMs",
    long_about = "qplc compiles a qlora-pipe-lite TOML configuration and a HuggingFace model \
                  folder into a plan (graph, partition over pipeline stages, memory and FLOP \
                  report), and runs models on its backends."
)]
struct Cli {
    /// More log output (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Compile(cmd::compile::Args),
    Run(cmd::run::Args),
    Data(cmd::data::Args),
    Score(cmd::score::Args),
    Bench(cmd::bench::Args),
    Generate(cmd::generate::Args),
    Inspect(cmd::inspect::Args),
    #[cfg(feature = "cuda")]
    CudaCheck(cmd::cuda_check::Args),
    Export(cmd::export::Args),
    Analyze(cmd::analyze::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Compile(a) => cmd::compile::run(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Data(a) => cmd::data::run(a),
        Command::Score(a) => cmd::score::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        #[cfg(feature = "cuda")]
        Command::CudaCheck(a) => cmd::cuda_check::run(a),
        Command::Export(a) => cmd::export::run(a),
        Command::Analyze(a) => cmd::analyze::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Errors are for people: the chain of contexts, outermost first.
            eprintln!("error: {e}");
            // Wrapper errors often display their source too; print each text once.
            let mut last = e.to_string();
            for cause in e.chain().skip(1) {
                let text = cause.to_string();
                if !last.contains(&text) {
                    eprintln!("  caused by: {text}");
                }
                last = text;
            }
            ExitCode::from(1)
        }
    }
}
