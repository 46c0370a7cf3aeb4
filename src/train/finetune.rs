//! Fine-tuning a trained text-conditioned UNet on a handful of images (lesson 12): LoRA, DreamBooth (with or without
//! prior preservation) and textual inversion all go through one loop; they differ only in which variables train
//! (the VarStore handed in) and in where the prompts' token vectors come from.
//!
//! [DreamBooth] Ruiz et al. 2023, arXiv:2208.12242, sec. 3.3, eq. 2: the instance loss on (x, "a [V] class") plus
//! λ times the same loss on class images x_pr drawn by the frozen model for "a class" (prior preservation):
//! L = E w_t‖x̂_θ(α_t x + σ_t ε, c) − x‖² + λ w_t'‖x̂_θ(α_t' x_pr + σ_t' ε', c_pr) − x_pr‖² (here in ε-form with
//! w_t = 1, L_simple).
//! [TI] Gal et al. 2022, arXiv:2208.01618, sec. 3, eq. 2: v* = argmin_v E ‖ε − ε_θ(z_t, t, c_θ(y; v))‖², every
//! weight frozen: only the pseudo-word's vector v trains.
//! [LoRA] Hu et al. 2021, arXiv:2106.09685: only A and B train ([`crate::nn::lora`]).
use crate::model::{Cond, WithContext};
use crate::nn::text_encoder::TextEncoder;
use crate::nn::unet::UNet;
use crate::train::ddpm::EpsObjective;
use crate::train::trainer::{train, TrainOutcome, TrainRun, TrainerConfig};
use anyhow::{ensure, Result};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// Where the P prompts' contexts come from.
pub enum Prompts<'a> {
    /// Computed once by the frozen text encoder: (P, L, D) with masks (P, L) (LoRA, DreamBooth).
    Frozen(&'a Cond),
    /// Recomputed at every step, because a new token's vectors train (textual inversion): ids (P, L) in which
    /// ids ≥ vocab_size read the rows of `extra` (E, D), and their masks (P, L).
    Inverted { encoder: &'a TextEncoder, ids: &'a Tensor, mask: &'a Tensor, extra: &'a Tensor },
}

impl Prompts<'_> {
    /// The contexts of prompt rows `rows` (B,): (B, L, D) and masks (B, L).
    fn select(&self, rows: &Tensor) -> Cond {
        match self {
            Prompts::Frozen(c) => Cond::masked(
                c.context.index_select(0, rows),
                c.mask.as_ref().expect("prompt masks").index_select(0, rows),
            ),
            Prompts::Inverted { encoder, ids, mask, extra } => {
                let (ids, mask) = (ids.index_select(0, rows), mask.index_select(0, rows)); // (B, L)
                                                                                           // [TI] eq. 2: c_θ(y; v), the frozen encoder reading the trainable vectors
                let hidden = encoder.forward_with_extra_tokens(&ids, Some(&mask), Some(extra)); // (B, L, D)
                Cond::masked(hidden, mask)
            }
        }
    }
}

/// Images to fine-tune on, (N, C, H, W) in [−1, 1], with the prompt row (N,) each is captioned by.
#[derive(Clone, Copy)]
pub struct Examples<'a> {
    pub images: &'a Tensor,
    pub prompts: &'a Tensor,
}

/// Rows 0..n of `e` repeated to `rows` rows (the smaller set of a pair cycles through its examples).
fn cycled(e: &Examples, rows: i64) -> (Tensor, Tensor) {
    let n = e.images.size()[0];
    let index = Tensor::arange(rows, (Kind::Int64, e.images.device())).remainder(n); // (rows,)
    (e.images.index_select(0, &index), e.prompts.index_select(0, &index))
}

