//! Trains the MNIST classifier that grades generated samples (the network is src/nn/classifier.rs, its training
//! src/train/classifier.rs) and saves its weights with their config beside them. data/classifier/README.md says how
//! the shipped `data/classifier/mnist_cnn.safetensors` was made.
use anyhow::Result;
use clap::Parser;
use scratch_diffusion::checkpoint;
use scratch_diffusion::cli::{lesson_main, log_line, positive, progress, CommonArgs};
use scratch_diffusion::data::mnist::{self, Mnist};
use scratch_diffusion::nn::classifier::{ClassifierConfig, MnistClassifier};
use scratch_diffusion::train::classifier::{steps_per_epoch, train_classifier};
use scratch_diffusion::train::trainer::{StepInfo, TrainRun, TrainerConfig};
use serde_json::json;
use std::path::PathBuf;

/// Training images used by --quick: enough to see the loss fall, small enough for a few seconds.
const QUICK_IMAGES: i64 = 2048;

/// Train the MNIST classifier used to grade generated digits (Fréchet distance, class histogram, confidence).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, allow_negative_numbers = true)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Passes over the 60 000 training images [default: 10, or 1 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    epochs: Option<u64>,
    /// Images per step.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(i64).range(2..=4096))]
    batch: i64,
    /// Peak learning rate of Adam.
    #[arg(long, default_value_t = 2e-3, value_parser = positive)]
    lr: f64,
    /// Where to write the weights (the config goes beside them as .json)
    /// [default: data/classifier/mnist_cnn.safetensors, or <out>/mnist_cnn.safetensors with --quick].
    #[arg(long, value_name = "PATH")]
    weights: Option<PathBuf>,
}

fn main() {
    lesson_main(|| run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    let run = args.common.init("train_classifier")?;
    let epochs = args.epochs.unwrap_or(if run.quick { 1 } else { 10 }) as usize;
    let weights = args.weights.clone().unwrap_or_else(|| {
        if run.quick {
            run.path("mnist_cnn.safetensors") // never overwrite the shipped weights from a smoke test
        } else {
            PathBuf::from(scratch_diffusion::nn::classifier::SHIPPED_WEIGHTS)
        }
    });
    let mut data = mnist::load(&run.data_dir)?;
    if run.quick {
        data = Mnist {
            train_images: data.train_images.narrow(0, 0, QUICK_IMAGES),
            train_labels: data.train_labels.narrow(0, 0, QUICK_IMAGES),
            ..data
        };
    }
    let config = ClassifierConfig::mnist();
    let model = MnistClassifier::new(config.clone(), run.device);
    let params: i64 = model.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum(); // not the BN statistics
    println!("classifier {config:?}: {params} parameters; {epochs} epochs on {} images", data.train_images.size()[0]);

    let steps = steps_per_epoch(data.train_images.size()[0], args.batch);
    let cfg = TrainerConfig {
        seed: run.seed,
        ..TrainerConfig::mnist_classifier(epochs, data.train_images.size()[0], args.batch, args.lr)
    };
    let bar = progress(cfg.steps as u64, "train");
    let (mut epoch_loss, mut per_epoch) = (0.0, Vec::new());
    let start = std::time::Instant::now();
    let (images, labels) = (data.train_images.to_device(run.device), data.train_labels.to_device(run.device));
    let on_step = |s: StepInfo| {
        bar.inc(1);
        bar.set_message(format!("loss {:.4}", s.loss));
        epoch_loss += s.loss / steps as f64;
        if (s.step + 1) % steps == 0 {
            let acc = model.accuracy(&data.test_images, &data.test_labels);
            let t = start.elapsed().as_secs_f64();
            log_line(
                &bar,
                format!(
                    "epoch {}/{epochs}: mean loss {epoch_loss:.4}, test accuracy {:.2} %, {t:.0} s",
                    s.epoch + 1,
                    100.0 * acc
                ),
            );
            per_epoch.push(json!({"epoch": s.epoch + 1, "mean_loss": epoch_loss, "test_accuracy": acc, "time_s": t}));
            epoch_loss = 0.0;
        }
    };
    train_classifier(&model, (&images, &labels), &cfg, TrainRun::new(run.device, on_step))?;
    bar.finish_and_clear();
    let train_time_s = start.elapsed().as_secs_f64();
    let accuracy = model.accuracy(&data.test_images, &data.test_labels);

    checkpoint::save(&model.vs, &weights, &config)?;
    let bytes = std::fs::metadata(&weights).map(|m| m.len()).unwrap_or(0);
    println!(
        "test accuracy {:.2} % after {train_time_s:.0} s on {} threads; wrote {} ({bytes} bytes) and its .json",
        100.0 * accuracy,
        tch::get_num_threads(),
        weights.display()
    );
    run.write_metrics(json!({
        "config": config, "parameters": params, "epochs": epochs, "train": cfg,
        "test_accuracy": accuracy, "train_time_s": train_time_s, "per_epoch": per_epoch,
        "weights": weights.display().to_string(), "weights_bytes": bytes,
    }))?;
    Ok(())
}
