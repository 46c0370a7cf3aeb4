//! The text-conditioned UNet of lessons 06 and 08: the UNet cross-attending to the token states of a frozen text
//! encoder, with the padding of each prompt hidden by a key-padding mask.
//!
//! [LDM] Rombach et al. 2022, arXiv:2112.10752, sec. 3.3 (cross-attention to τ_θ(y)).
//! [Imagen] Saharia et al. 2022, arXiv:2205.11487, sec. 4.4 (cross-attending to the sequence of token embeddings).
//! Notation (code -> paper): hidden -> τ_θ(y), the text encoder's last hidden state.
use crate::model::CondEpsModel;
use crate::nn::text_encoder::TextEncoder;
use crate::nn::unet::UNet;
use tch::{Kind, Tensor};

// ANCHOR: text_unet
/// The UNet reading a text context: the token states with their key-padding mask packed as one extra channel,
/// (B, L, D + 1), last channel 1 for a real token and 0 for padding ([`pack_context`]). Packed, the mask travels
/// with its context through everything that handles contexts, [`WithContext`] and the guidance wrapper (which
/// concatenates the conditional and unconditional contexts along the batch), so the padding of each prompt stays
/// hidden from the cross-attention.
#[derive(Debug)]
pub struct TextUNet(pub UNet);

impl CondEpsModel for TextUNet {
    fn eps_cond(&self, x_t: &Tensor, t: &Tensor, context: &Tensor, train: bool) -> Tensor {
        let (hidden, mask) = unpack_context(context); // (B, L, D), (B, L) bool
        self.0.forward_cond(x_t, t, Some(&hidden), Some(&mask), train)
    }
}

/// hidden (B, L, D), mask (B, L) bool -> (B, L, D + 1).
pub fn pack_context(hidden: &Tensor, mask: &Tensor) -> Tensor {
    let flag = mask.to_kind(hidden.kind()).unsqueeze(-1); // (B, L, 1): 1 real, 0 padding (exact in bf16 too)
    Tensor::cat(&[hidden, &flag], -1) // (B, L, D + 1)
}

/// (B, L, D + 1) -> the token states (B, L, D) and the mask (B, L) bool.
pub fn unpack_context(context: &Tensor) -> (Tensor, Tensor) {
    let d = context.size()[2] - 1;
    (context.narrow(2, 0, d), context.select(2, d).gt(0.5))
}
// ANCHOR_END: text_unet

/// τ(y) of token ids (B, L) with their key-padding mask (B, L), packed for [`TextUNet`]: the frozen encoder runs
/// without gradients, on the ids' device.
pub fn encode_context(text_encoder: &TextEncoder, ids: &Tensor, mask: &Tensor) -> Tensor {
    tch::no_grad(|| pack_context(&text_encoder.forward(ids, Some(mask)), mask)) // (B, L, D + 1)
}

/// The key-padding mask (B, L) bool of prompts with `lens` (B,) real tokens each (start and end included).
pub fn lens_to_mask(lens: &Tensor, context_len: i64) -> Tensor {
    let positions = Tensor::arange(context_len, (Kind::Int64, lens.device())).unsqueeze(0); // (1, L)
    positions.lt_tensor(&lens.unsqueeze(1)) // (B, L)
}
