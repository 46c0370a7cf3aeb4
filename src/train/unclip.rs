//! Training unCLIP's two networks (lesson 11) on (text embedding, image embedding, image) triples.
//!
//! [unCLIP] Ramesh et al. 2022, arXiv:2204.06125, sec. 2.2 (the prior's loss, on the clean embedding) and sec. 2.1
//! (the decoder, its embedding dropped 10 % of the time).
use crate::diffusion::forward::q_sample;
use crate::diffusion::schedule::NoiseSchedule;
use crate::model::WithContext;
use crate::nn::unclip::{drop_embeddings, DiffusionPrior, EmbeddingTokens, PriorConfig};
use crate::nn::unet::{UNet, UNetConfig};
use crate::train::ddpm::EpsObjective;
use crate::train::trainer::{train_model, TrainOutcome, TrainRun, TrainerConfig};
use anyhow::Result;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

// ANCHOR: train_prior
/// Trains the diffusion prior `config` on pairs of text embeddings `text` (N, d) and image embeddings `image` (N, d):
/// [unCLIP] sec. 2.2, L = E_{t, ε} ‖f_θ(√ᾱ_t z_i + √(1 − ᾱ_t) ε, t, z_t) − z_i‖², t uniform over the schedule.
pub fn train_prior(
    config: &PriorConfig,
    (text, image): (&Tensor, &Tensor),
    sched: &NoiseSchedule,
    cfg: &TrainerConfig,
    run: TrainRun,
) -> Result<(VarStore, DiffusionPrior, TrainOutcome)> {
    let alpha_bar = sched.to_tensor_alpha_bar(run.device);
    let steps = sched.num_steps() as i64;
    let mut loss = |net: &DiffusionPrior, _: &DiffusionPrior, batch: &[Tensor], _: usize| {
        let (z_t, z_i) = (&batch[0], &batch[1]); // (B, d) each
        let t = Tensor::randint(steps, [z_i.size()[0]], (Kind::Int64, z_i.device())); // t ~ U{0..T−1}
        let noised = q_sample(&alpha_bar, z_i, &t, &z_i.randn_like()); // z_i^(t), [DDPM] eq. 4
        let a = alpha_bar.index_select(0, &t); // (B,)
        (net.predict_clean(&noised, &t, &a, z_t) - z_i).square().mean(Kind::Float)
        // [unCLIP] sec. 2.2
    };
    let run = run.spec("prior", config).spec("schedule", sched.num_steps());
    train_model(|p| DiffusionPrior::new(p, config.clone()), &[text, image], cfg, run, &mut loss)
}
// ANCHOR_END: train_prior

/// The decoder: the image embedding's context tokens and the UNet that attends to them, on one VarStore.
#[derive(Debug)]
pub struct Decoder {
    pub tokens: EmbeddingTokens,
    pub unet: UNet,
}

