//! Training a text-conditioned ε-model, Stable Diffusion's recipe at MNIST scale: a frozen CLIP-style text encoder
//! turns a caption into token states τ(y) (B, L, D); the UNet's spatial transformers cross-attend to all L of them
//! (not to a pooled vector), the padding hidden by a key-padding mask; each caption is replaced by the empty prompt ""
//! with probability p_uncond, so the same network also learns ε_θ(x_t, t, τ("")) for classifier-free guidance.
//!
//! [LDM] Rombach et al. 2022, arXiv:2112.10752, sec. 3.3 (cross-attention to τ_θ(y)) and sec. 4.3.1 (text-to-image
//! with a transformer τ_θ over tokenised captions); Stable Diffusion keeps CLIP ViT-L/14's text encoder frozen.
//! [Imagen] Saharia et al. 2022, arXiv:2205.11487, sec. 2.1 (a frozen, text-only pre-trained encoder works) and
//! sec. 4.4 (cross-attending to the sequence of token embeddings beats mean- or attention-pooling them).
//! [CFG] Ho & Salimans 2022, arXiv:2207.12598, Algorithm 1 (condition dropout: c ← ∅ with probability p_uncond).
//! Notation (code -> paper): hidden -> τ_θ(y), the text encoder's last hidden state; empty prompt -> ∅.
use crate::model::WithContext;
use crate::nn::text_encoder::TextEncoder;
use crate::nn::text_unet::encode_context;
use crate::nn::text_unet::lens_to_mask;
use crate::nn::text_unet::TextUNet;
use crate::nn::unet::{UNet, UNetConfig};
use crate::text::captions::CaptionIds;
use crate::text::Encoded;
use crate::train::ddpm::EpsObjective;
use crate::train::trainer::TrainRun;
use crate::train::trainer::{train_model, TrainOutcome, TrainerConfig};
use anyhow::{ensure, Result};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

// ANCHOR: pick_captions
/// One caption per image for this step: for ids (B, K, L) and lens (B, K), caption k ~ U{0..K−1} of each image, then
/// [CFG] Algorithm 1: replaced by the `empty` prompt with probability `p_uncond`. Returns ids (B, L) and the mask
/// (B, L). Drawn from libtorch's generator, which the trainer reseeds per step: the same choice on every run.
pub fn pick_captions(ids: &Tensor, lens: &Tensor, empty: &Encoded, p_uncond: f64) -> (Tensor, Tensor) {
    let (b, k, l) = ids.size3().expect("caption ids (B, K, L)");
    let device = ids.device();
    let choice = Tensor::randint(k, [b, 1], (Kind::Int64, device)); // (B, 1)
    let picked = ids.gather(1, &choice.unsqueeze(2).expand([b, 1, l], false), false).squeeze_dim(1); // (B, L)
    let picked_lens = lens.gather(1, &choice, false).squeeze_dim(1); // (B,)
    let drop = Tensor::rand([b], (Kind::Float, device)).lt(p_uncond); // (B,) bool
    let empty_ids = Tensor::from_slice(&empty.ids).to_device(device).unsqueeze(0); // (1, L)
    let ids = empty_ids.where_self(&drop.unsqueeze(1), &picked); // (B, L)
    let lens = picked_lens.masked_fill(&drop, empty.len as i64); // (B,)
    (ids, lens_to_mask(&lens, l))
}
// ANCHOR_END: pick_captions

/// [`crate::train::conditional::train_cond_eps_model`] with text: builds the UNet `config` (its `cross_attention_dim` the
/// text encoder's hidden size; a bf16 copy when `cfg.bf16`) and trains it with the `weight`ed L_simple on `images`
/// (N, C, H, W) in [−1, 1], each step reading one of each image's `captions` through the frozen `text_encoder`
/// (which is not on the trainer's VarStore, so it never changes), dropped to `empty` (the tokenised "") with
/// probability `p_uncond`. Returns the f32 VarStore with the EMA weights (or the last ones), the model, the outcome.
pub fn train_text_cond_unet(
    config: &UNetConfig,
    text: TextData,
    images: &Tensor,
    objective: &EpsObjective,
    cfg: &TrainerConfig,
    run: TrainRun,
) -> Result<(VarStore, TextUNet, TrainOutcome)> {
    train_text_cond_unet_on(config, text, images, &|x| x.shallow_clone(), objective, cfg, run)
}

