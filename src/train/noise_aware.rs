//! Training the networks that guide without being the diffusion model (lesson 10): a noise-aware classifier
//! p_φ(y | x_t, t) and GLIDE's noised CLIP image tower, both on images noised by the forward process at a timestep
//! drawn uniformly from the schedule, as the sampler will show them.
//!
//! [Guidance] Dhariwal & Nichol 2021, arXiv:2105.05233, sec. 4.1: "we train the classifier on noised images"
//! (guided-diffusion's `classifier_train.py`: t uniform, x_t from q_sample, cross-entropy).
//! [GLIDE] Nichol et al. 2022, arXiv:2112.10741, sec. 2.3: a CLIP "trained on noised images", with the contrastive
//! loss of [CLIP] (Radford et al. 2021, arXiv:2103.00020, Fig. 3).
use crate::diffusion::forward::q_sample;
use crate::diffusion::schedule::NoiseSchedule;
use crate::nn::clip::{clip_loss_soft, same_caption};
use crate::nn::encoder_unet::{EncoderUNet, EncoderUNetConfig, NoisyClip};
use crate::train::trainer::{train_model, TrainOutcome, TrainRun, TrainerConfig};
use anyhow::Result;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// x₀ (B, ...) noised to a timestep drawn uniformly from 0..T for each row: (x_t, t) with x_t from [DDPM] eq. 4.
pub fn noised_at_random_timesteps(sched: &NoiseSchedule, x0: &Tensor) -> (Tensor, Tensor) {
    let (b, device) = (x0.size()[0], x0.device());
    let t = Tensor::randint(sched.num_steps() as i64, [b], (Kind::Int64, device)); // (B,) t ~ U{0, …, T−1}
    let eps = x0.randn_like();
    (q_sample(&sched.to_tensor_alpha_bar(device), x0, &t, &eps), t)
}

// ANCHOR: train_classifier
/// Trains p_φ(y | x_t, t) ([`EncoderUNet`] with 10 outputs) with cross-entropy on `images` (N, 1, H, W) in [−1, 1]
/// noised at uniform timesteps of `sched`, against their `labels` (N,). Returns the EMA weights' VarStore (frozen by
/// the caller if it guides), the network and the outcome.
pub fn train_noise_aware_classifier(
    config: &EncoderUNetConfig,
    sched: &NoiseSchedule,
    (images, labels): (&Tensor, &Tensor),
    cfg: &TrainerConfig,
    run: TrainRun,
) -> Result<(VarStore, EncoderUNet, TrainOutcome)> {
    let mut loss = |net: &EncoderUNet, _: &EncoderUNet, batch: &[Tensor], _: usize| {
        let (x_t, t) = noised_at_random_timesteps(sched, &batch[0]);
        net.forward(&x_t, &t, true).cross_entropy_for_logits(&batch[1])
    };
    let run = run.spec("model", config).spec("schedule", sched.num_steps());
    train_model(|p| EncoderUNet::new(p, config.clone()), &[images, labels], cfg, run, &mut loss)
}
// ANCHOR_END: train_classifier

