//! The compile report: what `qplc compile` prints before any GPU is touched — model size,
//! FLOPs, and the weight and activation memory each stage is predicted to need (DESIGN
//! "The flow": `qplc run` must come within a few percent of these figures).
use crate::memory::live_peak;
use crate::schedule::{executor_live_ranges, ScheduleError};
use qplc_compiler::dump::format_count;
use qplc_compiler::{CompileReport, Graph, Partition, StagePlan, StageReport};
use qplc_ops::DType;
use std::fmt::Write;

/// Summarises a partitioned, scheduled graph. `seq_len` is the static sequence length the
/// graph was built for.
pub fn build_report(
    graph: &Graph,
    partition: &Partition,
    stages: &[StagePlan],
    seq_len: usize,
    offloaded: &std::collections::BTreeSet<qplc_compiler::NodeId>,
) -> Result<CompileReport, ScheduleError> {
    let stage_reports: Vec<StageReport> = stages
        .iter()
        .map(|s| {
            let peak_live_bytes = live_peak(&executor_live_ranges(graph, partition, s.stage)?);
            let (grad_bytes, optimizer_bytes) = training_state_bytes(graph, s);
            let offloaded_bytes = offloaded
                .iter()
                .filter(|&&id| partition.stage_of(id) == Some(s.stage))
                .map(|&id| graph.node(id).ty.bytes() as u64)
                .sum();
            Ok(StageReport {
                stage: s.stage,
                layers: s.layers,
                layer_names: layer_names(partition, s.layers),
                params: s.params,
                trainable_params: s.trainable_params,
                weight_bytes: s.weight_bytes,
                activation_bytes: s.arena_bytes,
                flops: s.flops,
                peak_live_bytes,
                grad_bytes,
                optimizer_bytes,
                device_bytes: s.weight_bytes + grad_bytes + optimizer_bytes + peak_live_bytes,
                offloaded_bytes,
            })
        })
        .collect::<Result<_, ScheduleError>>()?;
    let mut notes = partition.notes.clone();
    if !offloaded.is_empty() {
        notes.push(format!(
            "activation_offload: {} layer inputs ({}) planned in host memory; the runtime does \
             not copy them yet, so the device figures still hold them",
            offloaded.len(),
            format_bytes(stage_reports.iter().map(|s| s.offloaded_bytes).sum())
        ));
    }
    if stages.iter().any(|s| s.layers.0 == s.layers.1) {
        notes.push(
            "some stages hold no layers (more pipeline stages than pipeline layers)".to_string(),
        );
    }
    Ok(CompileReport {
        seq_len,
        total_params: graph.param_count(),
        trainable_params: graph.trainable_param_count(),
        flops: graph.flops(),
        partition_method: partition.method.clone(),
        total_weight_bytes: stage_reports.iter().map(|s| s.weight_bytes).sum(),
        total_activation_bytes: stage_reports.iter().map(|s| s.activation_bytes).sum(),
        total_device_bytes: stage_reports.iter().map(|s| s.device_bytes).sum(),
        stages: stage_reports,
        notes,
    })
}

/// Bytes of the trainable weights' gradient buffers and of their Adam state on a stage:
/// gradients and m, v in the parameter dtype (spec §3.4: no mixed-precision wrapper), plus
/// a Kahan compensation buffer for bf16/f16 parameters (runtime/src/train/adam.rs).
fn training_state_bytes(graph: &Graph, stage: &StagePlan) -> (u64, u64) {
    let mut grads = 0u64;
    let mut state = 0u64;
    for &w in &stage.weights {
        let n = graph.node(w);
        if !n.trainable {
            continue;
        }
        let b = n.ty.bytes() as u64;
        grads += b;
        let kahan = matches!(n.ty.dtype, DType::BF16 | DType::F16);
        state += b * if kahan { 3 } else { 2 };
    }
    (grads, state)
}

