//! Device-resident training state (issue 6 item 3, `qplc bench`): Adam with Kahan
//! summation as ONE kernel launch over every trainable tensor, and random initialisation on
//! the device. Both live in train_kernels.cu, compiled here by NVRTC as a second module so
//! the backend's kernel list (mod.rs) stays untouched.
//!
//! The maths is runtime/src/train/adam.rs's `adam_update`, op for op, with the same rounding
//! points; the kernel uses `__fmul_rn`/`__fadd_rn` so that no multiply-add is contracted into
//! an FMA the host never does. [`adam_checks`] compares the two on random tensors.
//!
//! Storage: [`raw_ptr`] and [`storage_bytes`] are the only matches on `DevData` here; a
//! bf16-storage variant (`DevData::BF16(CudaSlice<u16>)`) needs one more arm in each
//! (`StorageKind::Bf16`, 2 bytes), nothing else. Optimiser state is kept
//! in the parameter's dtype (`ParamState`): f32 for f32 parameters, bf16/f16 bit patterns
//! for bf16/f16 ones (exact: every state value is rounded to that dtype anyway).
use super::check::CheckRow;
use super::{cuda_err, with_libraries, CudaBackend, CudaTensor, DevData};
use crate::backend::{Backend, KernelError};
use crate::bench::random::Init;
use crate::train::adam::{adam_update, AdamHyper, StepScalars};
use crate::HostTensor;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use qplc_ops::{DType, Shape, TensorType};

/// CUDA C source of the training kernels.
const TRAIN_KERNELS: &str = include_str!("train_kernels.cu");

/// Elements one block of `adam_multi` updates (apex uses 65536 per chunk; smaller chunks
/// keep the grid full for LoRA's many small tensors).
const CHUNK: usize = 16384;
const BLOCK: u32 = 256;

/// How a tensor's elements are stored on the device (`kind` in train_kernels.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageKind {
    F32 = 0,
    Bf16 = 1,
    F16 = 2,
}

impl StorageKind {
    /// The state storage of a parameter of `dtype` (its own precision, as optimi keeps it).
    fn for_state(dtype: DType) -> StorageKind {
        match dtype {
            DType::BF16 => StorageKind::Bf16,
            DType::F16 => StorageKind::F16,
            _ => StorageKind::F32,
        }
    }
}

/// The rounding code of `dtype` in train_kernels.cu (`round_to`).
fn round_code(dtype: DType) -> u64 {
    match dtype {
        DType::BF16 => 1,
        DType::F16 => 2,
        _ => 0,
    }
}

/// The device address and storage of a float tensor. Keep the returned guard until the
/// launch that reads the address is queued (cudarc orders streams with it).
pub fn raw_ptr<'a>(
    t: &'a CudaTensor,
    gpu: &'a CudaBackend,
    op: &'static str,
) -> Result<(u64, StorageKind, impl Drop + 'a), KernelError> {
    match t.data() {
        DevData::F32(s) => {
            let (p, guard) = s.device_ptr(&gpu.stream);
            Ok((p, StorageKind::F32, guard))
        }
        DevData::BF16(s) => {
            let (p, guard) = s.device_ptr(&gpu.stream);
            Ok((p, StorageKind::Bf16, guard))
        }
        DevData::I32(_) => Err(KernelError::new(
            op,
            format!("expects a float tensor, got {}", t.ty),
        )),
    }
}

/// Bytes a tensor occupies on the device (its storage, which may be wider than its
/// logical dtype: f16 is stored as f32).
pub fn storage_bytes(t: &CudaTensor) -> usize {
    let per = match t.data() {
        DevData::F32(_) | DevData::I32(_) => 4,
        DevData::BF16(_) => 2,
    };
    t.ty.shape.numel() * per
}

/// `(free, total)` device memory as the driver reports it (every allocation of the process,
/// cuBLAS workspaces and pool slack included).
pub fn device_memory(gpu: &CudaBackend) -> Result<(usize, usize), KernelError> {
    gpu.ctx
        .mem_get_info()
        .map_err(|e| cuda_err("cuda", "memory info", e))
}

