//! Bits per dimension of a trained image model on real images, through the probability-flow ODE.
//!
//! [SDE] Song et al. 2021, arXiv:2011.13456, sec. 4.3 and appendix D.2 (exact likelihood through the PF-ODE, reported
//! in bits/dim on uniformly dequantised data). [FFJORD] Grathwohl et al. 2019, arXiv:1810.01367, sec. 3.1
//! (Hutchinson's trace estimator with a probe fixed along each trajectory, an unbiased estimate of log p).
//! [Flow++] Ho et al. 2019, arXiv:1902.00275, sec. 3.1 (uniform dequantisation: the continuous density of x + u,
//! u ~ U[0, 1)/256, lower-bounds the discrete log-likelihood).
//! [DDPM] Ho et al. 2020, arXiv:2006.11239, eq. 5 and 13: the variational bound of the same model, term by term, with a
//! decoder discretised to the 8-bit levels ([`mnist_vlb_bits_per_dim`]), the other upper bound on −log p of the
//! discrete images.
use crate::diffusion::elbo::{discretized_decoder_nll, prior_kl, step_kl};
use crate::diffusion::forward::q_sample;
use crate::diffusion::schedule::{NoiseSchedule, PosteriorVariance};
use crate::model::{Denoiser, EpsModel};
use crate::sampling::likelihood::{bits_per_dim, dequantize, gaussian_log_prior, pf_ode_log_likelihood};
use crate::sampling::likelihood::{Divergence, Probe};
use tch::{Device, Kind, Tensor};

/// How the bits/dim were measured, and the result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BitsPerDimReport {
    /// Test images used (the first of the set), one dequantisation each.
    pub images: i64,
    /// Hutchinson probes per image (Rademacher), each fixed along its trajectory.
    pub probes: usize,
    /// RK4 steps in log σ from σ_min to σ_max; 4 network evaluations (forward and backward) each.
    pub rk4_steps: usize,
    pub nfe: usize,
    pub sigma_min: f64,
    pub sigma_max: f64,
    /// Mean bits/dim over the images and its standard error (which includes the probes' variance).
    pub mean: f64,
    pub std_error: f64,
    pub per_image: Vec<f64>,
    pub seconds: f64,
}

// ANCHOR: bits_per_dim
/// bits/dim of `images` (N, C, H, W) in [0, 1] (8-bit levels k/255) under the model behind `d`, `batch` images at a
/// time: scale to [−1, 1], dequantise uniformly, integrate the PF-ODE from σ_min (the model's first noise level) to
/// σ_max with a N(0, σ_max² I) prior, and convert with [`bits_per_dim`]. `d` must be differentiable in x (no clamping).
pub fn mnist_bits_per_dim(
    d: &dyn Denoiser,
    images: &Tensor,
    (sigma_min, sigma_max): (f64, f64),
    rk4_steps: usize,
    probes: usize,
    batch: i64,
) -> BitsPerDimReport {
    let started = std::time::Instant::now();
    let n = images.size()[0];
    let dims = images.numel() as i64 / n;
    let divergence = Divergence::Hutchinson { probe: Probe::Rademacher, probes };
    let prior = gaussian_log_prior(sigma_max);
    let mut per_image = Vec::new();
    let mut nfe = 0;
    for chunk in images.split(batch, 0) {
        let x0 = dequantize(&(chunk * 2.0 - 1.0)); // (B, C, H, W) in [−1, 1]
        let ll = pf_ode_log_likelihood(d, &x0, sigma_min, sigma_max, rk4_steps, divergence, &prior);
        let bpd = bits_per_dim(&ll.log_p, dims).to_device(Device::Cpu); // (B,)
        per_image.extend(Vec::<f64>::try_from(bpd.to_kind(Kind::Double)).expect("(B,) f64"));
        nfe = ll.nfe;
    }
    let (mean, std_error) = mean_and_std_error(&per_image);
    let seconds = started.elapsed().as_secs_f64();
    BitsPerDimReport { images: n, probes, rk4_steps, nfe, sigma_min, sigma_max, mean, std_error, per_image, seconds }
}
// ANCHOR_END: bits_per_dim

/// The mean of per-image values and its standard error (sample variance over n − 1, divided by n).
fn mean_and_std_error(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|b| (b - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, (var / n).sqrt())
}

/// The variational bound of one choice of reverse variances, in bits/dim.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VlbBits {
    /// σ_t² of the reverse steps (the decoder uses β₁ either way, β̃₁ being 0).
    pub variance: PosteriorVariance,
    /// The bound's mean over the images and its standard error (the noise draws included).
    pub mean: f64,
    pub std_error: f64,
    /// Its terms, averaged over the images: L_T, Σ L_{t−1}, L_0.
    pub prior: f64,
    pub steps: f64,
    pub decoder: f64,
}

/// [DDPM] eq. 5's bound for a trained model on real images.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VlbReport {
    pub images: i64,
    /// Network evaluations per image: one per timestep, each at one draw of x_t.
    pub nfe: usize,
    pub bounds: Vec<VlbBits>,
    pub seconds: f64,
}

