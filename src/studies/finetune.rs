//! Lesson 12's experiments: teaching lesson 06's pipeline a concept (a seven with a crossbar, bound to the rare word
//! "sks") by DreamBooth, LoRA and textual inversion, and a style (outlined strokes) by a LoRA whose multiplier sets
//! its strength; each measured by the detectors of [`crate::eval::signatures`] on samples the run draws.
//!
//! [DreamBooth] Ruiz et al. 2023, arXiv:2208.12242 (sec. 3.2: "a [V] class"; sec. 3.3: prior preservation, λ = 1).
//! [TI] Gal et al. 2022, arXiv:2208.01618 (sec. 4: the new word's vector starts from a coarse descriptor's).
//! [LoRA] Hu et al. 2021, arXiv:2106.09685.
use crate::checkpoint;
use crate::eval::frechet::evaluate_samples;
use crate::eval::signatures::{among_top_two, has_crossbar, hollowness, share, OUTLINED_AT};
use crate::model::Cond;
use crate::nn::classifier::MnistClassifier;
use crate::nn::clip::digit_prompts;
use crate::nn::lora::{attach_lora, detach_all, set_multiplier, LoraConfig};
use crate::pipelines::text_to_image::{Draw, TextToImage};
use crate::sd::embeddings::{Embedding, Embeddings};
use crate::studies::guidance_methods::Tile;
use crate::train::ddpm::EpsObjective;
use crate::train::finetune::{fine_tune, Examples, Prompts};
use crate::train::trainer::{TrainOutcome, TrainRun, TrainerConfig};
use anyhow::{Context, Result};
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The rare word the concept is bound to (DreamBooth's "[V]"; also the textual-inversion embedding's name).
pub const IDENTIFIER: &str = "sks";
/// The instance prompt, "a [V] class", and the class prompt of prior preservation ([DreamBooth] sec. 3.2–3.3).
pub const INSTANCE_PROMPT: &str = "a sks seven";
pub const CLASS_PROMPT: &str = "a seven";
/// The digit of the class.
pub const CLASS_DIGIT: i64 = 7;

/// Learning rates (AdamW, warm-up then cosine decay): the whole UNet moves gently (DreamBooth); the small LoRA
/// factors and a new word's vectors take larger steps (chapter 12).
pub const LR_DREAMBOOTH: f64 = 6e-4;
pub const LR_LORA: f64 = 1e-2;
pub const LR_EMBEDDING: f64 = 2e-2;
/// [DreamBooth] sec. 4.3: λ = 1 in the paper's experiments.
pub const PRIOR_WEIGHT: f64 = 1.0;

/// A fine-tune's optimiser: `steps` of `batch` at peak rate `lr`, a tenth of them warm-up, no EMA (the weights of
/// the last step are the result, as diffusers' scripts save them).
pub fn recipe(lr: f64, steps: usize, batch: i64, seed: u64) -> TrainerConfig {
    TrainerConfig { steps, batch_size: batch, lr, warmup: steps / 10, ema_decay: None, seed, ..Default::default() }
}

/// How graders draw: `n` samples per prompt from `seed` (the same noise for every model, so samples pair up).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Probe {
    pub n: i64,
    pub guidance: f64,
    pub steps: usize,
    pub seed: u64,
}

impl Probe {
    fn draw(&self, pipe: &TextToImage, prompt: &str) -> Result<Tensor> {
        pipe.generate(prompt, None, self.n, self.guidance, self.steps, self.seed)
        // (n, 1, H, W) in [0, 1]
    }
}

