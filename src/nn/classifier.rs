//! A small MNIST classifier, trained by this crate, that grades generated digits: its accuracy tells us it knows
//! what a digit looks like, its penultimate features feed the Fréchet distance ([`crate::eval::frechet`]) and its class
//! probabilities give the class histogram and confidence of a set of samples.
//!
//! [LeNet] LeCun et al. 1998, "Gradient-based learning applied to document recognition": convolutions and
//! subsampling, then fully connected layers, the layout followed here. [BN] Ioffe & Szegedy 2015, arXiv:1502.03167. [Dropout] Srivastava et al. 2014, JMLR 15.
//! [Adam] Kingma & Ba 2014, arXiv:1412.6980.
//!
//! Notation (code -> meaning): x -> image (B, 1, 28, 28) in [0, 1]; features -> φ(x) ∈ ℝ^hidden, the ReLU output of
//! the first fully connected layer; logits -> (B, 10); m -> max_shift, the augmentation's largest shift in pixels.
use crate::checkpoint;
use crate::validate::{finite_in, in_range, list_in, Validate, MAX_WIDTH};
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};

/// Where the shipped weights live, relative to the crate root (see data/classifier/README.md).
pub const SHIPPED_WEIGHTS: &str = "data/classifier/mnist_cnn.safetensors";
/// The command that retrains the classifier (an equally accurate one: the shipped weights come from an earlier
/// commit's loop, data/classifier/README.md).
pub const REPRODUCE: &str = "cargo run --release --bin train_classifier";
/// Images per forward pass in evaluation: bounds memory (about 100 KB of activations per image).
const EVAL_CHUNK: i64 = 1000;
const NUM_CLASSES: i64 = 10;

/// Sizes of the network and its augmentation; saved beside the weights.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassifierConfig {
    /// Output channels of the two conv blocks (28×28 → 14×14 → 7×7: a stride-2 conv, then a conv and a 2× max-pool).
    pub channels: [i64; 2],
    /// Width of the penultimate layer: the dimension F of the features.
    pub hidden: i64,
    /// Dropout probability before each fully connected layer ([Dropout]).
    pub dropout: f64,
    /// Training augmentation: each image is shifted by a random whole number of pixels in [−m, m] on each axis.
    pub max_shift: i64,
}

impl Validate for ClassifierConfig {
    fn validate(&self) -> Result<(), String> {
        list_in("channels", &self.channels, Some(2), 1, MAX_WIDTH)?;
        in_range("hidden", self.hidden, 1, MAX_WIDTH)?;
        finite_in("dropout", self.dropout, 0.0, 1.0)?;
        in_range("max_shift", self.max_shift, 0, 27)
    }
}

impl ClassifierConfig {
    /// The shipped classifier: about 99.3 % test accuracy after about two minutes on 2 CPU cores, weights under 1 MB.
    pub fn mnist() -> Self {
        Self { channels: [32, 32], hidden: 128, dropout: 0.25, max_shift: 2 }
    }
}

/// The CNN: conv3×3/2-BN-ReLU, conv3×3-maxpool-BN-ReLU, then fc1-ReLU (the features) and fc2 (the logits).
#[derive(Debug)]
pub struct MnistClassifier {
    pub config: ClassifierConfig,
    pub vs: nn::VarStore,
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

/// `data/classifier/mnist_cnn.safetensors` under the working directory if it is there, else under the crate root
/// (so a lesson run from anywhere inside the clone finds it), as [`crate::data::mnist::resolve_dir`] does.
pub fn shipped_path() -> PathBuf {
    crate::cli::shipped_path(SHIPPED_WEIGHTS, "")
}

impl MnistClassifier {
    /// A fresh, randomly initialised classifier on `device`.
    pub fn new(config: ClassifierConfig, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let [c1, c2] = config.channels;
        let pad = nn::ConvConfig { padding: 1, ..Default::default() };
        let strided = nn::ConvConfig { stride: 2, ..pad };
        let flat = c2 * 7 * 7; // stride 2, then a 2× pooling: 28 → 14 → 7
        Self {
            conv1: nn::conv2d(&root / "conv1", 1, c1, 3, strided),
            bn1: nn::batch_norm2d(&root / "bn1", c1, Default::default()),
            conv2: nn::conv2d(&root / "conv2", c1, c2, 3, pad),
            bn2: nn::batch_norm2d(&root / "bn2", c2, Default::default()),
            fc1: nn::linear(&root / "fc1", flat, config.hidden, Default::default()),
            fc2: nn::linear(&root / "fc2", config.hidden, NUM_CLASSES, Default::default()),
            config,
            vs,
        }
    }

    /// The weights shipped with the crate (see data/classifier/README.md for how they were made).
    pub fn load_shipped(device: Device) -> Result<Self> {
        Self::load_reproducible(&shipped_path(), device)
    }

