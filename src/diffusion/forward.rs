//! The forward (noising) process of a DDPM and the conversions between what a network may predict.
//!
//! [DDPM] Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239.
//! [DSM] Vincent 2011, "A Connection Between Score Matching and Denoising Autoencoders", Neural Computation 23(7).
//! [v-pred] Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", arXiv:2202.00512.
//! Notation (code -> paper): x0 -> x₀, x_t -> x_t, eps -> ε (or ε̂ = ε_θ(x_t, t) when predicted),
//! alpha_bar -> ᾱ_t, sched.betas[t] -> β_t, x0_hat -> x̂₀, score -> ∇_{x_t} log q(x_t).
//! Timesteps are array indices into the schedule (see `schedule.rs`): t = 0 is the first noising step.
//! Tensors are batch-first, f32 in the library (the functions are kind-agnostic); per-sample ᾱ are (B,) and
//! broadcast over the other dimensions with [`append_dims`].
use crate::diffusion::append_dims;
use crate::diffusion::schedule::NoiseSchedule;
use tch::Tensor;

/// A per-sample value (B,) reshaped to (B, 1, ...) to broadcast against `like`; anything else (a 0-dim scalar, an
/// already broadcastable shape) is used as it is.
fn per_sample(v: &Tensor, like: &Tensor) -> Tensor {
    if v.dim() == 1 && like.dim() > 1 {
        append_dims(v, like)
    } else {
        v.shallow_clone()
    }
}

/// Draws x_t ~ q(x_t | x₀) in one shot, [DDPM] eq. 4:  x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε.
/// `sched_alpha_bar` is the (T,) table of ᾱ ([`NoiseSchedule::to_tensor_alpha_bar`]), `t` the (B,) i64 indices,
/// `x0` and `eps` (B, ...).
// ANCHOR: q_sample
pub fn q_sample(sched_alpha_bar: &Tensor, x0: &Tensor, t: &Tensor, eps: &Tensor) -> Tensor {
    let alpha_bar = sched_alpha_bar.index_select(0, &t.to_device(sched_alpha_bar.device())).to_device(x0.device());
    // (B, 1, ...)
    let a = append_dims(&alpha_bar, x0);
    // [DDPM] eq. 4
    a.sqrt() * x0 + (1f64 - &a).sqrt() * eps
}
// ANCHOR_END: q_sample

/// x̂₀ from a noise prediction: eq. 4 solved for x₀ ([DDPM] eq. 15, sec. 4.3; the x̂₀ inside eq. 11):
///     x̂₀ = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t.
/// `alpha_bar` is (B,) or already broadcastable against `x_t`.
pub fn predict_x0_from_eps(alpha_bar: &Tensor, x_t: &Tensor, eps: &Tensor) -> Tensor {
    let a = per_sample(alpha_bar, x_t);
    (x_t - (1f64 - &a).sqrt() * eps) / a.sqrt()
}

/// The noise that takes x₀ to x_t, eq. 4 solved for ε:  ε = (x_t − √ᾱ_t x₀)/√(1 − ᾱ_t).
pub fn eps_from_x0(alpha_bar: &Tensor, x_t: &Tensor, x0: &Tensor) -> Tensor {
    let a = per_sample(alpha_bar, x_t);
    (x_t - a.sqrt() * x0) / (1f64 - &a).sqrt()
}

/// [v-pred] sec. 4's prediction target: v = √ᾱ_t ε − √(1 − ᾱ_t) x₀.
pub fn v_from_eps(alpha_bar: &Tensor, x0: &Tensor, eps: &Tensor) -> Tensor {
    let a = per_sample(alpha_bar, x0);
    a.sqrt() * eps - (1f64 - &a).sqrt() * x0
}

/// The noise from a v and x_t: with eq. 4 and the v above, ε = √ᾱ_t v + √(1 − ᾱ_t) x_t exactly.
pub fn eps_from_v(alpha_bar: &Tensor, x_t: &Tensor, v: &Tensor) -> Tensor {
    let a = per_sample(alpha_bar, x_t);
    a.sqrt() * v + (1f64 - &a).sqrt() * x_t
}

