//! Lesson 12 — fine-tuning: LoRA, DreamBooth and textual inversion on lesson 06's text-to-image pipeline.
//!
//! It makes a concept (a seven with a crossbar, to be drawn for the rare word "sks") and a style (outlined strokes)
//! from a few dozen MNIST digits, teaches the concept to the shipped pipeline by DreamBooth (all UNet weights, with
//! and without prior preservation), by LoRA adapters of rank 1–16 and by textual inversion, and the style by a LoRA;
//! then measures on samples what each learned (fidelity), what it broke (drift on plain "a seven", FD of other
//! prompts), its size and time, and the style's strength against the LoRA multiplier. The LoRAs are written in
//! kohya's format and the embedding in diffusers', which `lesson12 sample --lora FILE:0.8 --embedding FILE` loads
//! (and `<lora:NAME:0.8>` in the prompt, with `--lora-dir`). Chapter 12 walks through this file.
use anyhow::{ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use scratch_diffusion::cli::{crate_root, lesson_main, CommonArgs, StepLog};
use scratch_diffusion::data::{mnist, signatures};
use scratch_diffusion::diffusion::schedule::NoiseSchedule;
use scratch_diffusion::eval::signatures::has_crossbar;
use scratch_diffusion::nn::classifier::MnistClassifier;
use scratch_diffusion::nn::lora::{detach_all, LoraConfig, LoraTargets};
use scratch_diffusion::pipelines::text_to_image::{shipped_dir, TextToImage, DEFAULT_GUIDANCE, DEFAULT_SAMPLE_STEPS};
use scratch_diffusion::pipelines::{bundle, PromptArgs};
use scratch_diffusion::sd::lora::{merge_loras, parse_lora_flag, parse_prompt_loras};
use scratch_diffusion::studies::finetune::{self as study, ConceptData, Method, Probe, Reference, Row};
use scratch_diffusion::train::ddpm::{EpsObjective, LossWeight};
use scratch_diffusion::train::trainer::TrainRun;
use serde_json::json;
use std::path::PathBuf;
use tch::{Device, Tensor};

/// Where `--ship` writes the concept LoRA, the style LoRA and the embedding.
const SHIPPED: &str = "data/lesson12";

#[derive(Parser, Debug)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fine-tune and measure every method (the default without a subcommand).
    Train(TrainArgs),
    /// Draw with lesson 06's pipeline and LoRA files / textual-inversion embeddings.
    Sample(SampleArgs),
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Steps of each fine-tune [default: 400, or 4 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(i64).range(1..=256))]
    batch: i64,
    /// Instance images of the concept (crossbar sevens), as few as real users have.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..=500))]
    instance_images: i64,
    /// Class images the frozen model draws for prior preservation.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=500))]
    class_images: i64,
    /// Images of the style (outlined digits).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(i64).range(1..=500))]
    style_images: i64,
    /// LoRA ranks of the sweep.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4, 8, 16])]
    #[arg(value_parser = clap::value_parser!(i64).range(1..=64))]
    ranks: Vec<i64>,
    /// Which layers the concept LoRAs adapt (kohya's default: everything inside the spatial transformers).
    #[arg(long, value_enum, default_value_t = LoraTargets::Transformer)]
    targets: LoraTargets,
    /// Samples per prompt each grade draws [default: 100, or 10 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(10..=250))]
    num_samples: Option<i64>,
    /// Also copy the rank-4 concept LoRA, the style LoRA and the embedding into data/lesson12/.
    #[arg(long)]
    ship: bool,
    /// Continue interrupted fine-tunes from their checkpoints in OUT.
    #[arg(long)]
    resume: bool,
}

#[derive(Args, Debug)]
struct SampleArgs {
    #[command(flatten)]
    prompt: PromptArgs,
    /// A LoRA (kohya, diffusers/PEFT): FILE or FILE:W with multiplier W; repeat for several.
    #[arg(long = "lora", value_name = "FILE[:W]")]
    loras: Vec<String>,
    /// Where `<lora:NAME:W>` in the prompt finds NAME.safetensors.
    #[arg(long)]
    lora_dir: Option<PathBuf>,
    /// A textual-inversion embedding (diffusers' learned_embeds or kohya's emb_params); repeat for several.
    #[arg(long = "embedding", value_name = "FILE")]
    embeddings: Vec<PathBuf>,
}

fn main() {
    lesson_main(|| match Cli::parse() {
        Cli { command: Some(Command::Sample(args)), .. } => sample_cmd(args),
        Cli { command: Some(Command::Train(args)), .. } | Cli { train: args, .. } => train_cmd(args),
    })
}

