//! Training the super-resolution stage of a cascade (lesson 11) with Gaussian conditioning augmentation.
//!
//! [CDM] Ho et al. 2021, arXiv:2106.15282, sec. 4.2: at training time the low-resolution conditioning z₀ (here the
//! training image itself, downsampled) is noised to a level s ~ U{0, …, s_max} and the model is told s; at sampling
//! time s is fixed (and swept, sec. 4.2's Table 4): the model learns to trust its low-resolution input less as s
//! grows, so the base model's imperfect samples, unlike the training set's exact downsampled images, stop being a
//! surprise — the train/test mismatch ("exposure bias") that augmentation closes.
use crate::diffusion::forward::{augment, augment_sigma};
use crate::diffusion::schedule::NoiseSchedule;
use crate::nn::super_resolution::{upsample, LowResConditioned};
use crate::nn::unet::{UNet, UNetConfig};
use crate::train::ddpm::{l_simple_v, EpsObjective};
use crate::train::trainer::{train_model, TrainOutcome, TrainRun, TrainerConfig};
use anyhow::{ensure, Result};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// 2× downsampling by 2×2 averages: (B, C, H, W) -> (B, C, H/2, W/2) (the base stage's resolution).
pub fn downsample(x: &Tensor) -> Tensor {
    x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>)
}

// ANCHOR: train_sr
/// Trains the super-resolution UNet `config` (in_channels = 3: x_t, the upsampled low-resolution image, the level
/// map) on `images` (N, 1, H, W) in [−1, 1]: each step downsamples the batch 2×, augments it to levels
/// s ~ U{0, …, `max_level`} ([CDM] sec. 4.2; `max_level` 0: no augmentation), upsamples it back and regresses v on
/// the full-resolution images ([`l_simple_v`] on `objective`'s schedule): the network predicts v, not ε, as Imagen
/// Video's super-resolution models do (Ho et al. 2022, arXiv:2210.02303, whose v-parameterization avoids the colour
/// shifts of ε-prediction at high resolution), because its input pins x₀ down at every t, and an ε-network's
/// x̂₀ = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t multiplies its error by √((1 − ᾱ_t)/ᾱ_t), up to ≈ 160 at t = T (measured here: an
/// ε super-resolution UNet's samples at 20 steps kept grey, grainy backgrounds).
pub fn train_super_resolution(
    config: &UNetConfig,
    images: &Tensor,
    sched: &NoiseSchedule,
    max_level: usize,
    objective: &EpsObjective,
    cfg: &TrainerConfig,
    run: TrainRun,
) -> Result<(VarStore, UNet, TrainOutcome)> {
    ensure!(max_level <= sched.num_steps(), "the augmentation level runs up to T = {}", sched.num_steps());
    let (h, w) = (images.size()[2], images.size()[3]);
    let alpha_bar = sched.to_tensor_alpha_bar(run.device);
    let mut loss = |net: &UNet, _: &UNet, batch: &[Tensor], _: usize| {
        let x0 = &batch[0]; // (B, 1, H, W)
        let b = x0.size()[0];
        let low = downsample(x0); // (B, 1, H/2, W/2): z₀
        let levels = Tensor::randint_low(0, max_level as i64 + 1, [b], (Kind::Int64, x0.device())); // s ~ U{0..max}
        let z_s = augment(&alpha_bar, &low, &levels, &low.randn_like()); // [CDM] sec. 4.2
        let low_up = upsample(&z_s, [h, w]); // (B, 1, H, W)
        let sigma = augment_sigma(&alpha_bar, &levels).to_device(x0.device()); // (B,): what the model is told
        l_simple_v(&LowResConditioned { unet: net, low_up: &low_up, sigma: &sigma }, &objective.alpha_bar, x0)
    };
    ensure!(objective.is_uniform(), "the super-resolution stage trains with uniform weights over t");
    let run =
        objective.record(run).spec("model", config).spec("max_augmentation_level", max_level).spec("prediction", "v");
    train_model(|p| UNet::new(p, config.clone()), &[images], cfg, run, &mut loss)
}
// ANCHOR_END: train_sr

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::ddpm::LossWeight;
    use tch::Device;

    /// On 8×8 images whose top and bottom halves differ, the low-resolution input tells the model which is which:
    /// the loss falls.
    #[test]
    fn the_super_resolution_loss_falls() {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        tch::manual_seed(0);
        let n = 64;
        let bright = Tensor::rand([n, 1, 1, 1], tch::kind::FLOAT_CPU).gt(0.5).to_kind(Kind::Float) * 2.0 - 1.0;
        let images = bright.expand([n, 1, 8, 8], false).contiguous();
        let _ = images.narrow(2, 0, 4).g_mul_scalar_(-1.0);
        let sched = NoiseSchedule::ddpm(1000);
        let config = UNetConfig { in_channels: 3, ..UNetConfig::tiny() };
        let cfg =
            TrainerConfig { steps: 150, batch_size: 16, lr: 3e-3, warmup: 5, ema_decay: None, ..Default::default() };
        let objective = EpsObjective::new(&sched, LossWeight::Uniform, Device::Cpu);
        let (_, _, out) =
            train_super_resolution(&config, &images, &sched, 100, &objective, &cfg, TrainRun::new(Device::Cpu, |_| {}))
                .unwrap();
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        let (first, last) = (mean(&out.losses[..20]), mean(&out.losses[130..]));
        assert!(last < 0.7 * first, "the loss fell from {first} to only {last}");
        tch::set_num_threads(threads);
    }
}
