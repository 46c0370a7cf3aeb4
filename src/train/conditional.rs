//! Training a conditional ε-model with condition dropout, the recipe of classifier-free guidance: one network learns
//! both ε_θ(x_t, t, c) and, when the label is replaced by the null label ∅ with probability p_uncond, ε_θ(x_t, t, ∅).
//! It runs through the same trainer and the same loss as [`crate::train::ddpm::train_eps_model`]; only the batches carry
//! labels, which become a context sequence ([`LabelContext`]) the UNet cross-attends to.
//!
//! [CFG] Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598, Algorithm 1 (joint training:
//! c ← ∅ with probability p_uncond) and sec. 4 (p_uncond ∈ {0.1, 0.2} work best).
//! [DDPM] Ho, Jain, Abbeel 2020, arXiv:2006.11239, eq. 14 (L_simple).
//! [LDM] Rombach et al. 2022, arXiv:2112.10752, sec. 3.3 (conditioning through cross-attention to τ_θ(y)).
//! Notation (code -> paper): p_uncond -> p_uncond; null label -> ∅; context -> τ_θ(y); eps_cond -> ε_θ(z_λ, c).
use crate::model::CondEpsModel;
use crate::model::{Cond, WithContext};
use crate::nn::class_cond::LabelConditioned;
use crate::train::ddpm::EpsObjective;
use crate::train::trainer::TrainRun;
use crate::train::trainer::{train_model, TrainOutcome, TrainerConfig};
use anyhow::{ensure, Result};
use tch::nn::{self, VarStore};
use tch::{Kind, Tensor};

/// [CFG] sec. 4: the probability of training on ∅ that the paper found best together with 0.2.
pub const DEFAULT_P_UNCOND: f64 = 0.1;

// ANCHOR: drop_labels
/// Condition dropout, [CFG] Algorithm 1 line 3: each label (B,) i64 is replaced by `null_label` with probability
/// `p_uncond`, independently (drawn from libtorch's generator, which the trainer seeds per step).
pub fn drop_labels(labels: &Tensor, p_uncond: f64, null_label: i64) -> Tensor {
    let drop = Tensor::rand([labels.size()[0]], (Kind::Float, labels.device())).lt(p_uncond); // (B,) bool
    labels.masked_fill(&drop, null_label)
}
// ANCHOR_END: drop_labels

