//! Lesson 07 — fast samplers and the SDE view.
//!
//! One interface, a denoiser D(x; σ) → x̂₀, and every sampler of src/sampling on it: DDPM and DDIM, Euler and Heun on
//! the probability-flow ODE, Euler-ancestral, DPM-Solver-2/3 and DPM-Solver++(2M), and the VP predictor–corrector.
//! The lesson checks the ODE solvers' orders of convergence on an analytic Gaussian and draws ODE and SDE paths on a
//! 2-D mixture (neither needs a trained model), then measures sample quality against the number of network
//! evaluations on lesson 04's UNet (Fréchet distance) and lesson 06's text-to-image pipeline (prompt accuracy), and
//! the likelihood of lesson 04's model in bits/dim through the probability-flow ODE.
//! Chapter 07 walks through this file.
use anyhow::{ensure, Context, Result};
use clap::Parser;
use scratch_diffusion::cli::{lesson_main, log_line, progress, CommonArgs};
use scratch_diffusion::data::captions::eval_prompts;
use scratch_diffusion::data::mnist;
use scratch_diffusion::data::toy2d::GaussianMixture;
use scratch_diffusion::diffusion::schedule::NoiseSchedule;
use scratch_diffusion::eval::bits_per_dim::{likelihood_table, mnist_bits_per_dim, mnist_vlb_bits_per_dim};
use scratch_diffusion::eval::frechet::SampleReport;
use scratch_diffusion::model::Cond;
use scratch_diffusion::model::{Denoiser, EpsDenoiser};
use scratch_diffusion::nn::classifier::MnistClassifier;
use scratch_diffusion::pipelines::ddpm::{load_unet, shipped_unet};
use scratch_diffusion::pipelines::text_to_image::{shipped_dir, TextToImage, DEFAULT_GUIDANCE};
use scratch_diffusion::sampling::guidance::ClassifierFreeGuidance;
use scratch_diffusion::sampling::oracle::{ode_solvers, order_study, OrderSetup};
use scratch_diffusion::sampling::registry::Sampler;
use scratch_diffusion::sampling::wrappers::Clamped;
use scratch_diffusion::studies::nfe as study;
use scratch_diffusion::studies::sampler_figures::{self as figures, ode_vs_sde_trajectories, plot_orders};
use serde_json::json;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// The reference every sampler is compared with: DDPM ancestral over all T = 1000 timesteps (100 with --quick).
const REFERENCE_STEPS: [usize; 2] = [1000, 100];
/// Lesson 06's study: these samplers, the budgets up to this NFE (5 with --quick), one image per evaluation prompt.
const TEXT_SAMPLERS: [Sampler; 3] = [Sampler::Ddim, Sampler::EulerAncestral, Sampler::DpmSolverPp2m];
const TEXT_MAX_NFE: usize = 50;
/// bits/dim: Rademacher probes per image, RK4 steps of the PF-ODE (2 with --quick), images per batch.
const BPD_PROBES: usize = 1;
const BPD_RK4_STEPS: usize = 24;
const BPD_BATCH: i64 = 16;
/// The variational bound: timesteps per network call (all T = 1000 of every bits/dim image, forward passes only).
const VLB_BATCH: i64 = 250;

/// Lesson 07: fast samplers and the SDE view.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Samples per sampler and budget, all from the same starting noise [default: 64, or 8 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(2..=5000))]
    num_samples: Option<i64>,
    /// NFE budgets, comma-separated [default: 5,10,20,50,100, or 5,10 with --quick].
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=1000))]
    nfe: Option<Vec<u64>>,
    /// Lesson 04's trained UNet [default: data/lesson04/unet.safetensors].
    #[arg(long, value_name = "PATH")]
    unet: Option<PathBuf>,
    /// Lesson 06's text-to-image pipeline [default: data/lesson06].
    #[arg(long, value_name = "DIR")]
    pipeline: Option<PathBuf>,
    /// Clamp x̂₀ to [−1, 1] inside every sampler, as lesson 04's DDPM sampler does.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    clamp: bool,
    /// MNIST test images for bits/dim [default: 32, or 2 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(2..=10000))]
    bpd_images: Option<i64>,
}