/// What a fine-tuned model does with the concept and with everything else.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConceptGrade {
    /// Share of "a sks seven" samples that are sevens (7 among the classifier's two likeliest digits,
    /// [`among_top_two`]) with a crossbar (the detector).
    pub fidelity: f64,
    /// Share of "a sks seven" samples the classifier reads as sevens (its first reading).
    pub read_as_seven: f64,
    /// Share of plain "a seven" samples with a crossbar.
    pub plain_crossbar: f64,
    /// Language drift: share of plain "a seven" samples that have a crossbar where the frozen model's sample from
    /// the same noise had none.
    pub drift: f64,
    /// Fréchet distance of samples for "a handwritten 0" … "a handwritten 9" (classifier features, against test
    /// digits): what the fine-tune did to everything else.
    pub plain_fd: f64,
}

/// The frozen model's crossbars on "a seven", which drift is measured against.
pub struct Reference {
    pub plain_crossbar: Vec<bool>,
}

/// Grades `pipe` as it is now (with whatever adapters, weights or embeddings it has); returns the grade and the
/// instance and plain samples.
pub fn grade_concept(
    pipe: &TextToImage,
    clf: &MnistClassifier,
    probe: &Probe,
    reference: Option<&Reference>,
    test_images: &Tensor,
) -> Result<(ConceptGrade, Tensor, Tensor)> {
    let instance = probe.draw(pipe, INSTANCE_PROMPT)?;
    let plain = probe.draw(pipe, CLASS_PROMPT)?;
    let probabilities = clf.probabilities(&instance); // (n, 10)
    let sevens: Vec<bool> = Vec::try_from(probabilities.argmax(-1, false).eq(CLASS_DIGIT))?;
    let barred = has_crossbar(&instance);
    let both: Vec<bool> =
        among_top_two(&probabilities, CLASS_DIGIT).iter().zip(&barred).map(|(a, b)| *a && *b).collect();
    let plain_barred = has_crossbar(&plain);
    let acquired: Vec<bool> = match reference {
        Some(r) => plain_barred.iter().zip(&r.plain_crossbar).map(|(now, before)| *now && !before).collect(),
        None => vec![false; plain_barred.len()],
    };
    let prompts: Vec<String> = digit_prompts().into_iter().cycle().take(probe.n.max(10) as usize).collect();
    let (others, _) = pipe.generate_each(&prompts, &Draw::new(probe.guidance, probe.steps, probe.seed + 1))?;
    let plain_fd = evaluate_samples(clf, &others, test_images).frechet_distance;
    let grade = ConceptGrade {
        fidelity: share(&both),
        read_as_seven: share(&sevens),
        plain_crossbar: share(&plain_barred),
        drift: share(&acquired),
        plain_fd,
    };
    Ok((grade, instance, plain))
}

/// How the concept is taught.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Method {
    /// [DreamBooth]: every weight of the UNet trains.
    DreamBooth,
    /// DreamBooth's data and loss, but only LoRA adapters train (what most people run).
    Lora(LoraConfig),
    /// [TI]: only `vectors` new token vectors named "sks" train.
    TextualInversion { vectors: i64 },
}

impl Method {
    /// The method's learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Method::DreamBooth => LR_DREAMBOOTH,
            Method::Lora(_) => LR_LORA,
            Method::TextualInversion { .. } => LR_EMBEDDING,
        }
    }

    /// A short name for the method's files and figure rows.
    pub fn tag(&self, prior: bool) -> String {
        let p = if prior { "_prior" } else { "" };
        match self {
            Method::DreamBooth => format!("dreambooth{p}"),
            Method::Lora(c) => {
                let kind = match c.targets {
                    crate::nn::lora::LoraTargets::Attention => "lora_attn",
                    crate::nn::lora::LoraTargets::Transformer => "lora",
                    crate::nn::lora::LoraTargets::TransformerAndConvs => "locon",
                };
                format!("{kind}_r{}{p}", c.rank)
            }
            Method::TextualInversion { vectors } => format!("ti_{vectors}"),
        }
    }

    /// Whether lesson 12's figure shows the method's samples: DreamBooth, rank 4, textual inversion.
    pub fn in_figure(&self) -> bool {
        !matches!(self, Method::Lora(c) if c.rank != 4)
    }

    pub fn label(&self) -> String {
        match self {
            Method::DreamBooth => "DreamBooth (full UNet)".into(),
            Method::Lora(c) => format!("LoRA r{} ({:?})", c.rank, c.targets),
            Method::TextualInversion { vectors } => {
                format!("textual inversion ({vectors} vector{})", if *vectors == 1 { "" } else { "s" })
            }
        }
    }
}

