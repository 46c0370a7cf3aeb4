//! Training a ControlNet for a frozen text-conditioned UNet (lesson 13): only the ControlNet's weights move; the
//! loss is the UNet's own L_simple with the ControlNet's residuals added, on (image, caption, hint) triples, the
//! caption dropped to "" part of the time.
//!
//! [ControlNet] Zhang, Rao, Agrawala 2023, arXiv:2302.05543, sec. 3.3, eq. 5: L = E ‖ε − ε_θ(z_t, t, c_t, c_f)‖²,
//! with the text prompt c_t replaced by "" for 50 % of the samples so that the ControlNet learns to read the hint c_f.
use crate::model::{Cond, EpsModel};
use crate::nn::controlnet::{copy_unet_encoder, ControlNet, ControlNetConfig, ControlScale};
use crate::nn::text_unet::encode_context;
use crate::nn::unet::UNet;
use crate::train::ddpm::EpsObjective;
use crate::train::text_cond::{pick_captions, TextData};
use crate::train::trainer::{train, TrainOutcome, TrainRun, TrainerConfig};
use anyhow::{ensure, Result};
use tch::nn::VarStore;
use tch::Tensor;

/// [ControlNet] sec. 3.3: the share of prompts replaced by "" while training.
pub const P_EMPTY_PROMPT: f64 = 0.5;

// ANCHOR: controlled
/// The frozen UNet with a ControlNet at full strength, for one batch's conditioning (B rows) and hints (B, C, H, W):
/// ε_θ(x_t, t, c_t, c_f), an [`EpsModel`] the DDPM objective trains through.
pub struct Controlled<'a> {
    pub unet: &'a UNet,
    pub control: &'a ControlNet,
    pub cond: &'a Cond,
    pub hint: &'a Tensor,
}

impl EpsModel for Controlled<'_> {
    fn eps(&self, x_t: &Tensor, t: &Tensor, train: bool) -> Tensor {
        let cond = (Some(&self.cond.context), self.cond.mask.as_ref());
        let full = ControlScale { conditioning_scale: 1.0, guess_mode: false };
        let residuals = self.control.residuals(x_t, t, cond, self.hint, full, train);
        // the frozen UNet runs in eval mode whatever the ControlNet does (dropout, if it had any, stays off)
        self.unet.forward_controlled(x_t, t, cond, &residuals, false) // (B, C, H, W)
    }
}
// ANCHOR_END: controlled

/// What [`train_controlnet`] calls at its snapshot steps: (step, the ControlNet with its current weights).
pub type ControlSnapshot<'a> = dyn FnMut(usize, &ControlNet) + 'a;

