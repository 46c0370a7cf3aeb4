//! Networks. Module paths mirror the names diffusers uses for the same parts (`norm1`, `conv1`, `time_emb_proj`,
//! `conv_shortcut` ...), so later lessons can load real checkpoints without a key map.
pub mod attention;
pub mod class_cond;
pub mod classifier;
pub mod clip;
pub mod eps_mlp;
pub mod label_context;
pub mod layers;
pub mod ncsn;
pub mod score_mlp;
pub mod text_encoder;
pub mod text_unet;
pub mod transformer;
pub mod unet;
pub mod vae;