/// The concept's training data, (N, 1, H, W) in [−1, 1]: the instance images and the class images for prior
/// preservation (drawn by the frozen model).
pub struct ConceptData {
    pub instance: Tensor,
    pub prior: Tensor,
}

/// What a fine-tune left: how long it took, what trained, and the file it wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Tuned {
    pub seconds: f64,
    pub trainable_parameters: i64,
    pub file_bytes: u64,
    pub final_loss: f64,
}

/// What the detectors say about real digits and the training images: the base rates the samples are read against.
pub fn base_rates(
    clf: &MnistClassifier,
    instance: &Tensor,
    test_images: &Tensor,
    test_labels: &Tensor,
) -> serde_json::Value {
    let sevens = test_images.index_select(0, &test_labels.eq(CLASS_DIGIT).nonzero().squeeze_dim(1));
    // the ceiling of fidelity: how the classifier reads real sevens once they have a crossbar
    let barred = clf.probabilities(&crate::data::signatures::with_crossbar(&sevens)); // (N, 10)
    let read_as_seven = barred.argmax(-1, false).eq(CLASS_DIGIT).to_kind(Kind::Float).mean(Kind::Float);
    let digits = test_images.narrow(0, 0, 1000.min(test_images.size()[0]));
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
    serde_json::json!({
        "real_test_sevens_with_crossbar": share(&has_crossbar(&sevens)),
        "instance_images_with_crossbar": share(&has_crossbar(instance)),
        "barred_test_sevens_read_as_seven": read_as_seven.double_value(&[]),
        "barred_test_sevens_seven_in_top_two": share(&among_top_two(&barred, CLASS_DIGIT)),
        "real_digits_hollowness": mean(hollowness(&digits)),
        "outlined_digits_hollowness": mean(hollowness(&crate::data::signatures::outlined(&digits))),
    })
}

/// Contexts of the prompts (P, L, D) with masks, as the frozen text encoder reads them.
fn contexts(pipe: &TextToImage, prompts: &[&str]) -> Cond {
    let conds: Vec<Cond> = prompts.iter().map(|p| pipe.context(p).1).collect();
    Cond::cat(&conds.iter().collect::<Vec<_>>())
}

/// The UNet's weights, to put back after a DreamBooth run.
pub fn snapshot(vs: &VarStore) -> Vec<(String, Tensor)> {
    vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect()
}

/// Writes `saved` back into `vs`.
pub fn restore(vs: &VarStore, saved: &[(String, Tensor)]) {
    let vars = vs.variables();
    tch::no_grad(|| {
        for (k, t) in saved {
            vars[k].shallow_clone().copy_(t);
        }
    });
}