/// Compiles train_kernels.cu for `arch`; needs only libnvrtc, so it is tested without a GPU.
pub fn compile_train_kernels(arch: &'static str) -> Result<cudarc::nvrtc::Ptx, KernelError> {
    with_libraries(|| {
        cudarc::nvrtc::compile_ptx_with_opts(
            TRAIN_KERNELS,
            cudarc::nvrtc::CompileOptions {
                arch: Some(arch),
                name: Some("qplc_train_kernels.cu".into()),
                ..Default::default()
            },
        )
        .map_err(|e| match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => KernelError::new(
                "nvrtc",
                format!(
                    "train_kernels.cu does not compile:\n{}",
                    log.to_string_lossy()
                ),
            ),
            other => cuda_err("nvrtc", "train_kernels.cu", other),
        })
    })
}

/// The loaded training kernels of one GPU.
pub struct TrainKernels {
    adam: CudaFunction,
    init: CudaFunction,
}

impl TrainKernels {
    pub fn new(gpu: &CudaBackend) -> Result<Self, KernelError> {
        let (major, minor) = gpu
            .ctx
            .compute_capability()
            .map_err(|e| cuda_err("cuda", "compute capability", e))?;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let module = gpu
            .ctx
            .load_module(compile_train_kernels(arch)?)
            .map_err(|e| cuda_err("cuda", "loading train_kernels.cu", e))?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| cuda_err("cuda", &format!("kernel `{name}`"), e))
        };
        Ok(TrainKernels {
            adam: load("adam_multi")?,
            init: load("init_random")?,
        })
    }

    /// Fills `t` (a float tensor) with `init` drawn from stream `seed`, rounded to its dtype
    /// (bench/random.rs `host_tensor` computes the same values on the host).
    pub fn init(
        &self,
        gpu: &CudaBackend,
        t: &mut CudaTensor,
        init: Init,
        seed: u64,
    ) -> Result<(), KernelError> {
        let n = t.ty.shape.numel();
        if n == 0 {
            return Ok(());
        }
        let (mode, a, b) = init.kernel_args();
        let dtype = round_code(t.ty.dtype) as i32;
        let (ptr, kind, _guard) = raw_ptr(t, gpu, "init_random")?;
        let (kind, nn) = (kind as i32, n as i64);
        let mut l = gpu.stream.launch_builder(&self.init);
        l.arg(&ptr)
            .arg(&kind)
            .arg(&nn)
            .arg(&seed)
            .arg(&mode)
            .arg(&a)
            .arg(&b)
            .arg(&dtype);
        // SAFETY: arguments follow init_random's C signature; `ptr` addresses `n` elements
        // of `kind` (the tensor's own storage), kept alive by `t` and `_guard`.
        unsafe { l.launch(super::launch::grid(n)) }
            .map(|_| ())
            .map_err(|e| cuda_err("init_random", "kernel launch", e))
    }
}

/// Optimiser state of one tensor, in the storage [`StorageKind::for_state`] picks.
enum StateBuf {
    F32(CudaSlice<f32>),
    U16(CudaSlice<u16>),
}

impl StateBuf {
    fn zeros(gpu: &CudaBackend, kind: StorageKind, n: usize) -> Result<Self, KernelError> {
        let n = n.max(1);
        let err = |e| cuda_err("adam", &format!("state of {n} elements"), e);
        Ok(match kind {
            StorageKind::F32 => StateBuf::F32(gpu.stream.alloc_zeros::<f32>(n).map_err(err)?),
            _ => StateBuf::U16(gpu.stream.alloc_zeros::<u16>(n).map_err(err)?),
        })
    }

    fn ptr(&self, gpu: &CudaBackend) -> u64 {
        // The state is only ever touched on this stream, so the read guard is not needed
        // past this call.
        match self {
            StateBuf::F32(s) => s.device_ptr(&gpu.stream).0,
            StateBuf::U16(s) => s.device_ptr(&gpu.stream).0,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            StateBuf::F32(s) => s.len() * 4,
            StateBuf::U16(s) => s.len() * 2,
        }
    }

    /// The values as f32 (for checks).
    fn download(
        &self,
        gpu: &CudaBackend,
        n: usize,
        kind: StorageKind,
    ) -> Result<Vec<f32>, KernelError> {
        let err = |e| cuda_err("adam", "state download", e);
        let out = match self {
            StateBuf::F32(s) => gpu.stream.clone_dtoh(&s.slice(..n)).map_err(err)?,
            StateBuf::U16(s) => {
                let bits = gpu.stream.clone_dtoh(&s.slice(..n)).map_err(err)?;
                bits.into_iter()
                    .map(|b| match kind {
                        StorageKind::F16 => half::f16::from_bits(b).to_f32(),
                        _ => half::bf16::from_bits(b).to_f32(),
                    })
                    .collect()
            }
        };
        gpu.synchronize()?;
        Ok(out)
    }
}

