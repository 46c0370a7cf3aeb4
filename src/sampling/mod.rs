//! Samplers: plain functions from a score (or denoiser) and a noise schedule to samples.
pub mod ddim;
pub mod ddpm;
pub mod denoiser;
pub mod dpm_solver;
pub mod grids;
pub mod guidance;
pub mod karras;
pub mod langevin;
pub mod likelihood;
pub mod oracle;
pub mod sde;
