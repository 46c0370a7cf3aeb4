//! Benchmark (not a test): Stable Diffusion 1.5 at full size with random weights, ours against diffusers on the same
//! machine in the same run, with the same threads: one UNet step with classifier-free guidance (batch 2, 64 × 64
//! latents, 77 context tokens), the VAE decode of one 512² image, the text encoding of a prompt and its negative
//! (batch 2), and optionally a whole 512² txt2img (Euler a, w = 7), in f32 and bf16; peak resident memory of each
//! process.
//!
//! `cargo run --release --bin bench_sd` (after `./run.sh test`, which installs diffusers into .venv) prints a table
//! and writes out/bench_sd/bench_sd.json. Each side runs in its own process, ours and diffusers' alternating, for
//! `--rounds` rounds; a time is the median of `--reps` runs after a warm-up run, and the table shows the median over
//! the rounds. Compare numbers only within one run: the machine's load changes from minute to minute.
use anyhow::{bail, Context, Result};
use clap::Parser;
use scratch_diffusion::cli::{peak_rss_mib, venv_python, KEEP_FREED_MEMORY_ENV};
use scratch_diffusion::nn::layers::channels_last;
use scratch_diffusion::nn::taesd::{Taesd, TaesdConfig};
use scratch_diffusion::pipelines::stable_diffusion::{GenerateParams, SdSampler, StableDiffusion};
use scratch_diffusion::sd::weights::kind_of_dtype;
use scratch_diffusion::sd::{SdConfig, SdModels};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Parser, Debug)]
#[command(
    about = "Benchmark SD 1.5 (random weights, full size): our UNet step, VAE decode and text encoder against diffusers'"
)]
struct Args {
    /// Timed runs per part (after one warm-up run); the median is kept.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    reps: u64,
    /// Rounds of (ours, diffusers), alternating (odd, so that the median is one of them).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Threads for both sides.
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// Dtypes to run, comma-separated: f32, bf16.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    dtypes: Vec<String>,
    /// Parts to time, comma-separated: text, unet, vae (the networks), lcm (a whole 512² image: text encoding, 4 LCM
    /// steps at w = 1 as with the LCM-LoRA, the TAESD decode; alone, its process's peak memory is the image's).
    #[arg(long, value_delimiter = ',', default_value = "text,unet,vae", value_parser = ["text", "unet", "vae", "lcm"])]
    parts: Vec<String>,
    /// Also time a whole 512² txt2img of this many Euler a steps (0: skip; 20 is SD's usual; minutes per image here).
    #[arg(long, default_value_t = 0)]
    full_image_steps: usize,
    /// Also time diffusers with our malloc settings (`cli::keep_freed_memory`, through glibc's environment
    /// variables): a third process per round, reported as "diffusers, same malloc".
    #[arg(long)]
    diffusers_same_malloc: bool,
    /// Where to write bench_sd.json.
    #[arg(long, default_value = "out/bench_sd")]
    out: PathBuf,
    /// Internal: run our side for one dtype in this process and print its JSON.
    #[arg(long, hide = true)]
    one: Option<String>,
}

fn main() {
    scratch_diffusion::cli::lesson_main(|| {
        let args = Args::parse();
        match &args.one {
            Some(dtype) => ours(&args, dtype),
            None => all(&args),
        }
    })
}

/// Median of `reps` timed runs of `f` after one warm-up run, in seconds.
fn median_time(reps: u64, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut times)
}

