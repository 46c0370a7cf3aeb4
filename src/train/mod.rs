//! Training: one loop ([`trainer`]: AdamW, warm-up and cosine decay, clipping, EMA, bf16 with f32 master weights,
//! atomic checkpoints that resume exactly), the objectives of each lesson on top of it, and named recipes.
pub mod classifier;
pub mod clip;
pub mod conditional;
pub mod ddpm;
pub mod ema;
pub mod latent_diffusion;
pub mod recipe;
pub mod text_cond;
pub mod toy_score;
pub mod trainer;

use anyhow::{bail, Result};
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};

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

/// Trains a noise-conditional score model with the denoising-score-matching loss ([NCSN] eq. 6, see
/// [`crate::diffusion::score_matching::dsm_loss`]). Each step draws a batch with `batch(step)` and one noise level
/// per sample uniformly from `sigmas`. `score(x, σ)` is the model whose variables live in `vs`.
/// Returns the loss of every step; `cb(step, loss)` is called after each (for progress bars and logs).
/// Stops with an error, naming the step, if the loss stops being finite.
// ANCHOR: train_dsm
pub fn train_dsm(
    vs: &nn::VarStore,
    score: impl Fn(&Tensor, &Tensor) -> Tensor,
    mut batch: impl FnMut(usize) -> Tensor,
    sigmas: &[f64],
    opts: &TrainOpts,
    cb: &mut dyn FnMut(usize, f64),
) -> Result<Vec<f64>> {
    let mut opt = nn::Adam::default().build(vs, opts.lr)?;
    let ladder = Tensor::from_slice(sigmas).to_kind(Kind::Float).to_device(vs.device()); // (L,)
    let mut losses = Vec::with_capacity(opts.steps);
    for step in 0..opts.steps {
        let x0 = batch(step);
        let idx = Tensor::randint(sigmas.len() as i64, [x0.size()[0]], (Kind::Int64, vs.device()));
        let sigma = ladder.index_select(0, &idx); // (B,)
        let loss = crate::diffusion::score_matching::dsm_loss(&score, &x0, &sigma);
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            bail!("training diverged: the loss became {value} at step {step}; lower --lr and run again");
        }
        opt.set_lr(lr_at(opts, step));
        opt.backward_step(&loss);
        losses.push(value);
        cb(step, value);
    }
    Ok(losses)
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