struct TensorState {
    numel: usize,
    dtype: DType,
    kind: StorageKind,
    m: StateBuf,
    v: StateBuf,
    /// Present exactly for bf16/f16 parameters (as `ParamState::kahan_comp`).
    kahan: Option<StateBuf>,
}

/// One tensor's `(m, v, kahan)` on the host, as f32.
pub type HostState = (Vec<f32>, Vec<f32>, Option<Vec<f32>>);

/// Adam over a fixed list of device tensors: the state, and the tensor table that
/// `adam_multi` reads, built once. Parameters and gradients are passed to every
/// [`DeviceAdam::step`] (gradients are fresh buffers each step); only their addresses travel.
pub struct DeviceAdam {
    pub hyper: AdamHyper,
    /// Completed steps; the next is `step + 1` (1-based, as `AdamState`).
    pub step: u64,
    kernels: TrainKernels,
    tensors: Vec<TensorState>,
    table: CudaSlice<u64>,
    chunk_prefix: CudaSlice<i64>,
    chunks: usize,
}

impl DeviceAdam {
    /// State for tensors of the given types, in the order `step` will see them.
    pub fn new(
        gpu: &CudaBackend,
        hyper: AdamHyper,
        types: &[TensorType],
    ) -> Result<Self, KernelError> {
        if types.is_empty() {
            return Err(KernelError::new("adam", "no trainable tensors to optimise"));
        }
        let kernels = TrainKernels::new(gpu)?;
        let mut tensors = Vec::with_capacity(types.len());
        let mut table = Vec::with_capacity(5 * types.len());
        let mut prefix = Vec::with_capacity(types.len() + 1);
        let mut chunks = 0usize;
        for ty in types {
            if !ty.dtype.is_float() || ty.dtype == DType::NF4 {
                return Err(KernelError::new(
                    "adam",
                    format!("only f32/bf16/f16 tensors are optimised, got {ty}"),
                ));
            }
            let n = ty.shape.numel();
            let kind = StorageKind::for_state(ty.dtype);
            let low = matches!(ty.dtype, DType::BF16 | DType::F16);
            let st = TensorState {
                numel: n,
                dtype: ty.dtype,
                kind,
                m: StateBuf::zeros(gpu, kind, n)?,
                v: StateBuf::zeros(gpu, kind, n)?,
                kahan: if low {
                    Some(StateBuf::zeros(gpu, kind, n)?)
                } else {
                    None
                },
            };
            table.extend([
                st.m.ptr(gpu),
                st.v.ptr(gpu),
                st.kahan.as_ref().map_or(0, |c| c.ptr(gpu)),
                n as u64,
                round_code(ty.dtype) | (kind as u64) << 8,
            ]);
            prefix.push(chunks as i64);
            chunks += n.div_ceil(CHUNK);
            tensors.push(st);
        }
        prefix.push(chunks as i64);
        if chunks > i32::MAX as usize {
            return Err(KernelError::new(
                "adam",
                format!("{chunks} chunks exceed one launch's grid"),
            ));
        }
        let table = gpu
            .stream
            .clone_htod(&table)
            .map_err(|e| cuda_err("adam", "tensor table upload", e))?;
        let chunk_prefix = gpu
            .stream
            .clone_htod(&prefix)
            .map_err(|e| cuda_err("adam", "chunk table upload", e))?;
        Ok(DeviceAdam {
            hyper,
            step: 0,
            kernels,
            tensors,
            table,
            chunk_prefix,
            chunks,
        })
    }

