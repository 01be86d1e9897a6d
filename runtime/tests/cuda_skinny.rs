//! The skinny f32 products (runtime/src/cuda/skinny.cu): the kernels compile with NVRTC
//! wherever libnvrtc loads, and on a machine with a GPU every layout matches the CPU backend
//! and the 8B LoRA products match cuBLAS. Each test says so and returns early (passing)
//! where the library or the GPU is missing.
#![cfg(feature = "cuda")]
use qplc_runtime::cuda::check::table;
use qplc_runtime::cuda::check_skinny::skinny_checks;
use qplc_runtime::cuda::skinny::{compile_skinny_kernels, KERNEL_NAMES};
use qplc_runtime::cuda::CudaBackend;

#[test]
fn skinny_kernels_compile_with_nvrtc_for_hopper() {
    match compile_skinny_kernels("sm_90") {
        Ok(ptx) => {
            let src = ptx.to_src();
            for e in KERNEL_NAMES {
                assert!(src.contains(&format!(".entry {e}(")), "no {e}");
            }
        }
        Err(e) if e.message.contains("could not be loaded") => {
            eprintln!("SKIPPED: libnvrtc not found ({e})");
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn skinny_products_match_the_cpu_and_cublas_on_a_gpu() {
    let gpu = match CudaBackend::new(0) {
        Ok(g) => g.with_poison(true),
        Err(e) => {
            eprintln!("SKIPPED: no usable GPU ({e})");
            return;
        }
    };
    let rows = skinny_checks(&gpu, 20261201);
    let failed: Vec<_> = rows.iter().filter(|r| !r.ok()).collect();
    assert!(failed.is_empty(), "{}", table(&rows));
}