// ANCHOR: teach
/// Teaches `pipe` the concept by `method` (with the class images of `data` when `prior` is λ), writes what it learned
/// to `file` in the ecosystem's format (a kohya LoRA, diffusers' `learned_embeds`, or the whole UNet for DreamBooth)
/// and leaves it in `pipe` (adapters attached, weights changed, or the embedding loaded) for grading; [`forget`]
/// undoes it.
pub fn teach(
    pipe: &mut TextToImage,
    (method, prior): (Method, Option<f64>),
    data: &ConceptData,
    (objective, cfg, run): (&EpsObjective, &TrainerConfig, TrainRun),
    file: &Path,
) -> Result<Tuned> {
    let device = pipe.device();
    let n = data.instance.size()[0];
    let rows = |v: i64, len: i64| Tensor::full([len], v, (Kind::Int64, device)); // prompt row of each image
    let (instance_rows, prior_rows) = (rows(0, n), rows(1, data.prior.size()[0]));
    let instance = Examples { images: &data.instance, prompts: &instance_rows };
    let prior = prior.map(|lambda| (Examples { images: &data.prior, prompts: &prior_rows }, lambda));
    let (outcome, trainable): (TrainOutcome, i64) = match method {
        Method::DreamBooth => {
            let cond = contexts(pipe, &[INSTANCE_PROMPT, CLASS_PROMPT]);
            pipe.unfreeze_unet();
            let out =
                fine_tune(&pipe.unet.0, pipe.unet_vs(), &Prompts::Frozen(&cond), instance, prior, objective, cfg, run);
            pipe.freeze_unet();
            let out = out?; // a run that failed writes no file
            let vs = pipe.unet_vs();
            crate::cli::replace_atomically(file, ".safetensors", |tmp| Ok(vs.save(tmp)?))?;
            (out, checkpoint::num_parameters(vs))
        }
        Method::Lora(config) => {
            let cond = contexts(pipe, &[INSTANCE_PROMPT, CLASS_PROMPT]);
            train_lora(pipe, &config, &cond, (instance, prior), (objective, cfg, run), file)?
        }
        Method::TextualInversion { vectors } => {
            pipe.freeze_unet();
            // [TI] sec. 4: v starts from the embedding of a coarse descriptor of the concept, the class word
            let seed_ids = pipe.prompts.tokenizer.encode("seven");
            let start = pipe.prompts.text_encoder.token_embedding_rows(&seed_ids[..1]).repeat([vectors, 1]); // (n, D)
            let emb = VarStore::new(device);
            let v = emb.root().var_copy(IDENTIFIER, &start);
            let named = Embedding { name: IDENTIFIER.into(), vectors: v.shallow_clone(), path: file.to_path_buf() };
            pipe.prompts.embeddings = Embeddings::default();
            pipe.prompts.embeddings.list.push(named);
            let tokens: Vec<_> =
                [INSTANCE_PROMPT, CLASS_PROMPT].iter().map(|p| pipe.prompts.tokenize(p)).collect::<Result<_>>()?;
            let ids = Tensor::stack(&tokens.iter().map(|t| Tensor::from_slice(&t.encoded.ids)).collect::<Vec<_>>(), 0)
                .to_device(device); // (2, L)
            let lens =
                Tensor::from_slice(&tokens.iter().map(|t| t.encoded.len as i64).collect::<Vec<_>>()).to_device(device);
            let mask = crate::nn::text_unet::lens_to_mask(&lens, ids.size()[1]); // (2, L)
            let text = Prompts::Inverted { encoder: &pipe.prompts.text_encoder, ids: &ids, mask: &mask, extra: &v };
            let out = fine_tune(&pipe.unet.0, &emb, &text, instance, prior, objective, cfg, run)?;
            let learned = v.detach().copy().to_device(Device::Cpu);
            pipe.prompts.embeddings.list[0].vectors = learned.shallow_clone();
            // diffusers' learned_embeds.safetensors: {token: (n, D)}
            crate::cli::replace_atomically(file, ".safetensors", |tmp| {
                Ok(Tensor::write_safetensors(&[(IDENTIFIER, learned)], tmp)?)
            })?;
            (out, vectors * pipe.prompts.hidden_size())
        }
    };
    tuned(&outcome, trainable, file)
}
// ANCHOR_END: teach

/// Undoes [`teach`]: adapters detached, the embedding dropped, and for DreamBooth the UNet's weights `saved`.
pub fn forget(pipe: &mut TextToImage, saved: &[(String, Tensor)]) {
    detach_all(&mut pipe.unet.0);
    pipe.prompts.embeddings = Embeddings::default();
    restore(pipe.unet_vs(), saved);
}