    /// [`Self::load`], with errors that say how to get the shipped weights back.
    fn load_reproducible(path: &Path, device: Device) -> Result<Self> {
        ensure!(
            path.exists(),
            "classifier weights {} not found: they ship with the crate (restore them with `git checkout -- \
             data/classifier`) or retrain them with `{REPRODUCE}` (about a minute on 2 cores)",
            path.display()
        );
        Self::load(path, device).with_context(|| {
            format!(
                "cannot load the classifier {}: restore it with `git checkout -- data/classifier` or retrain it \
                 with `{REPRODUCE}`",
                path.display()
            )
        })
    }

    /// Loads weights saved by [`train_classifier`]'s binary: `path` plus its config JSON beside it.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let config = checkpoint::load_valid_config::<ClassifierConfig>(path)?;
        let mut model = Self::new(config, device);
        checkpoint::load(&mut model.vs, path)?;
        Ok(model)
    }

    /// The penultimate features φ(x) (B, hidden) in evaluation mode, with gradients with respect to x (lesson 08's
    /// perceptual loss backpropagates through them into a decoder).
    pub fn features_differentiable(&self, x: &Tensor) -> Tensor {
        self.features_t(x, false)
    }

    /// The penultimate features φ(x) (B, hidden), in training or evaluation mode, with gradients.
    fn features_t(&self, x: &Tensor, train: bool) -> Tensor {
        // Downsampling early keeps the CPU cost low: a stride-2 first conv costs a quarter of a stride-1 one (a conv
        // with one input channel is slow in libtorch), and pooling before BN and ReLU quarters their cost.
        let h = self.bn1.forward_t(&self.conv1.forward(x), train).relu(); // (B, c1, 14, 14)
        let h = self.bn2.forward_t(&self.conv2.forward(&h).max_pool2d_default(2), train).relu(); // (B, c2, 7, 7)
        let h = h.flatten(1, -1).dropout(self.config.dropout, train); // (B, c2·49)
        self.fc1.forward(&h).relu() // (B, hidden)
    }

    /// Logits (B, 10) of images x (B, 1, 28, 28) in [0, 1]. `train` turns on dropout and batch statistics, and
    /// updates the batch-norm running statistics (even without gradients): only the training loop should set it.
    pub fn logits(&self, x: &Tensor, train: bool) -> Tensor {
        self.fc2.forward(&self.features_t(x, train).dropout(self.config.dropout, train))
    }

    /// Runs `f` in evaluation mode without gradients over chunks of x, on the model's device; concatenates on dim 0.
    fn eval_chunked(&self, x: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
        let x = x.to_kind(Kind::Float).to_device(self.vs.device());
        tch::no_grad(|| {
            let chunks: Vec<Tensor> = x.split(EVAL_CHUNK, 0).iter().map(&f).collect();
            Tensor::cat(&chunks, 0)
        })
    }

    /// Penultimate features (B, hidden) in evaluation mode, without gradients: the space of the Fréchet distance.
    pub fn features(&self, x: &Tensor) -> Tensor {
        self.eval_chunked(x, |c| self.features_t(c, false))
    }

    /// Class probabilities softmax(logits) (B, 10) in evaluation mode, without gradients.
    pub fn probabilities(&self, x: &Tensor) -> Tensor {
        self.eval_chunked(x, |c| self.logits(c, false).softmax(-1, Kind::Float))
    }

    /// Fraction of `images` whose most probable class is the label.
    pub fn accuracy(&self, images: &Tensor, labels: &Tensor) -> f64 {
        let predicted = self.eval_chunked(images, |c| self.logits(c, false).argmax(-1, false)); // (N,)
        let correct = predicted.eq_tensor(&labels.to_device(predicted.device())).sum(Kind::Int64).int64_value(&[]);
        correct as f64 / labels.size()[0].max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mnist;

    #[test]
    fn missing_or_corrupt_weights_name_the_file_and_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clf.safetensors");
        let e = format!("{:#}", MnistClassifier::load_reproducible(&path, Device::Cpu).unwrap_err());
        assert!(e.contains("clf.safetensors") && e.contains(REPRODUCE), "{e}");
        let m = MnistClassifier::new(ClassifierConfig::mnist(), Device::Cpu);
        checkpoint::save(&m.vs, &path, &m.config).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = format!("{:#}", MnistClassifier::load_reproducible(&path, Device::Cpu).unwrap_err());
        assert!(e.contains("not a readable safetensors") && e.contains(REPRODUCE), "{e}");
        let x = Tensor::rand([3, 1, 28, 28], (Kind::Float, Device::Cpu));
        assert_eq!(m.logits(&x, false).size(), [3, 10]);
        assert_eq!(m.features(&x).size(), [3, 128]);
        assert!(
            (m.probabilities(&x).sum_dim_intlist(1, false, Kind::Float) - 1.0).abs().max().double_value(&[]) < 1e-6
        );
    }

    #[test]
    fn shipped_classifier_is_at_least_99_percent_accurate_on_the_test_set() {
        let data = mnist::load(&mnist::resolve_dir(None)).unwrap();
        let clf = MnistClassifier::load_shipped(Device::Cpu).unwrap();
        assert_eq!(clf.config, ClassifierConfig::mnist());
        let acc = clf.accuracy(&data.test_images, &data.test_labels);
        assert!(acc >= 0.99, "test accuracy {acc}");
    }
}
