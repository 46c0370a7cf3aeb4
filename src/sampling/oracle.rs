//! Analytic oracles: data whose ideal denoiser, probability-flow trajectories and noised densities are known in
//! closed form, for testing samplers without training anything, and the solver order study built on them.
//!
//! [EDM] Karras, Aittala, Aila, Laine 2022, arXiv:2206.00364: eq. 3 (D minimises the denoising loss, so the ideal
//! D(x; σ) = E[x₀ | x]) and eq. 4 (the PF-ODE dx/dσ = (x − D(x; σ))/σ); sec. 3 (ρ = 3 nearly equalises the
//! truncation error of every step).
//! Notation (code -> math): mu -> μ, std -> s (per dimension), sigma -> σ, weights/means/stds -> π_k, μ_k, s_k.
//!
//! For x₀ ~ N(μ, diag(s²)) and x = x₀ + σ ε, (x₀, x) are jointly Gaussian, so
//!     D(x; σ) = E[x₀ | x] = μ + s²/(s² + σ²) (x − μ),      p_σ = N(μ, diag(s² + σ²)).
//! The PF-ODE is then linear: d(x − μ)/dσ = (x − μ) σ/(s² + σ²), solved by
//!     x(σ₁) − μ = (x(σ₀) − μ) √((s² + σ₁²)/(s² + σ₀²)).
//! For an isotropic Gaussian mixture each component contributes its own posterior mean, weighted by its posterior
//! probability w_k(x) ∝ π_k N(x; μ_k, (s_k² + σ²) I).
use crate::data::toy2d::GaussianMixture;
use crate::diffusion::schedule::NoiseSchedule;
use crate::model::Denoiser;
use crate::model::EpsModel;
use crate::sampling::ddim::sample_ddim;
use crate::sampling::dpm_solver::{
    sample_dpm_solver_1, sample_dpm_solver_2, sample_dpm_solver_3, sample_dpm_solver_pp_2m,
};
use crate::sampling::grids::karras_sigmas;
use crate::sampling::karras::{sample_euler, sample_heun};
use crate::sampling::{randn_like, SamplerStep};
use std::f64::consts::PI;
use tch::{Device, Kind, Tensor};

/// Data N(μ, diag(s²)) in D dimensions; batches are (B, D). Parameters are f64; the denoiser follows x's kind.
pub struct GaussianOracle {
    pub mu: Tensor,
    pub std: Tensor,
}

impl GaussianOracle {
    pub fn isotropic(mu: &[f64], s: f64) -> Self {
        Self::diagonal(mu, &vec![s; mu.len()])
    }

    pub fn diagonal(mu: &[f64], std: &[f64]) -> Self {
        assert_eq!(mu.len(), std.len(), "one standard deviation per dimension");
        Self { mu: Tensor::from_slice(mu), std: Tensor::from_slice(std) }
    }

    /// μ and s² as (1, D) of `x`'s kind and device.
    fn params_like(&self, x: &Tensor) -> (Tensor, Tensor) {
        let opts = (x.kind(), x.device());
        (
            self.mu.to_kind(opts.0).to_device(opts.1).unsqueeze(0),
            self.std.square().to_kind(opts.0).to_device(opts.1).unsqueeze(0),
        )
    }

    /// The exact PF-ODE solution from x at σ₀ to σ₁: μ + (x − μ) √((s² + σ₁²)/(s² + σ₀²)).
    pub fn ode_endpoint(&self, x: &Tensor, sigma_from: f64, sigma_to: f64) -> Tensor {
        let (mu, s2) = self.params_like(x);
        &mu + (x - &mu) * ((&s2 + sigma_to * sigma_to) / (&s2 + sigma_from * sigma_from)).sqrt()
    }

    /// log p_σ(x) = log N(x; μ, diag(s² + σ²)): (B, D) -> (B,).
    pub fn log_density(&self, x: &Tensor, sigma: f64) -> Tensor {
        let (mu, s2) = self.params_like(x);
        let var = s2 + sigma * sigma; // (1, D)
        let quad = (x - mu).square() / &var; // (B, D)
        (quad + (var * (2.0 * PI)).log()).sum_dim_intlist(-1, false, x.kind()) * -0.5
    }

