//! The device Adam kernel and the device random init (cuda/adam.rs, train_kernels.cu): they
//! compile with NVRTC wherever libnvrtc loads, and on a GPU the kernel reproduces
//! `train::adam::adam_update` bit for bit on f32, bf16 and f16 tensors. Each test says so and
//! passes early where the library or the GPU is missing (CI); the GPU run is on the device
//! machine.
#![cfg(feature = "cuda")]
use qplc_runtime::cuda::adam::{adam_checks, compile_train_kernels, TrainKernels};
use qplc_runtime::cuda::check::table;
use qplc_runtime::cuda::CudaBackend;

#[test]
fn train_kernels_compile_with_nvrtc_for_hopper() {
    match compile_train_kernels("sm_90") {
        Ok(ptx) => {
            let src = ptx.to_src();
            assert!(src.contains(".entry adam_multi") && src.contains(".entry init_random"));
        }
        Err(e) if e.message.contains("could not be loaded") => {
            eprintln!("SKIPPED: libnvrtc not found ({e})")
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn device_adam_matches_the_host_adam_bit_for_bit_on_a_gpu() {
    let gpu = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED: no usable GPU ({e})");
            return;
        }
    };
    let rows = adam_checks(&gpu, 20261130);
    assert!(rows.iter().all(|r| r.ok()), "{}", table(&rows));
}

#[test]
fn device_init_matches_the_host_init_on_a_gpu() {
    use qplc_ops::{DType, Shape, TensorType};
    use qplc_runtime::backend::Backend;
    use qplc_runtime::bench::random::{host_tensor, Init};
    let gpu = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED: no usable GPU ({e})");
            return;
        }
    };
    let k = TrainKernels::new(&gpu).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        for init in [
            Init::Normal { std: 0.02 },
            Init::Uniform { lo: -0.1, hi: 0.1 },
            Init::Const(1.0),
        ] {
            let ty = TensorType::new(Shape::new(vec![1000, 37]), dtype);
            let mut t = gpu.alloc(&ty).unwrap();
            k.init(&gpu, &mut t, init, 99).unwrap();
            let dev = gpu.download(&t).unwrap();
            let host = host_tensor(&ty, init, 99);
            let worst = dev
                .as_f32()
                .iter()
                .zip(host.as_f32())
                .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
                .fold(0f32, f32::max);
            // logf/cosf differ from the host's by an ulp or two; one bf16 rounding flip is 2^-8.
            let tol = if dtype == DType::BF16 { 8e-3 } else { 1e-5 };
            assert!(
                worst <= tol,
                "{init:?} {}: worst relative difference {worst}",
                dtype.name()
            );
        }
    }
}
