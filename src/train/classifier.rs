//! Training the graders' MNIST classifier ([`crate::nn::classifier`]): cross-entropy on the shared trainer
//! ([`trainer::train`]), random shifts as augmentation (`cargo run --release --bin train_classifier`; see
//! data/classifier/README.md for how the shipped weights were made).
use crate::nn::classifier::MnistClassifier;
use crate::train::trainer::{self, TrainOutcome, TrainRun, TrainerConfig};
use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

/// Linear learning-rate warm-up, in steps, before the cosine decay of [`crate::train::lr_at`].
const WARMUP_STEPS: usize = 100;

/// Shifts each image of x (B, C, H, W) by its own random whole number of pixels in [−m, m] on each axis, filling
/// with zeros (the MNIST background): pad by m, then crop an H×W window at a random offset.
pub fn random_shift(x: &Tensor, m: i64) -> Tensor {
    if m == 0 {
        return x.shallow_clone();
    }
    let (b, c, h, w) = x.size4().expect("images (B, C, H, W)");
    let dev = x.device();
    let padded = x.constant_pad_nd([m, m, m, m]); // (B, C, H+2m, W+2m)
    let dy = Tensor::randint(2 * m + 1, [b, 1], (Kind::Int64, dev)); // top-left corner of the window
    let dx = Tensor::randint(2 * m + 1, [b, 1], (Kind::Int64, dev));
    let rows = (dy + Tensor::arange(h, (Kind::Int64, dev))).view([b, 1, h, 1]).expand([b, c, h, w + 2 * m], false);
    let cols = (dx + Tensor::arange(w, (Kind::Int64, dev))).view([b, 1, 1, w]).expand([b, c, h, w], false);
    padded.gather(2, &rows, false).gather(3, &cols, false) // (B, C, H, W+2m) -> (B, C, H, W)
}

/// Optimiser steps in one epoch: the last partial batch is dropped (each epoch reshuffles, so no image is lost for
/// good, and batch norm never sees a batch of one).
pub fn steps_per_epoch(n: i64, batch: i64) -> usize {
    (n / batch) as usize
}

/// Trains `model` on `images` (N, 1, 28, 28) in [0, 1] and `labels` (N,) with cross-entropy on the shared trainer
/// (`cfg`: [`TrainerConfig::mnist_classifier`]), each batch shifted at random ([`random_shift`]). `run.on_step` sees
/// every step; with the same seed and thread count a run on CPU is reproducible. Fails, naming the step, if the loss
/// stops being finite.
pub fn train_classifier(
    model: &MnistClassifier,
    (images, labels): (&Tensor, &Tensor),
    cfg: &TrainerConfig,
    run: TrainRun,
) -> Result<TrainOutcome> {
    let n = images.size()[0];
    ensure!(
        (2..=n).contains(&cfg.batch_size),
        "batch size {} must be between 2 and the {n} training images",
        cfg.batch_size
    );
    let mut loss = |batch: &[Tensor], _: usize| {
        let x = random_shift(&batch[0], model.config.max_shift); // (B, 1, 28, 28)
        model.logits(&x, true).cross_entropy_for_logits(&batch[1])
    };
    trainer::train(&model.vs, None, &[images, labels], cfg, &mut loss, run)
}

impl TrainerConfig {
    /// The classifier's recipe: `epochs` passes over `n` images in batches of `batch`, a warm-up of
    /// [`WARMUP_STEPS`] (at most one epoch) to peak rate `lr` and cosine decay to lr/10, no weight decay, no clipping,
    /// no EMA (batch norm's running statistics are the averages that matter here).
    pub fn mnist_classifier(epochs: usize, n: i64, batch: i64, lr: f64) -> Self {
        let per_epoch = steps_per_epoch(n, batch);
        TrainerConfig {
            steps: epochs * per_epoch,
            batch_size: batch,
            lr,
            warmup: WARMUP_STEPS.min(per_epoch),
            grad_clip: None,
            ema_decay: None,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mnist::{self, Mnist};
    use crate::nn::classifier::ClassifierConfig;
    use tch::Device;

    #[test]
    fn random_shift_moves_each_image_rigidly_within_m_pixels() {
        tch::manual_seed(0);
        let (b, m) = (400, 2);
        let x = Tensor::zeros([b, 1, 28, 28], (Kind::Float, Device::Cpu));
        let _ = x.narrow(2, 14, 1).narrow(3, 10, 1).fill_(1.0); // one bright pixel at (14, 10) in every image
        let y = random_shift(&x, m);
        assert_eq!(y.size(), [b, 1, 28, 28]);
        let mut seen = std::collections::HashSet::new();
        for i in 0..b {
            let img = y.get(i).get(0);
            assert_eq!(img.sum(Kind::Double).double_value(&[]), 1.0, "mass is kept: nothing falls off the edge");
            let at = img.flatten(0, -1).argmax(0, false).int64_value(&[]);
            let (dy, dx) = (at / 28 - 14, at % 28 - 10);
            assert!(dy.abs() <= m && dx.abs() <= m, "shift ({dy}, {dx}) beyond ±{m}");
            seen.insert((dy, dx));
        }
        assert_eq!(seen.len(), 25, "every shift in [−2, 2]² occurs");
        assert!(random_shift(&x, 0).equal(&x));
    }

    #[test]
    fn a_short_training_run_learns_to_classify() {
        let data = mnist::load(&mnist::resolve_dir(None)).unwrap();
        let small = Mnist {
            train_images: data.train_images.narrow(0, 0, 2048),
            train_labels: data.train_labels.narrow(0, 0, 2048),
            test_images: data.test_images.narrow(0, 0, 1000),
            test_labels: data.test_labels.narrow(0, 0, 1000),
        };
        let clf = MnistClassifier::new(ClassifierConfig::mnist(), Device::Cpu);
        let cfg = TrainerConfig::mnist_classifier(2, 2048, 64, 2e-3);
        let data = (&small.train_images, &small.train_labels);
        let losses = train_classifier(&clf, data, &cfg, TrainRun::new(Device::Cpu, |_| {})).unwrap().losses;
        assert_eq!(losses.len(), 2 * 32);
        let acc = clf.accuracy(&small.test_images, &small.test_labels);
        assert!(acc > 0.85, "accuracy after 64 steps on 2048 images: {acc}");
        let (first, last) = (losses[..8].iter().sum::<f64>() / 8.0, losses[56..].iter().sum::<f64>() / 8.0);
        assert!(last < 0.3 * first, "loss {first} -> {last}");
    }
}
