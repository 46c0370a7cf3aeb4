//! Lesson 07's study of sample quality against the number of network evaluations (NFE): a plan of (sampler, budget,
//! steps), one run per cell from the same starting noise with the evaluations counted, the graders of its two
//! models (Fréchet distance for lesson 04's UNet, prompt accuracy for lesson 06's pipeline) and a markdown table.
use crate::diffusion::schedule::NoiseSchedule;
use crate::eval::frechet::{evaluate_samples, SampleReport};
use crate::eval::prompt_accuracy::prompt_accuracy;
use crate::model::CountingDenoiser;
use crate::model::Denoiser;
use crate::nn::classifier::MnistClassifier;
use crate::sampling::registry::Sampler;
use anyhow::Result;
use serde_json::{json, Value};
use tch::{Device, Tensor};

/// One run of the study: which sampler, at which budget, what it cost and how it graded.
#[derive(Debug, serde::Serialize)]
pub struct NfeRow<G> {
    pub sampler: &'static str,
    pub name: &'static str,
    pub budget: usize,
    pub steps: usize,
    /// Network evaluations actually made per sample (counted).
    pub nfe: usize,
    pub seconds: f64,
    pub grade: G,
    /// The first samples in [0, 1] (for figures).
    #[serde(skip)]
    pub preview: Tensor,
}

/// (sampler, budget, steps) for every sampler and budget that affords at least one step, budgets ascending.
pub fn plan(samplers: &[Sampler], budgets: &[usize], sched: &NoiseSchedule) -> Vec<(Sampler, usize, usize)> {
    let mut budgets = budgets.to_vec();
    budgets.sort_unstable();
    budgets.dedup();
    let t = sched.num_steps();
    samplers.iter().flat_map(|&s| budgets.iter().filter_map(move |&b| s.steps_for(b, t).map(|n| (s, b, n)))).collect()
}

/// Network evaluations per sample of a whole plan (for a time estimate).
pub fn plan_nfe(plan: &[(Sampler, usize, usize)]) -> usize {
    plan.iter().map(|&(s, _, n)| s.nfe(n)).sum()
}

// ANCHOR: run_study
/// Runs `steps` steps of `sampler` (budget `budget`) from the noise `z` (the VP x_T, (B, ...)), after reseeding
/// libtorch with `seed` so that stochastic samplers share their noise across runs too, and grades the samples mapped
/// to [0, 1] with `grade`. `on_eval(B)` is called at every network evaluation (for a progress bar).
pub fn run_one<G>(
    d: &dyn Denoiser,
    sched: &NoiseSchedule,
    z: &Tensor,
    (sampler, budget, steps): (Sampler, usize, usize),
    seed: u64,
    grade: &mut dyn FnMut(&Tensor) -> Result<G>,
    on_eval: &dyn Fn(i64),
) -> Result<NfeRow<G>> {
    let watched = |x: &Tensor, sigma: &Tensor| {
        on_eval(x.size()[0]);
        d.denoise(x, sigma)
    };
    let counting = CountingDenoiser::new(&watched);
    tch::manual_seed(seed as i64);
    let started = std::time::Instant::now();
    let x = tch::no_grad(|| sampler.sample(&counting, sched, z, steps, &mut |_| {}));
    let seconds = started.elapsed().as_secs_f64();
    let unit = crate::data::to_unit(&x).to_device(Device::Cpu); // (B, C, H, W) in [0, 1]
    let (name, nfe) = (sampler.name(), counting.calls.get());
    let preview = unit.narrow(0, 0, unit.size()[0].min(8));
    Ok(NfeRow { sampler: sampler.key(), name, budget, steps, nfe, seconds, grade: grade(&unit)?, preview })
}
// ANCHOR_END: run_study

/// [`run_one`] for every entry of a [`plan`], from the same noise.
pub fn run_study<G>(
    d: &dyn Denoiser,
    sched: &NoiseSchedule,
    z: &Tensor,
    plan: &[(Sampler, usize, usize)],
    seed: u64,
    grade: &mut dyn FnMut(&Tensor) -> Result<G>,
    on_eval: &dyn Fn(i64),
) -> Result<Vec<NfeRow<G>>> {
    plan.iter().map(|&one| run_one(d, sched, z, one, seed, grade, on_eval)).collect()
}