/// The score of the noised data from a noise prediction: ∇_{x_t} log q(x_t) = −ε̂/√(1 − ᾱ_t).
/// For one x₀ it is exact: ∇ log N(x_t; √ᾱ_t x₀, (1 − ᾱ_t) I) = −(x_t − √ᾱ_t x₀)/(1 − ᾱ_t) = −ε/√(1 − ᾱ_t); for a
/// trained ε̂ = E[ε | x_t] it is the marginal score ([DSM], lesson 01). This is lesson 01's ε̂ = −σ · score with
/// the variance-preserving noise level σ = √(1 − ᾱ_t).
pub fn score_from_eps(alpha_bar: &Tensor, eps: &Tensor) -> Tensor {
    let a = per_sample(alpha_bar, eps);
    -(eps / (1f64 - &a).sqrt())
}

/// The mean of the forward-process posterior q(x_{t−1} | x_t, x₀), [DDPM] eq. 7:
///     μ̃_t(x_t, x₀) = √ᾱ_{t−1} β_t/(1 − ᾱ_t) · x₀ + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) · x_t,
/// with ᾱ_{−1} = 1, so μ̃_0 = x₀. Its variance is β̃_t ([`NoiseSchedule::posterior_variance`]).
/// `t` indexes `sched` (one timestep for the whole batch).
// ANCHOR: posterior_mean
pub fn posterior_mean(sched: &NoiseSchedule, t: usize, x_t: &Tensor, x0: &Tensor) -> Tensor {
    let (a, a_prev, beta) = (sched.alpha_bar(t), sched.alpha_bar_prev(t), sched.betas[t]);
    // [DDPM] eq. 7
    let coef_x0 = a_prev.sqrt() * beta / (1.0 - a);
    let coef_xt = (1.0 - beta).sqrt() * (1.0 - a_prev) / (1.0 - a);
    x0 * coef_x0 + x_t * coef_xt
}
// ANCHOR_END: posterior_mean

/// Gaussian noise-conditioning augmentation of a cascade's low-resolution input ([CDM] Ho et al. 2021,
/// arXiv:2106.15282, sec. 4.2; [Imagen] sec. 2.5): the image z₀ a super-resolution stage is conditioned on is noised
/// by the forward process to an augmentation level s, z_s = √ᾱ_s z₀ + √(1 − ᾱ_s) ε ([DDPM] eq. 4), with s = 0 the
/// clean image and s ≥ 1 the schedule's timestep s − 1 (so levels run 0..=T). `levels` (B,) i64, `z0` and `eps`
/// (B, ...).
// ANCHOR: augment
pub fn augment(sched_alpha_bar: &Tensor, z0: &Tensor, levels: &Tensor, eps: &Tensor) -> Tensor {
    let clean = Tensor::ones([1], (sched_alpha_bar.kind(), sched_alpha_bar.device())); // ᾱ = 1 at level 0
    let table = Tensor::cat(&[&clean, sched_alpha_bar], 0); // (T + 1,): level s reads ᾱ_{s−1}
    let alpha_bar = table.index_select(0, &levels.to_device(table.device())).to_device(z0.device()); // (B,)
    let a = append_dims(&alpha_bar, z0); // (B, 1, ...)
    a.sqrt() * z0 + (1f64 - &a).sqrt() * eps // [DDPM] eq. 4 at level s
}
// ANCHOR_END: augment