// ANCHOR: train_decoder
/// Trains the decoder on `images` (N, 1, H, W) in [−1, 1] with their image embeddings `embeddings` (N, d): the UNet
/// `config` (its `cross_attention_dim` the tokens' width) attends to `tokens` tokens projected from the embedding,
/// which is dropped to the null embedding with probability `p_drop` ([unCLIP] sec. 2.1: 10 %); L_simple of
/// `objective`.
pub fn train_decoder(
    config: &UNetConfig,
    tokens: i64,
    (images, embeddings): (&Tensor, &Tensor),
    p_drop: f64,
    objective: &EpsObjective,
    cfg: &TrainerConfig,
    run: TrainRun,
) -> Result<(VarStore, Decoder, TrainOutcome)> {
    let width = config.cross_attention_dim.expect("the decoder attends to its embedding's tokens");
    let dim = embeddings.size()[1];
    let mut loss = |net: &Decoder, _: &Decoder, batch: &[Tensor], _: usize| {
        let z = drop_embeddings(&batch[1], p_drop); // (B, d), some rows the null embedding
        let cond = net.tokens.context(&z); // (B, k, D)
        objective.loss(&WithContext { model: &net.unet, cond: &cond }, &batch[0])
    };
    let build = |p: tch::nn::Path| Decoder {
        tokens: EmbeddingTokens::new(&p / "image_proj", dim, tokens, width),
        unet: UNet::new(p / "unet", config.clone()),
    };
    let run = objective.record(run).spec("model", config).spec("tokens", tokens).spec("p_drop", p_drop);
    train_model(build, &[images, embeddings], cfg, run, &mut loss)
}
// ANCHOR_END: train_decoder

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::unclip::PriorEps;
    use crate::sampling::ddpm::{sample, AncestralSampling, PosteriorVariance};
    use crate::sampling::wrappers::Threshold;
    use tch::Device;

    /// On a Gaussian toy — image embeddings z_i ~ N(μ + z_t, Σ) given a text embedding z_t of ±1 — the prior's
    /// target (the clean z_i) and the sampler built on it agree: samples for each z_t recover the mean and the
    /// covariance of its distribution.
    #[test]
    fn the_prior_recovers_a_gaussian_embedding_distribution() {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        tch::manual_seed(0);
        let n = 4096;
        let sign = Tensor::rand([n, 1], tch::kind::FLOAT_CPU).gt(0.5).to_kind(Kind::Float) * 2.0 - 1.0; // (N, 1)
        let text = Tensor::cat(&[&sign, &sign.zeros_like()], 1); // (N, 2): z_t = (±1, 0)
        let mean = Tensor::from_slice(&[0.5f32, -0.3]);
        // Σ = L Lᵀ with L = [[0.3, 0], [0.2, 0.1]]: variances 0.09 and 0.05, covariance 0.06
        let l = Tensor::from_slice2(&[[0.3f32, 0.0], [0.2, 0.1]]);
        let image = Tensor::randn([n, 2], tch::kind::FLOAT_CPU).matmul(&l.tr()) + &mean + &text; // (N, 2)
        let sched = NoiseSchedule::cosine(1000);
        let config = PriorConfig { dim: 2, hidden: 256, layers: 3, time_dim: 32 };
        let cfg =
            TrainerConfig { steps: 6000, batch_size: 256, lr: 3e-3, warmup: 50, ema_decay: None, ..Default::default() };
        let (_, prior, _) =
            train_prior(&config, (&text, &image), &sched, &cfg, TrainRun::new(Device::Cpu, |_| {})).unwrap();
        let alpha_bar = sched.to_tensor_alpha_bar(Device::Cpu);
        for s in [1.0f32, -1.0] {
            let m = 4000;
            let cond = Tensor::from_slice(&[s, 0.0]).view([1, 2]).expand([m, 2], false).contiguous();
            let model = PriorEps { prior: &prior, text: &cond, alpha_bar: &alpha_bar };
            let how = AncestralSampling {
                steps: 100,
                variance: PosteriorVariance::BetaTilde,
                threshold: Threshold::None,
                batch: m,
            };
            let z = tch::no_grad(|| sample(&model, &sched, &[m, 2], &how, Device::Cpu, &mut |_, _| {}));
            let got_mean = z.mean_dim(0, false, Kind::Float);
            let want_mean = &mean + Tensor::from_slice(&[s, 0.0]);
            assert!((&got_mean - &want_mean).abs().max().double_value(&[]) < 0.05, "z_t = {s}: mean {got_mean:?}");
            let centred = &z - &got_mean;
            let cov = centred.tr().matmul(&centred) / (m - 1) as f64; // (2, 2)
            let want = l.matmul(&l.tr());
            assert!((&cov - &want).abs().max().double_value(&[]) < 0.02, "z_t = {s}: covariance {cov:?} vs {want:?}");
        }
        tch::set_num_threads(threads);
    }
}
