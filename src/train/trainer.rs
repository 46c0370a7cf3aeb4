//! The training loop every lesson from 03 on reuses: AdamW written out (so its state can be checkpointed), the
//! warm-up + cosine learning rate of [`lr_at`], gradient clipping by global norm, an EMA of the weights, optional bf16
//! compute with f32 master weights, atomic checkpoints every few steps, and exact resume.
//!
//! [Adam] Kingma & Ba 2015, arXiv:1412.6980, Algorithm 1 (moments, bias correction).
//! [AdamW] Loshchilov & Hutter 2019, arXiv:1711.05101, Algorithm 2 (decoupled weight decay).
//! [Clip] Pascanu, Mikolov, Bengio 2013, arXiv:1211.5063, Algorithm 1 (rescale g when ‖g‖ exceeds a threshold).
//! [Mixed] Micikevicius et al. 2018, arXiv:1710.03740, sec. 3.1 (f32 master weights, low-precision compute).
//! [SplitMix] Steele, Lea, Flood 2014, "Fast splittable pseudorandom number generators", OOPSLA (the seed mixer).
//!
//! Notation (code -> paper): m, v -> m_t, v_t; betas -> (β₁, β₂); adam_eps -> ε; g -> g_t;
//! lr -> α·η_t (peak rate times the schedule multiplier); weight_decay -> λ; grad_clip -> the threshold of [Clip].
//!
//! Exact resume: step s sees the same batch and the same noise whether or not the run was interrupted before it.
//! Epoch e's data order is a permutation drawn from a seed mixed from (seed, e); step s reseeds libtorch's generator
//! with a seed mixed from (seed, s) before the loss, so what `loss_fn` draws (`randn_like`, timesteps) depends on s
//! alone. A checkpoint holds everything else that changes: weights, AdamW's m and v, the EMA, the step, the losses.
//!
//! What a resume accepts: the checkpoint records, inside its safetensors header, everything that decides the run —
//! the [`TrainerConfig`], and the [`RunSpec`] the caller and the objective functions fill in (the model's config, the
//! schedule and T, the loss weighting, p_uncond, …) together with the shapes of the data — and a resume that differs
//! in any of them is refused, naming the setting, both values and the fix. `steps` (with the `warmup` a lesson derives
//! from it) is the exception: a run may be continued to more steps, on the learning-rate schedule of the new total
//! (so the steps after the resume point differ from those of the shorter schedule), but not to fewer steps than the
//! checkpoint has done. The libtorch thread count is recorded too; another one only warns, because it changes the
//! order of float sums: the continuation is as valid, but no longer bit-identical to an uninterrupted run.
use crate::checkpoint;
use crate::train::ema::Ema;
use crate::train::{lr_at, TrainOpts};
use anyhow::{anyhow, bail, ensure, Context, Result};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

/// The optimiser and budget of a training run; saved inside each checkpoint (with the [`RunSpec`]) and compared on
/// resume.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerConfig {
    pub steps: usize,
    pub batch_size: i64,
    /// Peak learning rate α (reached after `warmup` steps, then cosine decay to α/10, see [`lr_at`]).
    pub lr: f64,
    pub warmup: usize,
    /// λ of AdamW, decoupled from the gradient ([AdamW] Algorithm 2), scaled by the scheduled rate as in PyTorch.
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub adam_eps: f64,
    /// Clip the gradient to this global L2 norm ([Clip] Algorithm 1); None: no clipping.
    pub grad_clip: Option<f64>,
    /// Decay of the EMA of the weights (see [`Ema`]); None: no EMA.
    pub ema_decay: Option<f64>,
    /// Write the checkpoint every this many steps (and at the end); 0: only at the end.
    pub checkpoint_every: usize,
    /// bf16 forward/backward on a copy of the weights, f32 master weights and optimiser state ([Mixed] sec. 3.1).
    pub bf16: bool,
    /// Seed of the data order and of the noise drawn at every step.
    pub seed: u64,
}

impl Default for TrainerConfig {
    /// The [DDPM] CIFAR-10 run (arXiv:2006.11239, appendix B: α = 2·10⁻⁴, batch 128, EMA 0.9999; warm-up 5000
    /// and clipping at norm 1 from its released code, diffusion_tf `run_cifar.py`); Adam's defaults from [Adam] sec. 2.
    fn default() -> Self {
        Self {
            steps: 800_000,
            batch_size: 128,
            lr: 2e-4,
            warmup: 5000,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            adam_eps: 1e-8,
            grad_clip: Some(1.0),
            ema_decay: Some(0.9999),
            checkpoint_every: 0,
            bf16: false,
            seed: 0,
        }
    }
}

impl TrainerConfig {
    /// The learning-rate schedule in the form [`lr_at`] takes.
    pub fn schedule(&self) -> TrainOpts {
        TrainOpts { steps: self.steps, batch_size: self.batch_size, lr: self.lr, warmup: self.warmup }
    }
}

/// What one finished step reports to the callback (progress bars, loss logs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Index of the step, from 0.
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    /// ‖g‖₂ over all variables, before clipping.
    pub grad_norm: f64,
}

/// What decides a run besides the [`TrainerConfig`]: setting name -> value (the model's config, the noise schedule
/// and T, the loss weighting, p_uncond, …). Saved in each checkpoint; a resume must match it key by key (nested
/// objects field by field), and the error names the first setting that differs, e.g. `model.dropout`.
pub type RunSpec = serde_json::Map<String, serde_json::Value>;

/// Where a training call runs and what it reports: the device, the checkpoint file (None: no checkpoints), whether to
/// continue from that checkpoint, the [`RunSpec`] saved in it, the callback that sees every finished step (progress
/// bars, logs) and the one that sees warnings (a resume on another thread count).
pub struct TrainRun<'a> {
    pub device: Device,
    pub ckpt: Option<&'a Path>,
    pub resume: bool,
    pub spec: RunSpec,
    pub on_step: Box<dyn FnMut(StepInfo) + 'a>,
    pub on_warning: Box<dyn FnMut(&str) + 'a>,
}

impl<'a> TrainRun<'a> {
    /// On `device`, without checkpoints, reporting every step to `on_step` (warnings go to stderr).
    pub fn new(device: Device, on_step: impl FnMut(StepInfo) + 'a) -> Self {
        Self {
            device,
            ckpt: None,
            resume: false,
            spec: RunSpec::new(),
            on_step: Box::new(on_step),
            on_warning: Box::new(|w: &str| eprintln!("warning: {w}")),
        }
    }

    /// On `device`, without checkpoints, reporting every step to `log` (a progress bar and loss lines).
    pub fn logged(device: Device, log: &'a crate::cli::StepLog) -> Self {
        Self::new(device, |s: StepInfo| log.step(s.step, s.loss))
    }

    /// Writes checkpoints to `path`, and with `resume` continues from the one there.
    pub fn checkpoint(self, path: &'a Path, resume: bool) -> Self {
        Self { ckpt: Some(path), resume, ..self }
    }

    /// Records `key` = `value` in the [`RunSpec`]: a setting that decides the run, which a resume must repeat.
    pub fn spec(mut self, key: &str, value: impl serde::Serialize) -> Self {
        let value = serde_json::to_value(value).expect("a setting serialises to JSON");
        self.spec.insert(key.to_string(), value);
        self
    }

    /// Sends warnings (see [`TrainOutcome::warnings`]) to `f` instead of stderr.
    pub fn on_warning(self, f: impl FnMut(&str) + 'a) -> Self {
        Self { on_warning: Box::new(f), ..self }
    }
}