    /// Bytes of optimiser state on the device.
    pub fn state_bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|t| t.m.bytes() + t.v.bytes() + t.kahan.as_ref().map_or(0, |c| c.bytes()))
            .sum()
    }

    /// One optimiser step with learning rate `lr` over all tensors: one launch, queued on the
    /// stream (no synchronisation). `params[i]`/`grads[i]` match the `i`-th type given to `new`.
    pub fn step(
        &mut self,
        gpu: &CudaBackend,
        lr: f64,
        params: &mut [&mut CudaTensor],
        grads: &[&CudaTensor],
    ) -> Result<StepScalars, KernelError> {
        if params.len() != self.tensors.len() || grads.len() != self.tensors.len() {
            return Err(KernelError::new(
                "adam",
                format!(
                    "expected {} parameters and gradients, got {} and {}",
                    self.tensors.len(),
                    params.len(),
                    grads.len()
                ),
            ));
        }
        let mut ptrs = Vec::with_capacity(3 * self.tensors.len());
        let mut guards = Vec::with_capacity(2 * self.tensors.len());
        for ((st, p), g) in self.tensors.iter().zip(params.iter()).zip(grads) {
            for (what, t) in [("parameter", &**p), ("gradient", *g)] {
                if t.ty.shape.numel() != st.numel {
                    return Err(KernelError::new(
                        "adam",
                        format!(
                            "{what} {} does not have the {} elements of its optimiser state",
                            t.ty, st.numel
                        ),
                    ));
                }
            }
            if p.ty.dtype != st.dtype {
                return Err(KernelError::new(
                    "adam",
                    format!(
                        "parameter {} is not of the state's dtype {}",
                        p.ty,
                        st.dtype.name()
                    ),
                ));
            }
            let (pp, pk, pg) = raw_ptr(p, gpu, "adam")?;
            let (gp, gk, gg) = raw_ptr(g, gpu, "adam")?;
            ptrs.extend([pp, gp, pk as u64 | (gk as u64) << 8]);
            guards.push(pg);
            guards.push(gg);
        }
        let ptrs = gpu
            .stream
            .clone_htod(&ptrs)
            .map_err(|e| cuda_err("adam", "pointer table upload", e))?;
        self.step += 1;
        let s = StepScalars::new(&self.hyper, self.step, lr);
        let n_tensors = self.tensors.len() as i32;
        let chunk = CHUNK as i64;
        let mut l = gpu.stream.launch_builder(&self.kernels.adam);
        l.arg(&self.table)
            .arg(&ptrs)
            .arg(&self.chunk_prefix)
            .arg(&n_tensors)
            .arg(&chunk)
            .arg(&s.m_weight)
            .arg(&s.beta2)
            .arg(&s.one_minus_beta2)
            .arg(&s.neg_lr)
            .arg(&s.eps);
        let cfg = LaunchConfig {
            grid_dim: (self.chunks.max(1) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the tables hold, per tensor, addresses of buffers of `numel` elements in
        // the stated storage (checked above for parameters and gradients; the state is ours),
        // all alive for the launch (`params`, `grads`, `guards`, `self`).
        unsafe { l.launch(cfg) }
            .map(|_| ())
            .map_err(|e| cuda_err("adam_multi", "kernel launch", e))?;
        drop(guards);
        Ok(s)
    }

    /// `(m, v, kahan)` of tensor `i`, as f32 (for checks).
    pub fn state_host(&self, gpu: &CudaBackend, i: usize) -> Result<HostState, KernelError> {
        let t = &self.tensors[i];
        Ok((
            t.m.download(gpu, t.numel, t.kind)?,
            t.v.download(gpu, t.numel, t.kind)?,
            t.kahan
                .as_ref()
                .map(|c| c.download(gpu, t.numel, t.kind))
                .transpose()?,
        ))
    }
}

/// `(max |a − b|, max |a − b| / |a|)` over the elements whose bits differ (both 0 when the
/// arrays are identical; infinite where a NaN appears on one side only).
fn differences(a: &[f32], b: &[f32]) -> (f64, f64) {
    let mut worst_abs = 0f64;
    let mut worst_rel = 0f64;
    for (&x, &y) in a.iter().zip(b) {
        let d = (x as f64 - y as f64).abs();
        if x.to_bits() != y.to_bits() && !(x == 0.0 && y == 0.0) {
            worst_abs = worst_abs.max(if d.is_nan() { f64::INFINITY } else { d });
            worst_rel = worst_rel.max(d / (x.abs() as f64).max(1e-30));
        }
    }
    (worst_abs, worst_rel)
}

/// The device Adam against `adam_update` on random tensors: f32, bf16 and f16 parameters of
/// awkward sizes (a chunk boundary, a single element), several steps with a learning rate
/// large enough for the bf16 Kahan path to matter. Every parameter and state value must be
/// equal bit for bit (the kernel performs the same f32 operations in the same order).
pub fn adam_checks(gpu: &CudaBackend, seed: u64) -> Vec<CheckRow> {
    let mut rows = Vec::new();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let name = format!("device adam ({}), 5 steps", dtype.name());
        let row = match adam_case(gpu, dtype, seed) {
            Ok((max_abs, rel)) => CheckRow {
                name,
                dtype,
                rel_err: rel,
                max_abs,
                tol: 0.0,
                failure: if max_abs == 0.0 {
                    String::new()
                } else {
                    format!("not bit-identical to adam_update (max |d| {max_abs:e})")
                },
            },
            Err(e) => CheckRow {
                name,
                dtype,
                rel_err: f64::INFINITY,
                max_abs: f64::INFINITY,
                tol: 0.0,
                failure: e.to_string(),
            },
        };
        rows.push(row);
    }
    rows
}

