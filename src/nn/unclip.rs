//! unCLIP at MNIST scale (lesson 11): a diffusion *prior* that turns a CLIP text embedding into a CLIP image embedding,
//! and a *decoder* that draws an image from an image embedding.
//!
//! [unCLIP] Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents", arXiv:2204.06125.
//! Sec. 2.2 (prior): a diffusion model over the image embedding z_i, conditioned on the text embedding z_t, whose
//! network predicts the unnoised z_i directly, trained with L = E_t ‖f_θ(z_i^(t), t, z_t) − z_i‖².
//! Sec. 2.1 (decoder): the image embedding is projected and added to the timestep embedding, and projected into four
//! extra tokens of context the UNet attends to; it is dropped (set to the null embedding) 10 % of the time for
//! classifier-free guidance.
//! Here the prior is an MLP over [z_t, z_i^(t), timestep embedding] (the paper's is a transformer over the same
//! inputs); the decoder is lesson 06's UNet whose context is the k tokens of the embedding's projection, and whose
//! pooled-context path ([SDXL] sec. 2.1, the last token) carries it into the time embedding.
use crate::diffusion::forward::eps_from_x0;
use crate::model::{Cond, EpsModel};
use crate::nn::layers::timestep_embedding;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// The prior's shape: embedding width d, hidden width, depth, width of the timestep embedding.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PriorConfig {
    pub dim: i64,
    pub hidden: i64,
    pub layers: usize,
    pub time_dim: i64,
}

impl PriorConfig {
    /// For the 64-wide CLIP space of lesson 11.
    pub fn mnist(dim: i64) -> Self {
        Self { dim, hidden: 512, layers: 4, time_dim: 64 }
    }
}

/// f_θ(z_i^(t), t, z_t) -> ẑ_i, an MLP with SiLU.
#[derive(Debug)]
pub struct DiffusionPrior {
    pub config: PriorConfig,
    layers: Vec<nn::Linear>,
}

impl DiffusionPrior {
    pub fn new(vs: nn::Path, config: PriorConfig) -> Self {
        let mut layers = Vec::new();
        let mut width = 2 * config.dim + config.time_dim;
        for i in 0..config.layers {
            layers.push(nn::linear(&vs / "layers" / i, width, config.hidden, Default::default()));
            width = config.hidden;
        }
        layers.push(nn::linear(&vs / "layers" / config.layers, width, config.dim, Default::default()));
        Self { config, layers }
    }

    // ANCHOR: prior_forward
    /// [unCLIP] sec. 2.2: ẑ_i = f_θ(z_i^(t), t, z_t) from the noised image embedding (B, d), timesteps (B,) with their
    /// ᾱ_t (B,), and the text embedding (B, d): the prediction of the clean image embedding (B, d). The MLP's output
    /// is added to √ᾱ_t z_i^(t), the clean embedding's best linear guess when the noise is small (E[z_i | z_i^(t)] for
    /// unit-variance data as ᾱ_t → 1), so that at small t it learns a correction instead of the identity — which an MLP
    /// learns only roughly, shrinking the samples towards their mean (a skip in the spirit of [EDM]'s c_skip, Karras
    /// et al. 2022, arXiv:2206.00364, sec. 5).
    pub fn predict_clean(&self, z_noisy: &Tensor, t: &Tensor, alpha_bar: &Tensor, text: &Tensor) -> Tensor {
        let temb = timestep_embedding(t, self.config.time_dim, 10_000.0).to_kind(z_noisy.kind()); // (B, time_dim)
        let mut h = Tensor::cat(&[text, z_noisy, &temb], 1); // (B, 2d + time_dim)
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h);
            if i < last {
                h = h.silu();
            }
        }
        h + alpha_bar.sqrt().unsqueeze(1).to_kind(z_noisy.kind()) * z_noisy // (B, d)
    }
    // ANCHOR_END: prior_forward
}

/// The prior with one batch's text embeddings, as an ε-model for the crate's DDPM sampler: ε̂ from the predicted
/// clean embedding, ε̂ = (z_t − √ᾱ_t ẑ_i)/√(1 − ᾱ_t) ([DDPM] eq. 4 solved for ε).
pub struct PriorEps<'a> {
    pub prior: &'a DiffusionPrior,
    pub text: &'a Tensor,
    /// ᾱ of the training schedule, (T,).
    pub alpha_bar: &'a Tensor,
}