/// The text side of a training set: the frozen encoder, the captions of every row, the tokenised "" and the rate of
/// condition dropout.
#[derive(Clone, Copy)]
pub struct TextData<'a> {
    pub encoder: &'a TextEncoder,
    pub captions: &'a CaptionIds,
    pub empty: &'a Encoded,
    pub p_uncond: f64,
}

/// [`train_text_cond_unet`] on rows of `data` (N, …) that `x0_of` turns into the clean x₀ of each batch: the
/// identity for pixels, a draw z ~ q(z|x) from stored posterior moments for the latents of lesson 08.
// ANCHOR: train_text
pub fn train_text_cond_unet_on(
    config: &UNetConfig,
    text: TextData,
    data: &Tensor,
    x0_of: &dyn Fn(&Tensor) -> Tensor,
    objective: &EpsObjective,
    cfg: &TrainerConfig,
    run: TrainRun,
) -> Result<(VarStore, TextUNet, TrainOutcome)> {
    let TextData { encoder: text_encoder, captions, empty, p_uncond } = text;
    ensure!((0.0..=1.0).contains(&p_uncond), "--p-uncond must lie in [0, 1], got {p_uncond}");
    let width = text_encoder.config.hidden_size;
    ensure!(
        config.cross_attention_dim == Some(width),
        "the UNet's cross_attention_dim is {:?}, the text encoder's hidden size {width}: they must match",
        config.cross_attention_dim
    );
    ensure!(
        empty.ids.len() as i64 == captions.ids.size()[2],
        "the empty prompt has {} tokens, the captions {}: tokenize both to the same length",
        empty.ids.len(),
        captions.ids.size()[2]
    );
    let kind = if cfg.bf16 { Kind::BFloat16 } else { Kind::Float };
    let mut loss_fn = |net: &TextUNet, _: &TextUNet, batch: &[Tensor], _step: usize| {
        let (ids, mask) = pick_captions(&batch[1], &batch[2], empty, p_uncond); // (B, L) each
        let cond = encode_context(text_encoder, &ids, &mask).to_kind(kind); // (B, L, D) and the mask (B, L)
        objective.loss(&WithContext { model: net, cond: &cond }, &x0_of(&batch[0]).to_kind(kind))
    };
    let data = [data, &captions.ids, &captions.lens];
    let build = |p: tch::nn::Path| TextUNet(UNet::new(p, config.clone()));
    // what a resume must repeat (the frozen encoder by its config: its weights may differ in the last bits when the
    // run that trained them had another thread count, which only warns)
    let run = objective.record(run).spec("model", config).spec("text_encoder", &text_encoder.config);
    let run = run.spec("p_uncond", p_uncond);
    train_model(build, &data, cfg, run, &mut loss_fn)
}
// ANCHOR_END: train_text

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::NoiseSchedule;
    use crate::model::{Cond, CondEpsModel, EpsModel};
    use crate::nn::text_encoder::TextEncoderConfig;
    use crate::sampling::ddpm::AncestralSampling;
    use crate::sampling::guidance::ClassifierFreeGuidance;
    use crate::sampling::wrappers::Threshold;
    use crate::text::Bpe;
    use crate::train::ddpm::LossWeight;
    use crate::train::trainer::TrainRun;
    use tch::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn the_mask_hides_padding_and_guidance_at_one_is_the_masked_conditional_prediction() {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1); // for tensors this small a second thread only spin-waits
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let unet = TextUNet(UNet::new(vs.root(), UNetConfig::tiny_cond(6)));
        let opts = (Kind::Float, Device::Cpu);
        let (x, t) = (Tensor::randn([2, 1, 16, 16], opts), Tensor::from_slice(&[100i64, 700]));
        let hidden = Tensor::randn([2, 5, 6], opts);
        let mask = lens_to_mask(&Tensor::from_slice(&[3i64, 5]), 5); // image 0: 2 padded tokens
        let cond = Cond::masked(hidden.copy(), mask.copy());
        let eps = unet.eps_cond(&x, &t, &cond, false);
        assert!(eps.equal(&unet.0.forward_cond(&x, &t, Some(&hidden), Some(&mask), false)));
        // changing a padded token changes nothing; changing a real one does
        let padded = hidden.copy();
        let _ = padded.get(0).get(4).fill_(9.0);
        assert!(max_diff(&eps, &unet.eps_cond(&x, &t, &Cond::masked(padded.copy(), mask.copy()), false)) < 1e-6);
        let _ = padded.get(0).get(1).fill_(9.0);
        let changed = unet.eps_cond(&x, &t, &Cond::masked(padded.copy(), mask.copy()), false);
        assert!(max_diff(&eps.get(0), &changed.get(0)) > 1e-4);
        // guidance concatenates the conditionings, masks included: at w = 1 it is exactly the masked prediction
        let empty = Cond::masked(Tensor::randn([1, 5, 6], opts), lens_to_mask(&Tensor::from_slice(&[2i64]), 5));
        let guided = ClassifierFreeGuidance::new(&unet, cond.shallow_clone(), empty.shallow_clone(), 1.0);
        assert!(guided.eps(&x, &t, false).equal(&eps));
        let w3 =
            ClassifierFreeGuidance::new(&unet, cond.shallow_clone(), empty.shallow_clone(), 3.0).eps(&x, &t, false);
        let eps_empty = unet.eps_cond(&x, &t, &empty.for_batch(2), false);
        let diff = max_diff(&w3, &(&eps_empty + (&eps - &eps_empty) * 3.0));
        assert!(diff < 1e-5 * 4.0 * eps.abs().max().double_value(&[]), "{diff}");
        tch::set_num_threads(threads);
    }

    #[test]
    fn captions_are_picked_per_image_and_dropped_to_the_empty_prompt_at_rate_p() {
        let bpe = Bpe::train(&["a thin 7".to_string(), "seven".to_string()], 10);
        let per_image = vec!["a thin 7".to_string(), "seven".to_string()];
        let caps = CaptionIds::tokenize(&bpe, &vec![per_image; 4000], 8).unwrap();
        assert_eq!((caps.ids.size(), caps.lens.size()), (vec![4000, 2, 8], vec![4000, 2]));
        let empty = bpe.encode_padded("", 8);
        tch::manual_seed(3);
        let (ids, mask) = pick_captions(&caps.ids, &caps.lens, &empty, 0.2);
        tch::manual_seed(3);
        assert!(pick_captions(&caps.ids, &caps.lens, &empty, 0.2).0.equal(&ids), "deterministic under the seed");
        let rows: Vec<Vec<i64>> = (0..4000).map(|i| Vec::<i64>::try_from(ids.get(i)).unwrap()).collect();
        let count = |text: &str| rows.iter().filter(|r| **r == bpe.encode_padded(text, 8).ids).count() as f64;
        let (thin, seven, dropped) = (count("a thin 7"), count("seven"), count(""));
        assert_eq!(thin + seven + dropped, 4000.0, "every row is a caption of its image or the empty prompt");
        assert!((dropped / 4000.0 - 0.2).abs() < 0.03, "dropped {dropped}"); // 0.2 ± 4.7 standard errors
        assert!((thin - seven).abs() < 200.0, "the two captions are equally likely: {thin} vs {seven}");
        let lens = mask.sum_dim_intlist(1, false, Kind::Int64);
        let want: Vec<i64> =
            rows.iter().map(|r| 2 + r.iter().skip(1).take_while(|&&i| i != bpe.end_id()).count() as i64).collect();
        assert!(lens.equal(&Tensor::from_slice(&want)), "the mask covers start, the caption's tokens and end");
        let long = CaptionIds::tokenize(&bpe, &[vec!["a thin 7 a thin 7 a thin 7".to_string()]], 8).unwrap_err();
        assert!(long.to_string().contains("longer than 8 tokens"), "{long}");
    }

    /// The smallest text-to-image problem: 8×8 images that are blank for the prompt "zero" and hold a bright square
    /// for "one". After 100 steps a tiny UNet behind a frozen (random) text encoder draws the right one for each.
    #[test]
    fn a_tiny_text_conditioned_unet_learns_to_tell_two_prompts_apart() {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        tch::manual_seed(5);
        let n = 64;
        let prompts = ["zero".to_string(), "one".to_string()];
        let bpe = Bpe::train(&prompts, 10);
        let text_vs = VarStore::new(Device::Cpu);
        let text_cfg = TextEncoderConfig { vocab_size: bpe.vocab_size() as i64, ..TextEncoderConfig::tiny() };
        let text_encoder = TextEncoder::new(text_vs.root(), text_cfg);
        let is_one = Tensor::from_slice(&(0..n).map(|i| (i % 2) as f32).collect::<Vec<_>>()).view([n, 1, 1, 1]);
        let square = Tensor::zeros([1, 1, 8, 8], (Kind::Float, Device::Cpu));
        let _ = square.narrow(2, 2, 4).narrow(3, 2, 4).fill_(2.0);
        let images = is_one * square - 1.0; // (n, 1, 8, 8): −1 everywhere, +1 on the square for "one"
        let captions: Vec<Vec<String>> = (0..n).map(|i| vec![prompts[i as usize % 2].clone()]).collect();
        let caps = CaptionIds::tokenize(&bpe, &captions, 8).unwrap();
        let empty = bpe.encode_padded("", 8);
        let sched = NoiseSchedule::ddpm(1000);
        let cfg = TrainerConfig {
            steps: 100,
            batch_size: 16,
            lr: 5e-3,
            warmup: 10,
            ema_decay: Some(0.98),
            ..Default::default()
        };
        let (_vs, model, out) = train_text_cond_unet(
            &UNetConfig::tiny_cond(16),
            TextData { encoder: &text_encoder, captions: &caps, empty: &empty, p_uncond: 0.2 },
            &images,
            &EpsObjective::new(&sched, LossWeight::Uniform, Device::Cpu),
            &cfg,
            TrainRun::new(Device::Cpu, &mut |_| {}),
        )
        .unwrap();
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        assert!(mean(&out.losses[90..]) < 0.5 * mean(&out.losses[..10]), "{:?}", out.losses);
        let context = |text: &str| {
            let e = bpe.encode_padded(text, 8);
            let mask = lens_to_mask(&Tensor::from_slice(&[e.len as i64]), 8);
            encode_context(&text_encoder, &Tensor::from_slice(&e.ids).unsqueeze(0), &mask)
        };
        let brightness = |text: &str| {
            tch::manual_seed(6);
            let guided = ClassifierFreeGuidance::new(&model, context(text), context(""), 3.0);
            let x = crate::sampling::ddpm::sample(
                &guided,
                &sched,
                &[16, 1, 8, 8],
                &AncestralSampling {
                    steps: 20,
                    variance: crate::sampling::ddpm::PosteriorVariance::BetaTilde,
                    threshold: Threshold::Static,
                    batch: 16,
                },
                Device::Cpu,
                &mut |_, _| {},
            );
            // the mean of each sample's square, in [−1, 1]
            let means = x.narrow(2, 2, 4).narrow(3, 2, 4).mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float);
            Vec::<f32>::try_from(means).unwrap()
        };
        let (zero, one) = (brightness("zero"), brightness("one"));
        tch::set_num_threads(threads);
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        let (dark, lit) = (zero.iter().filter(|&&m| m < 0.0).count(), one.iter().filter(|&&m| m > 0.0).count());
        assert!(
            mean(&zero) < -0.5 && mean(&one) > 0.5,
            "the square's mean: {zero:?} for \"zero\", {one:?} for \"one\""
        );
        assert!(dark >= 14 && lit >= 14, "{dark} of 16 \"zero\" samples dark, {lit} of 16 \"one\" samples lit");
    }
}
