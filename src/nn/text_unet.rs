//! The text-conditioned UNet of lessons 06 and 08: the UNet cross-attending to the token states of a frozen text
//! encoder, with the padding of each prompt hidden by a key-padding mask.
//!
//! [LDM] Rombach et al. 2022, arXiv:2112.10752, sec. 3.3 (cross-attention to τ_θ(y)).
//! [Imagen] Saharia et al. 2022, arXiv:2205.11487, sec. 4.4 (cross-attending to the sequence of token embeddings).
//! Notation (code -> paper): hidden -> τ_θ(y), the text encoder's last hidden state.
use crate::model::{Cond, CondEpsModel};
use crate::nn::text_encoder::TextEncoder;
use crate::nn::unet::UNet;
use tch::{Kind, Tensor};

// ANCHOR: text_unet
/// The UNet reading a prompt: the token states τ_θ(y) (B, L, D) of a [`Cond`] with their key-padding mask (B, L),
/// which travels with its context through everything that handles conditionings ([`crate::model::WithContext`]
/// and the guidance wrapper, which concatenates the conditional and unconditional rows along the batch), so the
/// padding of each prompt stays hidden from the cross-attention.
#[derive(Debug)]
pub struct TextUNet(pub UNet);

impl CondEpsModel for TextUNet {
    fn eps_cond(&self, x_t: &Tensor, t: &Tensor, cond: &Cond, train: bool) -> Tensor {
        self.0.eps_cond(x_t, t, cond, train)
    }
}
// ANCHOR_END: text_unet

/// τ(y) of token ids (B, L) with their key-padding mask (B, L), as the conditioning of [`TextUNet`]: the frozen
/// encoder runs without gradients, on the ids' device.
pub fn encode_context(text_encoder: &TextEncoder, ids: &Tensor, mask: &Tensor) -> Cond {
    let hidden = tch::no_grad(|| text_encoder.forward(ids, Some(mask))); // (B, L, D)
    Cond::masked(hidden, mask.shallow_clone())
}

/// The key-padding mask (B, L) bool of prompts with `lens` (B,) real tokens each (start and end included).
pub fn lens_to_mask(lens: &Tensor, context_len: i64) -> Tensor {
    let positions = Tensor::arange(context_len, (Kind::Int64, lens.device())).unsqueeze(0); // (1, L)
    positions.lt_tensor(&lens.unsqueeze(1)) // (B, L)
}
