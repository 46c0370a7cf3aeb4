//! The "reverse trajectory" figure of lessons 03 and 04: x_t and x̂₀ of a few chains as DDPM walks back.
use crate::data::to_unit;
use crate::sampling::ddpm::DdpmStep;
use anyhow::Result;
use std::path::Path;
use tch::{Device, Tensor};

/// Snapshots of the first few chains of a reverse process: x_t and the model's x̂₀ at `keep` evenly spaced steps,
/// for the "reverse trajectory" figure.
pub struct Trajectory {
    chains: i64,
    every: usize,
    steps: usize,
    pub x_t: Vec<Tensor>,
    pub x0_hat: Vec<Tensor>,
    pub t: Vec<usize>,
}

impl Trajectory {
    pub fn new(chains: i64, steps: usize, keep: usize) -> Self {
        Self { chains, every: (steps / keep.max(1)).max(1), steps, x_t: vec![], x0_hat: vec![], t: vec![] }
    }

    /// Records step `st` of the batch that starts at sample `start` (only the first batch is kept).
    pub fn record(&mut self, start: i64, st: &DdpmStep) {
        if start == 0 && ((self.steps - 1 - st.i) % self.every == 0 || st.i == 0) && !self.t.contains(&st.t) {
            let n = self.chains.min(st.x_t.size()[0]);
            self.x_t.push(to_unit(&st.x_t.narrow(0, 0, n)).to_device(Device::Cpu));
            self.x0_hat.push(to_unit(&st.x0_hat.narrow(0, 0, n)).to_device(Device::Cpu));
            self.t.push(st.t);
        }
    }

    /// Draws rows (x_t of chain k, then x̂₀ of chain k) against columns (the recorded steps, noisiest first).
    pub fn draw(&self, path: &Path, title: &str) -> Result<()> {
        let cols = self.t.len();
        let mut tiles = Vec::new();
        let mut labels = Vec::new();
        for k in 0..self.x_t.first().map_or(0, |x| x.size()[0]) {
            for (row, name) in [(&self.x_t, "x_t"), (&self.x0_hat, "x̂₀")] {
                for (c, x) in row.iter().enumerate() {
                    tiles.push(x.get(k));
                    labels.push(format!("{name} t={}", self.t[c]));
                }
            }
        }
        anyhow::ensure!(!tiles.is_empty(), "no trajectory was recorded");
        crate::plot::image_grid(path, title, &Tensor::stack(&tiles, 0), cols, 3, &labels)
    }
}