// ANCHOR: fine_tune
/// Fine-tunes through the frozen-or-not `unet`: the variables of `trainable` (LoRA adapters attached to `unet`,
/// the UNet's own VarStore for DreamBooth, a new token's vectors for textual inversion) follow L_simple of
/// `objective` on `instance`, plus `λ` × the same loss on the class images of `prior` ([DreamBooth] eq. 2; each
/// step takes a batch of each). Nothing outside `trainable` changes.
#[allow(clippy::too_many_arguments)] // the network, what trains, its text, its two data sets and the trainer's three
pub fn fine_tune(
    unet: &UNet,
    trainable: &VarStore,
    prompts: &Prompts,
    instance: Examples,
    prior: Option<(Examples, f64)>,
    objective: &EpsObjective,
    cfg: &TrainerConfig,
    run: TrainRun,
) -> Result<TrainOutcome> {
    ensure!(!cfg.bf16, "fine-tuning runs in f32 (the frozen parts are f32)");
    ensure!(instance.images.size()[0] == instance.prompts.size()[0], "one prompt row per instance image");
    let rows = instance.images.size()[0].max(prior.map_or(0, |(p, _)| p.images.size()[0]));
    let (images, prompt_rows) = cycled(&instance, rows);
    let (prior_images, prior_rows, lambda) = match prior {
        Some((p, lambda)) => {
            ensure!(lambda >= 0.0, "the prior-preservation weight λ must be ≥ 0, got {lambda}");
            let (x, r) = cycled(&p, rows);
            (x, r, lambda)
        }
        None => (images.zeros_like(), prompt_rows.zeros_like(), 0.0),
    };
    let mut loss_fn = |batch: &[Tensor], _step: usize| {
        let cond = prompts.select(&batch[1]); // (B, L, D)
        let instance_loss = objective.loss(&WithContext { model: unet, cond: &cond }, &batch[0]);
        if lambda == 0.0 {
            return instance_loss;
        }
        let cond = prompts.select(&batch[3]);
        // [DreamBooth] eq. 2: + λ · the loss on the frozen model's own class images
        instance_loss + objective.loss(&WithContext { model: unet, cond: &cond }, &batch[2]) * lambda
    };
    let run = objective.record(run).spec("prior_preservation", lambda);
    train(trainable, None, &[&images, &prompt_rows, &prior_images, &prior_rows], cfg, &mut loss_fn, run)
}
// ANCHOR_END: fine_tune

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::NoiseSchedule;
    use crate::nn::lora::{attach_lora, LoraConfig, LoraTargets};
    use crate::nn::text_encoder::TextEncoderConfig;
    use crate::nn::unet::UNetConfig;
    use crate::train::ddpm::LossWeight;
    use crate::train::trainer::StepInfo;
    use tch::Device;

    fn snapshot(vs: &VarStore) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(k, t)| (k, t.copy())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn unchanged(before: &[(String, Tensor)], vs: &VarStore) -> bool {
        let now = vs.variables();
        before.iter().all(|(k, t)| now[k].equal(t))
    }

    /// LoRA on a frozen random UNet learns to tell two prompts apart (the loss falls), and textual inversion
    /// changes nothing but the new token's vectors.
    #[test]
    fn only_what_trains_changes_and_the_loss_falls() {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        tch::manual_seed(3);
        let text_vs = VarStore::new(Device::Cpu);
        let text_cfg = TextEncoderConfig { vocab_size: 20, ..TextEncoderConfig::tiny() };
        let encoder = TextEncoder::new(text_vs.root() / "text_model", text_cfg.clone());
        let mut unet_vs = VarStore::new(Device::Cpu);
        let mut unet = UNet::new(unet_vs.root(), UNetConfig::tiny_cond(text_cfg.hidden_size));
        unet_vs.freeze();
        let mut text_vs = text_vs;
        text_vs.freeze();
        // 8×8 images: a bright square for prompt 1, blank for prompt 0
        let n = 32;
        let which = Tensor::arange(n, tch::kind::INT64_CPU).remainder(2); // (N,)
        let images = Tensor::full([n, 1, 8, 8], -1.0, tch::kind::FLOAT_CPU);
        images
            .narrow(2, 2, 4)
            .narrow(3, 2, 4)
            .copy_(&(which.to_kind(Kind::Float) * 2.0 - 1.0).view([n, 1, 1, 1]).expand([n, 1, 4, 4], false));
        let ids = Tensor::from_slice2(&[[0i64, 5, 1, 2], [0, 6, 1, 2]]); // (P, L): two prompts, one token apart
        let mask = Tensor::ones([2, 4], (Kind::Bool, Device::Cpu));
        let cond = Cond::masked(tch::no_grad(|| encoder.forward(&ids, Some(&mask))), mask.shallow_clone());
        let sched = NoiseSchedule::by_name("linear", 1000).unwrap();
        let objective = EpsObjective::new(&sched, LossWeight::Uniform, Device::Cpu);
        let cfg = TrainerConfig {
            steps: 120,
            batch_size: 16,
            lr: 1e-2,
            warmup: 5,
            ema_decay: None,
            ..TrainerConfig::default()
        };
        let (unet_before, text_before) = (snapshot(&unet_vs), snapshot(&text_vs));

        let lora = VarStore::new(Device::Cpu);
        let config = LoraConfig { rank: 4, alpha: 4.0, targets: LoraTargets::Transformer };
        assert!(attach_lora(&mut unet, &lora.root(), "lora_unet_", &config) > 0);
        let examples = Examples { images: &images, prompts: &which };
        let out = fine_tune(
            &unet,
            &lora,
            &Prompts::Frozen(&cond),
            examples,
            None,
            &objective,
            &cfg,
            TrainRun::new(Device::Cpu, |_: StepInfo| {}),
        )
        .unwrap();
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        let (first, last) = (mean(&out.losses[..20]), mean(&out.losses[100..]));
        assert!(last < 0.8 * first, "LoRA's loss fell from {first} to only {last}");
        assert!(unchanged(&unet_before, &unet_vs) && unchanged(&text_before, &text_vs), "only A and B train");

        // textual inversion: one new vector (id 20 = vocab_size) in place of token 6
        crate::nn::lora::detach_all(&mut unet);
        let emb = VarStore::new(Device::Cpu);
        let v = emb.root().var_copy("sks", &encoder.token_embedding_rows(&[5]));
        let ids = Tensor::from_slice2(&[[0i64, 5, 1, 2], [0, 20, 1, 2]]);
        let inverted = Prompts::Inverted { encoder: &encoder, ids: &ids, mask: &mask, extra: &v };
        let before = v.copy();
        let cfg = TrainerConfig { steps: 10, ..cfg };
        fine_tune(&unet, &emb, &inverted, examples, None, &objective, &cfg, TrainRun::new(Device::Cpu, |_| {}))
            .unwrap();
        assert!(!v.equal(&before), "the new token's vector trains");
        assert!(unchanged(&unet_before, &unet_vs) && unchanged(&text_before, &text_vs), "and nothing else does");
        tch::set_num_threads(threads);
    }
}
