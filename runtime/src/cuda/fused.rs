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
/// Elements per thread in the vector loop: one 16-byte load per bf16 operand (two per f32).
const VEC: usize = 8;
/// Columns per thread of the product kernel's tile (`outer_tile`: 4).
const TILE_VEC: usize = 4;
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
    if let Some(at) = steps.iter().position(|st| st.op.is_fusable_product()) {
        return execute_with_product(be, op, steps, &step_types, at, operands, out);
    }
    let inputs = operands_of(name, steps, operands, &out.ty.shape)?;
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
    // SAFETY: the generated signature is one pointer per operand in operand order (typed by
    // each operand's storage, as passed), the output pointer, and `long long n`; every
    // same-shape operand holds n elements and every broadcast one the elements its strides
    // reach (its own shape, checked by `fused_types`).
    unsafe { launch_generated(be, &func, operands, out, &nn, cfg) }
}

/// Launches a generated kernel with one pointer per operand in order, the output, and `last`.
///
/// # Safety
/// The kernel's signature must be exactly that, and the buffers must hold what it reads and
/// writes.
unsafe fn launch_generated<T: cudarc::driver::DeviceRepr>(
    be: &CudaBackend,
    func: &CudaFunction,
    operands: &[&CudaTensor],
    out: &mut CudaTensor,
    last: &T,
    cfg: LaunchConfig,
) -> Result<(), KernelError> {
    let mut b = be.stream.launch_builder(func);
    for t in operands {
        b.arg(t.data());
    }
    b.arg(out.data_mut());
    b.arg(last);
    // SAFETY: the caller's promise.
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(|e| super::cuda_err("fused", "generated kernel launch", e))
}

/// How each operand is read: `None` for one only a product step reads (whole).
fn operands_of(
    name: &'static str,
    steps: &[FusedStep],
    operands: &[&CudaTensor],
    out: &Shape,
) -> Result<Vec<Option<Operand>>, KernelError> {
    operands
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let read = steps
                .iter()
                .any(|st| !st.op.is_fusable_product() && st.args.contains(&FusedArg::Input(k)));
            if !read {
                return Ok(None);
            }
            let f = t
                .data()
                .float()
                .expect("steps_of admits float storage only");
            Ok(Some((f, broadcast_axes(name, &t.ty.shape, out)?)))
        })
        .collect()
}