// ANCHOR: train_controlnet
/// Trains a ControlNet `config` for the frozen `unet` (its VarStore `unet_vs`, frozen: nothing of it may train): the
/// copy of its way down starts from its weights ([`copy_unet_encoder`]), and L_simple of `objective` is taken on
/// `images` (N, C, H, W) in [−1, 1] with their `hints` (N, C_hint, H', W') and one of each image's captions through
/// the frozen text encoder of `text` (dropped to "" with probability `text.p_uncond`, [`P_EMPTY_PROMPT`] in the
/// paper). At each step of `snapshot_at`, `on_snapshot(step, control)` sees the current weights after that step's
/// loss (the trainer reseeds the noise at every step, so what it draws changes nothing). Returns the ControlNet's
/// VarStore with the EMA weights (or the last ones), the network and the outcome.
#[allow(clippy::too_many_arguments)] // the frozen parts, the data and the two hooks every trainer of the crate takes
pub fn train_controlnet(
    (unet, unet_vs): (&UNet, &VarStore),
    config: &ControlNetConfig,
    text: TextData,
    (images, hints): (&Tensor, &Tensor),
    objective: &EpsObjective,
    cfg: &TrainerConfig,
    run: TrainRun,
    (snapshot_at, on_snapshot): (&[usize], &mut ControlSnapshot),
) -> Result<(VarStore, ControlNet, TrainOutcome)> {
    let frozen = unet_vs.variables().values().all(|v| !v.requires_grad());
    ensure!(frozen, "the UNet a ControlNet trains for must be frozen");
    ensure!(!cfg.bf16, "the ControlNet trains in f32 (the frozen UNet is f32)");
    ensure!(
        images.size()[0] == hints.size()[0],
        "{} images but {} hints: one hint per image",
        images.size()[0],
        hints.size()[0]
    );
    let TextData { encoder, captions, empty, p_uncond } = text;
    let mut vs = VarStore::new(run.device);
    let control = ControlNet::new(vs.root(), config.clone());
    copy_unet_encoder(&vs, unet_vs)?;
    let mut loss_fn = |batch: &[Tensor], step: usize| {
        let (ids, mask) = pick_captions(&batch[2], &batch[3], empty, p_uncond); // (B, L) each
        let cond = encode_context(encoder, &ids, &mask); // (B, L, D) and the mask (B, L)
        let loss = objective.loss(&Controlled { unet, control: &control, cond: &cond, hint: &batch[1] }, &batch[0]);
        if snapshot_at.contains(&step) {
            tch::no_grad(|| on_snapshot(step, &control));
        }
        loss
    };
    let run = objective.record(run).spec("controlnet", config).spec("p_uncond", p_uncond);
    let data = [images, hints, &captions.ids, &captions.lens];
    let outcome = train(&vs, None, &data, cfg, &mut loss_fn, run)?;
    if let Some(ema) = &outcome.ema {
        ema.copy_to(&mut vs);
    }
    Ok((vs, control, outcome))
}
// ANCHOR_END: train_controlnet

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::NoiseSchedule;
    use crate::nn::text_encoder::{TextEncoder, TextEncoderConfig};
    use crate::nn::unet::UNetConfig;
    use crate::text::captions::CaptionIds;
    use crate::text::Bpe;
    use crate::train::ddpm::LossWeight;
    use tch::{Device, Kind};

    /// The smallest control problem: 8×8 images that are blank or hold a bright square, one caption for both, and a
    /// hint that says which. A frozen (untrained) UNet cannot tell them apart; after training only the ControlNet,
    /// the loss falls, the UNet's weights are untouched and the zero convolutions have left zero.
    #[test]
    fn only_the_controlnet_trains_and_the_loss_falls() {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        tch::manual_seed(7);
        let n = 64;
        let bpe = Bpe::train(&["a digit".to_string()], 10);
        let text_vs = VarStore::new(Device::Cpu);
        let text_cfg = TextEncoderConfig { vocab_size: bpe.vocab_size() as i64, ..TextEncoderConfig::tiny() };
        let encoder = TextEncoder::new(text_vs.root(), text_cfg.clone());
        let mut unet_vs = VarStore::new(Device::Cpu);
        let unet = UNet::new(unet_vs.root(), UNetConfig::tiny_cond(text_cfg.hidden_size));
        unet_vs.freeze();
        let before: Vec<(String, Tensor)> = unet_vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
        let is_square = Tensor::from_slice(&(0..n).map(|i| (i % 2) as f32).collect::<Vec<_>>()).view([n, 1, 1, 1]);
        let square = Tensor::zeros([1, 1, 8, 8], (Kind::Float, Device::Cpu));
        let _ = square.narrow(2, 2, 4).narrow(3, 2, 4).fill_(1.0);
        let hints = &is_square * &square; // (n, 1, 8, 8): the square's outline-to-be, or nothing
        let images = &hints * 2.0 - 1.0; // (n, 1, 8, 8) in [−1, 1]
        let caps = CaptionIds::tokenize(&bpe, &vec![vec!["a digit".to_string()]; n as usize], 8).unwrap();
        let empty = bpe.encode_padded("", 8);
        let cfg =
            TrainerConfig { steps: 80, batch_size: 16, lr: 3e-3, warmup: 8, ema_decay: None, ..Default::default() };
        let sched = NoiseSchedule::ddpm(1000);
        let mut snapshots = vec![];
        let (vs, _control, out) = train_controlnet(
            (&unet, &unet_vs),
            &ControlNetConfig::pixel_space(UNetConfig::tiny_cond(text_cfg.hidden_size), 1),
            TextData { encoder: &encoder, captions: &caps, empty: &empty, p_uncond: P_EMPTY_PROMPT },
            (&images, &hints),
            &EpsObjective::new(&sched, LossWeight::Uniform, Device::Cpu),
            &cfg,
            TrainRun::new(Device::Cpu, |_| {}),
            (&[0, 79], &mut |step, _| snapshots.push(step)),
        )
        .unwrap();
        assert_eq!(snapshots, [0, 79]);
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        assert!(mean(&out.losses[70..]) < 0.8 * mean(&out.losses[..10]), "{:?}", out.losses);
        let after = unet_vs.variables();
        assert!(before.iter().all(|(name, v)| after[name].equal(v)), "the frozen UNet changed");
        let zero = vs.variables()["controlnet_mid_block.weight"].abs().sum(Kind::Float).double_value(&[]);
        assert!(zero > 0.0, "the zero convolution never moved");
        // a UNet that is not frozen is refused
        let free_vs = VarStore::new(Device::Cpu);
        let free = UNet::new(free_vs.root(), UNetConfig::tiny_cond(text_cfg.hidden_size));
        let text = TextData { encoder: &encoder, captions: &caps, empty: &empty, p_uncond: 0.5 };
        let objective = EpsObjective::new(&sched, LossWeight::Uniform, Device::Cpu);
        let err = train_controlnet(
            (&free, &free_vs),
            &ControlNetConfig::pixel_space(UNetConfig::tiny_cond(text_cfg.hidden_size), 1),
            text,
            (&images, &hints),
            &objective,
            &cfg,
            TrainRun::new(Device::Cpu, |_| {}),
            (&[], &mut |_, _| {}),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("frozen"), "{err}");
        tch::set_num_threads(threads);
    }
}
