//! Samplers: plain functions from a score (or denoiser) and a noise schedule to samples.
pub mod ddpm;
pub mod guidance;
pub mod langevin;
