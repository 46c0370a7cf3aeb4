//! Training latent diffusion at MNIST scale: the KL-autoencoder, the posterior moments of the training set, and the
//! text-conditioned UNet on scaled latents.
//!
//! [LDM] Rombach et al. 2022, arXiv:2112.10752: sec. 3.1 (perceptual compression: x ≈ D(E(x)), diffusion on
//! z = E(x)), eq. 2 (L_LDM = E ‖ε − ε_θ(z_t, t, τ_θ(y))‖²), appendix G (the autoencoder's loss: reconstruction + a
//! KL-penalty of small weight; LPIPS and a patch discriminator we leave out), sec. 4.3.2 (rescaled latents).
//! Notation (code -> paper): vae.encode -> E (its posterior), vae.decode -> D, z -> scaled latent.
use crate::data::to_unit;
use crate::nn::classifier::MnistClassifier;
use crate::nn::text_unet::TextUNet;
use crate::nn::unet::UNetConfig;
use crate::nn::vae::AutoencoderKl;
use crate::nn::vae::DiagonalGaussian;
use crate::nn::vae::VaeConfig;
use crate::train::ddpm::EpsObjective;
use crate::train::text_cond::train_text_cond_unet_on;
use crate::train::text_cond::TextData;
use crate::train::trainer::train_model;
use crate::train::trainer::TrainOutcome;
use crate::train::trainer::TrainRun;
use crate::train::trainer::TrainerConfig;
use anyhow::{ensure, Result};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// The autoencoder's training objective, per image ([LDM] appendix G, without the GAN term):
/// L = Σ_pixels |x − x̂| + kl_weight · KL(q(z|x) ‖ N(0, I)) + perceptual_weight · ‖φ(x) − φ(x̂)‖², with φ the crate
/// classifier's penultimate features standing in for LPIPS (whose VGG weights cannot be downloaded here); divided
/// by the pixel count, which only rescales the gradient for AdamW.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VaeLoss {
    pub kl_weight: f64,
    pub perceptual_weight: f64,
}

// ANCHOR: vae_loss
/// The [`VaeLoss`] of a batch x (B, 1, H, W) in [−1, 1] and the three terms' batch means (per image, unweighted).
pub fn vae_loss(vae: &AutoencoderKl, x: &Tensor, loss: VaeLoss, clf: Option<&MnistClassifier>) -> (Tensor, [f64; 3]) {
    let posterior = vae.encode(x);
    let x_hat = vae.decode(&posterior.sample()); // [VAE] sec. 2.4: through the reparameterised sample
    let pixels = (x.numel() as i64 / x.size()[0]) as f64;
    let rec = (x - &x_hat).abs().sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float).mean(Kind::Float);
    let kl = posterior.kl().mean(Kind::Float);
    let mut total = &rec + &kl * loss.kl_weight;
    let mut perceptual = 0.0;
    if let (Some(clf), true) = (clf, loss.perceptual_weight > 0.0) {
        // φ reads [0, 1] images; its features of x need no gradient
        let target = clf.features(&to_unit(x));
        let p =
            (clf.features_differentiable(&to_unit(&x_hat)) - target).square().sum_dim_intlist(1, false, Kind::Float);
        let p = p.mean(Kind::Float);
        perceptual = p.double_value(&[]);
        total += p * loss.perceptual_weight;
    }
    (total / pixels, [rec.double_value(&[]), kl.double_value(&[]), perceptual])
}
// ANCHOR_END: vae_loss