/// The result of [`train`].
pub struct TrainOutcome {
    /// Loss of every step from 0, including the steps before a resume (the checkpoint keeps them).
    pub losses: Vec<f64>,
    /// The step the run continued from, when it resumed from a checkpoint.
    pub resumed_from: Option<usize>,
    /// The averaged weights: `ema.copy_to(&mut vs)` before sampling. None when `ema_decay` is None.
    pub ema: Option<Ema>,
    /// Steps run by this call and their wall time (the benchmark of bf16 against f32 reads these).
    pub steps_run: usize,
    pub seconds: f64,
    /// What the run warned about (also sent to [`TrainRun::on_warning`]): a resume on another thread count.
    pub warnings: Vec<String>,
}

/// AdamW with its state in the open: the moments m and v of every trainable variable, keyed by name.
pub struct AdamW {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates taken so far (t of [Adam]).
    pub t: usize,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl AdamW {
    /// Zero moments for every trainable variable of `vs`.
    pub fn new(vs: &VarStore, betas: (f64, f64), eps: f64, weight_decay: f64) -> Self {
        let (m, v) = trainable(vs).into_iter().map(|(k, p)| ((k.clone(), p.zeros_like()), (k, p.zeros_like()))).unzip();
        Self { betas, eps, weight_decay, t: 0, m, v }
    }

    /// One update at learning rate `lr` of each variable of `vs` that has a gradient in `grads`; variables without
    /// one (unused by the loss) keep their value and moments.
    pub fn step(&mut self, vs: &VarStore, grads: &BTreeMap<String, Tensor>, lr: f64) {
        self.t += 1;
        let (beta1, beta2) = self.betas;
        // [Adam] Algorithm 1: bias corrections 1 − β₁ᵗ and 1 − β₂ᵗ
        let (c1, c2) = (1.0 - beta1.powf(self.t as f64), 1.0 - beta2.powf(self.t as f64));
        let params = vs.variables();
        tch::no_grad(|| {
            for (name, g) in grads {
                let (m, v) = (self.m.get_mut(name).expect("a trainable variable"), self.v.get_mut(name).unwrap());
                // [Adam] Algorithm 1: m_t = β₁ m_{t−1} + (1 − β₁) g_t,  v_t = β₂ v_{t−1} + (1 − β₂) g_t²
                let _ = m.g_mul_scalar_(beta1).g_add_(&(g * (1.0 - beta1)));
                let _ = v.g_mul_scalar_(beta2).g_add_(&(g.square() * (1.0 - beta2)));
                // [AdamW] Algorithm 2, line 12: θ_t = θ_{t−1} − lr·λ·θ_{t−1} − lr · m̂_t / (√v̂_t + ε),
                // m̂_t = m_t/(1 − β₁ᵗ), v̂_t = v_t/(1 − β₂ᵗ); the paper's η_t·λ is lr·λ here, as in PyTorch's AdamW
                let adam = (&*m / c1) / ((&*v / c2).sqrt() + self.eps);
                let mut theta = params[name].shallow_clone();
                let _ = theta.g_mul_scalar_(1.0 - lr * self.weight_decay).g_sub_(&(adam * lr));
            }
        });
    }
}

/// ‖g‖₂ of all the tensors taken together as one vector, accumulated in f64.
pub fn global_norm(grads: &[Tensor]) -> f64 {
    if grads.is_empty() {
        return 0.0;
    }
    let squares: Vec<Tensor> = grads.iter().map(|g| g.square().sum(Kind::Double)).collect();
    Tensor::stack(&squares, 0).sum(Kind::Double).sqrt().double_value(&[])
}

/// [Clip] Algorithm 1: if ‖g‖ > c then g ← g · c/‖g‖ (every tensor by the same factor, in place).
/// Returns ‖g‖ before clipping; a non-finite norm is returned without touching `grads`.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    if norm > max_norm {
        tch::no_grad(|| grads.iter_mut().for_each(|g| _ = g.g_mul_scalar_(max_norm / norm)));
    }
    norm
}

// Streams of the seed mixer: data order and per-step noise never share a seed.
const DATA_STREAM: u64 = 0x6461_7461; // "data"
const NOISE_STREAM: u64 = 0x6e6f_6973; // "nois"
/// Prefix of the trainer's own tensors in a checkpoint; the model's weights keep their plain names, so
/// [`checkpoint::load`] reads the raw weights of a trainer checkpoint directly.
const STATE: &str = "trainer";
/// `__metadata__` keys of a trainer checkpoint besides [`checkpoint::CONFIG_KEY`] (the [`TrainerConfig`]): the
/// [`RunSpec`] and the libtorch thread count of the run that wrote it.
const META_RUN: &str = "run";
const META_THREADS: &str = "threads";
/// The [`RunSpec`] key under which the trainer records the shapes of the data tensors (their rows decide the batches).
const SPEC_DATA: &str = "data_shapes";

/// SplitMix64's output function ([SplitMix] sec. 3; constants of Vigna's splitmix64.c): a bijection of u64 whose
/// outputs for neighbouring inputs look independent.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of item `index` of `stream` in a run seeded with `seed`.
fn stream_seed(seed: u64, stream: u64, index: usize) -> u64 {
    splitmix64(splitmix64(seed ^ stream).wrapping_add(index as u64))
}

/// Row order of epoch `epoch` over `n` examples: a permutation drawn from the epoch's own seed.
pub fn epoch_order(seed: u64, epoch: usize, n: i64) -> Vec<i64> {
    let mut rows: Vec<i64> = (0..n).collect();
    rows.shuffle(&mut StdRng::seed_from_u64(stream_seed(seed, DATA_STREAM, epoch)));
    rows
}

/// The trainable variables of `vs`, sorted by name (so sums over them do not depend on HashMap order).
fn trainable(vs: &VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect()
}

/// A VarStore holding `tensors` (not trainable) under their dotted names: `a.b.w` -> root / "a" / "b", "w".
fn store_of(tensors: impl IntoIterator<Item = (String, Tensor)>) -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    for (name, tensor) in tensors {
        let mut parts: Vec<&str> = name.split('.').collect();
        let leaf = parts.pop().expect("split yields at least one part");
        let _ = parts.iter().fold(vs.root(), |path, part| path / *part).add(leaf, tensor, false);
    }
    vs
}

/// bf16 mode, [Mixed] sec. 3.1: refresh the low-precision compute weights from the f32 master weights.
fn copy_master_to(master: &VarStore, compute: &VarStore) -> Result<()> {
    let (src, dst) = (master.variables(), compute.variables());
    ensure!(
        src.len() == dst.len(),
        "bf16 mode: the compute VarStore has {} variables, the master {}: build the same model on both",
        dst.len(),
        src.len()
    );
    tch::no_grad(|| {
        for (name, mut c) in dst {
            let m = src.get(&name).ok_or_else(|| {
                anyhow!("bf16 mode: the master VarStore has no variable '{name}': build the same model on both")
            })?;
            ensure!(m.size() == c.size(), "bf16 mode: '{name}' is {:?} in master, {:?} in compute", m.size(), c.size());
            c.copy_(m); // casts f32 -> bf16
        }
        Ok(())
    })
}

/// The optimiser, EMA and position of a run; [`train`] drives it, a lesson may call [`Trainer::step`] itself.
pub struct Trainer {
    pub cfg: TrainerConfig,
    /// The rest of what decides the run, saved in every checkpoint (see [`RunSpec`]).
    pub spec: RunSpec,
    /// Steps completed, which is the index of the next step.
    pub steps_done: usize,
    pub adam: AdamW,
    pub ema: Option<Ema>,
    /// Loss of every completed step.
    pub losses: Vec<f64>,
    order: Option<(usize, Vec<i64>)>, // (epoch, its row order), cached
}

