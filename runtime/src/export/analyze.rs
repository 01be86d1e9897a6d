//! `qplc analyze ADAPTER_DIR` (spec §11.4, check 55): per Control Adapter layer, for
//! `W = Q diag(expm1 S) Qᵀ` — the orthogonality error ‖QᵀQ − I‖²_F, ‖W‖_F, the spectral norm
//! ‖W‖₂, the nuclear norm ‖W‖_*, the effective rank `‖W‖_*² / ‖W‖_F²`, the condition number
//! σ_max/σ_min over the top r singular values (∞ if σ_min ≤ 1e-10), and how well the cheap
//! estimates `max|λ|` (of ‖W‖₂) and `Σ|λ|` (of ‖W‖_*) do, as signed relative errors
//! `(approx − true)/true` — both exact when Q is orthonormal. Then mean [min, max] summaries.
use super::linalg::control_singular_values;
use crate::ca_files::ControlAdapter;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerAnalysis {
    pub layer: usize,
    pub orthogonality: f64,
    pub frobenius: f64,
    pub spectral: f64,
    pub nuclear: f64,
    pub effective_rank: f64,
    /// `None` when σ_min ≤ 1e-10 (infinite).
    pub condition: Option<f64>,
    pub max_abs_lambda: f64,
    pub sum_abs_lambda: f64,
    pub spectral_error: f64,
    pub nuclear_error: f64,
}

/// `(approx − true)/true`, 0 when both are 0.
fn rel_err(approx: f64, truth: f64) -> f64 {
    if truth == 0.0 {
        if approx == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (approx - truth) / truth
    }
}

/// The analysis of one layer from `Q [h, r]` (row-major) and `S [r]`.
pub fn analyze_layer(layer: usize, q: &[f32], h: usize, s: &[f32]) -> LayerAnalysis {
    let r = s.len();
    let q: Vec<f64> = q.iter().map(|&x| x as f64).collect();
    let lambda: Vec<f64> = s.iter().map(|&x| (x as f64).exp_m1()).collect();
    let mut orth = 0.0;
    for a in 0..r {
        for b in 0..r {
            let g: f64 = (0..h).map(|i| q[i * r + a] * q[i * r + b]).sum();
            let e = g - if a == b { 1.0 } else { 0.0 };
            orth += e * e;
        }
    }
    let sv = control_singular_values(&q, h, &lambda);
    let frob = sv.iter().map(|x| x * x).sum::<f64>().sqrt();
    let spectral = sv.first().copied().unwrap_or(0.0);
    let nuclear: f64 = sv.iter().sum();
    let smin = sv.last().copied().unwrap_or(0.0);
    let max_abs = lambda.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let sum_abs: f64 = lambda.iter().map(|x| x.abs()).sum();
    LayerAnalysis {
        layer,
        orthogonality: orth,
        frobenius: frob,
        spectral,
        nuclear,
        effective_rank: if frob > 0.0 {
            nuclear * nuclear / (frob * frob)
        } else {
            0.0
        },
        condition: (smin > 1e-10).then(|| spectral / smin),
        max_abs_lambda: max_abs,
        sum_abs_lambda: sum_abs,
        spectral_error: rel_err(max_abs, spectral),
        nuclear_error: rel_err(sum_abs, nuclear),
    }
}

pub fn analyze(ca: &ControlAdapter) -> Vec<LayerAnalysis> {
    ca.layers
        .iter()
        .map(|(&l, x)| {
            let h = x.q.shape().dims()[0];
            analyze_layer(l, x.q.as_f32(), h, x.s.as_f32())
        })
        .collect()
}

fn fmt_cond(c: Option<f64>) -> String {
    c.map_or("inf".to_string(), |c| format!("{c:.3}"))
}

/// The table of [`analyze`] with the mean [min, max] summary and the guidance of §11.4.
pub fn render_table(rows: &[LayerAnalysis], rank: usize) -> String {
    let mut s = format!(
        "{:>5} {:>10} {:>10} {:>10} {:>10} {:>7} {:>10} {:>9} {:>9}\n",
        "layer", "orth", "|W|_F", "|W|_2", "|W|_*", "erank", "cond", "err_2", "err_*"
    );
    for r in rows {
        s += &format!(
            "{:>5} {:>10.3e} {:>10.4} {:>10.4} {:>10.4} {:>7.3} {:>10} {:>+8.2}% {:>+8.2}%\n",
            r.layer,
            r.orthogonality,
            r.frobenius,
            r.spectral,
            r.nuclear,
            r.effective_rank,
            fmt_cond(r.condition),
            100.0 * r.spectral_error,
            100.0 * r.nuclear_error
        );
    }
    if rows.is_empty() {
        return s;
    }
    let summary = |name: &str, f: &dyn Fn(&LayerAnalysis) -> f64| {
        let v: Vec<f64> = rows.iter().map(f).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{name:<14} {mean:.4e} [{min:.4e}, {max:.4e}]\n")
    };
    s += &format!(
        "\nsummary over {} layers (rank {rank}): mean [min, max]\n",
        rows.len()
    );
    s += &summary("orthogonality", &|r| r.orthogonality);
    s += &summary("|W|_F", &|r| r.frobenius);
    s += &summary("|W|_2", &|r| r.spectral);
    s += &summary("|W|_*", &|r| r.nuclear);
    s += &summary("erank", &|r| r.effective_rank);
    s += &summary("cond", &|r| r.condition.unwrap_or(f64::INFINITY));
    s += &summary("err_2", &|r| r.spectral_error);
    s += &summary("err_*", &|r| r.nuclear_error);
    s += "guidance: orthogonality < 1 (excellent < 0.5), erank close to r, errors < 5 %, cond < 100\n";
    s
}