fn sample_cmd(args: SampleArgs) -> Result<()> {
    let a = &args.prompt;
    let (device, dir) = (a.init()?, a.weights_dir(shipped_dir));
    let mut pipe = TextToImage::load(&dir, device).with_context(|| bundle::no_bundle(&dir, "06", "text-to-image"))?;
    // ANCHOR: sample_cmd
    let (prompt, mut uses) = parse_prompt_loras(&a.prompt, args.lora_dir.as_deref())?; // <lora:NAME:W> taken out
    for flag in &args.loras {
        uses.push(parse_lora_flag(flag)?);
    }
    let files = merge_loras(&pipe.lora_models(), &uses, None)?; // W ← W + m·(α/r)·B·A, every file checked first
    for path in &args.embeddings {
        let width = pipe.prompts.hidden_size();
        pipe.prompts.embeddings.add_file(path, width)?;
    }
    let images = pipe.generate(&prompt, a.negative.as_deref(), a.num, a.guidance, a.steps as usize, a.seed)?;
    // ANCHOR_END: sample_cmd
    let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
    println!(
        "LoRAs merged: {names:?}; embeddings: {:?}",
        pipe.prompts.embeddings.list.iter().map(|e| &e.name).collect::<Vec<_>>()
    );
    bundle::write_samples(&a.out_dir("lesson12"), &images, &a.title(&format!("{} steps", a.steps)))
}

