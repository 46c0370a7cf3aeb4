//! Samplers: plain functions from a score (or denoiser) and a noise schedule to samples.
pub mod langevin;
pub mod ddpm;
