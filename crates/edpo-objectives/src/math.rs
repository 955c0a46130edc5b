//! Numerically stable scalar functions used by the objectives.

/// `log σ(x)`, stable for large |x|.
pub fn log_sigmoid(x: f64) -> f64 {
    -softplus(-x)
}

/// `log(1 + eˣ)`, stable for large |x|.
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// The logistic function `σ(x) = 1 / (1 + e⁻ˣ)`, stable for large |x|.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log(1 − eˣ)` for `x < 0`, accurate near 0 and for large |x| (Mächler, 2012): `log(−expm1(x))`
/// above `−ln 2`, `ln_1p(−eˣ)` below.
pub fn log1m_exp(x: f64) -> f64 {
    if x > -std::f64::consts::LN_2 {
        (-x.exp_m1()).ln()
    } else {
        (-x.exp()).ln_1p()
    }
}

/// Arithmetic mean (0 for an empty slice).
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Population standard deviation (0 for fewer than two values).
pub fn std(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64).sqrt()
}

/// Sample standard deviation, dividing by `N − 1` (PyTorch's default `std`); 0 for fewer
/// than two values, where it is undefined.
pub fn sample_std(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_at_extremes() {
        assert_eq!(log_sigmoid(1000.0), 0.0);
        assert_eq!(log_sigmoid(-1000.0), -1000.0);
        assert!((log_sigmoid(0.0) + std::f64::consts::LN_2).abs() < 1e-15);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
    }

    #[test]
    fn log1m_exp_is_accurate_near_zero_and_far_from_it() {
        // float(mp.log(1 - mp.exp(mp.mpf(x)))) with mpmath at 40 digits
        for (x, expected) in [
            (-1e-12, -27.631021115929048),
            (-1e-3, -6.908255237315471),
            (-0.3, -1.3502256128148467),
            (-0.7, -0.6863410028083851),
            (-2.5, -0.08565048374203818),
            (-30.0, -9.357622968840613e-14),
        ] {
            let got = log1m_exp(x);
            assert!(
                (got - expected).abs() <= 1e-15 * expected.abs(),
                "{x}: {got}"
            );
        }
    }

    #[test]
    fn sample_std_divides_by_n_minus_one() {
        // torch.tensor([1., 2., 4.], dtype=torch.float64).std() = 1.5275252316519468
        assert!((sample_std(&[1.0, 2.0, 4.0]) - 1.5275252316519468).abs() < 1e-15);
        assert_eq!(sample_std(&[3.0]), 0.0);
    }
}