fn train_cmd(args: TrainArgs) -> Result<()> {
    let run = args.common.init("lesson12")?;
    let q = |quick: u64, full: u64| if run.quick { quick } else { full };
    let (steps, n) = (args.steps.unwrap_or(q(4, 400)) as usize, args.num_samples.unwrap_or(q(10, 100) as i64));
    ensure!(
        args.batch <= args.instance_images.min(args.style_images),
        "--batch ({}) must not exceed --instance-images or --style-images: lower --batch",
        args.batch
    );
    ensure!(!args.ship || args.ranks.contains(&4), "--ship copies the rank-4 LoRA: keep 4 in --ranks");
    let data = mnist::load(&run.data_dir).context("lesson 12 fine-tunes on MNIST digits")?;
    let mut pipe = TextToImage::load(&shipped_dir(), run.device)
        .context("lesson 06's shipped pipeline (./run.sh lesson 06 --ship)")?;
    let clf = MnistClassifier::load_shipped(Device::Cpu)?;
    let sched = NoiseSchedule::by_name(&pipe.config.schedule, pipe.config.num_train_timesteps)?;
    let objective = EpsObjective::new(&sched, LossWeight::Uniform, run.device);
    let probe = Probe {
        n,
        guidance: DEFAULT_GUIDANCE,
        steps: if run.quick { 5 } else { DEFAULT_SAMPLE_STEPS },
        seed: run.seed + 100,
    };

    // ANCHOR: data
    let sevens = data.train_images.index_select(0, &data.train_labels.eq(7).nonzero().squeeze_dim(1));
    let barred = signatures::with_crossbar(&sevens.narrow(0, 0, args.instance_images)); // the concept: K crossbar 7s
    let styled = signatures::outlined(&data.train_images.narrow(0, 0, args.style_images)); // the style
    let style_labels = data.train_labels.narrow(0, 0, args.style_images);
    // the frozen model's own sevens, for prior preservation, and its crossbars, which drift is measured against
    let class_images =
        pipe.generate(study::CLASS_PROMPT, None, args.class_images, probe.guidance, probe.steps, run.seed)?;
    let (frozen, frozen_instance, frozen_plain) = study::grade_concept(&pipe, &clf, &probe, None, &data.test_images)?;
    let reference = Reference { plain_crossbar: has_crossbar(&frozen_plain) };
    // ANCHOR_END: data
    let to_model = |x: &Tensor| (x * 2.0 - 1.0).to_device(run.device); // [0, 1] -> [−1, 1]
    let concept = ConceptData { instance: to_model(&barred), prior: to_model(&class_images) };
    let base_rates = study::base_rates(&clf, &barred, &data.test_images, &data.test_labels);
    println!("base rates: {base_rates}");

    // ANCHOR: methods
    let lora = |rank, targets| Method::Lora(LoraConfig { rank, alpha: rank as f64, targets });
    let mut plan = vec![(Method::DreamBooth, false), (Method::DreamBooth, true), (lora(4, args.targets), false)];
    if args.targets != LoraTargets::TransformerAndConvs {
        plan.push((lora(4, LoraTargets::TransformerAndConvs), true)); // LoCon: adapters at every resolution
    }
    plan.extend(args.ranks.iter().map(|&r| (lora(r, args.targets), true)));
    plan.push((Method::TextualInversion { vectors: 2 }, false));
    // ANCHOR_END: methods
    let saved = study::snapshot(pipe.unet_vs());
    let unet_bytes = std::fs::metadata(shipped_dir().join("unet.safetensors"))?.len();
    let mut rows =
        vec![Row { method: "frozen lesson 06 pipeline".into(), prior_preservation: false, tuned: None, grade: frozen }];
    let mut tiles = vec![
        ("frozen: sks".to_string(), frozen_instance.narrow(0, 0, 10)),
        ("frozen: seven".into(), frozen_plain.narrow(0, 0, 10)),
    ];
    for (i, &(method, prior)) in plan.iter().enumerate() {
        let cfg = study::recipe(method.lr(), steps, args.batch, run.seed + i as u64);
        let tag = method.tag(prior);
        let log = StepLog::new(steps as u64, &tag, 0);
        let ckpt = run.path(&format!("checkpoint_{tag}.safetensors"));
        let train_run = TrainRun::logged(run.device, &log).checkpoint(&ckpt, args.resume);
        // ANCHOR: teach
        let recipe = (method, prior.then_some(study::PRIOR_WEIGHT));
        let file = run.path(&format!("{tag}.safetensors"));
        let tuned = study::teach(&mut pipe, recipe, &concept, (&objective, &cfg, train_run), &file)?;
        let (grade, instance, plain) = study::grade_concept(&pipe, &clf, &probe, Some(&reference), &data.test_images)?;
        study::forget(&mut pipe, &saved);
        // ANCHOR_END: teach
        log.finish();
        println!("{tag}: fidelity {:.2}, drift {:.2}, {:.0} s", grade.fidelity, grade.drift, tuned.seconds);
        if method.in_figure() {
            tiles.push((format!("{tag}: sks"), instance.narrow(0, 0, 10)));
            tiles.push((format!("{tag}: seven"), plain.narrow(0, 0, 10)));
        }
        let method = method.label();
        rows.push(Row { method, prior_preservation: prior, tuned: Some(tuned), grade });
    }

    // ANCHOR: style
    let style_config = LoraConfig { rank: 4, alpha: 4.0, targets: LoraTargets::TransformerAndConvs }; // LoCon
    let cfg = study::recipe(study::LR_LORA, steps, args.batch, run.seed);
    let (log, style_ckpt) = (StepLog::new(steps as u64, "style", 0), run.path("checkpoint_style.safetensors"));
    let train_run = TrainRun::logged(run.device, &log).checkpoint(&style_ckpt, args.resume);
    let style_file = run.path("outlined_locon_r4.safetensors");
    let style_data = (&to_model(&styled), &style_labels);
    let style = study::teach_style(&mut pipe, &style_config, style_data, (&objective, &cfg, train_run), &style_file)?;
    log.finish();
    let (sweep, style_tiles) = study::style_sweep(&mut pipe, &clf, &[0.0, 0.25, 0.5, 0.75, 1.0], &probe)?;
    detach_all(&mut pipe.unet.0);
    // ANCHOR_END: style
    study::plot_figures(&run.out, (&tiles, &style_tiles), (&barred, &styled))?;
    run.write_results(&[
        ("concept", study::comparison_table(&rows, unet_bytes)),
        ("style", study::style_table(&sweep)),
    ])?;
    run.write_metrics(json!({
        "steps": steps, "batch_size": args.batch, "instance_images": args.instance_images,
        "class_images": args.class_images, "style_images": args.style_images, "probe": probe,
        "lr": {"dreambooth": study::LR_DREAMBOOTH, "lora": study::LR_LORA, "embedding": study::LR_EMBEDDING},
        "prior_weight": study::PRIOR_WEIGHT,
        "unet_bytes": unet_bytes, "base_rates": base_rates, "rows": rows, "style": {"tuned": style, "sweep": sweep},
    }))?;
    if args.ship {
        let dir = crate_root().join(SHIPPED);
        std::fs::create_dir_all(&dir)?;
        let concept_lora = run.path(&format!("{}.safetensors", lora(4, args.targets).tag(true)));
        for (from, to) in
            [(concept_lora, "sks_lora_r4"), (run.path("ti_2.safetensors"), "sks"), (style_file, "outlined_locon_r4")]
        {
            let to = dir.join(format!("{to}.safetensors"));
            std::fs::copy(&from, &to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        }
        println!("shipped the LoRAs and the embedding to {}", dir.display());
    }
    println!("outputs in {} ({:.1} s)", run.out.display(), run.elapsed_s());
    Ok(())
}