impl Trainer {
    /// A fresh run on the current weights of `master`.
    pub fn new(master: &VarStore, cfg: TrainerConfig) -> Result<Self> {
        ensure!(cfg.batch_size >= 1, "batch size must be at least 1, got {}", cfg.batch_size);
        ensure!(cfg.lr.is_finite() && cfg.lr > 0.0, "learning rate must be positive, got {}", cfg.lr);
        let (b1, b2) = cfg.betas;
        ensure!((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2), "Adam betas must lie in [0, 1): {:?}", cfg.betas);
        ensure!(cfg.grad_clip.map_or(true, |c| c > 0.0), "grad_clip must be positive, got {:?}", cfg.grad_clip);
        ensure!(
            cfg.ema_decay.map_or(true, |d| (0.0..=1.0).contains(&d)),
            "EMA decay must lie in [0, 1]: {:?}",
            cfg.ema_decay
        );
        if let Some(name) = master.variables().keys().find(|k| k.starts_with(&format!("{STATE}."))) {
            bail!("the model has a variable '{name}', but '{STATE}.' is reserved for the trainer's checkpoint state");
        }
        Ok(Self {
            adam: AdamW::new(master, cfg.betas, cfg.adam_eps, cfg.weight_decay),
            ema: cfg.ema_decay.map(|decay| Ema::new(master, decay)),
            spec: RunSpec::new(),
            steps_done: 0,
            losses: vec![],
            order: None,
            cfg,
        })
    }

    /// The rows of `data` (each (N, ...)) for step `step`, on `device`: epochs of ⌊N/B⌋ batches taken in order from
    /// the epoch's permutation (the last N mod B rows of each permutation are left out, so every batch has B rows).
    /// With no data tensors the batch is empty (and the epoch 0): the loss draws its batch itself.
    fn batch(&mut self, data: &[&Tensor], step: usize, device: Device) -> Result<(usize, Vec<Tensor>)> {
        let Some(first) = data.first() else {
            return Ok((0, vec![])); // no data set: the loss draws its own batch (after the step's seed)
        };
        let n = first.size()[0];
        if let Some((i, d)) = data.iter().enumerate().find(|(_, d)| d.size()[0] != n) {
            bail!(
                "data tensor {i} has {} rows, data tensor 0 has {n}: every data tensor needs one row per example",
                d.size()[0]
            );
        }
        let b = self.cfg.batch_size;
        ensure!(b <= n, "batch size {b} is larger than the data set ({n} examples): lower --batch-size");
        let per_epoch = (n / b) as usize;
        let (epoch, k) = (step / per_epoch, step % per_epoch);
        if self.order.as_ref().map(|o| o.0) != Some(epoch) {
            self.order = Some((epoch, epoch_order(self.cfg.seed, epoch, n)));
        }
        let rows = &self.order.as_ref().expect("just set").1[k * b as usize..(k + 1) * b as usize];
        let idx = Tensor::from_slice(rows); // (B,)
        Ok((epoch, data.iter().map(|d| d.index_select(0, &idx.to_device(d.device())).to_device(device)).collect()))
    }

    /// One step: batch, seeded noise, forward and backward (on `compute` in bf16 mode, else on `master`), NaN guard,
    /// clipping, AdamW on `master`, EMA. On a non-finite loss or gradient it returns an error before any update.
    pub fn step(
        &mut self,
        master: &VarStore,
        compute: Option<&mut VarStore>,
        data: &[&Tensor],
        loss_fn: &mut dyn FnMut(&[Tensor], usize) -> Tensor,
    ) -> Result<StepInfo> {
        let step = self.steps_done;
        ensure!(
            self.cfg.bf16 == compute.is_some(),
            "bf16 is {} but a compute VarStore was{} given: pass one exactly when bf16 is on",
            self.cfg.bf16,
            if compute.is_some() { "" } else { " not" }
        );
        let (epoch, batch) = self.batch(data, step, master.device())?;
        if !self.spec.contains_key(SPEC_DATA) {
            self.spec.insert(SPEC_DATA.to_string(), data_shapes(data)); // as `train` records it
        }
        // the noise loss_fn draws depends on the step alone (>> 1: a non-negative i64)
        tch::manual_seed((stream_seed(self.cfg.seed, NOISE_STREAM, step) >> 1) as i64);
        let run: &VarStore = match compute {
            Some(c) => {
                copy_master_to(master, c)?;
                c
            }
            None => master,
        };
        trainable(run).values_mut().for_each(Tensor::zero_grad);
        let loss = loss_fn(&batch, step);
        ensure!(loss.numel() == 1, "loss_fn must return a scalar, it returned shape {:?}", loss.size());
        ensure!(
            loss.requires_grad(),
            "the loss does not depend on any trainable variable: build the model on the VarStore given to the trainer"
        );
        let value = loss.double_value(&[]);
        let lr = lr_at(&self.cfg.schedule(), step);
        if !value.is_finite() {
            bail!(
                "training diverged at step {step}: the loss became {value} (lr {lr:.3e}); \
                 lower --lr and run again (the last checkpoint is untouched)"
            );
        }
        loss.backward();
        let run_vars = run.variables();
        let mut grads = BTreeMap::new();
        for (name, p) in trainable(master) {
            let g = run_vars[&name].grad();
            if g.defined() {
                grads.insert(name, g.to_kind(p.kind())); // bf16 gradients become f32 master gradients
            }
        }
        let mut flat: Vec<Tensor> = grads.values().map(Tensor::shallow_clone).collect();
        let grad_norm = match self.cfg.grad_clip {
            Some(c) => clip_grad_norm(&mut flat, c),
            None => global_norm(&flat),
        };
        if !grad_norm.is_finite() {
            bail!(
                "training diverged at step {step}: the gradient norm became {grad_norm} (loss {value}, lr {lr:.3e}); \
                 lower --lr and run again (the last checkpoint is untouched)"
            );
        }
        self.adam.step(master, &grads, lr);
        if let Some(ema) = &mut self.ema {
            ema.update(master);
        }
        self.steps_done += 1;
        self.losses.push(value);
        Ok(StepInfo { step, epoch, loss: value, lr, grad_norm })
    }

    /// Writes the checkpoint as one safetensors file, atomically ([`checkpoint::write_tensors`]): the weights of
    /// `master` under their own names, and under `trainer.`: AdamW's m and v, the EMA, the step count and the
    /// losses; in its header the [`TrainerConfig`], the [`RunSpec`] and the thread count.
    pub fn save(&self, master: &VarStore, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = master.variables().into_iter().collect();
        for (name, m) in &self.adam.m {
            tensors.push((format!("{STATE}.adam_m.{name}"), m.shallow_clone()));
            tensors.push((format!("{STATE}.adam_v.{name}"), self.adam.v[name].shallow_clone()));
        }
        if let Some(ema) = &self.ema {
            let mut average = store_of(master.variables().into_iter().map(|(k, v)| (k, v.zeros_like())));
            ema.copy_to(&mut average);
            tensors.extend(average.variables().into_iter().map(|(k, v)| (format!("{STATE}.ema.{k}"), v)));
        }
        tensors.push((format!("{STATE}.step"), Tensor::from(self.steps_done as i64)));
        tensors.push((format!("{STATE}.losses"), Tensor::from_slice(&self.losses))); // (steps_done,) f64
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let metadata = BTreeMap::from([
            (checkpoint::CONFIG_KEY.to_string(), serde_json::to_string(&self.cfg)?),
            (META_RUN.to_string(), serde_json::to_string(&self.spec)?),
            (META_THREADS.to_string(), tch::get_num_threads().to_string()),
        ]);
        checkpoint::write_tensors(path, &tensors, &metadata)
    }