fn adam_case(gpu: &CudaBackend, dtype: DType, seed: u64) -> Result<(f64, f64), KernelError> {
    use crate::bench::random::{host_tensor, tensor_seed};
    let sizes = [CHUNK + 77, 1, 3 * CHUNK, 513];
    let types: Vec<TensorType> = sizes
        .iter()
        .map(|&n| TensorType::new(Shape::new(vec![n]), dtype))
        .collect();
    let hyper = AdamHyper::default();
    // A learning rate this large makes updates comparable to bf16's ulp, so rounding and the
    // Kahan buffer are exercised; a second, tiny one checks that sub-ulp updates accumulate.
    let lrs = [1e-2, 1e-2, 1e-5, 1e-5, 3e-3];
    let mut host_p: Vec<HostTensor> = types
        .iter()
        .enumerate()
        .map(|(i, ty)| {
            host_tensor(
                ty,
                Init::Normal { std: 1.0 },
                tensor_seed(seed, &format!("p{i}")),
            )
        })
        .collect();
    let initial = host_p.clone();
    let mut dev_p: Vec<CudaTensor> = host_p
        .iter()
        .map(|t| gpu.upload(t))
        .collect::<Result<_, _>>()?;
    let mut state: Vec<HostState> = sizes
        .iter()
        .map(|&n| {
            let low = dtype != DType::F32;
            (vec![0.0; n], vec![0.0; n], low.then(|| vec![0.0; n]))
        })
        .collect();
    let mut adam = DeviceAdam::new(gpu, hyper, &types)?;
    for (k, &lr) in lrs.iter().enumerate() {
        let grads: Vec<HostTensor> = types
            .iter()
            .enumerate()
            .map(|(i, ty)| {
                host_tensor(
                    ty,
                    Init::Normal { std: 0.1 },
                    tensor_seed(seed, &format!("g{k}.{i}")),
                )
            })
            .collect();
        let dev_g: Vec<CudaTensor> = grads
            .iter()
            .map(|t| gpu.upload(t))
            .collect::<Result<_, _>>()?;
        let mut refs: Vec<&mut CudaTensor> = dev_p.iter_mut().collect();
        let g_refs: Vec<&CudaTensor> = dev_g.iter().collect();
        let s = adam.step(gpu, lr, &mut refs, &g_refs)?;
        for ((p, g), (m, v, c)) in host_p.iter_mut().zip(&grads).zip(&mut state) {
            adam_update(
                p.as_f32_mut(),
                g.as_f32(),
                m,
                v,
                c.as_deref_mut(),
                dtype,
                &s,
            );
        }
    }
    let mut worst = (0f64, 0f64);
    let mut fold = |(a, r): (f64, f64)| {
        worst = (worst.0.max(a), worst.1.max(r));
    };
    for (i, (hp, (m, v, c))) in host_p.iter().zip(&state).enumerate() {
        fold(differences(hp.as_f32(), gpu.download(&dev_p[i])?.as_f32()));
        let (dm, dv, dc) = adam.state_host(gpu, i)?;
        fold(differences(m, &dm));
        fold(differences(v, &dv));
        if let (Some(c), Some(dc)) = (c, dc) {
            fold(differences(c, &dc));
        }
    }
    // A check that cannot fail is worthless: the parameters must actually have moved.
    if host_p
        .iter()
        .zip(&initial)
        .all(|(p, p0)| p.as_f32() == p0.as_f32())
    {
        return Err(KernelError::new("adam", "the parameters did not move"));
    }
    Ok(worst)
}
