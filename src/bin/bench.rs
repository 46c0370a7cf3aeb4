//! Benchmarks (not tests): training steps/s and sampled images/s of the lesson 04 UNet, of lesson 06's
//! text-conditioned UNet (with its frozen text encoder run every step, and classifier-free guidance when sampling) and
//! of lesson 08's latent UNet (the same, on 4 × 7 × 7 latents, each sampled latent then decoded by the VAE) at the
//! default batch size, f32 vs bf16, with 1 and 2 threads, and the peak resident memory of each configuration.
//!
//! `cargo run --release --bin bench` prints a table and writes it into out/bench/ as results.md, with metrics.json and
//! run.json, stamped like a lesson's run (the book shows it: `./run.sh book-refresh bench`). Each configuration runs in its
//! own process (this binary re-invoked with `--one`), so thread counts and peak memory do not leak between them.
//! Compare numbers only within one run: the machine's load changes from minute to minute.
use anyhow::{bail, Context, Result};
use clap::Parser;
use scratch_diffusion::cli::peak_rss_mib;
use scratch_diffusion::diffusion::schedule::NoiseSchedule;
use scratch_diffusion::model::EpsModel;
use scratch_diffusion::model::{Cond, WithContext};
use scratch_diffusion::nn::text_encoder::{TextEncoder, TextEncoderConfig};
use scratch_diffusion::nn::unet::{UNet, UNetConfig};
use scratch_diffusion::nn::vae::{AutoencoderKl, VaeConfig};
use scratch_diffusion::sampling::ddpm::{sample, AncestralSampling, PosteriorVariance};
use scratch_diffusion::sampling::guidance::ClassifierFreeGuidance;
use scratch_diffusion::sampling::wrappers::Threshold;
use scratch_diffusion::text::captions::CONTEXT_LEN;
use scratch_diffusion::train::ddpm::l_simple;
use scratch_diffusion::train::trainer::{Trainer, TrainerConfig};
use serde_json::json;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[derive(Parser, Debug)]
#[command(
    about = "Benchmark the UNets of lessons 04, 06 and 08: training steps/s and sampled images/s, f32 vs bf16, 1 vs 2 threads"
)]
struct Args {
    /// Training steps to time per configuration (after 2 warm-up steps).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..))]
    train_steps: u64,
    /// Reverse steps to time per configuration; images/s is reported for a full sampling run of --sample-steps.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    timed_reverse_steps: u64,
    /// Reverse steps of a full sampling run (lesson 04's default).
    #[arg(long, default_value_t = 100)]
    sample_steps: u64,
    /// Batch size (lesson 04's default).
    #[arg(long, default_value_t = scratch_diffusion::train::recipe::BATCH)]
    batch: i64,
    /// Channels of each UNet level, comma-separated [default: the mnist preset's].
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(i64).range(1..=1024))]
    channels: Option<Vec<i64>>,
    /// Where to write metrics.json, results.md and run.json.
    #[arg(long, default_value = "out/bench")]
    out: std::path::PathBuf,
    /// Internal: run one configuration (model "unet", "text" or "latent", dtype "f32" or "bf16", threads) and print its JSON.
    #[arg(long, num_args = 3, hide = true)]
    one: Option<Vec<String>>,
}

/// Lesson 06's text side: the mini-CLIP text encoder's width and a vocabulary of the size its BPE reaches on the varied
/// captions (1 514 tokens).
const TEXT_VOCAB: i64 = 1514;
/// Lesson 06's default guidance scale: sampling runs the UNet on 2B images per step (any w but 0 and 1 does).
const GUIDANCE: f64 = scratch_diffusion::pipelines::text_to_image::DEFAULT_GUIDANCE;

fn main() {
    scratch_diffusion::cli::lesson_main(|| {
        let args = Args::parse();
        match &args.one {
            Some(v) => one(&args, &v[0], &v[1], v[2].parse().context("threads")?),
            None => all(&args),
        }
    })
}