/// A markdown table: a row per sampler, a column per budget, each cell "value (NFE)"; `value` picks the number.
pub fn markdown_table<G>(rows: &[&NfeRow<G>], value: &dyn Fn(&G) -> f64, what: &str) -> String {
    let mut budgets: Vec<usize> = rows.iter().map(|r| r.budget).collect();
    budgets.sort_unstable();
    budgets.dedup();
    let head: Vec<String> = budgets.iter().map(|b| format!("NFE ≤ {b}")).collect();
    let mut s = format!("| sampler | UI name | {} |\n|---|---|{}\n", head.join(" | "), "---|".repeat(budgets.len()));
    let mut names: Vec<&'static str> = Vec::new();
    for r in rows {
        if !names.contains(&r.name) {
            names.push(r.name);
        }
    }
    for name in names {
        let of: Vec<&&NfeRow<G>> = rows.iter().filter(|r| r.name == name).collect();
        let ui = Sampler::ALL.iter().find(|s| s.name() == name).map_or("", |s| s.ui_name());
        let cells: Vec<String> = budgets
            .iter()
            .map(|b| {
                of.iter()
                    .find(|r| r.budget == *b)
                    .map_or("—".into(), |r| format!("{:.2} ({})", value(&r.grade), r.nfe))
            })
            .collect();
        s.push_str(&format!("| {name} | {ui} | {} |\n", cells.join(" | ")));
    }
    format!("{s}\ncells: {what} (network evaluations actually made per sample)\n")
}

/// Grades one cell's samples `x` (N, 1, 28, 28) in [0, 1] with [`evaluate_samples`] against the MNIST `test_images`;
/// a sampler that diverged (any sample not finite) gets a Fréchet distance of NaN, not the 0 its NaN features give.
pub fn grade_frechet(clf: &MnistClassifier, x: &Tensor, test_images: &Tensor) -> SampleReport {
    let mut report = evaluate_samples(clf, x, test_images);
    if x.isfinite().all().int64_value(&[]) == 0 {
        report.frechet_distance = f64::NAN; // not the 0 that the NaN features would give
    }
    report
}

/// Grades one image per evaluation prompt: row i of `x` (50, 1, 28, 28) in [0, 1] was drawn for `prompts[i]`, which
/// hold the 50 prompts of [`crate::data::captions::eval_prompts`] (digits 0–9) in any order. Returns {overall,
/// worst_digit, per_digit} of [`prompt_accuracy`].
pub fn grade_prompt_images(clf: &MnistClassifier, x: &Tensor, prompts: &[String]) -> Result<Value> {
    // prompt_accuracy asks for each prompt in turn: hand it that prompt's image
    let mut lookup = |p: &str, _: i64, _: u64| Ok(x.narrow(0, prompts.iter().position(|q| q == p).unwrap() as i64, 1));
    let (acc, _, _) = prompt_accuracy(&mut lookup, clf, 1, 0)?;
    Ok(json!({ "overall": acc.overall, "worst_digit": acc.worst_digit, "per_digit": acc.per_digit }))
}

/// The overall prompt accuracy of a [`grade_prompt_images`] grade (NaN if it has none).
pub fn overall_accuracy(grade: &Value) -> f64 {
    grade["overall"].as_f64().unwrap_or(f64::NAN)
}

