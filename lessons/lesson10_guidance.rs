//! Lesson 10 — guidance beyond classifier-free: classifier guidance, CLIP guidance (GLIDE) and dynamic thresholding
//! (Imagen).
//!
//! It trains a noise-aware classifier p_φ(y | x_t, t) (the UNet's encoder half with a pooled head) and a noised
//! CLIP image tower against lesson 06's frozen text encoder, then guides lesson 04's unconditional UNet with the
//! gradient of each, and compares them with classifier-free guidance of lesson 05's class-conditional UNet on the
//! same axes: how often the samples are the digit asked for, how far they are from real digits (Fréchet distance),
//! how balanced their classes are, as the scale sweeps. Last, it pushes lesson 06's pipeline to large guidance with
//! x̂₀ left alone, clipped (static) or dynamically thresholded. Chapter 10 walks through this file.
use anyhow::{Context, Result};
use clap::Parser;
use scratch_diffusion::cli::{finite, positive, unit_interval, CommonArgs, StepLog};
use scratch_diffusion::data::captions::{held_out_prompt_per_row, held_out_prompts, CaptionStyle};
use scratch_diffusion::data::{mnist, to_unit};
use scratch_diffusion::nn::classifier::MnistClassifier;
use scratch_diffusion::nn::clip::digit_prompts;
use scratch_diffusion::nn::encoder_unet::EncoderUNetConfig;
use scratch_diffusion::pipelines::ddpm::{load_class_cond, load_unet, shipped_class_cond, shipped_unet};
use scratch_diffusion::pipelines::text_to_image::{shipped_dir, TextToImage, DEFAULT_SAMPLE_STEPS};
use scratch_diffusion::sampling::classifier_guidance::{ClassifierGuide, ClipGuide, GradientGuidance, GuidanceForm};
use scratch_diffusion::sampling::ddpm::PosteriorVariance;
use scratch_diffusion::sampling::guidance::ClassifierFreeGuidance;
use scratch_diffusion::sampling::wrappers::{Threshold, DYNAMIC_PERCENTILE};
use scratch_diffusion::studies::guidance_methods::{self as study, ddim_samples, sweep, Grading};
use scratch_diffusion::text::captions::caption_images_with;
use scratch_diffusion::train::noise_aware::{train_noise_aware_classifier, train_noisy_clip};
use scratch_diffusion::train::recipe;
use scratch_diffusion::train::trainer::{TrainRun, TrainerConfig};
use serde_json::json;
use tch::{Device, Kind, Tensor};

/// Lesson 10: classifier guidance, CLIP guidance and dynamic thresholding, against classifier-free guidance.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Training steps of the noise-aware classifier and of the noised CLIP, each [default: 1500, or 20 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    /// Images per training batch.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(i64).range(2..=4096))]
    batch: i64,
    /// Peak learning rate of both (AdamW, warm-up then cosine decay).
    #[arg(long, default_value_t = recipe::LR, value_parser = positive)]
    lr: f64,
    /// Training images captioned for the noised CLIP [default: 20000, or 512 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(2..=60000))]
    clip_images: Option<i64>,
    /// DDIM steps of every guided sample [default: 50, or 10 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    sample_steps: Option<u64>,
    /// Samples per method and scale, split evenly over the ten digits [default: 200, or 20 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(10..=10000))]
    num_samples: Option<i64>,
    /// Classifier-free guidance scales w of lesson 05's model (1: the conditional model).
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 1.5, 2.0, 3.0, 5.0], value_parser = finite)]
    cfg_scales: Vec<f64>,
    /// Classifier guidance scales s (0: lesson 04's unguided model).
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0], value_parser = finite)]
    classifier_scales: Vec<f64>,
    /// Classifier guidance scales of Algorithm 1 on DDPM's ancestral sampler, the same number of steps (0: that
    /// sampler unguided).
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 8.0, 32.0], value_parser = finite)]
    algorithm1_scales: Vec<f64>,
    /// CLIP guidance scales s.
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 2.0, 4.0, 8.0, 16.0], value_parser = finite)]
    clip_scales: Vec<f64>,
    /// Guidance scales w of lesson 06's pipeline for the thresholding study.
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 3.0, 10.0, 20.0], value_parser = finite)]
    threshold_scales: Vec<f64>,
    /// Percentiles p of dynamic thresholding, comma-separated (Imagen's 0.995, and one inside MNIST's sparse ink).
    #[arg(long, value_delimiter = ',', default_values_t = [DYNAMIC_PERCENTILE, 0.95], value_parser = unit_interval)]
    percentiles: Vec<f64>,
    /// Accuracies at which the methods' Fréchet distances are compared, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [0.85, 0.95], value_parser = unit_interval)]
    matched_accuracy: Vec<f64>,
    /// Continue interrupted training from OUT/*_checkpoint.safetensors.
    #[arg(long)]
    resume: bool,
}