/// `PrepareInputs … DecoderLayer 7` for a layer range; `(none)` when empty.
fn layer_names(partition: &Partition, (start, end): (usize, usize)) -> String {
    let e = &partition.layers.entries;
    match end.saturating_sub(start) {
        0 => "(none)".to_string(),
        1 => e[start].label(),
        _ => format!("{} … {}", e[start].label(), e[end - 1].label()),
    }
}

/// Bytes in binary units: `512 B`, `1.50 KiB`, `3.25 MiB`, `12.0 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (scale, unit) in UNITS {
        if bytes >= scale {
            let v = bytes as f64 / scale as f64;
            return if v >= 100.0 {
                format!("{v:.0} {unit}")
            } else if v >= 10.0 {
                format!("{v:.1} {unit}")
            } else {
                format!("{v:.2} {unit}")
            };
        }
    }
    format!("{bytes} B")
}

/// `134,515,008`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The report as a table for the console.
pub fn render_text(r: &CompileReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "parameters: {} ({}) total, {} ({}) trainable",
        format_count(r.total_params),
        thousands(r.total_params),
        format_count(r.trainable_params),
        thousands(r.trainable_params)
    );
    let _ = writeln!(
        out,
        "FLOPs of one {} at sequence_len {}: {}",
        if r.trainable_params > 0 {
            "micro-batch (forward + backward)"
        } else {
            "forward"
        },
        r.seq_len,
        format_count(r.flops)
    );
    let _ = writeln!(
        out,
        "partition: {} over {} stage{}",
        r.partition_method,
        r.stages.len(),
        if r.stages.len() == 1 { "" } else { "s" }
    );
    let rows: Vec<[String; 7]> = r
        .stages
        .iter()
        .map(|s| {
            [
                s.stage.to_string(),
                format!("{}..{} {}", s.layers.0, s.layers.1, s.layer_names),
                format_count(s.params),
                format_count(s.trainable_params),
                format_bytes(s.weight_bytes),
                format_bytes(s.activation_bytes),
                format_count(s.flops),
            ]
        })
        .chain(std::iter::once([
            "total".to_string(),
            String::new(),
            String::new(),
            String::new(),
            format_bytes(r.total_weight_bytes),
            format_bytes(r.total_activation_bytes),
            format_count(r.stages.iter().map(|s| s.flops).sum()),
        ]))
        .collect();
    let header = [
        "stage",
        "layers",
        "params",
        "trainable",
        "weights",
        "activations",
        "FLOPs",
    ];
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            let pad = w - c.chars().count();
            // Text columns left-aligned, figures right-aligned.
            if i <= 1 {
                l.push_str(c);
                l.push_str(&" ".repeat(pad));
            } else {
                l.push_str(&" ".repeat(pad));
                l.push_str(c);
            }
            l.push_str("  ");
        }
        l.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
    let _ = writeln!(
        out,
        "predicted memory: {} weights + {} activations = {}",
        format_bytes(r.total_weight_bytes),
        format_bytes(r.total_activation_bytes),
        format_bytes(r.total_weight_bytes + r.total_activation_bytes)
    );
    let sum = |f: fn(&qplc_compiler::StageReport) -> u64| r.stages.iter().map(f).sum::<u64>();
    let _ = writeln!(
        out,
        "predicted device peak: {} weights + {} grads + {} Adam state + {} live activations = {}",
        format_bytes(r.total_weight_bytes),
        format_bytes(sum(|s| s.grad_bytes)),
        format_bytes(sum(|s| s.optimizer_bytes)),
        format_bytes(sum(|s| s.peak_live_bytes)),
        format_bytes(r.total_device_bytes)
    );
    for n in &r.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}

/// The report as JSON (the same fields as in `plan.json`).
pub fn render_json(r: &CompileReport) -> serde_json::Value {
    serde_json::to_value(r).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_use_binary_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.50 KiB");
        assert_eq!(format_bytes(3 << 20), "3.00 MiB");
        assert_eq!(format_bytes(12 << 30), "12.0 GiB");
        assert_eq!(format_bytes(300 << 30), "300 GiB");
        assert_eq!(thousands(134_515_008), "134,515,008");
        assert_eq!(thousands(999), "999");
    }
}
