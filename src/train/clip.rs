//! Pre-training the mini-CLIP of lesson 06 contrastively on (image, caption) pairs through the shared trainer.
//!
//! [CLIP] Radford et al. 2021, arXiv:2103.00020, Figure 3 (the symmetric cross-entropy over the batch).
use crate::nn::clip::{ClipTargets, MiniClip, MiniClipConfig};
use crate::train::trainer::TrainRun;
use crate::train::trainer::{train_model, TrainOutcome, TrainerConfig};
use anyhow::{ensure, Result};
use tch::nn::{self, VarStore};
use tch::{Kind, Tensor};

/// Checks what [`train_mini_clip`] is given against the config, naming what is wrong.
fn check_inputs(config: &MiniClipConfig, images: &Tensor, ids: &Tensor, mask: Option<&Tensor>) -> Result<()> {
    let (n, shape) = (images.size()[0], images.size());
    ensure!(
        shape.len() == 4 && shape[1] == config.in_channels,
        "images must be (N, {}, H, W), got {shape:?}",
        config.in_channels
    );
    ensure!(ids.dim() == 2 && ids.kind() == Kind::Int64, "token ids must be (N, L) int64, got {:?}", ids.size());
    ensure!(ids.size()[0] == n, "{n} images but {} captions: give one caption per image", ids.size()[0]);
    let l = ids.size()[1];
    let max_len = config.text.max_position_embeddings;
    ensure!(l <= max_len, "captions have {l} tokens, the text encoder at most {max_len}: tokenize to ≤ {max_len}");
    let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
    let vocab = config.text.vocab_size;
    ensure!(
        lo >= 0 && hi < vocab,
        "token ids span [{lo}, {hi}], the vocabulary has {vocab}: use the model's tokenizer"
    );
    if let Some(m) = mask {
        ensure!(m.size() == ids.size(), "mask is {:?}, ids {:?}: they must have the same shape", m.size(), ids.size());
    }
    Ok(())
}

// ANCHOR: train_mini_clip
/// Builds a [`MiniClip`] on a fresh VarStore (and a bf16 copy when `cfg.bf16`) and trains it through the shared
/// trainer on matched pairs: `images` (N, C, H, W) in [−1, 1], caption `ids` (N, L) int64 and optional `mask`
/// (N, L) bool, one caption per image, batched by the same random rows. Returns the f32 VarStore holding the EMA
/// weights (or the last weights without EMA), the model on it, and the outcome, as `train_eps_model` does.
/// AdamW's weight decay reaches every variable, logit_scale included (CLIP exempts it): keep it small.
pub fn train_mini_clip(
    config: &MiniClipConfig,
    images: &Tensor,
    ids: &Tensor,
    mask: Option<&Tensor>,
    targets: ClipTargets,
    cfg: &TrainerConfig,
    run: TrainRun,
) -> Result<(VarStore, MiniClip, TrainOutcome)> {
    check_inputs(config, images, ids, mask)?;
    let kind = if cfg.bf16 { Kind::BFloat16 } else { Kind::Float };
    let mut loss_fn = |net: &MiniClip, _: &MiniClip, batch: &[Tensor], _step: usize| {
        net.loss(&batch[0].to_kind(kind), &batch[1], batch.get(2), targets)
    };
    let mut data = vec![images, ids];
    data.extend(mask);
    let build = |p: nn::Path| MiniClip::new(p, config.clone());
    let run = run.spec("model", config).spec("targets", targets).spec("mask", mask.is_some());
    train_model(build, &data, cfg, run, &mut loss_fn)
}
// ANCHOR_END: train_mini_clip

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::clip::tokenize;
    use crate::nn::clip::zero_shot_accuracy;
    use crate::text::Bpe;
    use crate::train::trainer::TrainRun;
    use tch::Device;

    #[test]
    fn a_tiny_mini_clip_learns_to_tell_zero_from_one() {
        // one intra-op thread: for tensors this small, a second thread only spin-waits (and crawls on a busy CPU)
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        tch::manual_seed(2);
        let n = 64;
        let corpus: Vec<String> = (0..n).map(|i| if i % 2 == 0 { "zero" } else { "one" }.to_string()).collect();
        let bpe = Bpe::train(&corpus, 20);
        let config = MiniClipConfig::tiny(bpe.vocab_size() as i64);
        assert_eq!(config.eos_token_id, bpe.end_id());
        let (ids, mask) = tokenize(&bpe, &corpus, 8);
        // class 0: a blank canvas; class 1: a bright square; both noisy, 16×16
        let is_one = Tensor::from_slice(&(0..n).map(|i| (i % 2) as f32).collect::<Vec<_>>()).view([n, 1, 1, 1]);
        let square = Tensor::zeros([1, 1, 16, 16], tch::kind::FLOAT_CPU);
        let _ = square.narrow(2, 4, 8).narrow(3, 4, 8).fill_(2.0);
        let images =
            (is_one * square - 1.0 + Tensor::randn([n, 1, 16, 16], tch::kind::FLOAT_CPU) * 0.2).clamp(-1.0, 1.0);
        let cfg = TrainerConfig {
            steps: 150,
            batch_size: 16,
            lr: 3e-3,
            warmup: 10,
            ema_decay: Some(0.99),
            ..Default::default()
        };
        let (_vs, model, out) = train_mini_clip(
            &config,
            &images,
            &ids,
            Some(&mask),
            ClipTargets::default(),
            &cfg,
            TrainRun::new(Device::Cpu, &mut |_| {}),
        )
        .unwrap();
        let (first, last) = (out.losses[..10].iter().sum::<f64>(), out.losses[140..].iter().sum::<f64>());
        assert!(last < first, "loss {first} -> {last}");
        let (cand_ids, cand_mask) = tokenize(&bpe, &["zero".to_string(), "one".to_string()], 8);
        let labels = Tensor::from_slice(&(0..n).map(|i| i % 2).collect::<Vec<i64>>());
        let acc = zero_shot_accuracy(&model, &images, &cand_ids, Some(&cand_mask), &labels);
        // 8 "zero" and 8 "one" pairs: the soft targets' entropy, ln 8, is the least loss possible; it gets close
        let rows = Tensor::arange(16, (Kind::Int64, Device::Cpu));
        let batch_loss = tch::no_grad(|| {
            let (x, t, m) = (images.index_select(0, &rows), ids.index_select(0, &rows), mask.index_select(0, &rows));
            model.loss(&x, &t, Some(&m), ClipTargets::SameCaption).double_value(&[])
        });
        let floor = 8f64.ln();
        assert!(batch_loss > floor - 1e-4 && batch_loss < floor + 0.02, "loss {batch_loss}, floor ln 8 = {floor}");
        assert!(acc >= 0.95, "zero-shot accuracy {acc}");
        // mismatched inputs are named
        let e = train_mini_clip(
            &config,
            &images.narrow(0, 0, 8),
            &ids,
            None,
            ClipTargets::Pairs,
            &cfg,
            TrainRun::new(Device::Cpu, &mut |_| {}),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("8 images but 64 captions"), "{e}");
        tch::set_num_threads(threads);
    }
}