fn main() {
    scratch_diffusion::cli::lesson_main(|| run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    let run = args.common.init("lesson10")?;
    let q = |quick: u64, full: u64| if run.quick { quick } else { full };
    let steps = args.steps.unwrap_or(q(20, 1500)) as usize;
    let (sample_steps, n) =
        (args.sample_steps.unwrap_or(q(10, 50)) as usize, args.num_samples.unwrap_or(q(20, 200) as i64));
    anyhow::ensure!(n % 10 == 0, "--num-samples must be a multiple of 10 (as many of each digit), got {n}");
    let m = args.clip_images.unwrap_or(q(512, 20000) as i64);
    anyhow::ensure!(m >= args.batch, "--clip-images ({m}) must be at least --batch ({}): lower --batch", args.batch);
    let data = mnist::load(&run.data_dir).context("lesson 10 trains on MNIST")?;
    let shipped =
        |lesson: &str| format!("lesson {lesson}'s shipped model (remake it with ./run.sh lesson {lesson} --ship)");
    let (_vs04, unet, sched) = load_unet(&shipped_unet(), run.device).with_context(|| shipped("04"))?;
    let (_vs05, class_cond, sched05) =
        load_class_cond(&shipped_class_cond(), run.device).with_context(|| shipped("05"))?;
    let pipe = TextToImage::load(&shipped_dir(), run.device).with_context(|| shipped("06"))?;
    let images = (&data.train_images * 2.0 - 1.0).to_device(run.device); // (60000, 1, 28, 28) in [−1, 1]
    let labels = data.train_labels.to_device(run.device);
    let cfg = TrainerConfig { seed: run.seed, ..TrainerConfig::mnist_unet(steps, args.batch, args.lr) };
    let trunk = |out: i64| if run.quick { EncoderUNetConfig::tiny(out) } else { EncoderUNetConfig::mnist(out) };

    // ANCHOR: train
    // p_φ(y | x_t, t): lesson 04's encoder half and a pooled head, on digits noised at uniform timesteps
    let (clf_ckpt, clip_ckpt) =
        (run.path("classifier_checkpoint.safetensors"), run.path("clip_checkpoint.safetensors"));
    let log = StepLog::new(steps as u64, "classifier", 10);
    let train_run = TrainRun::logged(run.device, &log).checkpoint(&clf_ckpt, args.resume);
    let (mut clf_vs, clf, clf_outcome) =
        train_noise_aware_classifier(&trunk(10), &sched, (&images, &labels), &cfg, train_run)?;
    clf_vs.freeze();
    log.finish();
    // the noised CLIP: its image tower against lesson 06's frozen text encoder, one caption per image
    let captioned = caption_images_with(
        &data.train_images.narrow(0, 0, m),
        &data.train_labels.narrow(0, 0, m),
        (1, CaptionStyle::Varied),
        run.seed,
        pipe.prompts.tokenizer.clone(),
    )?;
    let (ids, lens) = (captioned.captions.ids.select(1, 0), captioned.captions.lens.select(1, 0)); // (M, L), (M,)
    let text = study::pooled_text_states(&pipe.prompts, &ids, &lens); // (M, D)
    let log = StepLog::new(steps as u64, "clip", 10);
    let train_run = TrainRun::logged(run.device, &log).checkpoint(&clip_ckpt, args.resume);
    let clip_data = (&images.narrow(0, 0, m), &text, &ids.to_device(run.device));
    let (mut clip_vs, clip, clip_outcome) = train_noisy_clip(&trunk(64), &sched, clip_data, &cfg, train_run)?;
    clip_vs.freeze();
    log.finish();
    // ANCHOR_END: train
    println!("noise-aware classifier: {:.0} s; noised CLIP: {:.0} s", clf_outcome.seconds, clip_outcome.seconds);
    let losses: Vec<_> =
        clf_outcome.losses.iter().zip(&clip_outcome.losses).map(|(a, b)| vec![*a, *b]).enumerate().collect();
    run.write_loss_csv("loss.csv", &["classifier_cross_entropy", "clip_contrastive"], &losses)?;
    let series =
        [("classifier cross-entropy", &clf_outcome.losses[..]), ("CLIP contrastive", &clip_outcome.losses[..])];
    scratch_diffusion::plot::loss_curve(&run.path("loss.png"), "Lesson 10: the two guides' training losses", &series)?;

    // how well each reads the digit from x_t, against the graders' classifier that never saw noise
    let grader = MnistClassifier::load_shipped(Device::Cpu)?;
    let test_images = (data.test_images.narrow(0, 0, 1000) * 2.0 - 1.0).to_device(run.device); // (1000, 1, 28, 28)
    let test = (&test_images, &data.test_labels.narrow(0, 0, 1000));
    let digit_text = clip.encode_text(&study::pooled_prompt_states(&pipe.prompts, &digit_prompts())?); // (10, d_e)
    let timesteps: Vec<usize> = (0..=10).map(|k| (k * 100).min(sched.num_steps() - 1)).collect();
    let by_t = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| study::accuracy_by_timestep(f, &sched, test, &timesteps);
    let read_by_t = [
        ("noise-aware classifier", by_t(&|x, t| clf.forward(x, t, false))),
        ("noised CLIP, zero-shot", by_t(&|x, t| clip.encode_image(x, t).matmul(&digit_text.tr()))), // (N, 10)
        (
            "graders' classifier (no noise in training)",
            by_t(&|x, _| grader.logits(&to_unit(x).to_device(Device::Cpu), false)),
        ),
    ];
    study::plot_accuracy_by_timestep(&run.path("accuracy_by_timestep.png"), &read_by_t)?;

    // ANCHOR: sweeps
    // the same starting noise and the same asked-for digits for every method and scale
    let requested = Tensor::arange(10, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(n / 10, 0, None); // (N,)
    tch::manual_seed(run.seed as i64 + 1);
    let z = Tensor::randn([requested.size()[0], 1, 28, 28], (Kind::Float, run.device));
    let grading = Grading { clf: &grader, test_images: &data.test_images, test_labels: &data.test_labels, requested };
    let labels = grading.requested.to_device(run.device);
    let mut tiles = Vec::new();
    // classifier-free guidance of lesson 05's class-conditional UNet
    let (cond, null) = (class_cond.labels.forward(&labels), class_cond.labels.null_context(1));
    let mut draw = |w| {
        let guided = ClassifierFreeGuidance::new(&class_cond.net, cond.shallow_clone(), null.shallow_clone(), w);
        ddim_samples(&guided, &sched05, &z, sample_steps)
    };
    let cfg_rows = sweep("classifier-free", &args.cfg_scales, &mut draw, &grading, &mut tiles);
    // classifier guidance of lesson 04's unconditional UNet
    let guide = ClassifierGuide { classifier: &clf, labels: labels.shallow_clone() };
    let mut draw = |s| ddim_samples(&GradientGuidance::new(&unet, &guide, &sched, s), &sched, &z, sample_steps);
    let clf_rows = sweep("classifier", &args.classifier_scales, &mut draw, &grading, &mut tiles);
    // the same guide in Algorithm 1's form, a shift of the mean of DDPM's ancestral steps, from the same z
    let (timesteps, respaced) = sched.respaced(sample_steps);
    let form = GuidanceForm::Ddpm { respaced, timesteps, variance: PosteriorVariance::Beta };
    let mut draw = |s| {
        let guided = GradientGuidance::new(&unet, &guide, &sched, s).with_form(form.clone());
        study::ddpm_samples(&guided, &sched, &z.size(), sample_steps, (run.seed as i64 + 1, run.device))
    };
    let alg1_rows = sweep("classifier, Alg. 1 (DDPM)", &args.algorithm1_scales, &mut draw, &grading, &mut tiles);
    // CLIP guidance of the same UNet, towards held-out prompts (phrasings no caption had), one per sample
    let prompts = held_out_prompt_per_row(&Vec::<i64>::try_from(&grading.requested)?);
    let guide =
        ClipGuide { clip: &clip, text: clip.encode_text(&study::pooled_prompt_states(&pipe.prompts, &prompts)?) };
    let mut draw = |s| ddim_samples(&GradientGuidance::new(&unet, &guide, &sched, s), &sched, &z, sample_steps);
    let clip_rows = sweep("CLIP", &args.clip_scales, &mut draw, &grading, &mut tiles);
    // ANCHOR_END: sweeps
    let all: Vec<_> = [&cfg_rows, &clf_rows, &alg1_rows, &clip_rows].into_iter().flatten().cloned().collect();
    study::plot_comparison(&run.path("guidance_comparison.png"), &all)?;
    study::plot_rows(
        &run.path("guidance_samples.png"),
        "Digits 0–9 asked of each method and scale (same noise)",
        &tiles,
    )?;
    let methods: [(&str, &[_]); 3] = [("classifier-free", &cfg_rows), ("classifier", &clf_rows), ("CLIP", &clip_rows)];

    // ANCHOR: thresholds
    // lesson 06's pipeline at large w: x̂₀ left alone, clipped, or dynamically thresholded; held-out prompts
    let prompts: Vec<String> = (0..10).flat_map(|d| held_out_prompts(d, 5)).collect(); // 10 per digit
    let per = prompts.len() as i64 / 10;
    let asked = Tensor::arange(10, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(per, 0, None);
    let grading = Grading { requested: asked, ..grading };
    let mut thresholds = vec![Threshold::None, Threshold::Static];
    thresholds.extend(args.percentiles.iter().map(|&percentile| Threshold::Dynamic { percentile }));
    let (threshold_rows, threshold_tiles) = study::thresholding_study(
        &pipe,
        &prompts,
        (&thresholds, &args.threshold_scales),
        (DEFAULT_SAMPLE_STEPS, run.seed),
        &grading,
    )?;
    // ANCHOR_END: thresholds
    study::plot_thresholding(&run.path("thresholding.png"), &threshold_rows)?;
    let real_saturation = study::saturation(&data.test_images.narrow(0, 0, prompts.len() as i64)); // as many real digits
    let title = "Lesson 06's pipeline at growing w: none, static, dynamic thresholding of x̂₀ (held-out prompts)";
    study::plot_rows(&run.path("thresholding_samples.png"), title, &threshold_tiles)?;

    let by_t_table = study::accuracy_by_timestep_table(&read_by_t);
    run.write_results(&[
        ("comparison", study::comparison_table(&all)),
        ("matched", study::matched_table(&methods, &args.matched_accuracy)),
        ("thresholding", study::thresholding_table(&threshold_rows, real_saturation)),
        ("accuracy_by_timestep", by_t_table),
    ])?;
    run.write_metrics(json!({
        "train_steps": steps, "batch_size": args.batch, "lr": args.lr, "clip_images": m,
        "classifier": { "network": trunk(10), "train_seconds": clf_outcome.seconds, "final_loss": clf_outcome.losses.last() },
        "clip": { "network": trunk(64), "train_seconds": clip_outcome.seconds, "final_loss": clip_outcome.losses.last() },
        "accuracy_by_timestep": read_by_t.iter().map(|(n, p)| json!({"reader": n, "points": p})).collect::<Vec<_>>(),
        "sample_steps": sample_steps, "samples_per_scale": n,
        "classifier_free": cfg_rows, "classifier_guidance": clf_rows, "classifier_guidance_algorithm1": alg1_rows,
        "clip_guidance": clip_rows,
        "matched": args.matched_accuracy.iter().map(|&a| json!({"accuracy": a, "methods": methods.iter()
            .map(|(name, rows)| json!({"method": name, "at": study::at_accuracy(rows, a)})).collect::<Vec<_>>()})).collect::<Vec<_>>(),
        "thresholding": threshold_rows, "real_test_saturation": real_saturation,
    }))?;
    println!("outputs in {} ({:.1} s)", run.out.display(), run.elapsed_s());
    Ok(())
}