// ANCHOR: vlb_bits_per_dim
/// The variational bound L_T + Σ L_{t−1} + L_0 ([DDPM] eq. 5) of the ε-model `model` trained on `sched`, for
/// `images` (N, C, H, W) in [0, 1] (8-bit levels k/255, scaled to [−1, 1] as in training), in bits/dim: every
/// timestep of every image at one draw of x_t ~ q(x_t | x₀), `batch` timesteps per network call, for σ_t² = β̃_t and
/// σ_t² = β_t from the same network outputs.
pub fn mnist_vlb_bits_per_dim(model: &dyn EpsModel, sched: &NoiseSchedule, images: &Tensor, batch: i64) -> VlbReport {
    let started = std::time::Instant::now();
    let (n, t_max, device) = (images.size()[0], sched.num_steps(), images.device());
    let dims = images.numel() as i64 / n;
    let alpha_bar = sched.to_tensor_alpha_bar(device);
    let variances = [PosteriorVariance::BetaTilde, PosteriorVariance::Beta];
    let mut terms = vec![[[0.0; 3]; 2]; n as usize]; // per image and variance: L_T, Σ L_{t−1}, L_0 in nats
    for i in 0..n {
        let x0 = images.narrow(0, i, 1) * 2.0 - 1.0; // (1, C, H, W) in [−1, 1]
        let prior = prior_kl(sched, &x0).double_value(&[0]);
        for start in (0..t_max as i64).step_by(batch as usize) {
            let k = batch.min(t_max as i64 - start);
            let t = Tensor::arange_start(start, start + k, (tch::Kind::Int64, device)); // (k,)
            let x0k = x0.expand([k, -1, -1, -1], false);
            let eps = x0k.randn_like();
            let x_t = q_sample(&alpha_bar, &x0k, &t, &eps); // (k, C, H, W)
            let eps_hat = tch::no_grad(|| model.eps(&x_t, &t, false));
            let err2 = (&eps - &eps_hat).square().flatten(1, -1).sum_dim_intlist(1, false, Kind::Double); // (k,)
            let err2 = Vec::<f64>::try_from(err2).expect("(k,) f64");
            let image = &mut terms[i as usize];
            for (step, e2) in (start as usize..).zip(err2) {
                for (v, &variance) in variances.iter().enumerate() {
                    if step > 0 {
                        image[v][1] += step_kl(sched, step, variance, e2, dims);
                    }
                }
            }
            if start == 0 {
                // [DDPM] eq. 11 at paper step 1: μ_θ(x₁, 1) = (x₁ − β₁/√(1 − ᾱ₁) ε_θ)/√α₁, decoded with σ₁² = β₁
                let (beta, ab) = (sched.betas[0], sched.alpha_bar(0));
                let mean =
                    (x_t.narrow(0, 0, 1) - eps_hat.narrow(0, 0, 1) * (beta / (1.0 - ab).sqrt())) / (1.0 - beta).sqrt();
                let decoder = discretized_decoder_nll(&x0, &mean, beta).double_value(&[0]);
                image.iter_mut().for_each(|v| v[2] = decoder);
            }
        }
        terms[i as usize].iter_mut().for_each(|v| v[0] = prior);
    }
    let to_bits = |nats: f64| nats / (dims as f64 * std::f64::consts::LN_2);
    let bounds = variances
        .iter()
        .enumerate()
        .map(|(v, &variance)| {
            let per_image: Vec<f64> = terms.iter().map(|t| to_bits(t[v].iter().sum())).collect();
            let (mean, std_error) = mean_and_std_error(&per_image);
            let term = |k: usize| to_bits(terms.iter().map(|t| t[v][k]).sum::<f64>() / n as f64);
            VlbBits { variance, mean, std_error, prior: term(0), steps: term(1), decoder: term(2) }
        })
        .collect();
    VlbReport { images: n, nfe: t_max, bounds, seconds: started.elapsed().as_secs_f64() }
}
// ANCHOR_END: vlb_bits_per_dim