/// A chain with a product step (`Op::Fused`'s doc): a small-k f32 product runs as a
/// generated kernel that computes the block's tile with skinny.cu's `outer_tile` and applies
/// the chain to the accumulators; any other product runs as its own op into a scratch
/// buffer, which the chain then reads in its place (the bits of the unfused graph either
/// way: `outer_tile` sums as `skinny_outer` does).
fn execute_with_product(
    be: &CudaBackend,
    op: &Op,
    steps: &[FusedStep],
    step_types: &[TensorType],
    at: usize,
    operands: &[&CudaTensor],
    out: &mut CudaTensor,
) -> Result<(), KernelError> {
    let name = op.name();
    let input = |a: &FusedArg| match *a {
        FusedArg::Input(k) => Ok(k),
        FusedArg::Step(_) => Err(KernelError::new(
            name,
            "a product step reads graph operands",
        )),
    };
    let (ka, kb) = (input(&steps[at].args[0])?, input(&steps[at].args[1])?);
    let product = &steps[at].op;
    let p = super::dispatch::product_shape(product, &[operands[ka], operands[kb]])
        .ok_or_else(|| KernelError::new(name, "the product step is not a product"))?;
    let f32s = matches!(
        (operands[ka].data(), operands[kb].data()),
        (super::DevData::F32(_), super::DevData::F32(_))
    );
    let tile = f32s
        && p.batch == 1
        && p.m * p.n == out.ty.shape.numel()
        && step_types[at].dtype == DType::F32
        && super::skinny::route(&p) == Some(super::skinny::Route::Outer);
    if !tile {
        let mut tmp = be.alloc_in(&step_types[at], Float::of(step_types[at].dtype))?;
        super::dispatch::execute(be, product, &[operands[ka], operands[kb]], &mut tmp)?;
        let mut rest = steps.to_vec();
        rest[at] = FusedStep {
            op: Op::Cast {
                to: step_types[at].dtype,
            },
            args: vec![FusedArg::Input(operands.len())],
        };
        let mut with_tmp = operands.to_vec();
        with_tmp.push(&tmp);
        return execute(be, op, &rest, &with_tmp, out);
    }
    let out_float = out
        .data()
        .float()
        .ok_or_else(|| KernelError::new(name, "expects a float output"))?;
    let inputs = operands_of(name, steps, operands, &out.ty.shape)?;
    let body = product_kernel_body(steps, step_types, &inputs, out_float, at, (ka, kb));
    let kname = format!("fp_{:016x}", nvrtc_cache::fnv1a(&[&body]));
    let func = be.fused.get(be, &kname, &body)?;
    let (args, cfg) = super::skinny::outer_launch(name, &p)?;
    // SAFETY: the generated signature is one pointer per operand in operand order (typed by
    // each operand's storage), the output pointer and `SkinnyArgs`; the product's operands
    // are f32 and laid out as `p` (from their shapes, checked by `fused_types`) says, the
    // output holds p.m·p.n elements, and the other operands what their strides reach.
    unsafe { launch_generated(be, &func, operands, out, &args, cfg) }
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

/// Each operand's storage kind (f32 for an operand the chain does not read).
fn storages_of(inputs: &[Option<Operand>]) -> Vec<Float> {
    inputs
        .iter()
        .map(|i| i.as_ref().map_or(Float::F32, |o| o.0))
        .collect()
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
        "{}\n{}\n{}",
        r#"// Generated by qplc (runtime/src/cuda/fused.rs).
__device__ __forceinline__ float ld_bf16(unsigned short x) { return __uint_as_float(((unsigned int)x) << 16); }
#define NEG_INF __int_as_float(0xff800000)"#,
        &KERNELS[begin..end],
        r#"// kernels.cu's bf16 `st`.
__device__ __forceinline__ unsigned short st_bf16(float x) { return bf16_rn(x); }"#
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

/// The element function `KNAME_eval`: the chain on one f32 value per operand (and, with a
/// product step at `product`, its value `p`), each step rounded to its dtype.
fn eval_fn(
    s: &mut String,
    steps: &[FusedStep],
    types: &[TensorType],
    n_inputs: usize,
    product: Option<usize>,
) {
    let mut params: Vec<String> = (0..n_inputs).map(|k| format!("float x{k}")).collect();
    if product.is_some() {
        params.insert(0, "float p".into());
    }
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
            _ if product == Some(i) => "p".to_string(),
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
}

/// `KNAME_off{k}`: offsets of broadcast operands, literal dims and strides, innermost first.
fn offset_fns(s: &mut String, inputs: &[Option<Operand>]) {
    for (k, input) in inputs.iter().enumerate() {
        let Some((_, Some(axes))) = input else {
            continue;
        };
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
}

/// The kernel's parameters: one pointer per operand, then the output.
fn signature(inputs: &[Option<Operand>], storages: &[Float], out: Float) -> Vec<String> {
    let mut sig: Vec<String> = inputs
        .iter()
        .zip(storages)
        .enumerate()
        .map(|(k, (_, f))| format!("const {}* __restrict__ in{k}", storage_type(*f)))
        .collect();
    sig.push(format!("{}* __restrict__ out", storage_type(out)));
    sig
}

/// Where a vector epilogue finds a same-shape operand's `width` elements.
#[derive(Clone, Copy)]
enum Same {
    /// Vector `v` of the operand (of `width` elements).
    Load,
    /// `pw{k}[u]`, loaded ahead (the product kernel).
    Prefetched,
}

/// Loads of `a{k}[0..width]` for the elements `i0 + 0..width` (`width` 4 or 8).
fn vector_loads(s: &mut String, inputs: &[Option<Operand>], pad: &str, width: usize, same: Same) {
    for (k, input) in inputs.iter().enumerate() {
        let Some((f, axes)) = input else { continue };
        let _ = writeln!(s, "{pad}float a{k}[{width}];");
        match (axes, f, same) {
            (Some(_), ..) => {
                for j in 0..width {
                    let e = load(*f, &format!("in{k}[KNAME_off{k}(i0 + {j})]"));
                    let _ = writeln!(s, "{pad}a{k}[{j}] = {e};");
                }
            }
            (None, Float::F32, _) => {
                for h in 0..width / 4 {
                    let src = match same {
                        Same::Load => format!("((const float4*)in{k})[{} * v + {h}]", width / 4),
                        Same::Prefetched => format!("pw{k}[u]"),
                    };
                    let _ = writeln!(
                        s,
                        "{pad}{{ float4 w = {src}; a{k}[{}] = w.x; a{k}[{}] = w.y; a{k}[{}] = w.z; a{k}[{}] = w.w; }}",
                        4 * h,
                        4 * h + 1,
                        4 * h + 2,
                        4 * h + 3
                    );
                }
            }
            (None, Float::BF16, _) => {
                // Two bf16 a 32-bit word.
                let ty = if width == 8 { "uint4" } else { "uint2" };
                let src = match same {
                    Same::Load => format!("((const {ty}*)in{k})[v]"),
                    Same::Prefetched => format!("pw{k}[u]"),
                };
                let _ = write!(s, "{pad}{{ {ty} w = {src}; ");
                for (q, word) in ["x", "y", "z", "w"].iter().take(width / 2).enumerate() {
                    let _ = write!(
                        s,
                        "a{k}[{}] = __uint_as_float(w.{word} << 16); a{k}[{}] = __uint_as_float(w.{word} & 0xffff0000u); ",
                        2 * q,
                        2 * q + 1
                    );
                }
                let _ = writeln!(s, "}}");
            }
        }
    }
}

/// The arguments of `KNAME_eval` for element `j` of the loaded vectors (operands a product
/// alone reads pass 0, unused).
fn vector_args(inputs: &[Option<Operand>], j: &str) -> Vec<String> {
    inputs
        .iter()
        .enumerate()
        .map(|(k, input)| match input {
            Some(_) => format!("a{k}[{j}]"),
            None => "0.0f".into(),
        })
        .collect()
}

/// The arguments of `KNAME_eval` read at element index `i`.
fn scalar_args(inputs: &[Option<Operand>], i: &str) -> Vec<String> {
    inputs
        .iter()
        .enumerate()
        .map(|(k, input)| match input {
            Some((f, Some(_))) => load(*f, &format!("in{k}[KNAME_off{k}({i})]")),
            Some((f, None)) => load(*f, &format!("in{k}[{i}]")),
            None => "0.0f".into(),
        })
        .collect()
}

/// The store of `r[0..width]` as vector `v` (of `width` elements) of the output; `width` 4
/// or 8.
fn vector_store(out: Float, width: usize) -> String {
    let pair = |a: usize| {
        format!(
            "(unsigned int)st_bf16(r[{a}]) | ((unsigned int)st_bf16(r[{}]) << 16)",
            a + 1
        )
    };
    match (out, width) {
        (Float::F32, _) => (0..width / 4)
            .map(|h| {
                format!(
                    "((float4*)out)[{} * v + {h}] = make_float4(r[{}], r[{}], r[{}], r[{}]);",
                    width / 4,
                    4 * h,
                    4 * h + 1,
                    4 * h + 2,
                    4 * h + 3
                )
            })
            .collect::<Vec<_>>()
            .join(" "),
        (Float::BF16, 4) => format!(
            "uint2 w; w.x = {}; w.y = {}; ((uint2*)out)[v] = w;",
            pair(0),
            pair(2)
        ),
        (Float::BF16, _) => format!(
            "uint4 w; w.x = {}; w.y = {}; w.z = {}; w.w = {}; ((uint4*)out)[v] = w;",
            pair(0),
            pair(2),
            pair(4),
            pair(6)
        ),
    }
}

fn scalar_store(out: Float) -> &'static str {
    match out {
        Float::F32 => "r",
        Float::BF16 => "st_bf16(r)",
    }
}

/// The kernel source with `KNAME` for its name: an element function with the chain, a
/// vector loop of `VEC` elements per thread, and a scalar loop for the tail. Every operand
/// is read elementwise here (`Some`).
fn kernel_body(
    steps: &[FusedStep],
    types: &[TensorType],
    inputs: &[Option<Operand>],
    out: Float,
) -> String {
    let mut s = String::new();
    eval_fn(&mut s, steps, types, inputs.len(), None);
    offset_fns(&mut s, inputs);
    let storages = storages_of(inputs);
    let mut sig = signature(inputs, &storages, out);
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
    vector_loads(&mut s, inputs, "        ", VEC, Same::Load);
    let _ = writeln!(s, "        float r[{VEC}];");
    let _ = writeln!(
        s,
        "        #pragma unroll\n        for (int j = 0; j < {VEC}; ++j) r[j] = KNAME_eval({});",
        vector_args(inputs, "j").join(", ")
    );
    let _ = writeln!(s, "        {}", vector_store(out, VEC));
    let _ = writeln!(s, "    }}");
    // Tail: the last n % VEC elements, one per thread.
    let _ = writeln!(
        s,
        "    for (long long i = nv * {VEC} + tid; i < n; i += nth) {{"
    );
    let _ = writeln!(
        s,
        "        float r = KNAME_eval({});\n        out[i] = {};\n    }}\n}}",
        scalar_args(inputs, "i").join(", "),
        scalar_store(out)
    );
    s
}

/// A chain whose step `at` is the small-k product of operands `ka`·`kb` (f32, laid out as the
/// `SkinnyArgs` argument says): each block computes its 64 × 64 tile with skinny.cu's
/// `outer_tile`, then the chain on each accumulator with the other operands read at the
/// element's index (four columns a thread: vector loads and stores where the row allows).
fn product_kernel_body(
    steps: &[FusedStep],
    types: &[TensorType],
    inputs: &[Option<Operand>],
    out: Float,
    at: usize,
    (ka, kb): (usize, usize),
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}", super::skinny::outer_tile_source());
    eval_fn(&mut s, steps, types, inputs.len(), Some(at));
    offset_fns(&mut s, inputs);
    let storages = storages_of(inputs);
    let mut sig = signature(inputs, &storages, out);
    sig.push("const SkinnyArgs s".into());
    let with = |args: Vec<String>, acc: &str| {
        let mut a = vec![acc.to_string()];
        a.extend(args);
        a.join(", ")
    };
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__(OK_THREADS, 5) KNAME({}) {{",
        sig.join(", ")
    );
    let _ = writeln!(
        s,
        "    const int t = threadIdx.x;
    const int tx = t & 15, ty = t >> 4;
    const i64 i0r = (i64)blockIdx.y * OK_BM, j0 = (i64)blockIdx.x * OK_BN;
    const i64 n = s.n;
    const i64 j = j0 + tx * 4;
    const bool vec = n % {TILE_VEC} == 0 && j + {TILE_VEC} <= n;"
    );
    // The same-shape operands of the vector epilogue are loaded before the product, so
    // their latency hides behind its arithmetic (a block's tile is a few µs of work).
    let same: Vec<(usize, Float)> = inputs
        .iter()
        .enumerate()
        .filter_map(|(k, i)| match i {
            Some((f, None)) => Some((k, *f)),
            _ => None,
        })
        .collect();
    for &(k, f) in &same {
        let (ty, zero) = match f {
            Float::BF16 => ("uint2", "make_uint2(0u, 0u)"),
            Float::F32 => ("float4", "make_float4(0.f, 0.f, 0.f, 0.f)"),
        };
        let _ = writeln!(s, "    {ty} pw{k}[8];");
        let _ = writeln!(
            s,
            "    #pragma unroll\n    for (int u = 0; u < 8; ++u) {{\n        \
             const i64 i = i0r + (u < 4 ? ty * 4 + u : 32 + ty * 4 + (u - 4));\n        \
             pw{k}[u] = vec && i < s.m ? ((const {ty}*)in{k})[(i * n + j) / {TILE_VEC}] : {zero};\n    }}"
        );
    }
    let _ = writeln!(
        s,
        "    float acc[8][4];
    outer_tile(in{ka}, in{kb}, s, i0r, j0, acc);
    #pragma unroll
    for (int u = 0; u < 8; ++u) {{
        const i64 i = i0r + (u < 4 ? ty * 4 + u : 32 + ty * 4 + (u - 4));
        if (i >= s.m) continue;
        if (vec) {{
            const long long i0 = i * n + j;
            const long long v = i0 / {TILE_VEC};"
    );
    vector_loads(&mut s, inputs, "            ", TILE_VEC, Same::Prefetched);
    let _ = writeln!(s, "            float r[{TILE_VEC}];");
    let _ = writeln!(
        s,
        "            #pragma unroll\n            for (int jj = 0; jj < {TILE_VEC}; ++jj) r[jj] = KNAME_eval({});",
        with(vector_args(inputs, "jj"), "acc[u][jj]")
    );
    let _ = writeln!(s, "            {}", vector_store(out, TILE_VEC));
    let _ = writeln!(
        s,
        "        }} else {{
            #pragma unroll
            for (int jj = 0; jj < {TILE_VEC}; ++jj) {{
                // No `break`: a loop left early is not unrolled, and `acc` indexed by a
                // run-time value would move to local memory.
                if (j + jj < n) {{
                    const long long e = i * n + j + jj;
                    float r = KNAME_eval({});
                    out[e] = {};
                }}
            }}
        }}
    }}
}}",
        with(scalar_args(inputs, "e"), "acc[u][jj]"),
        scalar_store(out)
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
        let inputs = vec![
            Some((Float::F32, None)),
            Some((Float::BF16, None)),
            Some((Float::BF16, w)),
        ];
        kernel_body(&steps, &types, &inputs, Float::BF16)
    }

    #[test]
    fn generated_source_has_the_chain_and_exact_constants() {
        let body = lora_body();
        if std::env::var_os("QPLC_SHOW_SOURCE").is_some() {
            eprintln!("{body}");
        }
        assert!(body.contains("float s0 = round_bf16(x0);"), "{body}");
        assert!(body.contains("binary_fn(0, x1, s0)"), "{body}");
        // 0.5 as its bit pattern, not a decimal that could round differently.
        assert!(body.contains("__int_as_float(0x3f000000)"), "{body}");
        // Only the last axis of the [10] operand is read: no division beyond it.
        assert!(body.contains("o += (i % 10LL) * 1LL;"), "{body}");
        assert!(!body.contains("% 6LL"), "{body}");
    }

    /// `base + bf16(h·Bᵀ)` with the product as step 0, as source.
    fn product_body() -> String {
        let steps = vec![
            step(Op::Linear, vec![FusedArg::Input(0), FusedArg::Input(1)]),
            step(Op::Cast { to: DType::BF16 }, vec![FusedArg::Step(0)]),
            step(
                Op::Binary(BinaryOp::Add),
                vec![FusedArg::Input(2), FusedArg::Step(1)],
            ),
        ];
        let types = vec![
            TensorType::new(vec![6, 10], DType::F32),
            TensorType::new(vec![6, 10], DType::BF16),
            TensorType::new(vec![6, 10], DType::BF16),
        ];
        let inputs = vec![None, None, Some((Float::BF16, None))];
        product_kernel_body(&steps, &types, &inputs, Float::BF16, 0, (0, 1))
    }

    #[test]
    fn a_product_step_is_the_tile_then_the_chain_on_its_accumulators() {
        let body = product_body();
        if std::env::var_os("QPLC_SHOW_SOURCE").is_some() {
            eprintln!("{body}");
        }
        assert!(
            body.contains("outer_tile(in0, in1, s, i0r, j0, acc);"),
            "{body}"
        );
        assert!(body.contains("float s0 = p;"), "{body}");
        assert!(
            body.contains("KNAME_eval(acc[u][jj], 0.0f, 0.0f, a2[jj])"),
            "{body}"
        );
        let src = format!("{}\n{}", prelude(), body.replace("KNAME", "fp_test"));
        match nvrtc_cache::compile(&src, "sm_90", "test kernel") {
            Ok(ptx) => assert!(ptx.to_src().contains(".entry fp_test")),
            Err(e) if e.to_string().contains("could not be loaded") => {
                eprintln!("skipped: {e}")
            }
            Err(e) => panic!("{e}"),
        }
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
