//! A class label as a context sequence for cross-attention: the stand-in for a text encoder in lesson 05. Each label
//! 0..num_classes−1 owns `tokens` learned vectors of width `dim`, and one more label, the null label `num_classes`,
//! owns the sequence the network sees when it is told nothing (the unconditional branch of classifier-free
//! guidance, learned with condition dropout).
//!
//! [LDM] Rombach et al. 2022, arXiv:2112.10752, sec. 3.3: a domain-specific encoder τ_θ maps the condition y to
//! τ_θ(y) ∈ ℝ^{M×d_τ}, which the UNet's cross-attention reads; for class labels τ_θ is a learned embedding (their
//! class-conditional ImageNet models).
//! [CFG] Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598, sec. 3.2: the unconditional
//! model is the conditional one given a null token ∅, trained by replacing the label with ∅ at random.
//! Notation (code -> paper): forward(labels) -> τ_θ(y), (B, M, d_τ); tokens -> M; dim -> d_τ; null_label -> ∅.
use tch::nn;
use tch::{Device, Kind, Tensor};

/// The learned table: one row of `tokens · dim` numbers per label, the null label last.
#[derive(Debug)]
pub struct LabelContext {
    label_embedding: nn::Embedding,
    pub num_classes: i64,
    pub tokens: i64,
    pub dim: i64,
}

impl LabelContext {
    /// A table of `num_classes + 1` rows (the last for the null label) on `vs / "label_embedding"`, initialised
    /// N(0, 1) as `torch.nn.Embedding`.
    pub fn new(vs: nn::Path, num_classes: i64, tokens: i64, dim: i64) -> Self {
        assert!(num_classes >= 1 && tokens >= 1 && dim >= 1, "a label context needs classes, tokens and a width");
        let table = nn::embedding(vs / "label_embedding", num_classes + 1, tokens * dim, Default::default());
        Self { label_embedding: table, num_classes, tokens, dim }
    }

    /// ∅: the label whose sequence stands for "no condition".
    pub fn null_label(&self) -> i64 {
        self.num_classes
    }

    // ANCHOR: label_context_forward
    /// τ_θ(y): labels (B,) i64 in 0..=num_classes (the last is ∅) -> (B, tokens, dim).
    pub fn forward(&self, labels: &Tensor) -> Tensor {
        let b = labels.size1().expect("labels (B,)");
        if b > 0 {
            let (lo, hi) = (labels.min().int64_value(&[]), labels.max().int64_value(&[]));
            assert!(lo >= 0 && hi <= self.num_classes, "labels must lie in 0..={}, got {lo}..={hi}", self.num_classes);
        }
        let rows = labels.to_kind(Kind::Int64).to_device(self.device()).apply(&self.label_embedding); // (B, tokens · dim)
        rows.view([b, self.tokens, self.dim]) // (B, tokens, dim)
    }
    // ANCHOR_END: label_context_forward

    /// τ_θ(∅) for a batch of `b`: (b, tokens, dim).
    pub fn null_context(&self, b: i64) -> Tensor {
        self.forward(&Tensor::full([b], self.null_label(), (Kind::Int64, self.device())))
    }

    /// Where the table lives (labels are moved there).
    pub fn device(&self) -> Device {
        self.label_embedding.ws.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;

    #[test]
    fn each_label_owns_one_learned_sequence_and_the_null_label_its_own() {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let ctx = LabelContext::new(vs.root() / "label_context", 10, 3, 5);
        assert_eq!(vs.variables()["label_context.label_embedding.weight"].size(), [11, 15]);
        let labels = Tensor::from_slice(&[7i64, 2, 7, 10]);
        let out = ctx.forward(&labels);
        assert_eq!(out.size(), [4, 3, 5]);
        // the same label gives the same sequence; another label, or ∅, another one
        assert!(out.get(0).equal(&out.get(2)));
        assert!(!out.get(0).equal(&out.get(1)) && !out.get(0).equal(&out.get(3)));
        // row y of the table, read as `tokens` rows of `dim`, is the sequence of label y
        let table = vs.variables()["label_context.label_embedding.weight"].shallow_clone();
        assert!(out.get(1).equal(&table.get(2).view([3, 5])));
        assert!(ctx.null_context(2).get(1).equal(&out.get(3)));
        assert_eq!(ctx.null_label(), 10);
    }

    #[test]
    fn gradients_reach_only_the_rows_that_were_used() {
        let vs = VarStore::new(Device::Cpu);
        let ctx = LabelContext::new(vs.root(), 4, 2, 3);
        ctx.forward(&Tensor::from_slice(&[1i64, 4])).sum(Kind::Float).backward();
        let g = vs.variables()["label_embedding.weight"].grad(); // (5, 6)
        let used: Vec<f64> = (0..5).map(|r| g.get(r).abs().sum(Kind::Float).double_value(&[])).collect();
        assert_eq!(used, [0.0, 6.0, 0.0, 0.0, 6.0]);
    }

    #[test]
    #[should_panic(expected = "labels must lie in 0..=4")]
    fn a_label_beyond_the_null_label_is_refused() {
        let vs = VarStore::new(Device::Cpu);
        let _ = LabelContext::new(vs.root(), 4, 2, 3).forward(&Tensor::from_slice(&[5i64]));
    }
}
