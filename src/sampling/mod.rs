//! Samplers: plain functions from a score (or denoiser) and a noise schedule to samples.
pub mod classifier_guidance;
pub mod controlled;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod grids;
pub mod guidance;
pub mod karras;
pub mod langevin;
pub mod lcm;
pub mod likelihood;
pub mod oracle;
pub mod registry;
pub mod sde;
pub mod wrappers;

use tch::Tensor;

/// The probability-flow ODE's derivative dx/dσ = (x − D(x; σ))/σ ([EDM] eq. 4 with σ(t) = t, s(t) = 1; Alg. 1
/// line 4). It is also the noise estimate ε̂ = (x − x̂₀)/σ.
pub fn to_d(x: &Tensor, denoised: &Tensor, sigma: f64) -> Tensor {
    (x - denoised) / sigma
}

/// What every sampler reports once per step (for progress bars and trajectory plots).
pub struct SamplerStep<'a> {
    /// Step index, 0 for the step from `sigmas[0]`.
    pub i: usize,
    /// The noise level of `x` (for EDM's stochastic sampler, σ̂ after the churn).
    pub sigma: f64,
    /// The level this step goes to.
    pub sigma_next: f64,
    /// The state at `sigma`.
    pub x: &'a Tensor,
    /// D(x; σ), the model's x̂₀ at this step.
    pub denoised: &'a Tensor,
}

/// Draws z ~ N(0, I) shaped like x from libtorch's generator (seeded by `tch::manual_seed`): the default noise
/// source of the stochastic samplers, which take `noise: &mut dyn FnMut(&Tensor) -> Tensor` so that a test (or a
/// figure comparing two samplers) can replay the same noise.
pub fn randn_like(x: &Tensor) -> Tensor {
    x.randn_like()
}

/// The denoiser adapters of [`crate::model`] against the samplers' oracles and identities.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::forward::{eps_from_x0, q_sample};
    use crate::diffusion::schedule::NoiseSchedule;
    use crate::model::sigma_like;
    use crate::model::{denoise_at, sigmas_of_schedule, CountingDenoiser, EpsDenoiser, EpsModel, Prediction};
    use crate::sampling::oracle::{EpsOfDenoiser, GaussianOracle};
    use tch::Device;
    use tch::Kind;

    /// On the model's own timesteps the adapter undoes the VP scaling exactly: an ε-model built from a σ-space
    /// oracle ([`EpsOfDenoiser`]) and adapted back gives the oracle's x̂₀, for ε-, x₀- and v-prediction.
    #[test]
    fn eps_x0_and_v_adapters_recover_the_denoiser_on_the_grid() {
        tch::manual_seed(1);
        let sched = NoiseSchedule::cosine(1000);
        let oracle = GaussianOracle::isotropic(&[0.3, -0.2, 0.1], 0.5);
        let eps_model = EpsOfDenoiser::new(&oracle, &sched);
        for t in [0usize, 10, 300, 700, 999] {
            let sigma = sched.sigma(t);
            let x = Tensor::randn([8, 3], (Kind::Double, Device::Cpu)) * (1.0 + sigma);
            let want = denoise_at(&oracle, &x, sigma);
            let d = EpsDenoiser::new(&eps_model, &sched);
            assert_eq!(d.timestep(&sigma_like(&x, sigma)).int64_value(&[0]), t as i64);
            let got = denoise_at(&d, &x, sigma);
            assert!((&got - &want).abs().max().double_value(&[]) < 1e-9 * (1.0 + sigma), "ε, t={t}");
            // the same network output read as x₀ or v: build those outputs from the ε model and compare
            let a = sched.alpha_bar(t);
            let x_vp = &x * a.sqrt();
            let eps = eps_model.eps(&x_vp, &Tensor::full([8], t as i64, (Kind::Int64, Device::Cpu)), false);
            let x0 = (&x_vp - &eps * (1.0 - a).sqrt()) / a.sqrt();
            let v = &eps * a.sqrt() - &x0 * (1.0 - a).sqrt(); // [v-pred] v = √ᾱ ε − √(1 − ᾱ) x₀
            for (prediction, output) in [(Prediction::Sample, x0), (Prediction::V, v)] {
                let fixed = move |_: &Tensor, _: &Tensor, _: bool| output.shallow_clone();
                let m = FixedOutput(Box::new(fixed));
                let got = denoise_at(&EpsDenoiser::new(&m, &sched).with_prediction(prediction), &x, sigma);
                let err = (&got - &want).abs().max().double_value(&[]);
                assert!(err < 1e-8 * (1.0 + sigma), "{prediction:?}, t={t}: {err}");
            }
        }
    }

    /// An "ε-model" that returns whatever its closure gives (to feed the adapter x₀ or v outputs).
    type OutputFn = Box<dyn Fn(&Tensor, &Tensor, bool) -> Tensor>;
    struct FixedOutput(OutputFn);
    impl EpsModel for FixedOutput {
        fn eps(&self, x_t: &Tensor, t: &Tensor, train: bool) -> Tensor {
            (self.0)(x_t, t, train)
        }
    }

    /// Off the grid the model is called at the nearest timestep in log σ; ties and the ends behave.
    #[test]
    fn nearest_timestep_in_log_sigma() {
        let sched = NoiseSchedule::ddpm(1000);
        let zeros = FixedOutput(Box::new(|x, _, _| x.zeros_like()));
        let d = EpsDenoiser::new(&zeros, &sched);
        let s = &d.sigmas;
        let between = |t: usize, frac: f64| (s[t].ln() * (1.0 - frac) + s[t + 1].ln() * frac).exp();
        let sig = Tensor::from_slice(&[between(100, 0.4), between(100, 0.6), 1e-6, 1e6, s[500]]);
        let t: Vec<i64> = Vec::try_from(d.timestep(&sig)).unwrap();
        assert_eq!(t, vec![100, 101, 0, 999, 500]);
        assert_eq!(d.sigma_range(), (s[0], s[999]));
    }

    /// The VP identities the adapter relies on: x_vp = x/√(1 + σ_t²) is q_sample's x_t, and ε̂ = (x − x̂₀)/σ_t.
    #[test]
    fn sigma_space_is_the_vp_process_rescaled() {
        tch::manual_seed(2);
        let sched = NoiseSchedule::ddpm(1000);
        let t = 400usize;
        let x0 = Tensor::randn([16, 2], (Kind::Double, Device::Cpu));
        let eps = x0.randn_like();
        let table = Tensor::from_slice(&sched.alphas_cumprod);
        let x_vp = q_sample(&table, &x0, &Tensor::full([16], t as i64, (Kind::Int64, Device::Cpu)), &eps);
        let sigma = sigmas_of_schedule(&sched)[t];
        let x = &x0 + &eps * sigma;
        assert!((&x / (1.0 + sigma * sigma).sqrt() - &x_vp).abs().max().double_value(&[]) < 1e-12);
        let ab = Tensor::full([16], sched.alpha_bar(t), (Kind::Double, Device::Cpu));
        let eps_back = eps_from_x0(&ab, &x_vp, &x0);
        assert!((to_d(&x, &x0, sigma) - eps_back).abs().max().double_value(&[]) < 1e-9);
        let counting = CountingDenoiser::new(&|x: &Tensor, _: &Tensor| x.shallow_clone());
        let _ = denoise_at(&counting, &x, 1.0);
        let _ = denoise_at(&counting, &x, 2.0);
        assert_eq!(counting.calls.get(), 2);
    }
}
