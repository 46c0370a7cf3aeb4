//! Lesson 11 — cascades: a small model draws the digit at 14×14, a second one draws it again at 28×28.
//!
//! It trains a text-conditioned base model at 14×14 behind lesson 06's frozen text encoder, and a super-resolution
//! model 14 → 28 that reads the base's image upsampled, twice: with Gaussian conditioning augmentation (its input
//! noised to a random level it is told) and without. It samples the cascade with the augmentation level fixed and
//! swept, grades every level with the Fréchet distance and prompt accuracy, and compares the cascade with lesson 06's
//! direct 28×28 model, whose training time its own run recorded. Chapter 11 walks through this file.
use anyhow::{Context, Result};
use clap::Parser;
use scratch_diffusion::cli::{crate_root, lesson_main, CommonArgs, StepLog};
use scratch_diffusion::data::captions::CaptionStyle;
use scratch_diffusion::data::mnist;
use scratch_diffusion::diffusion::schedule::NoiseSchedule;
use scratch_diffusion::nn::classifier::MnistClassifier;
use scratch_diffusion::nn::clip::digit_prompts;
use scratch_diffusion::nn::super_resolution::SR_IN_CHANNELS;
use scratch_diffusion::nn::unet::UNetConfig;
use scratch_diffusion::pipelines::text_to_image::{shipped_dir, Draw, PipelineConfig, TextToImage, DEFAULT_GUIDANCE};
use scratch_diffusion::studies::cascade::{self as study, Contender, LevelRow};
use scratch_diffusion::studies::guidance_methods::plot_rows;
use scratch_diffusion::text::captions::caption_images_with;
use scratch_diffusion::train::cascade::{downsample, train_super_resolution};
use scratch_diffusion::train::ddpm::{EpsObjective, LossWeight};
use scratch_diffusion::train::text_cond::{train_text_cond_unet, TextData};
use scratch_diffusion::train::trainer::{TrainRun, TrainerConfig};
use serde_json::json;
use tch::{Device, Tensor};

/// [CDM] sec. 4.2 trains with s drawn uniformly up to a maximum; half the schedule here.
const MAX_LEVEL: usize = 500;
/// Lesson 06's peak learning rate, for both stages.
const LR: f64 = 1e-2;

#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Training steps of the 14×14 base model [default: 1500, or 10 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    base_steps: Option<u64>,
    /// Training steps of each super-resolution model [default: 1000, or 10 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    sr_steps: Option<u64>,
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(i64).range(2..=4096))]
    batch: i64,
    /// Training digits (with two captions each) [default: 30000, or 512 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(32..=60000))]
    train_images: Option<i64>,
    /// Samples each grade draws, one per prompt "a handwritten d" in turn [default: 200, or 20 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(10..=250))]
    num_samples: Option<i64>,
    /// Augmentation levels the cascade is sampled at (0: the base model's samples as they are).
    #[arg(long, value_delimiter = ',', default_values_t = [0, 50, 100, 200, 300, 500])]
    #[arg(value_parser = clap::value_parser!(u64).range(0..=1000))]
    levels: Vec<u64>,
    /// Continue interrupted training from the checkpoints in OUT.
    #[arg(long)]
    resume: bool,
}

fn main() {
    lesson_main(|| cascade(Args::parse()))
}