/// Trains the autoencoder `config` on `images` (N, 1, H, W) in [−1, 1] with [`vae_loss`]; `terms` sees the three
/// terms of every step. Returns the f32 VarStore (EMA weights when `cfg.ema_decay` is set), the model, the outcome.
pub fn train_vae(
    config: &VaeConfig,
    images: &Tensor,
    loss: VaeLoss,
    clf: Option<&MnistClassifier>,
    cfg: &TrainerConfig,
    run: TrainRun,
    terms: &mut dyn FnMut([f64; 3]),
) -> Result<(VarStore, AutoencoderKl, TrainOutcome)> {
    ensure!(!cfg.bf16, "the autoencoder trains in f32 only");
    let mut loss_fn = |vae: &AutoencoderKl, _: &AutoencoderKl, batch: &[Tensor], _step: usize| {
        let (l, t) = vae_loss(vae, &batch[0], loss, clf);
        terms(t);
        l
    };
    let build = |p: tch::nn::Path| AutoencoderKl::new(p, config.clone());
    let run = run.spec("model", config).spec("loss", loss).spec("perceptual_classifier", clf.is_some());
    train_model(build, &[images], cfg, run, &mut loss_fn)
}

/// The posterior moments (N, 2C, h, w) of `images` (N, 1, H, W) in [−1, 1], encoded `batch` at a time without
/// gradients: the latent UNet's training set (each step draws z ~ q(z|x) from them).
pub fn encode_moments(vae: &AutoencoderKl, images: &Tensor, batch: i64) -> Tensor {
    tch::no_grad(|| {
        let chunks: Vec<Tensor> = images
            .split(batch, 0)
            .iter()
            .map(|x| {
                let q = vae.encode(x);
                Tensor::cat(&[q.mean, q.logvar], 1) // (b, 2C, h, w)
            })
            .collect();
        Tensor::cat(&chunks, 0)
    })
}

/// Trains the latent UNet `config` on the moments of [`encode_moments`]: every step draws z ~ q(z|x) and scales it
/// by `scaling_factor` ([LDM] eq. 2 on scaled latents); the rest is lesson 06's text-conditioned training.
pub fn train_latent_unet(
    config: &UNetConfig,
    text: TextData,
    moments: &Tensor,
    scaling_factor: f64,
    objective: &EpsObjective,
    cfg: &TrainerConfig,
    run: TrainRun,
) -> Result<(VarStore, TextUNet, TrainOutcome)> {
    // ANCHOR: latent_x0
    // z = s · (μ + σ ε): a fresh draw from q(z|x) at every step, scaled ([LDM] sec. 4.3.2)
    let x0_of = |m: &Tensor| DiagonalGaussian::from_moments(m).sample() * scaling_factor;
    // ANCHOR_END: latent_x0
    train_text_cond_unet_on(config, text, moments, &x0_of, objective, cfg, run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::trainer::TrainRun;
    use tch::Device;

    #[test]
    fn the_autoencoder_loss_is_its_terms_and_falls_in_a_few_steps() {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        tch::manual_seed(0);
        // 64 8×8 "digits": a bright bar at one of 4 rows
        let rows = Tensor::arange(64, (Kind::Int64, Device::Cpu)).remainder(4) * 2;
        let images = Tensor::full([64, 1, 8, 8], -1.0, (Kind::Float, Device::Cpu));
        for i in 0..64 {
            let _ = images.get(i).narrow(1, rows.int64_value(&[i]), 2).fill_(1.0);
        }
        let loss = VaeLoss { kl_weight: 1e-3, perceptual_weight: 0.0 };
        let cfg =
            TrainerConfig { steps: 150, batch_size: 16, lr: 3e-3, warmup: 5, ema_decay: None, ..Default::default() };
        let mut terms = Vec::new();
        let (_, vae, out) = train_vae(
            &VaeConfig::tiny(),
            &images,
            loss,
            None,
            &cfg,
            TrainRun::new(Device::Cpu, &mut |_| {}),
            &mut |t| terms.push(t),
        )
        .unwrap();
        // the loss is (L1 + λ KL) / pixels
        let [l1, kl, _] = terms[0];
        assert!((out.losses[0] - (l1 + 1e-3 * kl) / 64.0).abs() < 1e-5);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (first, last) = (mean(&out.losses[..10]), mean(&out.losses[140..]));
        assert!(last < 0.5 * first, "the loss falls by half: {first} -> {last}");
        let recon = tch::no_grad(|| vae.decode(&vae.encode(&images).mean));
        assert_eq!(recon.size(), [64, 1, 8, 8]);
        tch::set_num_threads(threads);
    }
}