    /// Continues the run saved at `path`: loads the weights into `master` and the optimiser state, EMA, step and
    /// losses into the returned trainer. `cfg` and `spec` must equal what the checkpoint records, but for `steps`
    /// (no fewer than the checkpoint has done) and the `warmup` of a longer schedule; see the module's notes.
    /// Returns the trainer and a warning when the checkpoint was written on another thread count.
    pub fn resume(master: &VarStore, cfg: TrainerConfig, spec: RunSpec, path: &Path) -> Result<(Self, Option<String>)> {
        let warning = ensure_same_run(&cfg, &spec, path)?;
        let mut trainer = Self::new(master, cfg)?;
        trainer.spec = spec;
        let file: HashMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| {
                format!("checkpoint {} is not a readable safetensors file: delete it and start afresh", path.display())
            })?
            .into_iter()
            .collect();
        let take = |name: &str, like: &Tensor| -> Result<Tensor> {
            let t = file.get(name).ok_or_else(|| {
                anyhow!(
                    "checkpoint {} has no tensor '{name}': it was saved from another model or without the same options",
                    path.display()
                )
            })?;
            ensure!(
                t.size() == like.size(),
                "checkpoint {}: tensor '{name}' has shape {:?}, expected {:?}: it was made with another model config",
                path.display(),
                t.size(),
                like.size()
            );
            let what = format!("checkpoint {}: tensor '{name}'", path.display());
            let fix = "the file is damaged or was saved from a diverged run; delete it and start afresh";
            crate::cli::ensure_finite(t, &what, fix)?; // not "lower --lr" later, at the first step
            Ok(t.to_kind(like.kind()).to_device(like.device()))
        };
        let steps_done = take(&format!("{STATE}.step"), &Tensor::from(0i64))?.int64_value(&[]);
        ensure!(
            steps_done >= 0,
            "checkpoint {} says it has done {steps_done} steps: it is corrupt; delete it and start afresh",
            path.display()
        );
        let steps_done = steps_done as usize;
        ensure!(
            trainer.cfg.steps >= steps_done,
            "cannot resume from {}: it has already done {steps_done} steps and this run asks for {} in all; pass \
             --steps {steps_done} or more to continue it, or start afresh without --resume",
            path.display(),
            trainer.cfg.steps
        );
        // one loss per step done, checked on the file's shape (a corrupt step count must not size an allocation)
        let losses =
            file.get(&format!("{STATE}.losses")).filter(|l| l.size() == [steps_done as i64]).ok_or_else(|| {
                anyhow!(
                "checkpoint {} has no loss history of {steps_done} steps (tensor '{STATE}.losses'): it is corrupt; \
                 delete it and start afresh",
                path.display()
            )
            })?;
        let losses = losses.to_kind(Kind::Double);
        // read and check every tensor before changing any, so a bad checkpoint leaves `master` as it was
        let mut loads: Vec<(Tensor, Tensor)> = vec![];
        for (name, var) in master.variables() {
            loads.push((var.shallow_clone(), take(&name, &var)?));
        }
        for (name, m) in &trainer.adam.m {
            loads.push((m.shallow_clone(), take(&format!("{STATE}.adam_m.{name}"), m)?));
            let v = &trainer.adam.v[name];
            loads.push((v.shallow_clone(), take(&format!("{STATE}.adam_v.{name}"), v)?));
        }
        let average = store_of(master.variables().into_iter().map(|(k, v)| (k, v.detach().zeros_like())));
        if trainer.ema.is_some() {
            for (name, var) in average.variables() {
                loads.push((var.shallow_clone(), take(&format!("{STATE}.ema.{name}"), &var)?));
            }
        }
        tch::no_grad(|| loads.iter_mut().for_each(|(dst, src)| dst.copy_(src)));
        if let Some(decay) = trainer.cfg.ema_decay {
            trainer.ema = Some(Ema::from_state(&average, decay, steps_done));
        }
        trainer.adam.t = steps_done;
        trainer.steps_done = steps_done;
        trainer.losses = Vec::<f64>::try_from(&losses)?;
        Ok((trainer, warning))
    }
}

/// Loads the EMA weights kept in the trainer checkpoint at `path` into `vs` (strictly, as [`checkpoint::load`]; the
/// raw weights load with `checkpoint::load` itself).
pub fn load_ema(vs: &mut VarStore, path: &Path) -> Result<()> {
    let mut saved =
        store_of(vs.variables().into_iter().map(|(k, v)| (format!("{STATE}.ema.{k}"), v.detach().zeros_like())));
    checkpoint::load(&mut saved, path).with_context(|| format!("loading the EMA weights of {}", path.display()))?;
    let saved = saved.variables();
    tch::no_grad(|| vs.variables().into_iter().for_each(|(k, mut v)| v.copy_(&saved[&format!("{STATE}.ema.{k}")])));
    Ok(())
}

/// Resuming is for the same run: the saved [`TrainerConfig`] must match `cfg` in every field but `steps` (and `warmup`
/// when `steps` changes: a longer schedule), and the saved [`RunSpec`] must match `spec` in every setting; the error
/// names the first that differs, both values and the fix. Returns a warning when the thread count differs.
fn ensure_same_run(cfg: &TrainerConfig, spec: &RunSpec, path: &Path) -> Result<Option<String>> {
    let meta = checkpoint::read_metadata(path)?;
    let (Some(saved_cfg), Some(saved_spec)) = (meta.get(checkpoint::CONFIG_KEY), meta.get(META_RUN)) else {
        bail!(
            "cannot resume from {}: it does not record the settings of its run (it was written by an older version, \
             with its config beside it); start afresh without --resume",
            path.display()
        );
    };
    let corrupt =
        || format!("checkpoint {}: its recorded settings are not JSON; delete it and start afresh", path.display());
    let saved_cfg: serde_json::Value = serde_json::from_str(saved_cfg).with_context(corrupt)?;
    let saved_spec: serde_json::Value = serde_json::from_str(saved_spec).with_context(corrupt)?;
    let now_cfg = serde_json::to_value(cfg)?;
    // `steps` is checked against the steps done; another total is a new learning-rate schedule for the remaining
    // steps, whose warm-up a lesson derives from it
    let skip: &[&str] = if saved_cfg.get("steps") == now_cfg.get("steps") { &["steps"] } else { &["steps", "warmup"] };
    let without = |v: serde_json::Value| match v {
        serde_json::Value::Object(o) => o.into_iter().filter(|(k, _)| !skip.contains(&k.as_str())).collect(),
        other => other,
    };
    let (saved_cfg, now_cfg) = (without(saved_cfg), without(now_cfg));
    let differs = first_difference("", Some(&saved_cfg), Some(&now_cfg))
        .or_else(|| first_difference("", Some(&saved_spec), Some(&serde_json::Value::Object(spec.clone()))));
    if let Some((field, old, new)) = differs {
        bail!(
            "cannot resume from {}: it was trained with `{field}` = {old}, this run has `{field}` = {new}; \
             use the same setting, or start afresh without --resume",
            path.display()
        );
    }
    let now = tch::get_num_threads();
    Ok(match meta.get(META_THREADS).and_then(|t| t.parse::<i32>().ok()) {
        Some(saved) if saved != now => Some(format!(
            "{} was written by a run on {saved} threads, this one uses {now}: the continuation is valid, but not \
             bit-identical to an uninterrupted run (the thread count changes float sums); pass --threads {saved} for that",
            path.display()
        )),
        _ => None,
    })
}

