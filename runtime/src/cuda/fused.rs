//! Generated elementwise kernels: every `Op::Fused` chain (and every single elementwise op,
//! as a one-step chain) runs as a kernel written for it — operand storage kinds, broadcast
//! index arithmetic and op codes are constants of the source — compiled by NVRTC the first
//! time it is seen (and kept in the on-disk cache, `nvrtc_cache.rs`).
//!
//! Why generated: the generic kernels of kernels.cu read one 2-byte element per thread and
//! pass shapes at run time; they reached a third of the H200's bandwidth. These read four
//! elements per thread with one 8-byte (bf16) or 16-byte (f32) load per same-shape operand,
//! and a fused chain reads each operand once and writes one result instead of a buffer per op.
//!
//! Exactness: each step calls the element functions of kernels.cu (`unary_fn`,
//! `binary_partial`, … copied from between its FUSED_PRELUDE marks) with the same operands in
//! the same order, then rounds to the step's dtype (`round_bf16` / `round_f16`) as the
//! unfused op's store would; the result is stored with kernels.cu's `st`. A fused chain
//! therefore gives the same bits as its ops run one by one, on the GPU as on the CPU.
use super::launch::MAX_RANK;
use super::{nvrtc_cache, CudaBackend, CudaTensor, Float};
use crate::backend::KernelError;
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use qplc_ops::{BinaryOp, DType, FusedArg, FusedStep, Op, Shape, TensorType, UnaryOp};
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;

const KERNELS: &str = include_str!("kernels.cu");
/// Elements per thread in the vector loop.
const VEC: usize = 4;
const THREADS: u32 = 256;
const MAX_BLOCKS: usize = 1 << 16;

/// An operand's storage kind and, when broadcast, its (dim, stride) per output axis from
/// the innermost (`broadcast_axes`).
type Operand = (Float, Option<Vec<(usize, usize)>>);

/// Compiled kernels by name (the name is a hash of the source).
#[derive(Default)]
pub(crate) struct FusedKernels {
    funcs: Mutex<HashMap<String, CudaFunction>>,
}

/// The steps to generate for `op`, if it runs through this module: a fused chain, or one
/// elementwise op over float storage as a chain of one step.
pub(crate) fn steps_of(op: &Op, operands: &[&CudaTensor]) -> Option<Vec<FusedStep>> {
    if operands.iter().any(|t| t.data().float().is_none()) {
        return None;
    }
    match op {
        Op::Fused { steps } => Some(steps.clone()),
        op if op.is_fusable() && !operands.is_empty() => Some(vec![FusedStep {
            op: op.clone(),
            args: (0..operands.len()).map(FusedArg::Input).collect(),
        }]),
        _ => None,
    }
}

/// Runs `steps` (checked by `Op::fused_types` through `op`) over `operands` into `out`.
pub(crate) fn execute(
    be: &CudaBackend,
    op: &Op,
    steps: &[FusedStep],
    operands: &[&CudaTensor],
    out: &mut CudaTensor,
) -> Result<(), KernelError> {
    let name = op.name();
    let types: Vec<TensorType> = operands.iter().map(|t| t.ty.clone()).collect();
    let chain = Op::Fused {
        steps: steps.to_vec(),
    };
    let step_types = chain
        .fused_types(steps, &types)
        .map_err(|e| KernelError::new(name, e.to_string()))?;
    let n = out.ty.shape.numel();
    if n == 0 {
        return Ok(());
    }
    let out_float = out
        .data()
        .float()
        .ok_or_else(|| KernelError::new(name, "expects a float output"))?;
    let inputs: Vec<Operand> = operands
        .iter()
        .map(|t| {
            let f = t
                .data()
                .float()
                .expect("steps_of admits float storage only");
            Ok((f, broadcast_axes(name, &t.ty.shape, &out.ty.shape)?))
        })
        .collect::<Result<_, KernelError>>()?;
    let body = kernel_body(steps, &step_types, &inputs, out_float);
    let kname = format!("fz_{:016x}", nvrtc_cache::fnv1a(&[&body]));
    let func = be.fused.get(be, &kname, &body)?;
    let nn = n as i64;
    let vectors = n / VEC;
    let blocks = vectors
        .max(n % VEC)
        .div_ceil(THREADS as usize)
        .clamp(1, MAX_BLOCKS) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = be.stream.launch_builder(&func);
    for t in operands {
        b.arg(t.data());
    }
    b.arg(out.data_mut());
    b.arg(&nn);
    // SAFETY: the generated signature is one pointer per operand in operand order (typed by
    // each operand's storage, as passed), the output pointer, and `long long n`; every
    // same-shape operand holds n elements and every broadcast one the elements its strides
    // reach (its own shape, checked by `fused_types`).
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(|e| super::cuda_err("fused", "kernel launch", e))
}

