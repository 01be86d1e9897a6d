//! Small dense linear algebra in f64 for the adapter analysis: the cyclic Jacobi eigenvalue
//! method for symmetric matrices (accurate to rounding for the r × r matrices used here,
//! r ≤ a few hundred), and the symmetric square root of a PSD matrix.

/// Eigenvalues and eigenvectors of the symmetric `n × n` matrix `a` (row-major): returns
/// `(values, vectors)` with `vectors` column-major in a row-major buffer (column `k` of the
/// matrix is eigenvector `k`).
pub fn symmetric_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(a.len(), n * n);
    let mut m = a.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m[i * n + j] * m[i * n + j])
            .sum();
        let total: f64 = m.iter().map(|x| x * x).sum();
        if off <= 1e-30 * total.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (m[p * n + p], m[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (mkp, mkq) = (m[k * n + p], m[k * n + q]);
                    m[k * n + p] = c * mkp - s * mkq;
                    m[k * n + q] = s * mkp + c * mkq;
                }
                for k in 0..n {
                    let (mpk, mqk) = (m[p * n + k], m[q * n + k]);
                    m[p * n + k] = c * mpk - s * mqk;
                    m[q * n + k] = s * mpk + c * mqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| m[i * n + i]).collect(), v)
}

/// `G^{1/2}` of a symmetric positive semi-definite `g` (negative rounding noise in its
/// eigenvalues is clamped to 0).
pub fn psd_sqrt(g: &[f64], n: usize) -> Vec<f64> {
    let (w, v) = symmetric_eigen(g, n);
    let mut out = vec![0.0; n * n];
    for k in 0..n {
        let s = w[k].max(0.0).sqrt();
        for i in 0..n {
            for j in 0..n {
                out[i * n + j] += v[i * n + k] * s * v[j * n + k];
            }
        }
    }
    out
}

/// Singular values (descending) of `W = Q diag(λ) Qᵀ` for `Q [h, r]` row-major, without
/// forming the `h × h` matrix: the nonzero eigenvalues of `W` are those of
/// `G^{1/2} Λ G^{1/2}` with `G = QᵀQ` (r × r, symmetric), and W is symmetric, so its
/// singular values are their absolute values. Exactly r values (W has rank ≤ r).
pub fn control_singular_values(q: &[f64], h: usize, lambda: &[f64]) -> Vec<f64> {
    let r = lambda.len();
    let mut g = vec![0.0; r * r];
    for row in q.chunks_exact(r).take(h) {
        for a in 0..r {
            for b in 0..r {
                g[a * r + b] += row[a] * row[b];
            }
        }
    }
    let s = psd_sqrt(&g, r);
    let mut m = vec![0.0; r * r];
    for i in 0..r {
        for j in 0..r {
            m[i * r + j] = (0..r)
                .map(|k| s[i * r + k] * lambda[k] * s[k * r + j])
                .sum();
        }
    }
    let (w, _) = symmetric_eigen(&m, r);
    let mut sv: Vec<f64> = w.iter().map(|x| x.abs()).collect();
    sv.sort_by(|a, b| b.total_cmp(a));
    sv
}