/// [`crate::train::ddpm::train_eps_model`] for a conditional model: builds it with `build` (and a bf16 copy when
/// `cfg.bf16`), trains ε_θ(x_t, t, τ_θ(y)) with the `weight`ed L_simple on `images` (N, C, H, W) in [−1, 1] and
/// their `labels` (N,) i64, dropping each label to ∅ with probability `p_uncond`, and returns the f32 VarStore
/// with the EMA weights (or the last ones), the model on it and the outcome. The trainer slices `[images, labels]`
/// with the same rows, so every image keeps its label. The objective and `p_uncond` go into the checkpoint's run
/// spec (a resume must repeat them); the caller adds the model's config (`run.spec("model", &config)`).
// ANCHOR: train_cond
pub fn train_cond_eps_model<M: CondEpsModel>(
    build: impl Fn(nn::Path) -> LabelConditioned<M>,
    images: &Tensor,
    labels: &Tensor,
    objective: &EpsObjective,
    p_uncond: f64,
    cfg: &TrainerConfig,
    run: TrainRun,
) -> Result<(VarStore, LabelConditioned<M>, TrainOutcome)> {
    ensure!((0.0..=1.0).contains(&p_uncond), "--p-uncond must lie in [0, 1], got {p_uncond}");
    let kind = if cfg.bf16 { Kind::BFloat16 } else { Kind::Float };
    let mut loss_fn = |net: &LabelConditioned<M>, _: &LabelConditioned<M>, batch: &[Tensor], _step: usize| {
        let y = drop_labels(&batch[1], p_uncond, net.labels.null_label()); // (B,)
        let cond = Cond::new(net.labels.forward(&y)); // (B, tokens, dim)
        objective.loss(&WithContext { model: &net.net, cond: &cond }, &batch[0].to_kind(kind))
    };
    let run = objective.record(run).spec("p_uncond", p_uncond);
    train_model(build, &[images, labels], cfg, run, &mut loss_fn)
}
// ANCHOR_END: train_cond

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::NoiseSchedule;
    use crate::nn::class_cond::ClassCondConfig;
    use crate::train::ddpm::LossWeight;
    use crate::train::trainer::TrainRun;
    use tch::Device;

    #[test]
    fn condition_dropout_replaces_labels_at_rate_p_and_keeps_the_rest() {
        tch::manual_seed(0);
        let labels = Tensor::arange(10, (Kind::Int64, Device::Cpu)).repeat([2000]); // (20000,)
        let dropped = drop_labels(&labels, 0.1, 10);
        let is_null = dropped.eq(10);
        let rate = is_null.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        assert!((rate - 0.1).abs() < 0.01, "dropout rate {rate}"); // 0.1 ± 5 standard errors (0.0021)
        assert!(dropped.masked_select(&is_null.logical_not()).equal(&labels.masked_select(&is_null.logical_not())));
        assert!(drop_labels(&labels, 0.0, 10).equal(&labels));
        assert!(drop_labels(&labels, 1.0, 10).eq(10).all().int64_value(&[]) == 1);
    }

    #[test]
    fn the_bf16_path_trains_a_bf16_copy_and_keeps_f32_master_weights() {
        tch::manual_seed(4);
        let images = Tensor::rand([4, 1, 8, 8], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let labels = Tensor::from_slice(&[0i64, 1, 2, 3]);
        let cfg = TrainerConfig { steps: 3, batch_size: 4, lr: 1e-3, warmup: 0, bf16: true, ..Default::default() };
        let config = ClassCondConfig { num_classes: 4, ..ClassCondConfig::tiny() };
        let sched = NoiseSchedule::ddpm(1000);
        let (vs, model, out) = train_cond_eps_model(
            |p| config.build(p),
            &images,
            &labels,
            &EpsObjective::new(&sched, LossWeight::MinSnr, Device::Cpu),
            0.5,
            &cfg,
            TrainRun::new(Device::Cpu, &mut |_| {}),
        )
        .unwrap();
        assert!(out.losses.len() == 3 && out.losses.iter().all(|l| l.is_finite()), "{:?}", out.losses);
        assert!(vs.variables().values().all(|v| v.kind() == Kind::Float));
        assert_eq!(model.labels.null_context(1).kind(), Kind::Float);
    }

    /// Short runs on 8 fixed noisy images: the loss falls; the ∅ row of the label table learns only when labels
    /// are dropped; images and labels must come in pairs.
    #[test]
    fn a_tiny_conditional_unet_learns_and_the_null_label_trains_only_with_dropout() {
        tch::manual_seed(2);
        let images = Tensor::rand([8, 1, 8, 8], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 0, 1, 2, 3]);
        let sched = NoiseSchedule::ddpm(1000);
        let cfg =
            TrainerConfig { steps: 30, batch_size: 8, lr: 3e-3, warmup: 0, ema_decay: None, ..Default::default() };
        let config = ClassCondConfig { num_classes: 4, ..ClassCondConfig::tiny() };
        let run = |labels: &Tensor, p_uncond: f64| {
            // the table as built (the first build is the master VarStore's), and as trained
            let initial = std::cell::RefCell::new(None::<Tensor>);
            let build = |p: nn::Path| {
                let m = config.build(p);
                initial.borrow_mut().get_or_insert_with(|| m.labels.null_context(1).detach().copy());
                m
            };
            let (_, model, out) = train_cond_eps_model(
                build,
                &images,
                labels,
                &EpsObjective::new(&sched, LossWeight::Uniform, Device::Cpu),
                p_uncond,
                &cfg,
                TrainRun::new(Device::Cpu, &mut |_| {}),
            )?;
            let moved = (model.labels.null_context(1) - initial.take().unwrap()).abs().max().double_value(&[]);
            Ok::<_, anyhow::Error>((out.losses, moved))
        };
        let (losses, null_moved) = run(&labels, 0.3).unwrap();
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        assert!(mean(&losses[25..]) < 0.8 * mean(&losses[..5]), "{losses:?}");
        assert!(null_moved > 1e-3, "with p_uncond = 0.3 the ∅ row trains: moved {null_moved}");
        let (_, null_moved) = run(&labels, 0.0).unwrap();
        assert_eq!(null_moved, 0.0, "without dropout ∅ is never seen");
        let err = run(&labels.narrow(0, 0, 6), 0.1).err().unwrap();
        assert!(err.to_string().contains("rows"), "{err}");
    }
}
