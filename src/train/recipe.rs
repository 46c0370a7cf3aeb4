//! The MNIST DDPM training recipe that lessons 04–06 share, in one place: change a default here and every lesson
//! that trains a UNet on MNIST follows (each still takes the matching flags). Lesson 04 trains 30 % longer at a
//! slightly lower peak rate (its own STEPS and LR; chapter 04 says why).
//!
//! [DDPM] Ho, Jain, Abbeel 2020, arXiv:2006.11239. [IDDPM] Nichol & Dhariwal 2021, arXiv:2102.09672, eq. 17 (the
//! cosine schedule). [MinSNR] Hang et al. 2023, arXiv:2303.09556 (the loss weighting).
//! Chapter 04 measures what each choice buys: on the same 64 000 training images, the cosine schedule with Min-SNR
//! weighting and no dropout took the UNet's Fréchet distance from 101 to about 70, and batches of 32 at a six times
//! higher learning rate (with the narrower top level of `UNetConfig::mnist`) from 70 to about 34.
use crate::diffusion::schedule::PosteriorVariance;
use crate::train::ddpm::LossWeight;
use crate::train::trainer::TrainerConfig;

// ANCHOR: recipe
/// Training steps of the full runs (a step is one batch of BATCH images): 64 000 images, about one pass over MNIST.
pub const STEPS: u64 = 2000;
/// Images per batch. A run this short is far from converged, where more, noisier updates beat fewer, cleaner ones:
/// 2000 steps of 32 reached a lower Fréchet distance than 1000 of 64 in about the same time (chapter 04).
pub const BATCH: i64 = 32;
/// Peak learning rate of AdamW (after a warm-up of WARMUP_FRACTION of the steps, then cosine decay to LR/10,
/// [`crate::train::lr_at`]). High for
/// a small network because the run is short; gradient clipping at GRAD_CLIP keeps the first steps stable.
pub const LR: f64 = 1.2e-2;
pub const WARMUP_FRACTION: f64 = 0.05;
/// [IDDPM] eq. 17: fewer nearly-pure-noise steps than [DDPM]'s linear schedule, which wastes the last few hundred
/// on inputs that are already noise at 28×28.
pub const SCHEDULE: &str = "cosine";
/// [MinSNR]: the nearly clean timesteps stop dominating the gradient.
pub const LOSS_WEIGHT: LossWeight = LossWeight::MinSnr;
/// Exponential moving average of the weights, sampled from (with the warm-up min(β, (1+t)/(10+t)), chapter 04).
pub const EMA_DECAY: f64 = 0.999;
/// Gradient-norm clipping threshold.
pub const GRAD_CLIP: f64 = 1.0;
/// Steps between atomic checkpoints.
pub const CHECKPOINT_EVERY: usize = 250;
// ANCHOR_END: recipe

/// How a run's results tables name its recipe: schedule, loss weighting, peak learning rate and the sampler's
/// variance, e.g. `cosine, Min-SNR, lr 0.01, σ² = β̃`.
pub fn describe(schedule: &str, weight: LossWeight, lr: f64, variance: PosteriorVariance) -> String {
    let weight = match weight {
        LossWeight::Uniform => "uniform",
        LossWeight::MinSnr => "Min-SNR",
    };
    let variance = match variance {
        PosteriorVariance::Beta => "β",
        PosteriorVariance::BetaTilde => "β̃",
    };
    format!("{schedule}, {weight}, lr {lr}, σ² = {variance}")
}

/// Named training presets, one per kind of network the lessons train; each lesson's `--help` shows its flags'
/// defaults from these. ([`TrainerConfig::default`] is [DDPM]'s own CIFAR-10 run, for reference.)
impl TrainerConfig {
    /// The MNIST UNets of lessons 04–06 and lesson 08's latent UNet: the recipe above for `steps` steps of `batch`
    /// images at peak rate `lr` (warm-up WARMUP_FRACTION, EMA_DECAY, GRAD_CLIP, a checkpoint every CHECKPOINT_EVERY).
    pub fn mnist_unet(steps: usize, batch: i64, lr: f64) -> Self {
        TrainerConfig {
            steps,
            batch_size: batch,
            lr,
            warmup: (steps as f64 * WARMUP_FRACTION) as usize,
            ema_decay: Some(EMA_DECAY),
            grad_clip: Some(GRAD_CLIP),
            checkpoint_every: CHECKPOINT_EVERY,
            ..Default::default()
        }
    }

    /// Lesson 03's noise-prediction MLPs (on the 2-D mixture and on MNIST): a warm-up of 1/20 of the steps,
    /// EMA_DECAY, GRAD_CLIP, a checkpoint every 500 steps.
    pub fn ddpm_mlp(steps: usize, batch: i64, lr: f64) -> Self {
        TrainerConfig {
            steps,
            batch_size: batch,
            lr,
            warmup: steps / 20,
            ema_decay: Some(EMA_DECAY),
            grad_clip: Some(GRAD_CLIP),
            checkpoint_every: 500,
            ..Default::default()
        }
    }

    /// Lesson 08's autoencoder: a warm-up of 1/20 of the steps, no EMA (the decoder is used as trained), clipping as
    /// [DDPM], a checkpoint every CHECKPOINT_EVERY steps.
    pub fn mnist_vae(steps: usize, batch: i64, lr: f64) -> Self {
        TrainerConfig {
            steps,
            batch_size: batch,
            lr,
            warmup: steps / 20,
            ema_decay: None,
            checkpoint_every: CHECKPOINT_EVERY,
            ..Default::default()
        }
    }

    /// Denoising score matching in lessons 01 and 02 ([`crate::train::train_dsm`]): a warm-up of 1/20 of the steps,
    /// no clipping and no EMA (lesson 02 adds one for its MNIST network).
    pub fn dsm(steps: usize, batch: i64, lr: f64) -> Self {
        TrainerConfig {
            steps,
            batch_size: batch,
            lr,
            warmup: steps / 20,
            grad_clip: None,
            ema_decay: None,
            ..Default::default()
        }
    }

    /// Lesson 06's mini-CLIP pre-training: a warm-up of 1/20 of the steps, a short EMA (0.99: a few hundred steps
    /// in all), clipping as [DDPM], a checkpoint at the end.
    pub fn mini_clip(steps: usize, batch: i64, lr: f64) -> Self {
        TrainerConfig { steps, batch_size: batch, lr, warmup: steps / 20, ema_decay: Some(0.99), ..Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::NoiseSchedule;

    #[test]
    fn the_recipe_names_a_real_schedule_and_a_sane_trainer() {
        assert!(NoiseSchedule::by_name(SCHEDULE, 1000).is_ok());
        let cfg = TrainerConfig::mnist_unet(1000, BATCH, LR);
        assert_eq!((cfg.warmup, cfg.steps, cfg.batch_size, cfg.grad_clip), (50, 1000, BATCH, Some(GRAD_CLIP)));
        assert_eq!(cfg.ema_decay, Some(EMA_DECAY));
        let mlp = TrainerConfig::ddpm_mlp(1000, 128, 1e-3);
        assert_eq!((mlp.warmup, mlp.checkpoint_every, mlp.ema_decay), (50, 500, Some(EMA_DECAY)));
        let vae = TrainerConfig::mnist_vae(600, 64, 2e-3);
        assert_eq!((vae.warmup, vae.ema_decay, vae.grad_clip), (30, None, Some(1.0)));
    }
}