// ANCHOR: train_clip
/// Trains GLIDE's noised CLIP: the image tower sees `images` (N, 1, H, W) in [−1, 1] noised at uniform timesteps,
/// the text side is a frozen text encoder's pooled states `text` (N, D) of each image's caption, whose token ids
/// `ids` (N, L) say which captions are the same text (the [UniCL] targets of the mini-CLIP, [`clip_loss_soft`]).
/// Only the image tower, the text projection and the temperature train.
pub fn train_noisy_clip(
    config: &EncoderUNetConfig,
    sched: &NoiseSchedule,
    (images, text, ids): (&Tensor, &Tensor, &Tensor),
    cfg: &TrainerConfig,
    run: TrainRun,
) -> Result<(VarStore, NoisyClip, TrainOutcome)> {
    let text_dim = text.size()[1];
    let mut loss = |net: &NoisyClip, _: &NoisyClip, batch: &[Tensor], _: usize| {
        let (x_t, t) = noised_at_random_timesteps(sched, &batch[0]);
        let (image_emb, text_emb) = (net.encode_image(&x_t, &t), net.encode_text(&batch[1])); // (B, d_e) each
        clip_loss_soft(&image_emb, &text_emb, &net.logit_scale(), &same_caption(&batch[2]))
    };
    let run = run.spec("model", config).spec("schedule", sched.num_steps());
    train_model(|p| NoisyClip::new(p, config.clone(), text_dim), &[images, text, ids], cfg, run, &mut loss)
}
// ANCHOR_END: train_clip

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The noising is q(x_t | x₀): at t = 0 of a schedule with ᾱ_0 ≈ 1 the image survives, and over many draws the
    /// noised pixels of a constant image have mean √ᾱ_t x₀ and variance 1 − ᾱ_t averaged over uniform t.
    #[test]
    fn random_timestep_noising_follows_the_forward_process() {
        tch::manual_seed(0);
        let sched = NoiseSchedule::cosine(1000);
        let x0 = Tensor::full([20000, 1], 0.5, (Kind::Float, Device::Cpu));
        let (x_t, t) = noised_at_random_timesteps(&sched, &x0);
        let ab = sched.to_tensor_alpha_bar(Device::Cpu).index_select(0, &t).view([-1, 1]);
        let z = (&x_t - ab.sqrt() * 0.5) / (-&ab + 1.0).sqrt(); // the ε drawn: standard normal
        let (m, v) = (z.mean(Kind::Double).double_value(&[]), z.var(true).double_value(&[]));
        assert!(m.abs() < 0.03 && (v - 1.0).abs() < 0.03, "ε mean {m}, variance {v}");
        let (lo, hi) = (t.min().int64_value(&[]), t.max().int64_value(&[]));
        assert!(lo < 10 && hi > 990, "t spans the schedule: {lo}..{hi}");
    }

    /// A few steps on two separable classes lower the noise-aware classifier's loss; the noised CLIP trains too.
    #[test]
    fn both_noise_aware_networks_train() {
        let sched = NoiseSchedule::cosine(1000);
        let images = Tensor::cat(
            &[
                Tensor::full([32, 1, 16, 16], -1.0, (Kind::Float, Device::Cpu)),
                Tensor::full([32, 1, 16, 16], 1.0, (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let labels = Tensor::cat(
            &[Tensor::zeros([32], (Kind::Int64, Device::Cpu)), Tensor::ones([32], (Kind::Int64, Device::Cpu))],
            0,
        );
        let cfg =
            TrainerConfig { steps: 40, batch_size: 16, lr: 3e-3, warmup: 0, ema_decay: None, ..Default::default() };
        let (_, _, out) = train_noise_aware_classifier(
            &EncoderUNetConfig::tiny(2),
            &sched,
            (&images, &labels),
            &cfg,
            TrainRun::new(Device::Cpu, |_| {}),
        )
        .unwrap();
        let first: f64 = out.losses[..5].iter().sum::<f64>() / 5.0;
        let last: f64 = out.losses[35..].iter().sum::<f64>() / 5.0;
        assert!(last < first, "classifier loss {first} -> {last}");
        let text = Tensor::cat(
            &[Tensor::ones([32, 6], (Kind::Float, Device::Cpu)), -Tensor::ones([32, 6], (Kind::Float, Device::Cpu))],
            0,
        );
        let ids = labels.view([-1, 1]);
        let (_, _, out) = train_noisy_clip(
            &EncoderUNetConfig::tiny(8),
            &sched,
            (&images, &text, &ids),
            &cfg,
            TrainRun::new(Device::Cpu, |_| {}),
        )
        .unwrap();
        assert!(out.losses.iter().all(|l| l.is_finite()) && out.losses.len() == 40);
    }
}
