//! Inference pipelines: trained networks and their noise schedule, saved and loaded as one bundle, sampled through
//! the sampler registry ([`crate::sampling::registry`]).
//!
//! - [`bundle`]: the folder a pipeline saves itself into, and `--ship`.
//! - [`ddpm`]: lesson 04's unconditional UNet (lesson 07 samples the shipped one).
//! - [`prompt_encoder`]: a tokenizer and a frozen text encoder, prompt in, context out (lessons 06 and 08).
//! - [`text_to_image`]: lesson 06, text to pixels.
//! - [`latent_diffusion`]: lesson 08, text to latents to pixels, with img2img and inpainting.
//! - [`stable_diffusion`]: lesson 09, SD 1.5's networks at full size and the web UIs' samplers.
pub mod bundle;
pub mod ddpm;
pub mod latent_diffusion;
pub mod prompt_encoder;
pub mod stable_diffusion;
pub mod text_to_image;