/// The number of values in the trainable variables of `vs` (a LoRA's A and B, not its α).
pub fn trainable_numel(vs: &VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

/// Writes a LoRA's VarStore as the kohya file it already is by its names (`lora_unet_….lora_down.weight`, …), in
/// f16 as kohya's scripts save by default (`--save_precision fp16`), atomically.
pub fn save_kohya(lora: &VarStore, file: &Path) -> Result<()> {
    let half = |v: Tensor| v.detach().to_kind(Kind::Half).to_device(Device::Cpu);
    let mut named: Vec<(String, Tensor)> = lora.variables().into_iter().map(|(k, v)| (k, half(v))).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    crate::cli::replace_atomically(file, ".safetensors", |tmp| Ok(Tensor::write_safetensors(&named, tmp)?))
}

/// Attaches fresh adapters of `config` to `pipe`'s frozen UNet, trains them on `examples` (and `prior`) captioned by
/// the contexts `cond`, and writes them to `file` as kohya's LoRA; the adapters stay attached. Returns the outcome and
/// the number of trainable values.
fn train_lora(
    pipe: &mut TextToImage,
    config: &LoraConfig,
    cond: &Cond,
    (examples, prior): (Examples, Option<(Examples, f64)>),
    (objective, cfg, run): (&EpsObjective, &TrainerConfig, TrainRun),
    file: &Path,
) -> Result<(TrainOutcome, i64)> {
    pipe.freeze_unet();
    let lora = VarStore::new(pipe.device());
    attach_lora(&mut pipe.unet.0, &lora.root(), "lora_unet_", config);
    let out = fine_tune(&pipe.unet.0, &lora, &Prompts::Frozen(cond), examples, prior, objective, cfg, run)?;
    save_kohya(&lora, file)?;
    Ok((out, trainable_numel(&lora)))
}

/// Trains a style LoRA on `images` (N, 1, H, W) in [−1, 1] with their digits' prompts ("a handwritten 3"); the
/// adapters stay attached to `pipe` and are written to `file`.
pub fn teach_style(
    pipe: &mut TextToImage,
    config: &LoraConfig,
    (images, labels): (&Tensor, &Tensor),
    (objective, cfg, run): (&EpsObjective, &TrainerConfig, TrainRun),
    file: &Path,
) -> Result<Tuned> {
    let prompts = digit_prompts();
    let cond = contexts(pipe, &prompts.iter().map(String::as_str).collect::<Vec<_>>()); // (10, L, D)
    let labels = labels.to_device(pipe.device());
    let examples = Examples { images, prompts: &labels };
    let (out, trainable) = train_lora(pipe, config, &cond, (examples, None), (objective, cfg, run), file)?;
    tuned(&out, trainable, file)
}

/// What a fine-tune that wrote `file` reports.
fn tuned(out: &TrainOutcome, trainable_parameters: i64, file: &Path) -> Result<Tuned> {
    let file_bytes = std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?.len();
    let final_loss = crate::cli::mean_of_last(&out.losses, 20);
    Ok(Tuned { seconds: out.seconds, trainable_parameters, file_bytes, final_loss })
}

/// Style strength at one LoRA multiplier.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StylePoint {
    pub multiplier: f64,
    /// Mean hollowness of the samples ([`hollowness`]).
    pub hollowness: f64,
    /// Share of samples above [`OUTLINED_AT`].
    pub outlined: f64,
    /// Share read by the classifier as the digit asked for.
    pub read_as_asked: f64,
}