/// The shapes of the data tensors, as the [`RunSpec`] records them.
fn data_shapes(data: &[&Tensor]) -> serde_json::Value {
    data.iter().map(|d| d.size()).collect()
}

/// The first place where `old` and `new` differ, as (dotted path, old value, new value), descending into objects key
/// by key (in sorted order) so a nested setting is named by its own path (`model.dropout`).
fn first_difference(
    path: &str,
    old: Option<&serde_json::Value>,
    new: Option<&serde_json::Value>,
) -> Option<(String, String, String)> {
    use serde_json::Value;
    if let (Some(Value::Object(a)), Some(Value::Object(b))) = (old, new) {
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        return keys.into_iter().find_map(|k| {
            let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
            first_difference(&sub, a.get(k), b.get(k))
        });
    }
    let show = |v: Option<&Value>| v.map_or("nothing".to_string(), |v| v.to_string());
    (old != new).then(|| (path.to_string(), show(old), show(new)))
}

/// Trains the model whose f32 weights are `master` for `cfg.steps` steps on `data` (tensors of N rows each, sliced
/// into the same batches) with `loss_fn(batch, step) -> scalar`. In bf16 mode `compute` holds the same model in
/// bf16 and `loss_fn` runs that model (casting the batch to bf16); otherwise `compute` is None and `loss_fn` runs the
/// model on `master`. With `ckpt`, a checkpoint is written every `checkpoint_every` steps and at the end; with
/// `resume` and a checkpoint at `ckpt`, the run continues from it (without one it starts afresh). `cb` sees every
/// step. A non-finite loss or gradient stops the run with an error naming the step, writing no checkpoint.
// ANCHOR: train
pub fn train(
    master: &VarStore,
    mut compute: Option<&mut VarStore>,
    data: &[&Tensor],
    cfg: &TrainerConfig,
    loss_fn: &mut dyn FnMut(&[Tensor], usize) -> Tensor,
    run: TrainRun,
) -> Result<TrainOutcome> {
    // the stores are already on their device; `run.device` is what `train_model` built them on
    let TrainRun { ckpt, resume, mut spec, on_step: mut cb, mut on_warning, .. } = run;
    ensure!(!resume || ckpt.is_some(), "resume was asked for, but no checkpoint path was given");
    spec.insert(SPEC_DATA.to_string(), data_shapes(data));
    if let Some(path) = ckpt {
        checkpoint::remove_stale_temps(path)?; // what a killed save left behind
    }
    let mut warnings = vec![];
    let mut trainer = match ckpt {
        Some(path) if resume && path.exists() => {
            let (trainer, warning) = Trainer::resume(master, cfg.clone(), spec, path)?;
            warnings.extend(warning);
            trainer
        }
        _ => Trainer { spec, ..Trainer::new(master, cfg.clone())? },
    };
    warnings.iter().for_each(|w| on_warning(w));
    let resumed_from = (trainer.steps_done > 0).then_some(trainer.steps_done);
    let started = std::time::Instant::now();
    while trainer.steps_done < cfg.steps {
        let info = trainer.step(master, compute.as_deref_mut(), data, loss_fn)?;
        let done = trainer.steps_done;
        if let Some(path) =
            ckpt.filter(|_| done == cfg.steps || (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0))
        {
            trainer.save(master, path)?;
        }
        cb(info);
    }
    Ok(TrainOutcome {
        steps_run: trainer.steps_done - resumed_from.unwrap_or(0),
        seconds: started.elapsed().as_secs_f64(),
        losses: trainer.losses,
        resumed_from,
        ema: trainer.ema,
        warnings,
    })
}

/// The loss of one step for [`train_model`]: (the model that computes, the f32 model, the batch, the step).
pub type ModelLoss<'a, M> = dyn FnMut(&M, &M, &[Tensor], usize) -> Tensor + 'a;