fn main() {
    lesson_main(|| run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    let run = args.common.init("lesson07")?;
    let q = |quick: usize, full: usize| if run.quick { quick } else { full };
    let n = args.num_samples.unwrap_or(q(8, 64) as i64);
    let default_nfe = if run.quick { vec![5, 10] } else { vec![5, 10, 20, 50, 100] };
    let budgets: Vec<usize> = args.nfe.clone().unwrap_or(default_nfe).into_iter().map(|b| b as usize).collect();
    let (bpd_images, bpd_steps) = (args.bpd_images.unwrap_or(q(2, 32) as i64), q(2, BPD_RK4_STEPS));
    let reference_steps = REFERENCE_STEPS[run.quick as usize];

    // ANCHOR: load
    let unet_path = args.unet.clone().unwrap_or_else(shipped_unet);
    ensure!(
        unet_path.exists(),
        "no lesson 04 UNet at {}: make it with `./run.sh lesson 04 --ship`, or pass --unet PATH (the \
         unet.safetensors of a lesson 04 run)",
        unet_path.display()
    );
    let (_vs, unet, sched) = load_unet(&unet_path, run.device).with_context(|| format!("{}", unet_path.display()))?;
    let pipe_dir = args.pipeline.clone().unwrap_or_else(shipped_dir);
    let pipe = TextToImage::load(&pipe_dir, run.device).with_context(|| {
        format!(
            "no usable text-to-image pipeline in {}: make it with `./run.sh lesson 06 --ship`, or pass --pipeline DIR",
            pipe_dir.display()
        )
    })?;
    // ε̂(x_vp, t) -> D(x; σ), with x̂₀ clamped for every sampler alike (or for none)
    let eps = EpsDenoiser::new(&unet, &sched);
    let clamped = Clamped { inner: &eps, range: (-1.0, 1.0) };
    let d: &dyn Denoiser = if args.clamp { &clamped } else { &eps };
    // ANCHOR_END: load
    let data = mnist::load(&run.data_dir).context("lesson 07 grades samples against MNIST")?;
    let clf = MnistClassifier::load_shipped(Device::Cpu)?;

    // the text pipeline as one guided ε-model over the 50 evaluation prompts, one image each
    let text_sched = NoiseSchedule::by_name(&pipe.config.schedule, pipe.config.num_train_timesteps)?;
    let prompts: Vec<String> = (0..10).flat_map(eval_prompts).collect();
    let conds: Vec<Cond> = prompts.iter().map(|p| pipe.context(p).1).collect();
    let cond = Cond::cat(&conds.iter().collect::<Vec<_>>()); // (50, L, D) with the prompts' masks
    let guided = ClassifierFreeGuidance::new(&pipe.unet, cond, pipe.context("").1, DEFAULT_GUIDANCE);
    let text_eps = EpsDenoiser::new(&guided, &text_sched);
    let text_clamped = Clamped { inner: &text_eps, range: (-1.0, 1.0) };
    let text_d: &dyn Denoiser = if args.clamp { &text_clamped } else { &text_eps };

    let plan = study::plan(&Sampler::ALL, &budgets, &sched);
    let reference = study::plan(&[Sampler::Ddpm], &[reference_steps], &sched);
    let text_budgets: Vec<usize> = budgets.iter().copied().filter(|&b| b <= q(5, TEXT_MAX_NFE)).collect();
    let text_plan = study::plan(&TEXT_SAMPLERS, &text_budgets, &text_sched);
    let (per_image, per_text) =
        (study::seconds_per_image(d, n, run.device), study::seconds_per_image(text_d, 50, run.device));
    let estimate = per_image * n as f64 * (study::plan_nfe(&plan) + study::plan_nfe(&reference)) as f64
        + per_text * 50.0 * study::plan_nfe(&text_plan) as f64
        + per_image * 3.0 * (bpd_images * 4 * bpd_steps as i64) as f64 // a backward pass ≈ two forwards
        + per_image * (bpd_images * sched.num_steps() as i64) as f64; // the variational bound
    println!(
        "estimated time about {:.0} s ({:.1} ms per image per network evaluation; {n} samples × {} sampler runs + the \
         reference, {} text runs, bits/dim of {bpd_images} images)",
        estimate + 10.0,
        1e3 * per_image,
        plan.len(),
        text_plan.len()
    );

    // ANCHOR: orders
    tch::manual_seed(run.seed as i64);
    let setup = OrderSetup::default();
    let orders = order_study(&setup, &ode_solvers());
    plot_orders(&run.path("order.png"), &orders)?;
    for r in &orders {
        println!("{:<18} fitted order {:.2} (theory {}), errors {:?}", r.name, r.order, r.expected, r.errors);
    }
    // ANCHOR_END: orders
    // ANCHOR: trajectories
    let runs = [
        (Sampler::Heun, 20),
        (Sampler::DpmSolverPp2m, 10),
        (Sampler::EulerAncestral, 40),
        (Sampler::PredictorCorrector, 100),
    ];
    let ring = GaussianMixture::by_name("ring")?;
    let traj = ode_vs_sde_trajectories(&run.path("trajectories.png"), &ring, &runs, 500, 12)?;
    // ANCHOR_END: trajectories
    for p in &traj.panels {
        println!(
            "2-D {:<24} {:>3} NFE: mean log p₀ {:.3} (data {:.3}), same mode as Heun from the same start {:.2}",
            p.sampler, p.nfe, p.mean_log_p, traj.data_mean_log_p, p.same_mode_as_first
        );
    }

    // ANCHOR: nfe_study
    tch::manual_seed(run.seed as i64);
    let z = Tensor::randn([n, 1, 28, 28], (Kind::Float, run.device)); // one x_T for every sampler
    let bar = progress((study::plan_nfe(&plan) + study::plan_nfe(&reference)) as u64 * n as u64, "sample");
    let on_eval = |b: i64| bar.inc(b as u64);
    let mut grade = |x: &Tensor| Ok(study::grade_frechet(&clf, x, &data.test_images)); // NaN if a sampler diverged
    let mut rows = Vec::new();
    for &one in reference.iter().chain(&plan) {
        let row = study::run_one(d, &sched, &z, one, run.seed, &mut grade, &on_eval)?;
        let (fd, floor) = (row.grade.frechet_distance, row.grade.frechet_floor);
        let line =
            format!("{:<24} {:>4} steps {:>4} NFE: FD {fd:7.2} (floor {floor:.2})", row.name, row.steps, row.nfe);
        log_line(&bar, format!("{line}  {:.1} s", row.seconds));
        rows.push(row);
    }
    bar.finish_and_clear();
    // ANCHOR_END: nfe_study
    let fd = |g: &SampleReport| g.frechet_distance;
    let reference = rows.remove(0);
    let ref_fd = reference.grade.frechet_distance;
    let all: Vec<_> = rows.iter().chain([&reference]).collect();
    let table = study::markdown_table(&all, &fd, "Fréchet distance");
    println!("Fréchet distance against NFE, {n} samples per cell, the same starting noise:\n{table}");
    figures::plot_fd_study(&run.out, (&rows, &reference), (n, reference_steps), &budgets)?;
    let dpmpp_10 = rows.iter().find(|r| r.sampler == Sampler::DpmSolverPp2m.key() && r.budget == 10);
    let target = dpmpp_10.map(|r| r.grade.frechet_distance / ref_fd);
    if let Some(ratio) = target {
        let verdict = if ratio <= 1.1 { "met" } else { "not met" };
        println!(
            "DPM-Solver++(2M) at 10 NFE / DDPM at {reference_steps}: FD ratio {ratio:.3} (target ≤ 1.10: {verdict})"
        );
    }

    // ANCHOR: text_study
    tch::manual_seed(run.seed as i64);
    let z = Tensor::randn([50, 1, 28, 28], (Kind::Float, run.device)); // one x_T per prompt, shared by the samplers
    let mut grade_prompts = |x: &Tensor| study::grade_prompt_images(&clf, x, &prompts); // row i drawn for prompt i
    let mut text_rows = Vec::new();
    for &one in &text_plan {
        let row = study::run_one(text_d, &text_sched, &z, one, run.seed, &mut grade_prompts, &|_| {})?;
        let acc = study::overall_accuracy(&row.grade);
        println!("text-to-image {:<18} {:>3} NFE: prompt accuracy {acc:.3}", row.name, row.nfe);
        text_rows.push(row);
    }
    // ANCHOR_END: text_study
    let all: Vec<_> = text_rows.iter().collect();
    let text_table = study::markdown_table(&all, &study::overall_accuracy, "prompt accuracy over the 50 prompts");
    println!("{text_table}");
    figures::plot_prompt_study(&run.out, &text_rows, DEFAULT_GUIDANCE)?;

    // ANCHOR: bits_per_dim
    tch::manual_seed(run.seed as i64);
    // (N, 1, 28, 28) in [0, 1]; the unclamped denoiser: the ODE (and its divergence) of the model itself
    let images = data.test_images.narrow(0, 0, bpd_images).to_device(run.device);
    let bpd = mnist_bits_per_dim(&eps, &images, eps.sigma_range(), bpd_steps, BPD_PROBES, BPD_BATCH);
    // the same images under [DDPM]'s variational bound of the same model: every timestep, one draw of x_t each
    let vlb = mnist_vlb_bits_per_dim(&unet, &sched, &images, VLB_BATCH);
    // ANCHOR_END: bits_per_dim
    println!(
        "bits/dim of the first {bpd_images} test images (uniform dequantisation, {} Rademacher probe, {} RK4 steps = \
         {} NFE): {:.3} ± {:.3} ({:.0} s)",
        bpd.probes, bpd.rk4_steps, bpd.nfe, bpd.mean, bpd.std_error, bpd.seconds
    );

    let likelihood = likelihood_table(&bpd, &vlb);
    println!("{likelihood}(the variational bound in {:.0} s)", vlb.seconds);
    run.write_results(&[("nfe", table), ("prompt_accuracy", text_table), ("likelihood", likelihood)])?;
    run.write_metrics(json!({
        "unet": unet_path, "pipeline": pipe_dir, "clamp_x0": args.clamp, "estimated_seconds": estimate,
        "order_study": { "setup": setup, "solvers": orders },
        "trajectories": traj,
        "nfe_study": { "num_samples": n, "budgets": budgets, "reference": reference, "rows": rows,
                       "dpm_solver_pp_2m_10_over_reference": target },
        "text_to_image": { "guidance": DEFAULT_GUIDANCE, "prompts": 50, "samples_per_prompt": 1, "rows": text_rows },
        "bits_per_dim": bpd, "vlb_bits_per_dim": vlb,
    }))?;
    println!("outputs in {} ({:.1} s)", run.out.display(), run.elapsed_s());
    Ok(())
}
