//! The run directory of spec §9.4: `output_dir/YYYYMMDD_HH-MM-SS` (UTC) holding the copied
//! config, the data cache, TensorBoard events, checkpoints and epoch outputs.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A fresh run directory with the config file copied in.
pub fn create(output_dir: &Path, config_path: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("cannot create output_dir `{}`", output_dir.display()))?;
    let mut stamp = chrono::Utc::now().format("%Y%m%d_%H-%M-%S").to_string();
    // Two runs started in the same second must not share a directory.
    let mut dir = output_dir.join(&stamp);
    let mut n = 1;
    while dir.exists() {
        stamp = format!("{}_{n}", chrono::Utc::now().format("%Y%m%d_%H-%M-%S"));
        dir = output_dir.join(&stamp);
        n += 1;
    }
    std::fs::create_dir(&dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let name = config_path.file_name().unwrap_or_default();
    std::fs::copy(config_path, dir.join(name))
        .with_context(|| format!("cannot copy the config into `{}`", dir.display()))?;
    Ok(dir)
}

/// The run to resume: the lexicographically greatest *directory* of `output_dir` (the
/// reference takes any entry, so a stray file could be picked — spec §9.4).
pub fn latest(output_dir: &Path) -> Result<PathBuf> {
    if !output_dir.is_dir() {
        bail!(
            "--resume_from_checkpoint: output_dir `{}` does not exist, so it has no run directory to resume",
            output_dir.display()
        );
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(output_dir)
        .with_context(|| format!("cannot read output_dir `{}`", output_dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    match dirs.pop() {
        Some(d) => Ok(d),
        None => bail!(
            "--resume_from_checkpoint: output_dir `{}` has no run directory to resume",
            output_dir.display()
        ),
    }
}
