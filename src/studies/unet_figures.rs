//! The figures of lesson 04: where a UNet's parameters sit, block by block, and the same starting noises sampled at
//! checkpoints during training.
use crate::nn::unet::{UNet, UNetConfig};
use crate::plot;
use anyhow::Result;
use std::path::Path;
use tch::{Device, Tensor};

/// architecture.png: the parameters of each top-level block of a UNet built from `config` (on the CPU, with fresh
/// weights: this draws from libtorch's generator). Returns the rows drawn, (block, parameters), for the lesson to
/// print.
pub fn plot_architecture(path: &Path, config: &UNetConfig) -> Result<Vec<(String, i64)>> {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let _ = UNet::new(vs.root(), config.clone());
    let rows = UNet::parameter_summary(&vs);
    let total: i64 = rows.iter().map(|r| r.1).sum();
    let names: Vec<String> = rows.iter().map(|r| r.0.replace("_blocks", "")).collect();
    plot::bars(
        path,
        &format!("UNet parameters per block ({total} in all)"),
        "parameters",
        &names,
        &[("parameters", rows.iter().map(|r| r.1 as f64).collect())],
    )?;
    Ok(rows)
}

/// samples_over_training.png: `snapshots`, (training step, samples (16, 1, 28, 28) in [0, 1]) from the same
/// starting noises, a row each; draws nothing when there are none.
pub fn plot_snapshots(path: &Path, snapshots: &[(usize, Tensor)]) -> Result<()> {
    if snapshots.is_empty() {
        return Ok(());
    }
    let labels: Vec<String> =
        snapshots.iter().flat_map(|(s, x)| (0..x.size()[0]).map(move |_| format!("step {s}"))).collect();
    let all = Tensor::cat(&snapshots.iter().map(|(_, x)| x.shallow_clone()).collect::<Vec<_>>(), 0); // (16·rows, 1, 28, 28)
    let title = "The same 16 starting noises sampled after 25, 50, 75 % of training (current weights) and at the end \
                 (EMA), 50 steps";
    plot::image_grid(path, title, &all, 16, 2, &labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_architecture_rows_add_up_and_both_figures_render() {
        tch::manual_seed(0);
        let dir = tempfile::tempdir().unwrap();
        let config = UNetConfig::tiny();
        let rows = plot_architecture(&dir.path().join("architecture.png"), &config).unwrap();
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let _ = UNet::new(vs.root(), config);
        let total: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(rows.iter().map(|r| r.1).sum::<i64>(), total);
        let x = Tensor::rand([16, 1, 28, 28], (tch::Kind::Float, Device::Cpu));
        plot_snapshots(&dir.path().join("snapshots.png"), &[(1, x.copy()), (2, x)]).unwrap();
        plot_snapshots(&dir.path().join("none.png"), &[]).unwrap();
        assert!(!dir.path().join("none.png").exists());
        for name in ["architecture.png", "snapshots.png"] {
            assert_eq!(&std::fs::read(dir.path().join(name)).unwrap()[1..4], b"PNG", "{name} is a PNG");
        }
    }
}