impl FusedKernels {
    fn get(&self, be: &CudaBackend, name: &str, body: &str) -> Result<CudaFunction, KernelError> {
        let mut funcs = self.funcs.lock().expect("fused kernel cache poisoned");
        if let Some(f) = funcs.get(name) {
            return Ok(f.clone());
        }
        let src = format!("{}\n{}", prelude(), body.replace("KNAME", name));
        let ptx = nvrtc_cache::compile(&src, be.arch, &format!("fused kernel {name}"))?;
        let module = be
            .ctx
            .load_module(ptx)
            .map_err(|e| super::cuda_err("fused", &format!("loading {name}"), e))?;
        let f = module
            .load_function(name)
            .map_err(|e| super::cuda_err("fused", &format!("kernel `{name}`"), e))?;
        funcs.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// How many distinct kernels have been compiled (or loaded from the disk cache).
    pub(crate) fn len(&self) -> usize {
        self.funcs.lock().map(|f| f.len()).unwrap_or(0)
    }
}

/// kernels.cu's element functions, and loads/stores of both storage kinds.
fn prelude() -> String {
    let begin = KERNELS
        .find("// FUSED_PRELUDE_BEGIN")
        .expect("kernels.cu has the FUSED_PRELUDE_BEGIN mark");
    let end = KERNELS
        .find("// FUSED_PRELUDE_END")
        .expect("kernels.cu has the FUSED_PRELUDE_END mark");
    format!(
        "{}\n{}",
        r#"// Generated by qplc (runtime/src/cuda/fused.rs).
__device__ __forceinline__ float ld_bf16(unsigned short x) { return __uint_as_float(((unsigned int)x) << 16); }
// kernels.cu's bf16 `st`: round to nearest even; NaN stays a quiet NaN.
__device__ __forceinline__ unsigned short st_bf16(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
#define NEG_INF __int_as_float(0xff800000)"#,
        &KERNELS[begin..end]
    )
}

/// For an operand of `shape` read at the output's index: `None` when it has the output's
/// shape, else the (dim, stride) of each output axis from the last, stride 0 on broadcast
/// axes (NumPy rules, right-aligned).
fn broadcast_axes(
    op: &'static str,
    shape: &Shape,
    out: &Shape,
) -> Result<Option<Vec<(usize, usize)>>, KernelError> {
    if shape == out {
        return Ok(None);
    }
    let rank = out.rank();
    if rank > MAX_RANK || shape.rank() > rank {
        return Err(KernelError::new(
            op,
            format!("cannot broadcast {shape} to {out} in a generated kernel"),
        ));
    }
    let own = shape.strides();
    let pad = rank - shape.rank();
    Ok(Some(
        (0..rank)
            .rev()
            .map(|i| {
                let stride = if i < pad || shape.dims()[i - pad] == 1 {
                    0
                } else {
                    own[i - pad]
                };
                (out.dims()[i], stride)
            })
            .collect(),
    ))
}

fn unary_code(u: UnaryOp) -> i32 {
    super::dispatch::unary_code(u)
}

fn binary_code(b: BinaryOp) -> i32 {
    super::dispatch::binary_code(b)
}

/// An exact f32 literal.
fn lit(v: f64) -> String {
    format!("__int_as_float({:#010x})", (v as f32).to_bits())
}

fn storage_type(f: Float) -> &'static str {
    match f {
        Float::F32 => "float",
        Float::BF16 => "unsigned short",
    }
}

fn load(f: Float, expr: &str) -> String {
    match f {
        Float::F32 => expr.to_string(),
        Float::BF16 => format!("ld_bf16({expr})"),
    }
}

/// The kernel source with `KNAME` for its name: an element function with the chain, a
/// vector loop of `VEC` elements per thread, and a scalar loop for the tail.
fn kernel_body(
    steps: &[FusedStep],
    types: &[TensorType],
    inputs: &[Operand],
    out: Float,
) -> String {
    let mut s = String::new();
    let params: Vec<String> = (0..inputs.len()).map(|k| format!("float x{k}")).collect();
    // The chain: one f32 value per step, rounded to the step's dtype.
    let _ = writeln!(
        s,
        "__device__ __forceinline__ float KNAME_eval({}) {{",
        params.join(", ")
    );
    for (i, (st, ty)) in steps.iter().zip(types).enumerate() {
        let a: Vec<String> = st
            .args
            .iter()
            .map(|a| match *a {
                FusedArg::Input(k) => format!("x{k}"),
                FusedArg::Step(j) => format!("s{j}"),
            })
            .collect();
        let e = match &st.op {
            Op::Unary(u) => format!("unary_fn({}, {})", unary_code(*u), a[0]),
            Op::Binary(b) => format!("binary_fn({}, {}, {})", binary_code(*b), a[0], a[1]),
            Op::Scale { factor } => format!("{} * {}", a[0], lit(*factor)),
            Op::AddScalar { value } => format!("{} + {}", a[0], lit(*value)),
            Op::Softcap { cap } => {
                let c = lit(*cap);
                format!("{c} * tanhf({} / {c})", a[0])
            }
            Op::Cast { .. } => a[0].clone(),
            Op::UnaryBackward(u) => format!("{} * unary_deriv({}, {})", a[1], unary_code(*u), a[0]),
            Op::BinaryBackward { op, wrt } => format!(
                "binary_partial({}, {wrt}, {}, {}) * {}",
                binary_code(*op),
                a[0],
                a[1],
                a[2]
            ),
            other => unreachable!("fused_types admits only fusable ops, got {}", other.name()),
        };
        let e = match ty.dtype {
            DType::BF16 => format!("round_bf16({e})"),
            DType::F16 => format!("round_f16({e})"),
            _ => e,
        };
        let _ = writeln!(s, "    float s{i} = {e};");
    }
    let _ = writeln!(s, "    return s{};\n}}", steps.len() - 1);
    // Offsets of broadcast operands: literal dims and strides, innermost axis first.
    for (k, (_, axes)) in inputs.iter().enumerate() {
        let Some(axes) = axes else { continue };
        let _ = writeln!(
            s,
            "__device__ __forceinline__ long long KNAME_off{k}(long long i) {{"
        );
        let _ = writeln!(s, "    long long o = 0;");
        let last = axes.iter().rposition(|&(_, st)| st != 0);
        for (ax, &(dim, stride)) in axes.iter().enumerate() {
            if last.is_none_or(|l| ax > l) {
                break;
            }
            if stride != 0 {
                let _ = writeln!(s, "    o += (i % {dim}LL) * {stride}LL;");
            }
            let _ = writeln!(s, "    i /= {dim}LL;");
        }
        let _ = writeln!(s, "    return o;\n}}");
    }
    let mut sig: Vec<String> = inputs
        .iter()
        .enumerate()
        .map(|(k, (f, _))| format!("const {}* __restrict__ in{k}", storage_type(*f)))
        .collect();
    sig.push(format!("{}* __restrict__ out", storage_type(out)));
    sig.push("long long n".into());
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void KNAME({}) {{",
        sig.join(", ")
    );
    let _ = writeln!(
        s,
        "    long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n    \
         long long nth = (long long)blockDim.x * gridDim.x;\n    long long nv = n / {VEC};"
    );
    let _ = writeln!(s, "    for (long long v = tid; v < nv; v += nth) {{");
    let _ = writeln!(s, "        long long i0 = v * {VEC};");
    for (k, (f, axes)) in inputs.iter().enumerate() {
        let _ = writeln!(s, "        float a{k}[{VEC}];");
        match (axes, f) {
            (Some(_), _) => {
                for j in 0..VEC {
                    let e = load(*f, &format!("in{k}[KNAME_off{k}(i0 + {j})]"));
                    let _ = writeln!(s, "        a{k}[{j}] = {e};");
                }
            }
            (None, Float::F32) => {
                let _ = writeln!(
                    s,
                    "        {{ float4 w = ((const float4*)in{k})[v]; a{k}[0] = w.x; a{k}[1] = w.y; a{k}[2] = w.z; a{k}[3] = w.w; }}"
                );
            }
            (None, Float::BF16) => {
                let _ = writeln!(
                    s,
                    "        {{ uint2 w = ((const uint2*)in{k})[v]; \
                     a{k}[0] = __uint_as_float(w.x << 16); a{k}[1] = __uint_as_float(w.x & 0xffff0000u); \
                     a{k}[2] = __uint_as_float(w.y << 16); a{k}[3] = __uint_as_float(w.y & 0xffff0000u); }}"
                );
            }
        }
    }
    let args = |j: &str| -> String {
        (0..inputs.len())
            .map(|k| format!("a{k}[{j}]"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(s, "        float r[{VEC}];");
    let _ = writeln!(
        s,
        "        #pragma unroll\n        for (int j = 0; j < {VEC}; ++j) r[j] = KNAME_eval({});",
        args("j")
    );
    match out {
        Float::F32 => {
            let _ = writeln!(
                s,
                "        ((float4*)out)[v] = make_float4(r[0], r[1], r[2], r[3]);"
            );
        }
        Float::BF16 => {
            let _ = writeln!(
                s,
                "        uint2 w; w.x = (unsigned int)st_bf16(r[0]) | ((unsigned int)st_bf16(r[1]) << 16); \
                 w.y = (unsigned int)st_bf16(r[2]) | ((unsigned int)st_bf16(r[3]) << 16); ((uint2*)out)[v] = w;"
            );
        }
    }
    let _ = writeln!(s, "    }}");
    // Tail: the last n % VEC elements, one per thread.
    let _ = writeln!(
        s,
        "    for (long long i = nv * {VEC} + tid; i < n; i += nth) {{"
    );
    let scalar: Vec<String> = inputs
        .iter()
        .enumerate()
        .map(|(k, (f, axes))| match axes {
            Some(_) => load(*f, &format!("in{k}[KNAME_off{k}(i)]")),
            None => load(*f, &format!("in{k}[i]")),
        })
        .collect();
    let store = match out {
        Float::F32 => "r",
        Float::BF16 => "st_bf16(r)",
    };
    let _ = writeln!(
        s,
        "        float r = KNAME_eval({});\n        out[i] = {store};\n    }}\n}}",
        scalar.join(", ")
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(op: Op, args: Vec<FusedArg>) -> FusedStep {
        FusedStep { op, args }
    }

    /// The LoRA output `base + bf16(lora)` with a broadcast bias-like operand, as source.
    fn lora_body() -> String {
        let steps = vec![
            step(Op::Cast { to: DType::BF16 }, vec![FusedArg::Input(0)]),
            step(
                Op::Binary(BinaryOp::Add),
                vec![FusedArg::Input(1), FusedArg::Step(0)],
            ),
            step(
                Op::Binary(BinaryOp::Mul),
                vec![FusedArg::Step(1), FusedArg::Input(2)],
            ),
            step(Op::Scale { factor: 0.5 }, vec![FusedArg::Step(2)]),
        ];
        let ty = |d| TensorType::new(vec![6, 10], d);
        let types = vec![
            ty(DType::BF16),
            ty(DType::BF16),
            ty(DType::BF16),
            ty(DType::BF16),
        ];
        let w = broadcast_axes("t", &Shape(vec![10]), &Shape(vec![6, 10])).unwrap();
        assert_eq!(w, Some(vec![(10, 1), (6, 0)]));
        let inputs = vec![(Float::F32, None), (Float::BF16, None), (Float::BF16, w)];
        kernel_body(&steps, &types, &inputs, Float::BF16)
    }

    #[test]
    fn generated_source_has_the_chain_and_exact_constants() {
        let body = lora_body();
        assert!(body.contains("float s0 = round_bf16(x0);"), "{body}");
        assert!(body.contains("binary_fn(0, x1, s0)"), "{body}");
        // 0.5 as its bit pattern, not a decimal that could round differently.
        assert!(body.contains("__int_as_float(0x3f000000)"), "{body}");
        // Only the last axis of the [10] operand is read: no division beyond it.
        assert!(body.contains("o += (i % 10LL) * 1LL;"), "{body}");
        assert!(!body.contains("% 6LL"), "{body}");
    }

    #[test]
    fn generated_kernels_compile_with_nvrtc() {
        let src = format!("{}\n{}", prelude(), lora_body().replace("KNAME", "fz_test"));
        match nvrtc_cache::compile(&src, "sm_90", "test kernel") {
            Ok(ptx) => assert!(ptx.to_src().contains(".entry fz_test")),
            Err(e) if e.to_string().contains("could not be loaded") => {
                eprintln!("skipped: {e}")
            }
            Err(e) => panic!("{e}"),
        }
    }
}