// ANCHOR: style_sweep
/// Samples for "a handwritten 0" … "a handwritten 9" (cycled to `probe.n`) at each multiplier of the LoRA attached
/// to `pipe`, from the same noise: how strong the style is, and 10 samples per multiplier for the figure.
pub fn style_sweep(
    pipe: &mut TextToImage,
    clf: &MnistClassifier,
    multipliers: &[f64],
    probe: &Probe,
) -> Result<(Vec<StylePoint>, Vec<Tile>)> {
    let prompts: Vec<String> = digit_prompts().into_iter().cycle().take(probe.n.max(10) as usize).collect();
    let asked = Tensor::from_slice(&(0..prompts.len() as i64).map(|i| i % 10).collect::<Vec<_>>());
    let (mut points, mut tiles) = (Vec::new(), Vec::new());
    for &m in multipliers {
        set_multiplier(&mut pipe.unet.0, m);
        let (x, _) = pipe.generate_each(&prompts, &Draw::new(probe.guidance, probe.steps, probe.seed))?;
        let h = hollowness(&x);
        let read = clf.probabilities(&x).argmax(-1, false).eq_tensor(&asked).to_kind(Kind::Float).mean(Kind::Float);
        points.push(StylePoint {
            multiplier: m,
            hollowness: h.iter().sum::<f64>() / h.len() as f64,
            outlined: share(&h.iter().map(|&v| v > OUTLINED_AT).collect::<Vec<_>>()),
            read_as_asked: read.double_value(&[]),
        });
        tiles.push((format!("m = {m}"), x.narrow(0, 0, 10)));
    }
    set_multiplier(&mut pipe.unet.0, 1.0);
    Ok((points, tiles))
}
// ANCHOR_END: style_sweep

/// A row of the comparison table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub method: String,
    pub prior_preservation: bool,
    pub tuned: Option<Tuned>,
    pub grade: ConceptGrade,
}

/// concept.png (the methods' samples), style.png (the multiplier sweep) and training_images.png (ten images of the
/// concept `concept` and of the style `style`, (N, 1, H, W) in [0, 1]) in `dir`.
pub fn plot_figures(
    dir: &Path,
    (tiles, style_tiles): (&[Tile], &[Tile]),
    (concept, style): (&Tensor, &Tensor),
) -> Result<()> {
    let title = "\"a sks seven\" and \"a seven\" after each fine-tune";
    crate::studies::guidance_methods::plot_rows(&dir.join("concept.png"), title, tiles)?;
    let title = "The outlined-style LoRA at growing multiplier";
    crate::studies::guidance_methods::plot_rows(&dir.join("style.png"), title, style_tiles)?;
    let ten = |x: &Tensor| x.narrow(0, 0, x.size()[0].min(10));
    let examples = Tensor::cat(&[ten(concept), ten(style)], 0);
    let title = "Training images: the concept, the style";
    crate::plot::image_grid(&dir.join("training_images.png"), title, &examples, 10, 2, &[])
}

/// The comparison table (markdown).
pub fn comparison_table(rows: &[Row], unet_bytes: u64) -> String {
    let mut t = String::from(
        "| method | prior preservation | trainable parameters | file | file / UNet | training | fidelity | read as 7 | crossbar on \"a seven\" | drift | FD of other prompts |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let (params, file, ratio, secs) = match &r.tuned {
            Some(t) => (
                t.trainable_parameters.to_string(),
                format!("{:.1} KB", t.file_bytes as f64 / 1024.0),
                format!("{:.2} %", 100.0 * t.file_bytes as f64 / unet_bytes as f64),
                format!("{:.0} s", t.seconds),
            ),
            None => ("—".into(), "—".into(), "—".into(), "—".into()),
        };
        let g = &r.grade;
        t.push_str(&format!(
            "| {} | {} | {params} | {file} | {ratio} | {secs} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} |\n",
            r.method,
            if r.prior_preservation { "yes" } else { "no" },
            g.fidelity,
            g.read_as_seven,
            g.plain_crossbar,
            g.drift,
            g.plain_fd
        ));
    }
    t
}

/// The style table (markdown): strength against the multiplier.
pub fn style_table(points: &[StylePoint]) -> String {
    let mut t =
        String::from("| multiplier | mean hollowness | outlined | read as the digit asked |\n|---|---|---|---|\n");
    for p in points {
        t.push_str(&format!(
            "| {} | {:.3} | {:.2} | {:.2} |\n",
            p.multiplier, p.hollowness, p.outlined, p.read_as_asked
        ));
    }
    t
}