/// One configuration, in this process.
fn one(args: &Args, model_name: &str, dtype: &str, threads: i32) -> Result<()> {
    tch::set_num_threads(threads);
    tch::manual_seed(0);
    let bf16 = match dtype {
        "f32" => false,
        "bf16" => true,
        other => bail!("unknown dtype {other}"),
    };
    let (text, latent) = match model_name {
        "unet" => (false, false),
        "text" => (true, false),
        "latent" => (true, true),
        other => bail!("unknown model {other}"),
    };
    let encoder_config =
        TextEncoderConfig { max_position_embeddings: CONTEXT_LEN as i64, ..TextEncoderConfig::mnist(TEXT_VOCAB) };
    let mut config = if latent { UNetConfig::mnist_latent() } else { unet_config(args) };
    if text {
        // lesson 06: cross-attention to the text encoder's token states, and its pooled state in the time embedding
        config.cross_attention_dim = Some(encoder_config.hidden_size);
        config.pooled_context_embedding = true;
    }
    let sched = NoiseSchedule::ddpm(1000);
    let alpha_bar = sched.to_tensor_alpha_bar(Device::Cpu);
    let master = VarStore::new(Device::Cpu);
    let model = UNet::new(master.root(), config.clone());
    let mut compute = bf16.then(|| VarStore::new(Device::Cpu));
    let compute_model = compute.as_ref().map(|c| UNet::new(c.root(), config.clone()));
    if let Some(c) = compute.as_mut() {
        c.set_kind(Kind::BFloat16);
    }
    // pixels (B, 1, 28, 28) or lesson 08's latents (B, 4, 7, 7)
    let shape: Vec<i64> = if latent { vec![args.batch, 4, 7, 7] } else { vec![args.batch, 1, 28, 28] };
    let data = Tensor::rand([&[512], &shape[1..]].concat().as_slice(), (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let cfg = TrainerConfig {
        steps: 1000,
        batch_size: args.batch,
        lr: 1e-3,
        warmup: 10,
        ema_decay: Some(0.995),
        bf16,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&master, cfg)?;
    let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
    // the frozen text encoder (f32, as lesson 06 runs it) and random prompts of the full context length
    let encoder_vs = VarStore::new(Device::Cpu);
    let encoder = TextEncoder::new(encoder_vs.root() / "text_model", encoder_config);
    let ids = Tensor::randint(TEXT_VOCAB, [args.batch, CONTEXT_LEN as i64], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([args.batch, CONTEXT_LEN as i64], (Kind::Bool, Device::Cpu));
    let net_of = || compute_model.as_ref().unwrap_or(&model);
    let mut loss_fn = |batch: &[Tensor], _: usize| {
        let x0 = batch[0].to_kind(kind);
        if text {
            let cond = Cond::new(tch::no_grad(|| encoder.forward(&ids, Some(&mask))).to_kind(kind)); // (B, L, D)
            l_simple(&WithContext { model: net_of(), cond: &cond }, &alpha_bar, &x0)
        } else {
            l_simple(net_of(), &alpha_bar, &x0)
        }
    };
    for _ in 0..2 {
        trainer.step(&master, compute.as_mut(), &[&data], &mut loss_fn)?;
    }
    let t0 = std::time::Instant::now();
    for _ in 0..args.train_steps {
        trainer.step(&master, compute.as_mut(), &[&data], &mut loss_fn)?;
    }
    let train_steps_per_s = args.train_steps as f64 / t0.elapsed().as_secs_f64();
    // sampling: the f32 model, or the bf16 copy with bf16 inputs; the text model with guidance (2 contexts)
    let (cond, uncond) = tch::no_grad(|| {
        let cond = encoder.forward(&ids.narrow(0, 0, 1), Some(&mask.narrow(0, 0, 1))).to_kind(kind); // (1, L, D)
        (cond.shallow_clone(), cond.zeros_like())
    });
    let guided = ClassifierFreeGuidance::new(net_of(), cond, uncond, GUIDANCE);
    let sampler: &dyn EpsModel = if text { &guided } else { net_of() };
    let cast = CastTo { inner: sampler, kind };
    let threshold = if latent { Threshold::None } else { Threshold::Static };
    let draw = |steps: usize| {
        sample(
            &cast,
            &sched,
            &shape,
            &AncestralSampling { steps, variance: PosteriorVariance::BetaTilde, threshold, batch: args.batch },
            Device::Cpu,
            &mut |_, _| {},
        )
    };
    let _ = draw(2);
    let t0 = std::time::Instant::now();
    let z = draw(args.timed_reverse_steps as usize);
    let per_step = t0.elapsed().as_secs_f64() / args.timed_reverse_steps as f64;
    // lesson 08 decodes each sampled latent once, with its f32 VAE
    let decode = if latent {
        let vae_vs = VarStore::new(Device::Cpu);
        let vae = AutoencoderKl::new(vae_vs.root(), VaeConfig::mnist());
        let t0 = std::time::Instant::now();
        let _ = tch::no_grad(|| vae.decode(&z));
        t0.elapsed().as_secs_f64()
    } else {
        0.0
    };
    let images_per_s = args.batch as f64 / (per_step * args.sample_steps as f64 + decode);
    println!(
        "{}",
        json!({"model": model_name, "dtype": dtype, "threads": threads, "train_steps_per_s": train_steps_per_s, "sample_images_per_s": images_per_s, "peak_rss_mib": peak_rss_mib()})
    );
    Ok(())
}

/// The mnist preset, with the levels of `--channels` if given (self-attention at the last level, as lesson 04 does).
fn unet_config(args: &Args) -> UNetConfig {
    let mut config = UNetConfig::mnist();
    if let Some(c) = &args.channels {
        config.attention = (0..c.len()).map(|i| i + 1 == c.len()).collect();
        config.block_out_channels = c.clone();
    }
    config
}

/// Runs a model in another dtype and returns f32, so the f32 sampler can drive a bf16 network.
struct CastTo<'a> {
    inner: &'a dyn EpsModel,
    kind: Kind,
}
impl EpsModel for CastTo<'_> {
    fn eps(&self, x_t: &Tensor, t: &Tensor, train: bool) -> Tensor {
        self.inner.eps(&x_t.to_kind(self.kind), t, train).to_kind(Kind::Float)
    }
}

/// Every configuration, each in a child process; prints the table and writes metrics.json, results.md and run.json.
fn all(args: &Args) -> Result<()> {
    let (stamp, since) = (scratch_diffusion::cli::RunStamp::now("bench", 0), std::time::SystemTime::now());
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    println!(
        "UNet {:?}, batch {}, {} reverse steps per sample; text = lesson 06's UNet with its text encoder, sampled \
         with guidance {GUIDANCE} (2 network rows per image); latent = lesson 08's latent UNet, the same way, plus \
         the VAE decode",
        unet_config(args).block_out_channels,
        args.batch,
        args.sample_steps
    );
    println!(
        "{:<6} {:<6} {:>7} {:>16} {:>18} {:>14}",
        "model", "dtype", "threads", "train steps/s", "sampled images/s", "peak RSS MiB"
    );
    for model in ["unet", "text", "latent"] {
        for dtype in ["f32", "bf16"] {
            for threads in [1, 2] {
                let out = std::process::Command::new(&exe)
                    .args(["--one", model, dtype, &threads.to_string(), "--batch", &args.batch.to_string()])
                    .args(["--train-steps", &args.train_steps.to_string()])
                    .args(["--timed-reverse-steps", &args.timed_reverse_steps.to_string()])
                    .args(["--sample-steps", &args.sample_steps.to_string()])
                    .args(args.channels.iter().flat_map(|c| {
                        ["--channels".to_string(), c.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")]
                    }))
                    .output()?;
                if !out.status.success() {
                    bail!("benchmark {model}/{dtype}/{threads} failed: {}", String::from_utf8_lossy(&out.stderr));
                }
                let row: serde_json::Value = serde_json::from_slice(&out.stdout).context("child output")?;
                println!(
                    "{:<6} {:<6} {:>7} {:>16.3} {:>18.2} {:>14.0}",
                    model,
                    dtype,
                    threads,
                    row["train_steps_per_s"].as_f64().unwrap_or(f64::NAN),
                    row["sample_images_per_s"].as_f64().unwrap_or(f64::NAN),
                    row["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
                );
                rows.push(row);
            }
        }
    }
    let get = |m: &str, d: &str, t: i64, k: &str| {
        rows.iter()
            .find(|r| r["model"] == m && r["dtype"] == d && r["threads"] == t)
            .and_then(|r| r[k].as_f64())
            .unwrap_or(f64::NAN)
    };
    let mut ratios = serde_json::Map::new();
    let sample_rate = "sample_images_per_s";
    ratios.insert(
        "latent_over_text_sampling_f32".into(),
        json!({"1thread": get("latent", "f32", 1, sample_rate) / get("text", "f32", 1, sample_rate),
               "2threads": get("latent", "f32", 2, sample_rate) / get("text", "f32", 2, sample_rate)}),
    );
    for m in ["unet", "text", "latent"] {
        let (train, sample) = ("train_steps_per_s", sample_rate);
        ratios.insert(
            m.to_string(),
            json!({
                "train_bf16_over_f32_2threads": get(m, "bf16", 2, train) / get(m, "f32", 2, train),
                "sample_bf16_over_f32_2threads": get(m, "bf16", 2, sample) / get(m, "f32", 2, sample),
                "train_2threads_over_1thread_f32": get(m, "f32", 2, train) / get(m, "f32", 1, train),
                "sample_2threads_over_1thread_f32": get(m, "f32", 2, sample) / get(m, "f32", 1, sample),
            }),
        );
    }
    println!("ratios (same run): {}", serde_json::to_string_pretty(&ratios)?);
    scratch_diffusion::cli::ensure_writable_dir(&args.out)?;
    let cells = |r: &serde_json::Value| {
        let f = |k: &str, d: usize| format!("{:.*}", d, r[k].as_f64().unwrap_or(f64::NAN));
        let name = r["model"].as_str().unwrap_or_default().to_string();
        vec![
            name,
            r["dtype"].to_string().replace('"', ""),
            r["threads"].to_string(),
            f("train_steps_per_s", 3),
            f("sample_images_per_s", 2),
            f("peak_rss_mib", 0),
        ]
    };
    let header = ["model", "dtype", "threads", "training steps/s", "sampled images/s", "peak RSS (MiB)"];
    let table = scratch_diffusion::cli::markdown_table(&header, &rows.iter().map(cells).collect::<Vec<_>>());
    let results = scratch_diffusion::cli::results_markdown(&stamp, &[("bench", table)])?;
    scratch_diffusion::cli::write_atomic(&args.out.join("results.md"), results.as_bytes())?;
    let report = json!({"unet": unet_config(args), "batch": args.batch, "sample_steps": args.sample_steps,
                        "guidance": GUIDANCE, "rows": rows, "ratios": ratios, "run": stamp});
    scratch_diffusion::cli::write_atomic(
        &args.out.join("metrics.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    scratch_diffusion::cli::write_manifest(&args.out, &stamp, since)?;
    println!("wrote {}/metrics.json, results.md and run.json", args.out.display());
    Ok(())
}