/// Seconds per image of one evaluation of `d` on `b` random 28×28 images at σ = 1: the fastest of three calls after
/// a warm-up (for a time estimate; the minimum is the least disturbed by other work on the machine).
pub fn seconds_per_image(d: &dyn Denoiser, b: i64, device: Device) -> f64 {
    let x = Tensor::randn([b, 1, 28, 28], (tch::Kind::Float, device));
    let sigma = Tensor::ones([b], (tch::Kind::Float, device));
    tch::no_grad(|| {
        let _ = d.denoise(&x, &sigma);
        let time = |_| {
            let started = std::time::Instant::now();
            let _ = d.denoise(&x, &sigma);
            started.elapsed().as_secs_f64()
        };
        (0..3).map(time).fold(f64::INFINITY, f64::min) / b as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::oracle::GaussianOracle;
    use tch::Kind;

    /// The budget rule gives the most steps that fit, and the counted evaluations equal the cost formula for every
    /// sampler (on a Gaussian oracle, so nothing is trained).
    #[test]
    fn steps_fit_the_budget_and_nfe_is_counted() {
        let sched = NoiseSchedule::ddpm(1000);
        assert_eq!(Sampler::Heun.steps_for(10, 1000), Some(5)); // 2·5 − 1 = 9
        assert_eq!(Sampler::DpmSolver3.steps_for(10, 1000), Some(4)); // 3·4 − 2 = 10
        assert_eq!(Sampler::PredictorCorrector.steps_for(10, 1000), Some(4)); // 2·4 + 1 = 9
        assert_eq!(Sampler::PredictorCorrector.steps_for(2, 1000), None);
        assert_eq!(Sampler::Ddpm.steps_for(5000, 1000), Some(1000));
        let p = plan(&Sampler::ALL, &[10, 5, 10], &sched);
        assert_eq!(p.len(), 18);
        assert!(p.iter().all(|&(s, b, n)| s.nfe(n) <= b && s.nfe(n + 1) > b));
        let oracle = GaussianOracle::isotropic(&[0.3, -0.2], 0.5);
        let z = Tensor::randn([4, 2], (Kind::Double, Device::Cpu));
        // grade: all samples finite (the predictor–corrector at 2 and 4 steps once gave NaN)
        let finite = |x: &Tensor| Ok(x.isfinite().all().int64_value(&[]) == 1);
        let rows = run_study(&oracle, &sched, &z, &p, 0, &mut { finite }, &|_| {}).unwrap();
        for (r, &(s, _, n)) in rows.iter().zip(&p) {
            assert_eq!(r.nfe, s.nfe(n), "{}", r.name);
            assert!(r.grade, "{} at {} steps: not finite", r.name, r.steps);
        }
        let table = markdown_table(&rows.iter().collect::<Vec<_>>(), &|g| *g as u8 as f64, "finite");
        assert_eq!(table.lines().filter(|l| l.starts_with("| ")).count(), 1 + 9);
    }

    /// The two graders on real test digits: the Fréchet grade is finite until one sample is not, and real digits of
    /// the digit each prompt asks for read right.
    #[test]
    fn the_graders_mark_divergence_and_read_real_digits_right() {
        let data = crate::data::mnist::load(&crate::data::mnist::resolve_dir(None)).unwrap();
        let clf = MnistClassifier::load_shipped(Device::Cpu).unwrap();
        let x = data.test_images.narrow(0, 0, 64);
        assert!(grade_frechet(&clf, &x, &data.test_images).frechet_distance.is_finite());
        let _ = x.get(3).get(0).get(5).fill_(f64::NAN);
        assert!(grade_frechet(&clf, &x, &data.test_images).frechet_distance.is_nan());
        // prompts in reverse order, row i a test digit of the one prompt i asks for
        let prompts: Vec<String> = (0..10).rev().flat_map(crate::data::captions::eval_prompts).collect();
        let rows: Vec<Tensor> = (0..50)
            .map(|i| {
                let digit = 9 - i / 5;
                let of_digit = data.test_labels.eq(digit).nonzero().squeeze_dim(1); // (n_digit,)
                data.test_images.get(of_digit.int64_value(&[i % 5]))
            })
            .collect();
        let grade = grade_prompt_images(&clf, &Tensor::stack(&rows, 0), &prompts).unwrap();
        assert!(overall_accuracy(&grade) >= 0.9, "{grade}");
        assert!(overall_accuracy(&serde_json::json!({})).is_nan());
    }
}
