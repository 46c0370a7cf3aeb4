//! Training: one loop ([`trainer`]: AdamW, warm-up and cosine decay, clipping, EMA, bf16 with f32 master weights,
//! atomic checkpoints that resume exactly), the objectives of each lesson on top of it (denoising score matching
//! here, ε-prediction in [`ddpm`], …), and named recipes ([`recipe`]).
pub mod cascade;
pub mod classifier;
pub mod clip;
pub mod conditional;
pub mod controlnet;
pub mod ddpm;
pub mod ema;
pub mod finetune;
pub mod latent_diffusion;
pub mod noise_aware;
pub mod recipe;
pub mod text_cond;
pub mod toy_score;
pub mod trainer;
pub mod unclip;

use anyhow::Result;
use tch::nn;
use tch::{Kind, Tensor};
use trainer::{TrainOutcome, TrainRun, TrainerConfig};

/// Budget and optimiser settings of a training run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainOpts {
    pub steps: usize,
    pub batch_size: i64,
    /// Peak learning rate of Adam.
    pub lr: f64,
    /// Linear warm-up steps before the cosine decay.
    pub warmup: usize,
}

/// Learning rate at `step`: linear warm-up to `lr`, then cosine decay to lr/10 at the last step
/// (SGDR, Loshchilov & Hutter 2017, eq. 5 with η_min = η_max/10 and a single cycle).
pub fn lr_at(opts: &TrainOpts, step: usize) -> f64 {
    if step < opts.warmup {
        return opts.lr * (step + 1) as f64 / opts.warmup as f64;
    }
    let progress = (step - opts.warmup) as f64 / (opts.steps.saturating_sub(opts.warmup).max(1)) as f64;
    let min = opts.lr / 10.0;
    // SGDR eq. 5: η = η_min + ½(η_max − η_min)(1 + cos(π · T_cur/T_i))
    min + 0.5 * (opts.lr - min) * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// Where [`train_dsm`] gets its clean batches.
pub enum DsmData<'a> {
    /// Rows of a data set (N, ...), in the trainer's epochs of shuffled batches (lesson 02's MNIST).
    Rows(&'a Tensor),
    /// A fresh draw of `batch_size` samples every step from a density we can sample (lesson 01's mixture); drawn
    /// after the trainer seeds the step, so a resumed run draws the same.
    Draw(&'a dyn Fn(i64) -> Tensor),
}

/// Trains a noise-conditional score model with the denoising-score-matching loss ([NCSN] eq. 6, see
/// [`crate::diffusion::score_matching::dsm_loss`]) on the shared trainer ([`trainer::train_model`]: AdamW, warm-up
/// and cosine decay, EMA when `cfg` asks for it, checkpoints and resume through `run`). The model is built by
/// `build`; `score(model, x, σ)` is its score. Each step takes a clean batch from `data` and gives every sample one
/// noise level drawn uniformly from `sigmas`. Returns the VarStore (holding the EMA weights when there is an EMA), the
/// model and the outcome; a loss that stops being finite ends the run with an error naming the step.
// ANCHOR: train_dsm
pub fn train_dsm<M>(
    build: impl Fn(nn::Path) -> M,
    score: impl Fn(&M, &Tensor, &Tensor) -> Tensor,
    data: DsmData,
    sigmas: &[f64],
    cfg: &TrainerConfig,
    run: TrainRun,
) -> Result<(nn::VarStore, M, TrainOutcome)> {
    let ladder = Tensor::from_slice(sigmas).to_kind(Kind::Float).to_device(run.device); // (L,)
    let rows: Vec<&Tensor> = match &data {
        DsmData::Rows(x) => vec![*x],
        DsmData::Draw(_) => vec![], // the loss draws its own batch
    };
    let run = run.spec("sigmas", sigmas).spec("draws", matches!(data, DsmData::Draw(_)));
    trainer::train_model(build, &rows, cfg, run, &mut |net, _, batch, _| {
        let x0 = match &data {
            DsmData::Rows(_) => batch[0].shallow_clone(),
            DsmData::Draw(draw) => draw(cfg.batch_size),
        };
        let idx = Tensor::randint(sigmas.len() as i64, [x0.size()[0]], (Kind::Int64, x0.device()));
        let sigma = ladder.index_select(0, &idx); // (B,): each sample's own level σ_i
        crate::diffusion::score_matching::dsm_loss(|x, s| score(net, x, s), &x0, &sigma)
    })
}
// ANCHOR_END: train_dsm

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_warms_up_then_decays_to_a_tenth() {
        let o = TrainOpts { steps: 100, batch_size: 1, lr: 1e-3, warmup: 10 };
        assert!((lr_at(&o, 0) - 1e-4).abs() < 1e-12);
        assert!((lr_at(&o, 9) - 1e-3).abs() < 1e-12);
        assert!((lr_at(&o, 10) - 1e-3).abs() < 1e-12);
        assert!((lr_at(&o, 55) - 5.5e-4).abs() < 1e-12); // halfway: η_min + ½(η_max − η_min)
        assert!((lr_at(&o, 100) - 1e-4).abs() < 1e-12);
    }
}
