//! The 2-D score model of lessons 01–02 as one unit: the mixture it learns, its noise ladder, the network and how it
//! was trained. Saved as `score_mlp.safetensors` + `score_mlp.json`, so lesson 02 can reuse lesson 01's model.
use crate::checkpoint;
use crate::data::toy2d::GaussianMixture;
use crate::nn::score_mlp::{ScoreMlp, ScoreMlpConfig};
use crate::train::trainer::{TrainOutcome, TrainRun, TrainerConfig};
use crate::train::{train_dsm, DsmData};
use anyhow::Result;
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Everything needed to rebuild (or retrain) a 2-D score model; saved beside its weights.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ToyScoreConfig {
    pub layout: String,
    pub mixture: GaussianMixture,
    /// Noise ladder σ₁ > … > σ_L the network is trained on.
    pub sigmas: Vec<f64>,
    pub net: ScoreMlpConfig,
    /// The training run (its seed included).
    pub train: TrainerConfig,
}

/// A trained (or loaded) 2-D score model.
pub struct ToyScoreModel {
    pub config: ToyScoreConfig,
    pub vs: VarStore,
    pub net: ScoreMlp,
}

impl ToyScoreModel {
    /// A fresh, untrained model on `device`.
    pub fn new(config: ToyScoreConfig, device: Device) -> Self {
        let vs = VarStore::new(device);
        let net = ScoreMlp::new(vs.root(), config.net.clone());
        Self { config, vs, net }
    }

    /// Trains a model of `config` with denoising score matching on fresh samples of the mixture each step.
    pub fn train(config: ToyScoreConfig, run: TrainRun) -> Result<(Self, TrainOutcome)> {
        let (p, device) = (&config.mixture, run.device);
        let draw = |batch: i64| p.sample(batch, device);
        let (vs, net, outcome) = train_dsm(
            |path| ScoreMlp::new(path, config.net.clone()),
            |net: &ScoreMlp, x, s| net.score(x, s),
            DsmData::Draw(&draw),
            &config.sigmas,
            &config.train,
            run,
        )?;
        Ok((Self { config, vs, net }, outcome))
    }

    /// The learned score at one noise level: x (N, 2) -> (N, 2), without gradients.
    pub fn score(&self, x: &Tensor, sigma: f64) -> Tensor {
        let s = Tensor::full([x.size()[0]], sigma, (Kind::Float, x.device()));
        tch::no_grad(|| self.net.score(&x.to_kind(Kind::Float), &s))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        checkpoint::save(&self.vs, path, &self.config)
    }

    /// Loads a saved model if its config equals `want`; returns None when the file is missing or was trained
    /// differently (so the caller retrains), and an error when the file is there but unreadable.
    pub fn load_if_matching(path: &Path, want: &ToyScoreConfig, device: Device) -> Result<Option<Self>> {
        if !path.exists() || !checkpoint::config_path(path).exists() {
            return Ok(None);
        }
        let Ok(found) = checkpoint::load_config::<ToyScoreConfig>(path) else { return Ok(None) };
        if &found != want {
            return Ok(None);
        }
        let mut model = Self::new(found, device);
        checkpoint::load(&mut model.vs, path)?;
        Ok(Some(model))
    }
}