    /// Γ(σ) = E‖ε̂‖²/D with ε̂ = (x − D(x; σ))/σ = (x − μ)σ/(s² + σ²):  mean over dimensions of σ²/(s² + σ²).
    pub fn eps_sq_mean(&self, sigma: f64) -> f64 {
        let s2 = self.std.square();
        (s2.ones_like() * (sigma * sigma) / (s2 + sigma * sigma)).mean(Kind::Double).double_value(&[])
    }

    /// n samples of p_σ (x₀ + σ ε), (n, D) f64, from libtorch's generator.
    pub fn sample_noised(&self, n: i64, sigma: f64) -> Tensor {
        let var = self.std.square() + sigma * sigma;
        self.mu.unsqueeze(0) + Tensor::randn([n, self.mu.size()[0]], (Kind::Double, Device::Cpu)) * var.sqrt()
    }

    /// n samples of the data.
    pub fn sample(&self, n: i64) -> Tensor {
        self.sample_noised(n, 0.0)
    }
}

// ANCHOR: gaussian_denoiser
impl Denoiser for GaussianOracle {
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Tensor {
        let (mu, s2) = self.params_like(x);
        let sigma2 = sigma.to_kind(x.kind()).square().unsqueeze(1); // (B, 1)
        &mu + (x - &mu) * (&s2 / (&s2 + sigma2))
    }
}
// ANCHOR_END: gaussian_denoiser

/// An isotropic Gaussian mixture Σ_k π_k N(μ_k, s_k² I) in D dimensions; batches are (B, D).
pub struct MixtureOracle {
    pub log_weights: Tensor,
    pub means: Tensor,
    pub vars: Tensor,
}

impl MixtureOracle {
    /// Weights are normalised; `means` is K rows of D.
    pub fn new(weights: &[f64], means: &[Vec<f64>], stds: &[f64]) -> Self {
        assert!(weights.len() == means.len() && means.len() == stds.len() && !weights.is_empty());
        let total: f64 = weights.iter().sum();
        let flat: Vec<f64> = means.iter().flatten().copied().collect();
        Self {
            log_weights: (Tensor::from_slice(weights) / total).log(),
            means: Tensor::from_slice(&flat).view([means.len() as i64, -1]), // (K, D)
            vars: Tensor::from_slice(stds).square(),
        }
    }

    /// Lesson 01–02's 2-D mixtures.
    pub fn from_toy2d(p: &GaussianMixture) -> Self {
        let means: Vec<Vec<f64>> = p.means.iter().map(|m| m.to_vec()).collect();
        Self::new(&p.weights, &means, &p.stds)
    }

    /// log π_k + log N(x; μ_k, (s_k² + σ²) I): (B, K), with μ_k − x: (B, K, D) and s_k² + σ²: (B, K).
    fn logits(&self, x: &Tensor, sigma2: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (kind, device) = (x.kind(), x.device());
        let means = self.means.to_kind(kind).to_device(device);
        let var = self.vars.to_kind(kind).to_device(device).unsqueeze(0) + sigma2.unsqueeze(1); // (B, K)
        let diff = means.unsqueeze(0) - x.unsqueeze(1); // (B, K, D)
        let dim = x.size()[1] as f64;
        let sq = diff.square().sum_dim_intlist(-1, false, kind); // (B, K)
        let log_n = -(sq / (&var * 2.0)) - (&var * (2.0 * PI)).log() * (dim / 2.0);
        (log_n + self.log_weights.to_kind(kind).to_device(device).unsqueeze(0), diff, var)
    }

    /// log p_σ(x) of the mixture noised at σ: (B, D) -> (B,).
    pub fn log_density(&self, x: &Tensor, sigma: f64) -> Tensor {
        let sigma2 = Tensor::full([x.size()[0]], sigma * sigma, (x.kind(), x.device()));
        self.logits(x, &sigma2).0.logsumexp(-1, false)
    }