/// Lesson 07's likelihood table: the probability-flow ODE's bits/dim beside the variational bound's, on the same
/// images and model.
pub fn likelihood_table(ode: &BitsPerDimReport, vlb: &VlbReport) -> String {
    let mut rows = vec![vec![
        "probability-flow ODE, dequantised ([SDE])".to_string(),
        format!("{:.3} ± {:.3}", ode.mean, ode.std_error),
        String::new(),
        format!("{} ({} RK4 steps, {} probe)", ode.nfe, ode.rk4_steps, ode.probes),
    ]];
    for b in &vlb.bounds {
        let variance = match b.variance {
            PosteriorVariance::BetaTilde => "σ² = β̃",
            PosteriorVariance::Beta => "σ² = β",
        };
        rows.push(vec![
            format!("variational bound, {variance} ([DDPM] eq. 5)"),
            format!("{:.3} ± {:.3}", b.mean, b.std_error),
            format!("{:.4} + {:.3} + {:.3}", b.prior, b.steps, b.decoder),
            vlb.nfe.to_string(),
        ]);
    }
    let header = ["measure", "bits/dim", "L_T + Σ L_{t−1} + L_0", "network evaluations per image"];
    crate::cli::markdown_table(&header, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::oracle::GaussianOracle;

    /// For a Gaussian "model" of 16 pixels the estimate matches the closed-form density of the dequantised pixels
    /// (noised by σ_min) in bits/dim, within 5 standard errors of the Hutchinson noise.
    #[test]
    fn matches_the_closed_form_for_a_gaussian() {
        tch::manual_seed(8);
        let oracle = GaussianOracle::isotropic(&[0.0; 16], 0.5);
        let d = |x: &Tensor, s: &Tensor| {
            let flat = x.flatten(1, -1); // (B, 16)
            oracle.denoise(&flat, s).view_as(x)
        };
        let images = ((Tensor::randn([24, 1, 4, 4], (Kind::Double, Device::Cpu)) * 0.25 + 0.5).clamp(0.0, 1.0) * 255.0)
            .round()
            / 255.0;
        let (lo, hi) = (0.01, 200.0);
        let r = mnist_bits_per_dim(&d, &images, (lo, hi), 60, 4, 8);
        assert_eq!((r.images, r.nfe, r.per_image.len()), (24, 240, 24));
        // the same images dequantised again (other noise): compare the means over the images
        let x0 = dequantize(&(&images * 2.0 - 1.0)).flatten(1, -1);
        let exact = bits_per_dim(&oracle.log_density(&x0, lo), 16).mean(Kind::Double).double_value(&[]);
        println!("{} ± {} vs exact {exact}", r.mean, r.std_error);
        assert!((r.mean - exact).abs() < 5.0 * r.std_error + 0.05, "{} ± {} vs {exact}", r.mean, r.std_error);
    }

    /// The ideal model of data that is one image: ε_θ(x_t, t) = (x_t − √ᾱ_t x₀)/√(1 − ᾱ_t), the noise exactly.
    struct OnePoint {
        x0: Tensor,
        alpha_bar: Tensor,
    }

    impl EpsModel for OnePoint {
        fn eps(&self, x_t: &Tensor, t: &Tensor, _train: bool) -> Tensor {
            let ab = self.alpha_bar.index_select(0, t).view([-1, 1, 1, 1]);
            (x_t - ab.sqrt() * &self.x0) / (ab.neg() + 1.0).sqrt()
        }
    }

    /// For data that is a single black image the bound is known term by term: no noise error, so with σ² = β̃ every
    /// step term is 0 and the bound is L_T plus the decoder's −ln Φ((1/255)/√β₁) per pixel (the bottom level, its mean
    /// exactly on it); σ² = β adds Σ ½ D (ln(β/β̃) + β̃/β − 1).
    #[test]
    fn the_bound_of_a_one_image_model_is_its_closed_form() {
        let sched = NoiseSchedule::by_name("cosine", 50).unwrap();
        let images = Tensor::zeros([3, 1, 4, 4], tch::kind::FLOAT_CPU); // black: x₀ = −1 everywhere
        let model =
            OnePoint { x0: images.narrow(0, 0, 1) * 2.0 - 1.0, alpha_bar: sched.to_tensor_alpha_bar(Device::Cpu) };
        let report = mnist_vlb_bits_per_dim(&model, &sched, &images, 16);
        let (d, bits) = (16.0, |nats: f64| nats / (16.0 * std::f64::consts::LN_2));
        let phi = |z: f64| 0.5 * (1.0 + erf(z / std::f64::consts::SQRT_2));
        let decoder = bits(-d * phi((1.0 / 255.0) / sched.betas[0].sqrt()).ln());
        let ab = sched.alpha_bar(49);
        let prior = bits(d * 0.5 * (-(1.0 - ab).ln() + (1.0 - ab) + ab - 1.0));
        let [tilde, beta] = [&report.bounds[0], &report.bounds[1]];
        assert_eq!((report.images, report.nfe, tilde.variance), (3, 50, PosteriorVariance::BetaTilde));
        // f32 network arithmetic moves the decoder's mean by about 1e-7
        assert!((tilde.decoder - decoder).abs() < 1e-4 && (tilde.prior - prior).abs() < 1e-9, "{tilde:?}");
        assert!(tilde.steps.abs() < 1e-6 && tilde.std_error < 1e-4, "{tilde:?}");
        let log_gap: f64 = (1..50)
            .map(|t| {
                let (b, bt) = (sched.betas[t], sched.posterior_variance(t));
                0.5 * d * ((b / bt).ln() + bt / b - 1.0)
            })
            .sum();
        assert!((beta.steps - bits(log_gap)).abs() < 1e-6 && beta.mean > tilde.mean, "{beta:?}");
    }

    /// erf to 1e-12 by its Taylor series (|x| < 3 here), for the test's closed form.
    fn erf(x: f64) -> f64 {
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