/// Builds a model with `build` on a fresh f32 VarStore (and, when `cfg.bf16`, a bf16 copy that the forward and
/// backward passes run on), trains it through [`train`] with `loss_fn(net, master_model, batch, step)`, where `net`
/// is the copy the passes run on, and returns the f32 VarStore holding the EMA weights (or the last weights without
/// EMA), the model on it, and the outcome. Every model-training function of the crate goes through here.
pub fn train_model<M>(
    build: impl Fn(nn::Path) -> M,
    data: &[&Tensor],
    cfg: &TrainerConfig,
    run: TrainRun,
    loss_fn: &mut ModelLoss<M>,
) -> Result<(VarStore, M, TrainOutcome)> {
    let device = run.device;
    let mut master = VarStore::new(device);
    let model = build(master.root());
    let mut compute = cfg.bf16.then(|| VarStore::new(device));
    let compute_model = compute.as_ref().map(|c| build(c.root()));
    if let Some(c) = compute.as_mut() {
        c.set_kind(Kind::BFloat16);
    }
    let mut step_loss =
        |batch: &[Tensor], step: usize| loss_fn(compute_model.as_ref().unwrap_or(&model), &model, batch, step);
    let outcome = train(&master, compute.as_mut(), data, cfg, &mut step_loss, run)?;
    if let Some(ema) = &outcome.ema {
        ema.copy_to(&mut master);
    }
    Ok((master, model, outcome))
}
// ANCHOR_END: train

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, Module};

    /// A 2-layer MLP on `vs`: (B, d_in) -> (B, d_out).
    fn mlp(vs: &VarStore, d_in: i64, hidden: i64, d_out: i64) -> nn::Sequential {
        nn::seq()
            .add(nn::linear(vs.root() / "fc1", d_in, hidden, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(vs.root() / "fc2", hidden, d_out, Default::default()))
    }

    /// Deterministic regression data without the global generator: x (n, d) on a grid of sines, y = a smooth map of x.
    fn toy_data(n: i64, d: i64) -> (Tensor, Tensor) {
        let x = (Tensor::arange(n * d, (Kind::Float, Device::Cpu)).view([n, d]) * 0.37).sin(); // (n, d)
        let y = Tensor::cat(&[x.sum_dim_intlist(-1, true, Kind::Float).sin(), x.narrow(1, 0, 1) * 2.0], 1); // (n, 2)
        (x, y)
    }

    fn mse(model: &impl Module, batch: &[Tensor]) -> Tensor {
        (model.forward(&batch[0]) - &batch[1]).square().mean(Kind::Float)
    }

    /// libtorch has one random generator per process, shared by every test thread, and the trainer reseeds it at
    /// every step: run in-process, these tests would repeat the noise of random tests beside them (and theirs would
    /// break the bit-exactness checked here). So each test that trains runs its body alone in a child process of
    /// this test binary: `in_child` spawns it and checks it passed (false), or says that this is the child (true).
    const CHILD: &str = "SCRATCH_DIFFUSION_TRAINER_CHILD";

    fn in_child(test: &str) -> bool {
        if std::env::var_os(CHILD).is_some() {
            return true;
        }
        let name = format!("{}::{test}", module_path!().split_once("::").expect("crate::path").1);
        let out = std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args([name.as_str(), "--exact", "--test-threads=1", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .expect("the test binary runs");
        let log = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && log.contains("1 passed"), "{name} failed in its child process:\n{log}");
        false
    }

    fn quiet(cfg: TrainerConfig) -> TrainerConfig {
        TrainerConfig { grad_clip: None, ema_decay: None, warmup: 0, ..cfg }
    }

    #[test]
    fn adamw_follows_the_update_formula_on_a_quadratic() {
        // f(θ) = ½ Σ aᵢ θᵢ², ∇f = a ⊙ θ; three steps at changing lr, compared with the formula evaluated in f64
        let mut vs = VarStore::new(Device::Cpu);
        let theta = vs.root().var_copy("theta", &Tensor::from_slice(&[1.0f64, -2.0]));
        vs.double(); // f64 throughout, so the comparison can be tight
        let a = [1.0, 3.0];
        let (betas, eps, wd) = ((0.9, 0.999), 1e-8, 0.1);
        let mut adam = AdamW::new(&vs, betas, eps, wd);
        let (mut th, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        for (t, lr) in [0.1, 0.05, 0.02].into_iter().enumerate() {
            let g = &theta.detach() * Tensor::from_slice(&a);
            adam.step(&vs, &BTreeMap::from([("theta".to_string(), g)]), lr);
            let t = (t + 1) as i32;
            for i in 0..2 {
                let g = a[i] * th[i];
                m[i] = betas.0 * m[i] + (1.0 - betas.0) * g;
                v[i] = betas.1 * v[i] + (1.0 - betas.1) * g * g;
                let (m_hat, v_hat) = (m[i] / (1.0 - betas.0.powi(t)), v[i] / (1.0 - betas.1.powi(t)));
                th[i] -= lr * wd * th[i] + lr * m_hat / (v_hat.sqrt() + eps);
            }
            let got = Vec::<f64>::try_from(&theta.detach()).unwrap();
            for i in 0..2 {
                assert!((got[i] - th[i]).abs() < 1e-12, "step {t}: θ{i} = {} vs {}", got[i], th[i]);
            }
        }
        assert_eq!(adam.t, 3);
    }

    #[test]
    fn clipping_scales_the_global_norm_to_the_limit_only_when_above() {
        let mut grads = [Tensor::from_slice(&[3.0f32, 4.0]), Tensor::from_slice(&[12.0f32])]; // ‖g‖ = 13
        assert_eq!(clip_grad_norm(&mut grads, 6.5), 13.0);
        assert!((global_norm(&grads) - 6.5).abs() < 1e-6);
        assert_eq!(Vec::<f32>::try_from(&grads[0]).unwrap(), [1.5, 2.0]); // direction kept: every tensor halved
        let before: Vec<Tensor> = grads.iter().map(Tensor::copy).collect();
        assert!((clip_grad_norm(&mut grads, 100.0) - 6.5).abs() < 1e-6);
        assert!(grads.iter().zip(&before).all(|(g, b)| g.equal(b)), "below the limit nothing changes");
    }

    #[test]
    fn every_epoch_visits_each_row_once_in_a_new_order() {
        let (e0, e1) = (epoch_order(3, 0, 50), epoch_order(3, 1, 50));
        let mut sorted = e0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(e0, e1);
        assert_eq!(e0, epoch_order(3, 0, 50));
    }

    #[test]
    fn a_tiny_mlp_overfits_one_batch() {
        if !in_child("a_tiny_mlp_overfits_one_batch") {
            return;
        }
        tch::manual_seed(0);
        let (x, y) = toy_data(32, 4);
        let vs = VarStore::new(Device::Cpu);
        let model = mlp(&vs, 4, 32, 2);
        let cfg = TrainerConfig { steps: 300, batch_size: 32, lr: 1e-2, warmup: 10, ..quiet(Default::default()) };
        let out =
            train(&vs, None, &[&x, &y], &cfg, &mut |b, _| mse(&model, b), TrainRun::new(Device::Cpu, &mut |_| {}))
                .unwrap();
        let (first, last) = (out.losses[0], out.losses[299]);
        assert!(last < 0.1 * first, "the loss fell from {first} to only {last}");
        assert!(out.ema.is_none() && out.resumed_from.is_none() && out.steps_run == 300);
    }

    #[test]
    fn bf16_mode_trains_and_keeps_f32_master_weights() {
        if !in_child("bf16_mode_trains_and_keeps_f32_master_weights") {
            return;
        }
        tch::manual_seed(0);
        let (x, y) = toy_data(64, 4);
        let master = VarStore::new(Device::Cpu);
        let _ = mlp(&master, 4, 32, 2);
        let mut compute = VarStore::new(Device::Cpu);
        let model = mlp(&compute, 4, 32, 2);
        compute.set_kind(Kind::BFloat16);
        let cfg = TrainerConfig { steps: 200, batch_size: 16, lr: 3e-3, bf16: true, ..quiet(Default::default()) };
        let mut loss = |b: &[Tensor], _: usize| {
            let (x, y) = (b[0].to_kind(Kind::BFloat16), b[1].to_kind(Kind::BFloat16));
            (model.forward(&x) - y).square().mean(Kind::Float)
        };
        let e =
            train(&master, None, &[&x, &y], &cfg, &mut loss, TrainRun::new(Device::Cpu, &mut |_| {})).err().unwrap();
        assert!(e.to_string().contains("compute VarStore"), "{e}");
        let out =
            train(&master, Some(&mut compute), &[&x, &y], &cfg, &mut loss, TrainRun::new(Device::Cpu, &mut |_| {}))
                .unwrap();
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        let (early, late) = (mean(&out.losses[..10]), mean(&out.losses[190..]));
        assert!(late < 0.3 * early, "bf16 loss fell from {early} only to {late}");
        assert!(master.variables().values().all(|v| v.kind() == Kind::Float));
        assert!(compute.variables().values().all(|v| v.kind() == Kind::BFloat16));
        // the master weights hold more than bf16 can: small updates were not rounded away
        let w = &master.variables()["fc1.weight"];
        assert!(!w.equal(&w.to_kind(Kind::BFloat16).to_kind(Kind::Float)));
    }

    #[test]
    fn a_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint() {
        if !in_child("a_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint") {
            return;
        }
        tch::manual_seed(0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let (x, y) = toy_data(32, 4);
        let vs = VarStore::new(Device::Cpu);
        let model = mlp(&vs, 4, 8, 2);
        let cfg = TrainerConfig { steps: 10, batch_size: 8, lr: 1e-3, checkpoint_every: 5, ..Default::default() };
        let mut loss = |b: &[Tensor], step: usize| if step == 5 { mse(&model, b) * f64::NAN } else { mse(&model, b) };
        let mut saved = vec![];
        let mut cb = |i: StepInfo| {
            if i.step == 4 {
                saved = std::fs::read(&path).unwrap()
            }
        };
        let e = format!(
            "{:#}",
            train(&vs, None, &[&x, &y], &cfg, &mut loss, TrainRun::new(Device::Cpu, &mut cb).checkpoint(&path, false))
                .err()
                .unwrap()
        );
        assert!(e.contains("step 5") && e.contains("--lr"), "{e}");
        assert!(
            !saved.is_empty() && std::fs::read(&path).unwrap() == saved,
            "the checkpoint of step 5 was overwritten"
        );
        let spec = RunSpec::from_iter([(SPEC_DATA.to_string(), data_shapes(&[&x, &y]))]);
        let (resumed, warning) = Trainer::resume(&vs, cfg.clone(), spec, &path).unwrap();
        assert_eq!((resumed.steps_done, warning), (5, None));

        // a finite loss with a non-finite gradient: d√|z|/dz at z = 0
        let vs = VarStore::new(Device::Cpu);
        let z = vs.root().var("z", &[1], nn::Init::Const(0.0));
        let mut loss = |_: &[Tensor], _: usize| z.abs().sqrt().sum(Kind::Float);
        let e = train(&vs, None, &[&x], &cfg, &mut loss, TrainRun::new(Device::Cpu, &mut |_| {}))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("step 0") && e.contains("gradient norm"), "{e}");
    }

    #[test]
    fn resuming_with_another_lr_names_the_field_and_more_steps_are_allowed() {
        if !in_child("resuming_with_another_lr_names_the_field_and_more_steps_are_allowed") {
            return;
        }
        tch::manual_seed(0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let (x, y) = toy_data(32, 4);
        let vs = VarStore::new(Device::Cpu);
        let model = mlp(&vs, 4, 8, 2);
        let cfg = TrainerConfig { steps: 3, batch_size: 8, lr: 1e-3, warmup: 1, ..Default::default() };
        let mut loss = |b: &[Tensor], _: usize| mse(&model, b);
        train(&vs, None, &[&x, &y], &cfg, &mut loss, TrainRun::new(Device::Cpu, &mut |_| {}).checkpoint(&path, false))
            .unwrap();
        let other = TrainerConfig { lr: 2e-3, ..cfg.clone() };
        let e = format!(
            "{:#}",
            train(
                &vs,
                None,
                &[&x, &y],
                &other,
                &mut loss,
                TrainRun::new(Device::Cpu, &mut |_| {}).checkpoint(&path, true)
            )
            .err()
            .unwrap()
        );
        assert!(e.contains("`lr`") && e.contains("0.001") && e.contains("0.002"), "{e}");
        // a longer run is a new schedule for the remaining steps: its warm-up may follow from the new total
        let longer = TrainerConfig { steps: 5, warmup: 2, ..cfg };
        let out = train(
            &vs,
            None,
            &[&x, &y],
            &longer,
            &mut loss,
            TrainRun::new(Device::Cpu, &mut |_| {}).checkpoint(&path, true),
        )
        .unwrap();
        assert_eq!((out.resumed_from, out.losses.len(), out.steps_run), (Some(3), 5, 2));
    }

    #[test]
    fn an_interrupted_and_resumed_run_ends_bit_identical() {
        if !in_child("an_interrupted_and_resumed_run_ends_bit_identical") {
            return;
        }
        tch::set_num_threads(1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let (x, y) = toy_data(64, 3);
        let cfg = TrainerConfig {
            steps: 20,
            batch_size: 16,
            lr: 1e-2,
            warmup: 3,
            weight_decay: 0.01,
            grad_clip: Some(0.5),
            ema_decay: Some(0.9),
            checkpoint_every: 0,
            bf16: false,
            seed: 7,
            ..Default::default()
        };
        // the loss draws noise, so the per-step seeding is part of what is checked
        let noisy =
            |model: &nn::Sequential, b: &[Tensor]| mse(model, &[&b[0] + b[0].randn_like() * 0.1, b[1].shallow_clone()]);
        let build = |seed: i64| {
            tch::manual_seed(seed);
            let vs = VarStore::new(Device::Cpu);
            let model = mlp(&vs, 3, 16, 2);
            (vs, model)
        };

        let (vs_a, model_a) = build(0);
        let a = train(
            &vs_a,
            None,
            &[&x, &y],
            &cfg,
            &mut |b, _| noisy(&model_a, b),
            TrainRun::new(Device::Cpu, &mut |_| {}),
        )
        .unwrap();

        let (vs_b, model_b) = build(0);
        let mut trainer = Trainer::new(&vs_b, cfg.clone()).unwrap();
        for _ in 0..7 {
            trainer.step(&vs_b, None, &[&x, &y], &mut |b, _| noisy(&model_b, b)).unwrap();
            // step 7 is mid-epoch 1
        }
        trainer.save(&vs_b, &path).unwrap();
        drop((trainer, vs_b, model_b));

        let (vs_c, model_c) = build(123); // other initial weights: all of it must come from the checkpoint
        let c = train(
            &vs_c,
            None,
            &[&x, &y],
            &cfg,
            &mut |b, _| noisy(&model_c, b),
            TrainRun::new(Device::Cpu, &mut |_| {}).checkpoint(&path, true),
        )
        .unwrap();
        assert_eq!(c.resumed_from, Some(7));
        assert_eq!(a.losses, c.losses);
        for (name, w) in vs_a.variables() {
            assert!(w.equal(&vs_c.variables()[&name]), "weights '{name}' differ after resume");
        }
        let (mut ema_a, mut ema_c) = (build(1).0, build(2).0);
        let (ema_of_a, ema_of_c) = (a.ema.unwrap(), c.ema.unwrap());
        ema_of_a.copy_to(&mut ema_a);
        ema_of_c.copy_to(&mut ema_c);
        for (name, w) in ema_a.variables() {
            assert!(w.equal(&ema_c.variables()[&name]), "EMA '{name}' differs after resume");
        }
        assert_eq!(ema_of_a.current_decay(), ema_of_c.current_decay(), "the EMA's warm-up resumed where it stopped");
        let (mut from_file, _) = build(3);
        load_ema(&mut from_file, &path).unwrap(); // the final checkpoint of the resumed run
        assert!(from_file.variables().iter().all(|(name, w)| w.equal(&ema_c.variables()[name])));
    }

    /// A 3-step ε-prediction run of an MLP on 2-D data through [`crate::train::ddpm::train_eps_model`], as lessons 03
    /// and 04 call it (the model's config in the run spec), checkpointed to `path`; `resume` continues from it.
    fn eps_run(
        path: &Path,
        resume: bool,
        (schedule, timesteps, weight): (&str, usize, crate::train::ddpm::LossWeight),
        model: &crate::nn::eps_mlp::EpsMlpConfig,
        steps: usize,
    ) -> Result<TrainOutcome> {
        use crate::diffusion::schedule::NoiseSchedule;
        use crate::train::ddpm::{train_eps_model, EpsObjective};
        let data = toy_data(32, 2).0;
        let objective = EpsObjective::new(&NoiseSchedule::by_name(schedule, timesteps)?, weight, Device::Cpu);
        let cfg = TrainerConfig { steps, batch_size: 8, lr: 1e-3, warmup: 1, ..Default::default() };
        let run = TrainRun::new(Device::Cpu, |_| {}).checkpoint(path, resume).spec("model", model);
        let build = |p: nn::Path| crate::nn::eps_mlp::EpsMlp::new(p, model.clone());
        Ok(train_eps_model(build, &data, &objective, &cfg, run, (&[], &mut |_, _| {}))?.2)
    }

    #[test]
    fn resuming_with_another_schedule_t_weighting_or_model_is_refused_naming_it() {
        if !in_child("resuming_with_another_schedule_t_weighting_or_model_is_refused_naming_it") {
            return;
        }
        use crate::nn::eps_mlp::EpsMlpConfig;
        use crate::train::ddpm::LossWeight::{MinSnr, Uniform};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let model = EpsMlpConfig { depth: 2, ..EpsMlpConfig::tiny(2) };
        eps_run(&path, false, ("cosine", 100, Uniform), &model, 3).unwrap();
        let refused = |objective, model: &EpsMlpConfig, steps| {
            format!("{:#}", eps_run(&path, true, objective, model, steps).err().expect("the resume is refused"))
        };
        for (objective, want) in [
            (("linear", 100, Uniform), ["`schedule`", "\"cosine\"", "\"linear\""]),
            (("cosine", 50, Uniform), ["`timesteps`", "100", "50"]),
            (("cosine", 100, MinSnr), ["`loss_weight`", "\"Uniform\"", "\"MinSnr\""]),
        ] {
            let e = refused(objective, &model, 5);
            assert!(want.iter().all(|w| e.contains(w)) && e.contains("without --resume"), "{want:?}: {e}");
        }
        // one block fewer: every tensor the smaller model has is in the checkpoint, so only the spec can tell
        let e = refused(("cosine", 100, Uniform), &EpsMlpConfig { depth: 1, ..model.clone() }, 5);
        assert!(e.contains("`model.depth` = 2") && e.contains("`model.depth` = 1"), "{e}");
        // fewer steps than the checkpoint has done
        let e = refused(("cosine", 100, Uniform), &model, 2);
        assert!(e.contains("already done 3 steps") && e.contains("--steps 3 or more"), "{e}");
        // the same settings continue
        let out = eps_run(&path, true, ("cosine", 100, Uniform), &model, 5).unwrap();
        assert_eq!((out.resumed_from, out.steps_run, out.warnings.len()), (Some(3), 2, 0));
    }

    #[test]
    fn another_thread_count_warns_and_continues() {
        if !in_child("another_thread_count_warns_and_continues") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let (x, y) = toy_data(32, 4);
        let vs = VarStore::new(Device::Cpu);
        let model = mlp(&vs, 4, 8, 2);
        let mut loss = |b: &[Tensor], _: usize| mse(&model, b);
        let cfg = TrainerConfig { steps: 3, batch_size: 8, lr: 1e-3, warmup: 1, ..Default::default() };
        tch::set_num_threads(1);
        train(&vs, None, &[&x, &y], &cfg, &mut loss, TrainRun::new(Device::Cpu, |_| {}).checkpoint(&path, false))
            .unwrap();
        tch::set_num_threads(2);
        let mut seen = vec![];
        let run = TrainRun::new(Device::Cpu, |_| {}).checkpoint(&path, true).on_warning(|w| seen.push(w.to_string()));
        let out = train(&vs, None, &[&x, &y], &TrainerConfig { steps: 5, ..cfg }, &mut loss, run).unwrap();
        assert_eq!((out.resumed_from, out.warnings.len()), (Some(3), 1));
        let w = &out.warnings[0];
        assert!(w.contains("on 1 threads") && w.contains("uses 2") && w.contains("--threads 1"), "{w}");
        assert_eq!(seen, out.warnings);
    }

    #[test]
    fn a_checkpoint_without_recorded_settings_is_refused_and_stale_temp_files_are_removed() {
        if !in_child("a_checkpoint_without_recorded_settings_is_refused_and_stale_temp_files_are_removed") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let (x, y) = toy_data(32, 4);
        let vs = VarStore::new(Device::Cpu);
        let model = mlp(&vs, 4, 8, 2);
        let mut loss = |b: &[Tensor], _: usize| mse(&model, b);
        let cfg = TrainerConfig { steps: 3, batch_size: 8, lr: 1e-3, warmup: 1, ..Default::default() };
        // what a save killed before its rename leaves: a half-written temporary file (of another process id)
        let stale = dir.path().join(".ckpt.safetensors.tmp4242.safetensors");
        std::fs::write(&stale, b"half a checkpoint").unwrap();
        let unrelated = dir.path().join(".other.safetensors.tmp4242.safetensors");
        std::fs::write(&unrelated, b"not ours").unwrap();
        train(&vs, None, &[&x, &y], &cfg, &mut loss, TrainRun::new(Device::Cpu, |_| {}).checkpoint(&path, false))
            .unwrap();
        assert!(!stale.exists() && unrelated.exists(), "the stale temporary file of this checkpoint is removed");
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(files.len(), 2, "the checkpoint is one file, no config beside it: {files:?}");

        // a checkpoint of the old format: weights, config in a JSON file beside them, no run spec inside
        let old = dir.path().join("old.safetensors");
        vs.save(&old).unwrap();
        std::fs::write(checkpoint::config_path(&old), serde_json::to_string(&cfg).unwrap()).unwrap();
        let e = format!(
            "{:#}",
            train(&vs, None, &[&x, &y], &cfg, &mut loss, TrainRun::new(Device::Cpu, |_| {}).checkpoint(&old, true))
                .err()
                .unwrap()
        );
        assert!(e.contains("does not record the settings") && e.contains("without --resume"), "{e}");
    }

    #[test]
    fn a_corrupt_step_count_is_refused_before_anything_is_sized_by_it() {
        if !in_child("a_corrupt_step_count_is_refused_before_anything_is_sized_by_it") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let (x, y) = toy_data(32, 4);
        let vs = VarStore::new(Device::Cpu);
        let model = mlp(&vs, 4, 8, 2);
        let mut loss = |b: &[Tensor], _: usize| mse(&model, b);
        let cfg = TrainerConfig { steps: 3, batch_size: 8, lr: 1e-3, warmup: 1, ..Default::default() };
        let run = || TrainRun::new(Device::Cpu, |_| {}).checkpoint(&path, true);
        train(&vs, None, &[&x, &y], &cfg, &mut loss, run()).unwrap();
        let metadata = checkpoint::read_metadata(&path).unwrap();
        let tensors = Tensor::read_safetensors(&path).unwrap();
        for (step, want) in [(-1i64, "says it has done -1 steps"), (1_000_000_000_000, "no loss history")] {
            let edited: Vec<(String, Tensor)> = tensors
                .iter()
                .map(|(k, t)| (k.clone(), if k == "trainer.step" { Tensor::from(step) } else { t.shallow_clone() }))
                .collect();
            checkpoint::write_tensors(&path, &edited, &metadata).unwrap();
            let long = TrainerConfig { steps: 2_000_000_000_000, ..cfg.clone() };
            let e = format!("{:#}", train(&vs, None, &[&x, &y], &long, &mut loss, run()).err().unwrap());
            assert!(e.contains(want) && e.contains("start afresh"), "{e}");
        }
    }

    /// Issue 17, defect 10: a checkpoint holding NaN weights is refused when it is loaded, naming the tensor, instead
    /// of failing at the first step with "lower --lr".
    #[test]
    fn a_checkpoint_with_nan_weights_is_refused_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let (x, y) = toy_data(32, 4);
        let vs = VarStore::new(Device::Cpu);
        let model = mlp(&vs, 4, 8, 2);
        let mut loss = |b: &[Tensor], _: usize| mse(&model, b);
        let cfg = TrainerConfig { steps: 2, batch_size: 8, lr: 1e-3, warmup: 1, ..Default::default() };
        let run = || TrainRun::new(Device::Cpu, |_| {}).checkpoint(&path, true);
        train(&vs, None, &[&x, &y], &cfg, &mut loss, run()).unwrap();
        let metadata = checkpoint::read_metadata(&path).unwrap();
        let edited: Vec<(String, Tensor)> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .map(|(k, t)| if k == "fc1.weight" { (k, t.fill(f64::NAN)) } else { (k, t) })
            .collect();
        checkpoint::write_tensors(&path, &edited, &metadata).unwrap();
        let more = TrainerConfig { steps: 4, ..cfg.clone() };
        let e = format!("{:#}", train(&vs, None, &[&x, &y], &more, &mut loss, run()).err().unwrap());
        assert!(e.contains("fc1.weight") && e.contains("NaN") && !e.contains("--lr"), "{e}");
        let mut fresh = VarStore::new(Device::Cpu);
        let _ = mlp(&fresh, 4, 8, 2);
        let e = format!("{:#}", checkpoint::load(&mut fresh, &path).err().unwrap());
        assert!(e.contains("fc1.weight") && e.contains("NaN"), "{e}");
        // integer values where float weights belong are refused too, not converted
        let ints: Vec<(String, Tensor)> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .map(|(k, t)| if k == "fc1.weight" { (k, t.zeros_like().to_kind(Kind::Int)) } else { (k, t) })
            .collect();
        checkpoint::write_tensors(&path, &ints, &metadata).unwrap();
        let e = format!("{:#}", checkpoint::load(&mut fresh, &path).err().unwrap());
        assert!(e.contains("fc1.weight") && e.contains("Int"), "{e}");
    }
}