    /// n samples of p_σ, (n, D) f64.
    pub fn sample_noised(&self, n: i64, sigma: f64) -> Tensor {
        let k = self.log_weights.exp().multinomial(n, true); // (n,)
        let std = (self.vars.index_select(0, &k) + sigma * sigma).sqrt().unsqueeze(1); // (n, 1)
        let mu = self.means.index_select(0, &k); // (n, D)
        &mu + mu.randn_like() * std
    }
}

impl Denoiser for MixtureOracle {
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Tensor {
        let sigma2 = sigma.to_kind(x.kind()).square();
        let (logits, diff, var) = self.logits(x, &sigma2);
        // (B, K): the posterior probability of each component
        let w = logits.softmax(-1, x.kind());
        // each component's E[x₀ | x, k] = x + s_k²/(s_k² + σ²)(μ_k − x)
        let s2 = self.vars.to_kind(x.kind()).to_device(x.device()).unsqueeze(0); // (1, K)
        let shrink = (s2 / var).unsqueeze(-1); // (B, K, 1)
        let post_mean = x.unsqueeze(1) + (1f64 - shrink) * diff; // (B, K, D)
        (w.unsqueeze(-1) * post_mean).sum_dim_intlist(1, false, x.kind()) // (B, D)
    }
}

/// The reverse adapter, for tests: a σ-space denoiser as a discrete-time VP ε-model on `sched`'s timesteps,
/// ε̂(x_vp, t) = (x − D(x; σ_t))/σ_t with x = x_vp √(1 + σ_t²).
pub struct EpsOfDenoiser<'a> {
    pub denoiser: &'a dyn Denoiser,
    sigmas: Tensor,
}

impl<'a> EpsOfDenoiser<'a> {
    pub fn new(denoiser: &'a dyn Denoiser, sched: &NoiseSchedule) -> Self {
        Self { denoiser, sigmas: Tensor::from_slice(&crate::model::sigmas_of_schedule(sched)) }
    }
}

impl EpsModel for EpsOfDenoiser<'_> {
    fn eps(&self, x_t: &Tensor, t: &Tensor, _train: bool) -> Tensor {
        let sigma = self.sigmas.index_select(0, &t.to_device(Device::Cpu)).to_kind(x_t.kind()).to_device(x_t.device());
        let s = crate::diffusion::append_dims(&sigma, x_t); // (B, 1, ...)
        let x = x_t * (s.square() + 1.0).sqrt();
        (&x - self.denoiser.denoise(&x, &sigma)) / s
    }
}

/// A deterministic solver with the common signature (no noise source).
pub type OdeSolver = fn(&dyn Denoiser, Tensor, &[f64], &mut dyn FnMut(SamplerStep)) -> Tensor;

/// The deterministic solvers with their theoretical orders: (name, order, solver).
pub fn ode_solvers() -> Vec<(&'static str, f64, OdeSolver)> {
    let ddim: OdeSolver = |d, x, sigmas, cb| sample_ddim(d, x, sigmas, 0.0, None, &mut randn_like, cb);
    vec![
        ("Euler", 1.0, sample_euler),
        ("DDIM", 1.0, ddim),
        ("Heun", 2.0, sample_heun),
        ("DPM-Solver-1", 1.0, sample_dpm_solver_1),
        ("DPM-Solver-2", 2.0, sample_dpm_solver_2),
        ("DPM-Solver-3", 3.0, sample_dpm_solver_3),
        ("DPM-Solver++(2M)", 2.0, sample_dpm_solver_pp_2m),
    ]
}

/// The setting of [`order_study`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct OrderSetup {
    /// Dimensions of the Gaussian, with standard deviations log-spaced from `std_min` to `std_max`.
    pub dim: i64,
    pub std_min: f64,
    pub std_max: f64,
    /// Starting points x(σ_max) = μ + σ_max z.
    pub points: i64,
    /// The ODE is integrated from σ_max to σ_min (not to 0, where the order of the last step differs).
    pub sigma_max: f64,
    pub sigma_min: f64,
    /// Karras ρ of the grid.
    pub rho: f64,
    pub steps: Vec<usize>,
}