/// The standard deviation σ_s = √(1 − ᾱ_s) of the noise [`augment`] adds at `levels` (B,) i64: 0 at level 0.
pub fn augment_sigma(sched_alpha_bar: &Tensor, levels: &Tensor) -> Tensor {
    let clean = Tensor::ones([1], (sched_alpha_bar.kind(), sched_alpha_bar.device()));
    let table = Tensor::cat(&[&clean, sched_alpha_bar], 0); // (T + 1,)
    (1f64 - table.index_select(0, &levels.to_device(table.device()))).sqrt() // (B,)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [CDM] sec. 4.2: level 0 leaves the low-resolution image as it is; level s draws from q(z_s | z₀), mean √ᾱ_{s−1} z₀
    /// and variance 1 − ᾱ_{s−1}.
    #[test]
    fn augmentation_is_the_forward_process_at_its_level_and_level_zero_is_the_identity() {
        tch::manual_seed(0);
        let sched = NoiseSchedule::ddpm(1000);
        let table = sched.to_tensor_alpha_bar(tch::Device::Cpu);
        let z0 = Tensor::full([20000, 4], 0.7, tch::kind::FLOAT_CPU);
        let eps = Tensor::randn([20000, 4], tch::kind::FLOAT_CPU);
        let zero = Tensor::zeros([20000], tch::kind::INT64_CPU);
        assert!(augment(&table, &z0, &zero, &eps).equal(&z0), "level 0 is the clean input, bit for bit");
        let sigma = augment_sigma(&table, &Tensor::from_slice(&[0i64, 600]));
        assert_eq!(sigma.double_value(&[0]), 0.0);
        assert!((sigma.double_value(&[1]) - (1.0 - sched.alpha_bar(599)).sqrt()).abs() < 1e-6);
        for level in [1i64, 250, 600] {
            let z = augment(&table, &z0, &Tensor::full([20000], level, tch::kind::INT64_CPU), &eps);
            let a = sched.alpha_bar(level as usize - 1);
            let (mean, var) = (z.mean(tch::Kind::Double).double_value(&[]), z.var(true).double_value(&[]));
            assert!((mean - a.sqrt() * 0.7).abs() < 0.01, "level {level}: mean {mean}");
            assert!((var - (1.0 - a)).abs() < 0.02 * (1.0 - a) + 1e-6, "level {level}: variance {var} vs {}", 1.0 - a);
        }
    }
    use tch::{Device, Kind};

    const N_MC: i64 = 200_000;

    fn mean_var(x: &Tensor) -> (f64, f64) {
        (x.mean(Kind::Double).double_value(&[]), x.to_kind(Kind::Double).var(true).double_value(&[]))
    }

    /// Asserts a Monte-Carlo mean and variance of `n` Gaussian samples match (m, v) within 5 standard errors:
    /// SE(mean) = √(v/n), SE(variance) = v √(2/n).
    fn assert_moments(what: &str, (m_hat, v_hat): (f64, f64), (m, v): (f64, f64), n: i64) {
        let n = n as f64;
        assert!((m_hat - m).abs() < 5.0 * (v / n).sqrt(), "{what}: mean {m_hat} vs {m}");
        assert!((v_hat - v).abs() < 5.0 * v * (2.0 / n).sqrt(), "{what}: variance {v_hat} vs {v}");
    }

    /// (a) q(x_t | x₀) = N(√ᾱ_t x₀, 1 − ᾱ_t) is what T one-step transitions x_t = √(1 − β_t) x_{t−1} + √β_t ε
    /// ([DDPM] eq. 2) produce, and what `q_sample` draws.
    #[test]
    fn closed_form_q_matches_iterating_the_one_step_process() {
        tch::manual_seed(11);
        let sched = NoiseSchedule::ddpm(1000);
        let ab = sched.to_tensor_alpha_bar(Device::Cpu);
        let x0_value = 1.5;
        let x0 = Tensor::full([N_MC], x0_value, (Kind::Float, Device::Cpu));
        let mut x = x0.shallow_clone();
        for (t, &beta) in sched.betas.iter().enumerate() {
            x = &x * (1.0 - beta).sqrt() + x.randn_like() * beta.sqrt(); // [DDPM] eq. 2
            if [0, 9, 99, 499, 999].contains(&t) {
                let a = sched.alpha_bar(t);
                let want = (a.sqrt() * x0_value, 1.0 - a);
                assert_moments(&format!("iterated, t={t}"), mean_var(&x), want, N_MC);
                let t_batch = Tensor::full([N_MC], t as i64, (Kind::Int64, Device::Cpu));
                let direct = q_sample(&ab, &x0, &t_batch, &x0.randn_like());
                assert_moments(&format!("q_sample, t={t}"), mean_var(&direct), want, N_MC);
            }
        }
    }

    #[test]
    fn q_sample_gathers_per_sample_alpha_bar_and_broadcasts() {
        let sched = NoiseSchedule::cosine(100);
        let ab = sched.to_tensor_alpha_bar(Device::Cpu);
        let ts = [0i64, 5, 50, 99];
        let x0 = Tensor::ones([4, 3, 2], (Kind::Float, Device::Cpu)); // (B, C, D)
        let x_t = q_sample(&ab, &x0, &Tensor::from_slice(&ts), &x0.zeros_like());
        assert_eq!(x_t.size(), vec![4, 3, 2]);
        for (b, &t) in ts.iter().enumerate() {
            let row = x_t.get(b as i64);
            let want = sched.alpha_bar(t as usize).sqrt();
            assert!((row - want).abs().max().double_value(&[]) < 1e-6, "sample {b}, t={t}");
        }
    }

    /// (b) ε ↔ x̂₀ ↔ score are exact inverses of eq. 4. In f64 to 1e-9 at every t; in f32 to 1e-5 where the
    /// conversions are well conditioned (dividing by √ᾱ_t near t = T or by √(1 − ᾱ_t) near t = 0 amplifies f32
    /// rounding by up to 1/√ᾱ_{999} ≈ 160 or 1/√(1 − ᾱ_0) = 100).
    #[test]
    fn eps_x0_and_score_round_trip() {
        tch::manual_seed(12);
        let sched = NoiseSchedule::ddpm(1000);
        for (kind, ts, tol) in
            [(Kind::Double, &[0usize, 1, 10, 100, 500, 900, 999][..], 1e-9), (Kind::Float, &[50, 200, 500], 1e-5)]
        {
            for &t in ts {
                let x0 = Tensor::randn([64, 2, 3], (kind, Device::Cpu));
                let eps = x0.randn_like();
                let ab = Tensor::full([64], sched.alpha_bar(t), (kind, Device::Cpu));
                let ab_table = Tensor::from_slice(&sched.alphas_cumprod).to_kind(kind);
                let x_t = q_sample(&ab_table, &x0, &Tensor::full([64], t as i64, (Kind::Int64, Device::Cpu)), &eps);
                let max_err = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
                assert!(max_err(&predict_x0_from_eps(&ab, &x_t, &eps), &x0) < tol, "x̂₀, t={t}, {kind:?}");
                assert!(max_err(&eps_from_x0(&ab, &x_t, &x0), &eps) < tol, "ε, t={t}, {kind:?}");
                // score ↔ ε: ε = −√(1 − ᾱ) · score
                let score = score_from_eps(&ab, &eps);
                assert!(max_err(&(&score * -(1.0 - sched.alpha_bar(t)).sqrt()), &eps) < tol, "score, t={t}");
                // in lesson 01's variance-exploding units x̃ = x_t/√ᾱ = x₀ + σ_t ε, whose score is −ε/σ_t; the
                // chain rule gives ∇_{x_t} = ∇_{x̃}/√ᾱ
                let ve_score = -(&eps / sched.sigma(t)) / sched.alpha_bar(t).sqrt();
                assert!(max_err(&score, &ve_score) < tol * (1.0 + sched.sigma(t)), "VE score, t={t}");
            }
        }
    }

    /// The score is the gradient of log N(x_t; √ᾱ x₀, (1 − ᾱ) I) — checked by autograd, sign included.
    #[test]
    fn score_from_eps_is_the_gradient_of_the_log_density() {
        tch::manual_seed(13);
        let a = 0.3f64;
        let x0 = Tensor::randn([8, 2], (Kind::Double, Device::Cpu));
        let x_t = Tensor::randn([8, 2], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let log_q = -(&x_t - &x0 * a.sqrt()).square().sum(Kind::Double) / (2.0 * (1.0 - a));
        let grad = Tensor::run_backward(&[log_q], &[&x_t], false, false).pop().unwrap();
        let ab = Tensor::full([8], a, (Kind::Double, Device::Cpu));
        let eps = eps_from_x0(&ab, &x_t.detach(), &x0);
        assert!((score_from_eps(&ab, &eps) - grad).abs().max().double_value(&[]) < 1e-12);
    }

    /// (c, formulas) μ̃'s coefficients written out from eq. 7, and the two identities of Gaussian conditioning that
    /// any correct (μ̃, β̃) satisfies, at every t of every schedule: averaging μ̃ over x_t ~ q(x_t | x₀) gives back
    /// E[x_{t−1} | x₀] = √ᾱ_{t−1} x₀, and (law of total variance) 1 − ᾱ_{t−1} = coef_xt² (1 − ᾱ_t) + β̃_t.
    #[test]
    fn posterior_mean_and_variance_follow_eq_7() {
        for sched in [NoiseSchedule::ddpm(1000), NoiseSchedule::cosine(1000), NoiseSchedule::scaled_linear(1000)] {
            for t in 0..1000 {
                let one = Tensor::from(1.0f64);
                let zero = Tensor::from(0.0f64);
                let coef_x0 = posterior_mean(&sched, t, &zero, &one).double_value(&[]);
                let coef_xt = posterior_mean(&sched, t, &one, &zero).double_value(&[]);
                let (a, a_prev, beta) =
                    (sched.alpha_bar(t), if t == 0 { 1.0 } else { sched.alpha_bar(t - 1) }, sched.betas[t]);
                assert!((coef_x0 - a_prev.sqrt() * beta / (1.0 - a)).abs() < 1e-12);
                assert!((coef_xt - (1.0 - beta).sqrt() * (1.0 - a_prev) / (1.0 - a)).abs() < 1e-12);
                assert!((coef_x0 + coef_xt * a.sqrt() - a_prev.sqrt()).abs() < 1e-9, "{:?} t={t}", sched.kind);
                let total = coef_xt * coef_xt * (1.0 - a) + sched.posterior_variance(t);
                assert!((total - (1.0 - a_prev)).abs() < 1e-9, "{:?} t={t}", sched.kind);
            }
        }
    }

    /// (c, Monte Carlo) For a fixed x₀ draw x_{t−1} ~ q(x_{t−1} | x₀), then x_t ~ q(x_t | x_{t−1}). The pair is
    /// jointly Gaussian, so the least-squares line of x_{t−1} on x_t is E[x_{t−1} | x_t, x₀] = μ̃_t and the
    /// residual variance is Var[x_{t−1} | x_t, x₀] = β̃_t. Tolerances: 5 standard errors of each estimate.
    #[test]
    fn posterior_matches_a_monte_carlo_regression() {
        tch::manual_seed(14);
        let sched = NoiseSchedule::ddpm(1000);
        let x0_value = 1.5;
        let n = N_MC as f64;
        for t in [1usize, 10, 100, 500, 999] {
            let (a_prev, beta) = (sched.alpha_bar(t - 1), sched.betas[t]);
            let opts = (Kind::Double, Device::Cpu);
            let x_prev = Tensor::randn([N_MC], opts) * (1.0 - a_prev).sqrt() + a_prev.sqrt() * x0_value;
            let x_t = &x_prev * (1.0 - beta).sqrt() + Tensor::randn([N_MC], opts) * beta.sqrt(); // eq. 2
            let (m_t, v_t) = mean_var(&x_t);
            let m_prev = x_prev.mean(Kind::Double).double_value(&[]);
            let cov = ((&x_t - m_t) * (&x_prev - m_prev)).mean(Kind::Double).double_value(&[]);
            let slope = cov / v_t;
            let intercept = m_prev - slope * m_t;
            let resid_var = (&x_prev - &x_t * slope - intercept).var(true).double_value(&[]);
            let beta_tilde = sched.posterior_variance(t);
            assert!(
                (resid_var / beta_tilde - 1.0).abs() < 5.0 * (2.0 / n).sqrt(),
                "t={t}: {resid_var} vs {beta_tilde}"
            );
            // the fitted line against μ̃ at x̄_t and x̄_t ± 2 sd: SE² of the line = β̃ (1/n + (x − x̄)²/(n v_t))
            let probes = [m_t - 2.0 * v_t.sqrt(), m_t, m_t + 2.0 * v_t.sqrt()];
            let mu = posterior_mean(&sched, t, &Tensor::from_slice(&probes), &Tensor::from(x0_value));
            for (k, &x) in probes.iter().enumerate() {
                let se = (beta_tilde * (1.0 / n + (x - m_t).powi(2) / (n * v_t))).sqrt();
                let (fit, want) = (intercept + slope * x, mu.double_value(&[k as i64]));
                assert!((fit - want).abs() < 5.0 * se, "t={t}, x_t={x}: regression {fit} vs μ̃ {want}");
            }
        }
    }
}