// ANCHOR: ours
/// Our side: the same inputs as tests/parity/bench_diffusers.py.
fn ours(args: &Args, dtype: &str) -> Result<()> {
    tch::set_num_threads(args.threads);
    tch::manual_seed(0);
    let kind = kind_of_dtype(dtype)?;
    let models = SdModels::new_in(SdConfig::sd15(), Device::Cpu, kind)?; // created in `kind`, as lesson09 loads
    let ids = Tensor::randint(49_408, [2, 77], (Kind::Int64, Device::Cpu));
    let latents = channels_last(&Tensor::randn([2, 4, 64, 64], (kind, Device::Cpu)));
    let context = Tensor::randn([2, 77, 768], (kind, Device::Cpu));
    let t = Tensor::from_slice(&[500i64, 500]);
    let z = channels_last(&Tensor::randn([1, 4, 64, 64], (kind, Device::Cpu)));
    let mut out = json!({"dtype": dtype, "threads": args.threads});
    let timed = |part: &str| args.parts.iter().any(|p| p == part);
    tch::no_grad(|| {
        if timed("text") {
            out["text_encode_s"] = json!(median_time(args.reps, || drop(models.text_encoder.forward(&ids, None))));
        }
        if timed("unet") {
            out["unet_cfg_step_s"] = json!(median_time(args.reps, || {
                drop(models.unet.forward_cond(&latents, &t, Some(&context), None, false))
            }));
        }
        if timed("vae") {
            out["vae_decode_512_s"] = json!(median_time(args.reps, || drop(models.vae.decode(&z))));
        }
    });
    if timed("lcm") {
        let mut sd = StableDiffusion::new(models, "random")?;
        let mut vs = tch::nn::VarStore::new(Device::Cpu);
        let taesd = Taesd::new(vs.root(), TaesdConfig::sd()); // random weights, TAESD's shapes
        vs.set_kind(kind);
        sd.taesd = Some((vs, taesd));
        let p = GenerateParams {
            steps: 4,
            sampler: SdSampler::Lcm,
            cfg_scale: 1.0,
            ..GenerateParams::new("a photo of an astronaut riding a horse")
        };
        let t0 = Instant::now();
        // as `lesson09 generate --taesd` runs it: the VAE's decoder and, once the prompts are encoded, the text
        // encoder freed (diffusers keeps its text encoder; its VAE is TAESD alone)
        sd.models.release_vae_decoder();
        sd.encode_ahead_and_release(&[&p.prompt, &p.negative_prompt])?;
        sd.txt2img(&p, &mut |_, _| {}, &mut |_, _, _| Ok(()))?;
        out["lcm_taesd_512_s"] = json!(t0.elapsed().as_secs_f64());
        out["peak_rss_mib"] = json!(peak_rss_mib());
        println!("{out}");
        return Ok(());
    }
    if args.full_image_steps > 0 {
        let sd = StableDiffusion::new(models, "random")?;
        let p = GenerateParams {
            steps: args.full_image_steps,
            sampler: SdSampler::EulerA,
            ..GenerateParams::new("a photo of an astronaut riding a horse")
        };
        let t0 = Instant::now();
        sd.txt2img(&p, &mut |_, _| {}, &mut |_, _, _| Ok(()))?;
        out["txt2img_512_s"] = json!(t0.elapsed().as_secs_f64());
    }
    out["peak_rss_mib"] = json!(peak_rss_mib());
    println!("{out}");
    Ok(())
}
// ANCHOR_END: ours