impl Default for OrderSetup {
    /// EDM's σ range 80 → 0.002 with ρ = 3 (not 7) and data scales 0.02–2, 16 dimensions, 256 points, N = 10–80.
    /// Why: with one data scale the error is a single number per grid (the ODE is linear in x), and its leading
    /// coefficient can pass through zero for some grids. With s = 0.5 alone, DPM-Solver-3 on a ρ = 7 grid measures
    /// order 4.6 (its h³ coefficient nearly vanishes on that grid), and on uniform-λ grids DPM-Solver++(2M)'s
    /// error changes sign between N = 5 and 10 (fitted order 1.7) while DPM-Solver-3 is still pre-asymptotic
    /// (3.3). A spread of scales averages over many such coefficients, and ρ = 3 spreads the truncation error
    /// evenly over the steps ([EDM] sec. 3), so that no region of σ dominates and N = 10 is close to asymptotic.
    fn default() -> Self {
        Self {
            dim: 16,
            std_min: 0.02,
            std_max: 2.0,
            points: 256,
            sigma_max: 80.0,
            sigma_min: 0.002,
            rho: 3.0,
            steps: vec![10, 20, 40, 80],
        }
    }
}

/// One solver's endpoint errors and fitted order.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OrderResult {
    pub name: String,
    /// The theoretical order.
    pub expected: f64,
    /// (steps N, relative RMS endpoint error ‖x_N − x(σ_min)‖/‖x(σ_min) − μ‖).
    pub errors: Vec<(usize, f64)>,
    /// −slope of the least-squares line through (log N, log error).
    pub order: f64,
}

/// The fitted order: minus the least-squares slope of log error against log N.
pub fn fitted_order(errors: &[(usize, f64)]) -> f64 {
    let pts: Vec<(f64, f64)> = errors.iter().map(|&(n, e)| ((n as f64).ln(), e.ln())).collect();
    let k = pts.len() as f64;
    let (mx, my) = (pts.iter().map(|p| p.0).sum::<f64>() / k, pts.iter().map(|p| p.1).sum::<f64>() / k);
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    -sxy / sxx
}

