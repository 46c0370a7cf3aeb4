//! Stable Diffusion 1.x with real weights (lesson 09): the SD 1.5 networks are lessons 04–08's modules at full size
//! ([`crate::nn::unet::UNetConfig::sd15`], [`crate::nn::vae::VaeConfig::sd15`],
//! [`crate::nn::text_encoder::TextEncoderConfig::clip_vit_l14`]); this module reads their weights (a diffusers folder
//! or an original single file, through one key map) and runs the text-to-image and image-to-image pipeline.
pub mod embeddings;
pub mod flops;
pub mod keymap;
pub mod lora;
pub mod safetensors;
pub mod weights;

pub use weights::{SdConfig, SdModels};
