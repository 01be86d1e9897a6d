//! NVRTC compiles kept on disk: the PTX of a source is stored under a name derived from the
//! source text and the target architecture, so a second start-up (or a second run of the
//! same model's fused kernels) loads PTX instead of compiling again.
//!
//! Folder: `$QPLC_CACHE_DIR/nvrtc`, else `$XDG_CACHE_HOME/qplc/nvrtc`, else
//! `$HOME/.cache/qplc/nvrtc`; `QPLC_NVRTC_CACHE=0` turns the cache off. The cache is only an
//! accelerator: any failure to read or write it falls back to compiling, and entries are
//! written to a temporary name and renamed, so a crash never leaves half a file under a
//! valid name.
use super::with_libraries;
use crate::backend::KernelError;
use cudarc::nvrtc::Ptx;
use std::path::PathBuf;

/// 64-bit FNV-1a: stable across Rust versions and platforms, unlike `DefaultHasher`.
pub(crate) fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if std::env::var("QPLC_NVRTC_CACHE").is_ok_and(|v| v == "0") {
        return None;
    }
    let base = if let Some(d) = std::env::var_os("QPLC_CACHE_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("qplc")
    } else {
        PathBuf::from(std::env::var_os("HOME")?).join(".cache/qplc")
    };
    Some(base.join("nvrtc"))
}

/// PTX for `src` compiled for `arch` (`sm_90`), from the disk cache when present.
/// `label` names the source in errors (`kernels.cu (bf16 storage)`). No multiply-add
/// contraction (`fmad=false`): `a·b + c` rounds twice, as the CPU backend and each unfused
/// kernel do, so a fused chain of f32 steps gives exactly the bits of its ops one by one.
pub(crate) fn compile(src: &str, arch: &'static str, label: &str) -> Result<Ptx, KernelError> {
    compile_with(src, arch, label, false)
}

/// `compile` with the contraction choice: the flash-attention kernels keep NVRTC's default
/// (`fmad=true`), which their speed and measured precision assume.
pub(crate) fn compile_with(
    src: &str,
    arch: &'static str,
    label: &str,
    fmad: bool,
) -> Result<Ptx, KernelError> {
    let options = format!("fmad={fmad}");
    let key = format!("{:016x}-{arch}.ptx", fnv1a(&[src, arch, &options]));
    let path = cache_dir().map(|d| d.join(&key));
    if let Some(p) = &path {
        if let Ok(text) = std::fs::read_to_string(p) {
            if text.contains(".entry") {
                return Ok(Ptx::from_src(text));
            }
        }
    }
    let owned = src.to_string();
    let label_owned = label.to_string();
    let ptx = with_libraries(move || {
        cudarc::nvrtc::compile_ptx_with_opts(
            owned,
            cudarc::nvrtc::CompileOptions {
                arch: Some(arch),
                fmad: Some(fmad),
                name: Some(format!("qplc_{}.cu", label_owned.replace(' ', "_"))),
                ..Default::default()
            },
        )
        .map_err(|e| match e {
            cudarc::nvrtc::CompileError::CompileError { log, options, .. } => KernelError::new(
                "nvrtc",
                format!(
                    "{label_owned} does not compile (options {options:?}):\n{}",
                    log.to_string_lossy()
                ),
            ),
            e => KernelError::new("nvrtc", format!("{label_owned}: {e:?}")),
        })
    })?;
    if let Some(p) = &path {
        // Best effort: a read-only or full disk only costs the next start-up a compile.
        let write = || -> std::io::Result<()> {
            let dir = p.parent().expect("cache entries live in a folder");
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!("{key}.{}.tmp", std::process::id()));
            std::fs::write(&tmp, ptx.to_src())?;
            std::fs::rename(&tmp, p)
        };
        if let Err(e) = write() {
            tracing::debug!("NVRTC cache not written ({}): {e}", p.display());
        }
    }
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::fnv1a;

    #[test]
    fn keys_are_stable_and_separate_parts() {
        // Known FNV-1a value pins the function across releases (cache names must not move).
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(&["ab", "c"]), fnv1a(&["a", "bc"]));
        assert_eq!(fnv1a(&["kernel", "sm_90"]), fnv1a(&["kernel", "sm_90"]));
    }
}