/// Integrates the PF-ODE of a Gaussian (see [`OrderSetup`]) with each solver on Karras grids of N steps from
/// σ_max to σ_min, and compares the endpoint with the exact one. Draws the starting points from libtorch's
/// generator (seed it first).
pub fn order_study(setup: &OrderSetup, solvers: &[(&str, f64, OdeSolver)]) -> Vec<OrderResult> {
    let d = setup.dim;
    let std: Vec<f64> = (0..d)
        .map(|i| setup.std_min * (setup.std_max / setup.std_min).powf(i as f64 / (d - 1).max(1) as f64))
        .collect();
    let mu: Vec<f64> = (0..d).map(|i| if i % 2 == 0 { 0.5 } else { -0.5 }).collect();
    let oracle = GaussianOracle::diagonal(&mu, &std);
    let x_start =
        oracle.mu.unsqueeze(0) + Tensor::randn([setup.points, d], (Kind::Double, Device::Cpu)) * setup.sigma_max;
    let exact = oracle.ode_endpoint(&x_start, setup.sigma_max, setup.sigma_min);
    let scale = (&exact - oracle.mu.unsqueeze(0)).square().mean(Kind::Double).sqrt().double_value(&[]);
    solvers
        .iter()
        .map(|&(name, expected, solver)| {
            let errors: Vec<(usize, f64)> = setup
                .steps
                .iter()
                .map(|&n| {
                    // N steps = N + 1 levels from σ_max to σ_min (the grid's trailing 0 dropped)
                    let mut sigmas = karras_sigmas(n + 1, setup.sigma_min, setup.sigma_max, setup.rho);
                    sigmas.pop();
                    let x = solver(&oracle, x_start.copy(), &sigmas, &mut |_| {});
                    (n, (x - &exact).square().mean(Kind::Double).sqrt().double_value(&[]) / scale)
                })
                .collect();
            OrderResult { name: name.to_string(), expected, order: fitted_order(&errors), errors }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::denoise_at;
    use crate::sampling::to_d;

    /// Every deterministic solver converges at its theoretical order (±0.15) on the Gaussian oracle.
    #[test]
    fn solvers_converge_at_their_order() {
        tch::manual_seed(14);
        let results = order_study(&OrderSetup::default(), &ode_solvers());
        for r in &results {
            println!("{:18} order {:.3} (expected {}) errors {:?}", r.name, r.order, r.expected, r.errors);
        }
        for r in &results {
            assert!(
                (r.order - r.expected).abs() <= 0.15,
                "{}: fitted order {:.3}, expected {}",
                r.name,
                r.order,
                r.expected
            );
            assert!(r.errors.windows(2).all(|w| w[1].1 < w[0].1), "{}: error must fall with N", r.name);
        }
        assert!((fitted_order(&[(10, 1e-2), (20, 2.5e-3), (40, 6.25e-4)]) - 2.0).abs() < 1e-12);
    }

    /// The closed forms: the denoiser is the posterior mean (a Monte-Carlo regression of x₀ on x), the endpoint
    /// solves the ODE (its σ-derivative is (x − D)/σ), and the densities integrate/normalise correctly.
    #[test]
    fn closed_forms_are_consistent() {
        tch::manual_seed(15);
        let oracle = GaussianOracle::diagonal(&[1.0, -2.0], &[0.5, 1.5]);
        let x = oracle.sample_noised(8, 3.0);
        // d/dσ of the exact endpoint at σ = 3 equals (x − D(x; 3))/3 (central difference)
        let h = 1e-5;
        let fd = (oracle.ode_endpoint(&x, 3.0, 3.0 + h) - oracle.ode_endpoint(&x, 3.0, 3.0 - h)) / (2.0 * h);
        assert!((fd - to_d(&x, &denoise_at(&oracle, &x, 3.0), 3.0)).abs().max().double_value(&[]) < 1e-8);
        // log density against a hand-written 2-D Gaussian at σ = 0.7
        let var = [0.25 + 0.49, 2.25 + 0.49];
        let p = Tensor::from_slice(&[0.3f64, -1.0]).view([1, 2]);
        let want = -0.5 * ((0.3f64 - 1.0).powi(2) / var[0] + (1.0f64).powi(2) / var[1])
            - 0.5 * (4.0 * PI * PI * var[0] * var[1]).ln();
        assert!((oracle.log_density(&p, 0.7).double_value(&[0]) - want).abs() < 1e-12);
        // a one-component mixture is the isotropic Gaussian
        let single = MixtureOracle::new(&[1.0], &[vec![1.0, -2.0]], &[0.5]);
        let iso = GaussianOracle::isotropic(&[1.0, -2.0], 0.5);
        let sig = Tensor::from_slice(&[0.1f64, 1.0, 2.0, 5.0, 0.3, 0.2, 4.0, 9.0]);
        assert!((single.denoise(&x, &sig) - iso.denoise(&x, &sig)).abs().max().double_value(&[]) < 1e-12);
        assert!((single.log_density(&x, 0.4) - iso.log_density(&x, 0.4)).abs().max().double_value(&[]) < 1e-12);
        // the mixture denoiser is E[x₀ | x]: the residual x₀ − D(x; σ) is uncorrelated with every function of x
        // (here x and tanh(x), per coordinate); the best linear estimator would pass the first check but not both
        let mix = MixtureOracle::from_toy2d(&GaussianMixture::two_modes());
        let n = 200_000;
        let x0 = mix.sample_noised(n, 0.0);
        let sigma = 2.0;
        let xs = &x0 + x0.randn_like() * sigma;
        let resid = &x0 - denoise_at(&mix, &xs, sigma);
        for f in [xs.shallow_clone(), xs.tanh()] {
            let f = &f - f.mean_dim(0, true, Kind::Double);
            let corr = (&resid * &f).mean_dim(0, false, Kind::Double)
                / (f.square().mean_dim(0, false, Kind::Double) * resid.square().mean_dim(0, false, Kind::Double))
                    .sqrt();
            assert!(corr.abs().max().double_value(&[]) < 5.0 / (n as f64).sqrt(), "{corr:?}");
        }
        assert!(resid.mean(Kind::Double).abs().double_value(&[]) < 0.02);
    }
}