impl EpsModel for PriorEps<'_> {
    fn eps(&self, x_t: &Tensor, t: &Tensor, _train: bool) -> Tensor {
        let a = self.alpha_bar.index_select(0, &t.to_device(self.alpha_bar.device())).to_device(x_t.device()); // (B,)
        let clean = self.prior.predict_clean(x_t, t, &a, self.text);
        eps_from_x0(&a, x_t, &clean)
    }
}

/// The decoder's conditioning: an image embedding (B, d) projected into `tokens` context tokens (B, k, D)
/// ([unCLIP] sec. 2.1's extra tokens; diffusers' `UnCLIPTextProjModel`, `clip_extra_context_tokens`).
#[derive(Debug)]
pub struct EmbeddingTokens {
    proj: nn::Linear,
    pub tokens: i64,
    pub width: i64,
}

impl EmbeddingTokens {
    pub fn new(vs: nn::Path, dim: i64, tokens: i64, width: i64) -> Self {
        Self {
            proj: nn::linear(vs / "clip_extra_context_tokens_proj", dim, tokens * width, Default::default()),
            tokens,
            width,
        }
    }

    // ANCHOR: embedding_tokens
    /// The context of image embeddings `z` (B, d): (B, k, D), every token real. The null embedding (dropped for
    /// guidance) is z = 0, whose tokens are the projection's bias, learned as "no image".
    pub fn context(&self, z: &Tensor) -> Cond {
        let b = z.size()[0];
        Cond::new(self.proj.forward(z).view([b, self.tokens, self.width])) // (B, k, D)
    }
    // ANCHOR_END: embedding_tokens
}

/// [unCLIP] sec. 2.1: the embeddings (B, d) with each row replaced by the null embedding 0 with probability
/// `p_drop` (drawn from libtorch's generator).
pub fn drop_embeddings(z: &Tensor, p_drop: f64) -> Tensor {
    let keep = Tensor::rand([z.size()[0], 1], (Kind::Float, z.device())).ge(p_drop).to_kind(z.kind()); // (B, 1)
    z * keep
}

/// Spherical interpolation between unit vectors a and b (d,) at fraction f: what unCLIP's interpolations use
/// (sec. 3.2), since CLIP embeddings live on the sphere.
pub fn slerp(a: &Tensor, b: &Tensor, f: f64) -> Tensor {
    let cos = (a * b).sum(Kind::Float).clamp(-1.0, 1.0).double_value(&[]);
    let omega = cos.acos();
    if omega.abs() < 1e-6 {
        return a * (1.0 - f) + b * f;
    }
    // slerp(a, b; f) = sin((1 − f)Ω)/sin Ω · a + sin(fΩ)/sin Ω · b, with cos Ω = a·b
    a * (((1.0 - f) * omega).sin() / omega.sin()) + b * ((f * omega).sin() / omega.sin())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    #[test]
    fn slerp_stays_on_the_sphere_and_hits_its_ends() {
        let a = Tensor::from_slice(&[1.0f32, 0.0, 0.0]);
        let b = Tensor::from_slice(&[0.0f32, 1.0, 0.0]);
        assert!((slerp(&a, &b, 0.0) - &a).abs().max().double_value(&[]) < 1e-6);
        assert!((slerp(&a, &b, 1.0) - &b).abs().max().double_value(&[]) < 1e-6);
        let mid = slerp(&a, &b, 0.5);
        assert!((mid.norm().double_value(&[]) - 1.0).abs() < 1e-6);
        assert!((mid.double_value(&[0]) - 0.5f64.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn shapes_and_the_null_embedding() {
        let vs = VarStore::new(Device::Cpu);
        let tokens = EmbeddingTokens::new(vs.root(), 6, 4, 8);
        let z = Tensor::randn([3, 6], tch::kind::FLOAT_CPU);
        assert_eq!(tokens.context(&z).context.size(), [3, 4, 8]);
        tch::manual_seed(0);
        let dropped = drop_embeddings(&Tensor::ones([10000, 6], tch::kind::FLOAT_CPU), 0.1);
        let share = dropped.select(1, 0).eq(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        assert!((share - 0.1).abs() < 0.01, "{share}");
        let prior =
            DiffusionPrior::new(vs.root() / "prior", PriorConfig { dim: 6, hidden: 16, layers: 2, time_dim: 8 });
        let t = Tensor::from_slice(&[0i64, 10, 999]);
        assert_eq!(prior.predict_clean(&z, &t, &Tensor::ones([3], tch::kind::FLOAT_CPU), &z).size(), [3, 6]);
    }
}