/// The last line of a child's stdout as JSON.
fn run_json(cmd: &mut Command, what: &str) -> Result<Value> {
    let output = cmd.output().with_context(|| format!("cannot start {what}"))?;
    if !output.status.success() {
        bail!("{what} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().rev().find(|l| l.starts_with('{')).with_context(|| format!("{what} printed no JSON"))?;
    serde_json::from_str(last).with_context(|| format!("{what} printed bad JSON: {last}"))
}

fn python() -> Result<PathBuf> {
    let py = venv_python();
    let ok =
        Command::new(&py).args(["-c", "import diffusers, transformers"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        bail!(
            "{} cannot import diffusers: run ./run.sh test once (it installs the references into .venv)",
            py.display()
        );
    }
    Ok(py)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn all(args: &Args) -> Result<()> {
    if args.parts.iter().any(|p| p == "lcm") && args.parts.len() > 1 {
        bail!("--parts lcm runs alone (its process's peak memory is the whole image's): run the networks separately");
    }
    let py = python()?;
    let exe = std::env::current_exe()?;
    let parts =
        ["text_encode_s", "unet_cfg_step_s", "vae_decode_512_s", "txt2img_512_s", "lcm_taesd_512_s", "peak_rss_mib"];
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut report = json!({"threads": args.threads, "reps": args.reps, "rounds": args.rounds, "parts": args.parts,
        "cpu": scratch_diffusion::cli::cpu_description(), "commit": scratch_diffusion::cli::git_commit(root), "runs": []});
    println!(
        "SD 1.5, random weights, {} threads; medians of {} runs, median over {} rounds",
        args.threads, args.reps, args.rounds
    );
    println!("{:<6} {:<18} {:>10} {:>10} {:>8}", "dtype", "part", "ours", "diffusers", "ratio");
    for dtype in &args.dtypes {
        kind_of_dtype(dtype)?;
        let mut runs: Vec<Value> = Vec::new();
        let parts_arg = args.parts.join(",");
        for round in 0..args.rounds {
            let mut cmd = Command::new(&exe);
            cmd.args(["--one", dtype, "--reps", &args.reps.to_string(), "--threads", &args.threads.to_string()]);
            cmd.args(["--full-image-steps", &args.full_image_steps.to_string(), "--parts", &parts_arg]);
            let o = run_json(&mut cmd, "our side")?;
            println!("  round {round} ({dtype}): ours {o}"); // now: the diffusers side can take long (bf16)
            let diffusers = |same_malloc: bool| -> Result<Value> {
                let mut cmd = Command::new(&py);
                cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/bench_diffusers.py")).args([
                    dtype.as_str(),
                    &args.threads.to_string(),
                    &args.reps.to_string(),
                ]);
                if args.full_image_steps > 0 {
                    cmd.args(["--full-image", &args.full_image_steps.to_string()]);
                }
                cmd.args(["--parts", &parts_arg]);
                if same_malloc {
                    cmd.envs(KEEP_FREED_MEMORY_ENV);
                }
                run_json(&mut cmd, "tests/parity/bench_diffusers.py")
            };
            let d = diffusers(false)?;
            println!("  round {round} ({dtype}): diffusers {d}");
            let mut run = json!({"dtype": dtype, "round": round, "ours": o, "diffusers": d});
            if args.diffusers_same_malloc {
                let m = diffusers(true)?;
                println!("  round {round} ({dtype}): diffusers, same malloc {m}");
                run["diffusers_same_malloc"] = m;
            }
            report["runs"].as_array_mut().expect("array").push(run.clone());
            runs.push(run);
        }
        for part in parts {
            let med = |side: &str| {
                let mut v: Vec<f64> = runs.iter().filter_map(|r| r[side][part].as_f64()).collect();
                (!v.is_empty()).then(|| median(&mut v))
            };
            let (Some(a), Some(b)) = (med("ours"), med("diffusers")) else { continue };
            print!("{dtype:<6} {part:<18} {a:>10.2} {b:>10.2} {:>8.3}", a / b);
            // each round's ratio too: the two sides of a round ran minutes apart, not hours
            let per_round: Vec<f64> =
                runs.iter().filter_map(|r| Some(r["ours"][part].as_f64()? / r["diffusers"][part].as_f64()?)).collect();
            let shown: Vec<String> = per_round.iter().map(|r| format!("{r:.3}")).collect();
            print!("   rounds {}", shown.join(" "));
            report["summary"][dtype][part] =
                json!({"ours": a, "diffusers": b, "ratio": a / b, "ratio_per_round": per_round});
            if let Some(m) = med("diffusers_same_malloc") {
                print!("   diffusers, same malloc {m:.2} (ratio {:.3})", a / m);
                report["summary"][dtype][part]["diffusers_same_malloc"] = json!(m);
            }
            println!();
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("bench_sd.json");
    scratch_diffusion::cli::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    println!("wrote {}", path.display());
    Ok(())
}