fn cascade(args: Args) -> Result<()> {
    let run = args.common.init("lesson11")?;
    let q = |quick: u64, full: u64| if run.quick { quick } else { full };
    let (base_steps, sr_steps) = (args.base_steps.unwrap_or(q(10, 1500)), args.sr_steps.unwrap_or(q(10, 1000)));
    let (m, n) = (args.train_images.unwrap_or(q(512, 30000) as i64), args.num_samples.unwrap_or(q(20, 200) as i64));
    let sample_steps = if run.quick { 5 } else { 20 };
    let data = mnist::load(&run.data_dir).context("lesson 11 trains on MNIST")?;
    let direct = TextToImage::load(&shipped_dir(), run.device)
        .context("lesson 06's shipped pipeline (./run.sh lesson 06 --ship): its text encoder and its direct model")?;
    let clf = MnistClassifier::load_shipped(Device::Cpu)?;
    let sched = NoiseSchedule::by_name(&direct.config.schedule, direct.config.num_train_timesteps)?;
    let objective = EpsObjective::new(&sched, LossWeight::Uniform, run.device);
    let text = &direct.prompts;

    // ANCHOR: data
    let images = data.train_images.narrow(0, 0, m); // (M, 1, 28, 28) in [0, 1]
    let captioned = caption_images_with(
        &images,
        &data.train_labels.narrow(0, 0, m),
        (2, CaptionStyle::Varied),
        run.seed,
        text.tokenizer.clone(),
    )?;
    let full = (&images * 2.0 - 1.0).to_device(run.device); // (M, 1, 28, 28) in [−1, 1]
    let low = downsample(&full); // (M, 1, 14, 14): the base stage's data
                                 // ANCHOR_END: data

    // ANCHOR: base
    let base_config = UNetConfig {
        block_out_channels: vec![32, 64], // 14×14 → 7×7
        attention: vec![false, true],
        cross_attention_dim: Some(text.hidden_size()),
        pooled_context_embedding: true,
        ..UNetConfig::mnist()
    };
    let empty = text.tokenizer.encode_padded("", text.context_len);
    let text_data =
        TextData { encoder: &text.text_encoder, captions: &captioned.captions, empty: &empty, p_uncond: 0.1 };
    let cfg =
        |steps: u64| TrainerConfig { seed: run.seed, ..TrainerConfig::mnist_unet(steps as usize, args.batch, LR) };
    let log = StepLog::new(base_steps, "base 14×14", 10);
    let ckpt = run.path("base_checkpoint.safetensors");
    let train = TrainRun::logged(run.device, &log).checkpoint(&ckpt, args.resume);
    let (base_vs, base_unet, base_out) =
        train_text_cond_unet(&base_config, text_data, &low, &objective, &cfg(base_steps), train)?;
    log.finish();
    let config = PipelineConfig { image_size: 14, ..direct.config.clone() };
    let text_config = text.text_encoder.config.clone();
    let base = TextToImage::new(config, text.tokenizer.clone(), text_config, text.text_vs(), base_vs, base_unet, None)?;
    // ANCHOR_END: base

    // ANCHOR: super_resolution
    let sr_config = UNetConfig { in_channels: SR_IN_CHANNELS, ..UNetConfig::mnist() };
    let mut sr = Vec::new(); // (trained with augmentation, without)
    for (name, max_level) in [("sr_augmented", MAX_LEVEL), ("sr_plain", 0)] {
        let log = StepLog::new(sr_steps, name, 10);
        let ckpt = run.path(&format!("{name}_checkpoint.safetensors"));
        let train = TrainRun::logged(run.device, &log).checkpoint(&ckpt, args.resume);
        sr.push(train_super_resolution(&sr_config, &full, &sched, max_level, &objective, &cfg(sr_steps), train)?);
        log.finish();
    }
    // ANCHOR_END: super_resolution
    println!(
        "base: {:.0} s; super-resolution with augmentation {:.0} s, without {:.0} s",
        base_out.seconds, sr[0].2.seconds, sr[1].2.seconds
    );

    // ANCHOR: sample
    let prompts: Vec<String> = digit_prompts().into_iter().cycle().take(n as usize).collect();
    let asked = Tensor::from_slice(&(0..n).map(|i| i % 10).collect::<Vec<_>>());
    let draw = Draw::new(DEFAULT_GUIDANCE, sample_steps, run.seed + 1);
    let started = std::time::Instant::now();
    let (base_samples, _) = base.generate_each(&prompts, &draw)?; // (n, 1, 14, 14) in [0, 1]
    let base_seconds = started.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    let mut sr_seconds = 0.0;
    for &level in &args.levels {
        let started = std::time::Instant::now();
        let how = (level as usize, sample_steps, run.seed + 2);
        let up = |i: usize| study::super_resolve(&sr[i].1, &sched, &base_samples, [28, 28], how, run.device);
        let (with, without) = (up(0), up(1));
        sr_seconds = started.elapsed().as_secs_f64() / 2.0; // one model's pass
        let with_augmentation = study::grade(&clf, &with, &asked, &data.test_images);
        let without_augmentation = study::grade(&clf, &without, &asked, &data.test_images);
        println!(
            "level {level}: FD {:.1} with augmentation, {:.1} without",
            with_augmentation.frechet_distance, without_augmentation.frechet_distance
        );
        rows.push((LevelRow { level: level as usize, with_augmentation, without_augmentation }, with, without));
    }
    // ANCHOR_END: sample
    let started = std::time::Instant::now();
    let (direct_samples, _) = direct.generate_each(&prompts, &draw)?;
    let direct_seconds = started.elapsed().as_secs_f64();
    let direct_grade = study::grade(&clf, &direct_samples, &asked, &data.test_images);
    let best = rows
        .iter()
        .min_by(|a, b| a.0.with_augmentation.frechet_distance.total_cmp(&b.0.with_augmentation.frechet_distance))
        .context("no --levels")?;
    let plain_best = rows
        .iter()
        .min_by(|a, b| a.0.without_augmentation.frechet_distance.total_cmp(&b.0.without_augmentation.frechet_distance))
        .context("no --levels")?;
    let direct_train = lesson06_train_seconds();
    let contenders = vec![
        Contender {
            model: format!("cascade, augmented, s = {}", best.0.level),
            train_seconds: base_out.seconds + sr[0].2.seconds,
            sample_seconds: base_seconds + sr_seconds,
            grade: best.0.with_augmentation.clone(),
        },
        Contender {
            model: format!("cascade, not augmented, s = {}", plain_best.0.level),
            train_seconds: base_out.seconds + sr[1].2.seconds,
            sample_seconds: base_seconds + sr_seconds,
            grade: plain_best.0.without_augmentation.clone(),
        },
        Contender {
            model: "lesson 06, direct 28×28".into(),
            train_seconds: direct_train.unwrap_or(f64::NAN),
            sample_seconds: direct_seconds,
            grade: direct_grade.clone(),
        },
    ];

    let level_rows: Vec<LevelRow> = rows.iter().map(|r| r.0.clone()).collect();
    study::plot_levels(&run.path("cascade_levels.png"), &level_rows, direct_grade.frechet_distance)?;
    let zero = rows.iter().find(|r| r.0.level == 0).unwrap_or(&rows[0]);
    let tiles = vec![
        ("base 14×14".to_string(), upsample_nearest(&base_samples.narrow(0, 0, 10))),
        (format!("SR, augmented, s = {}", best.0.level), best.1.narrow(0, 0, 10)),
        (format!("SR, not augmented, s = {}", zero.0.level), zero.2.narrow(0, 0, 10)),
        ("lesson 06, direct".into(), direct_samples.narrow(0, 0, 10)),
    ];
    plot_rows(&run.path("cascade_stages.png"), "The cascade's stages for \"a handwritten 0\" … \"9\"", &tiles)?;
    run.write_results(&[
        ("levels", study::levels_table(&level_rows)),
        ("contenders", study::contenders_table(&contenders)),
    ])?;
    run.write_metrics(json!({
        "base": {"network": base_config, "steps": base_steps, "seconds": base_out.seconds},
        "super_resolution": {"network": sr_config, "steps": sr_steps, "max_level": MAX_LEVEL,
            "seconds_augmented": sr[0].2.seconds, "seconds_plain": sr[1].2.seconds},
        "batch_size": args.batch, "lr": LR, "train_images": m, "samples": n, "sample_steps": sample_steps,
        "levels": level_rows, "contenders": contenders, "lesson06_train_seconds": direct_train,
        "best_level": best.0.level,
    }))?;
    println!("outputs in {} ({:.1} s)", run.out.display(), run.elapsed_s());
    Ok(())
}

/// 14×14 images shown at 28×28 (each pixel a 2×2 block), for the figure.
fn upsample_nearest(x: &Tensor) -> Tensor {
    x.upsample_nearest2d([28, 28], None, None)
}

/// Lesson 06's UNet training time, as its own run recorded it beside chapter 06 (None without the book).
fn lesson06_train_seconds() -> Option<f64> {
    let path = crate_root().join("book/src/figures/lesson06/metrics.json");
    let metrics: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    metrics["unet_seconds"].as_f64()
}
