//! Lesson 04's unconditional pipeline: a trained ε-prediction UNet and the noise schedule it learned, saved
//! together (lesson 07 samples from the shipped one).
use crate::diffusion::schedule::NoiseSchedule;
use anyhow::Result;
use std::path::Path;
use tch::nn::VarStore;
use tch::Device;

/// What a trained ε-prediction UNet needs besides its weights: its shape and the noise schedule it learned,
/// saved as the JSON beside `unet.safetensors` (lesson 04 writes one; lesson 07 samples from it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedUNet {
    pub unet: crate::nn::unet::UNetConfig,
    /// A name [`NoiseSchedule::by_name`] knows.
    pub schedule: String,
    /// T, the number of training timesteps.
    pub timesteps: usize,
}

impl crate::validate::Validate for SavedUNet {
    fn validate(&self) -> std::result::Result<(), String> {
        self.unet.validate()?;
        crate::validate::in_range("timesteps", self.timesteps, 21, 100_000) // the linear schedule needs T > 20
    }
}

/// Where lesson 04's trained UNet is shipped (`lesson04 --ship`), for lesson 07 to sample from on a fresh clone.
pub const SHIPPED_UNET: &str = "data/lesson04/unet.safetensors";

/// [`SHIPPED_UNET`] under the working directory if it is there, else under the crate root.
pub fn shipped_unet() -> std::path::PathBuf {
    crate::cli::shipped_path(SHIPPED_UNET, "")
}

/// Saves the UNet weights of `vs` to `path` (safetensors, atomically) with `saved` beside it.
pub fn save_unet(vs: &VarStore, path: &Path, saved: &SavedUNet) -> Result<()> {
    crate::checkpoint::save(vs, path, saved)
}

/// How a shipped UNet was made and what it scored: the facts of the README beside it (see [`ship_unet`]).
pub struct ShipNote {
    /// Training steps, images per batch, peak learning rate, seed and training time: the flags that reproduce it.
    pub steps: usize,
    pub batch: i64,
    pub lr: f64,
    pub seed: u64,
    pub train_seconds: f64,
    /// Samples graded at 100 steps, their Fréchet distance and the real-vs-real floor at that number.
    pub samples: i64,
    pub frechet_distance: f64,
    pub frechet_floor: f64,
}

/// `lesson04 --ship`: saves the UNet to [`SHIPPED_UNET`] under the crate root (what lesson 07 samples from on a fresh
/// clone), with a README that says how it was made, on how many threads, and what it scored. Returns the path.
pub fn ship_unet(vs: &VarStore, saved: &SavedUNet, note: &ShipNote) -> Result<std::path::PathBuf> {
    let path = crate::cli::crate_root().join(SHIPPED_UNET);
    save_unet(vs, &path, saved)?;
    let ShipNote { steps, batch, lr, seed, train_seconds: seconds, .. } = note;
    let readme = format!(
        "# Lesson 04 UNet\n\nThe EMA weights of lesson 04's DDPM UNet ({:?} channels, {} schedule, T = {}), which \
         lesson 07 samples from by default.\n\nMade by `./run.sh lesson 04 --ship --steps {steps} --batch {batch} --lr \
         {lr}` (seed {seed}, {steps} steps of {batch} images, {seconds:.0} s of training on {} threads; {} samples \
         at 100 steps: Fréchet distance {:.2}, floor {:.2}); the same command reproduces it.\n",
        saved.unet.block_out_channels,
        saved.schedule,
        saved.timesteps,
        tch::get_num_threads(),
        note.samples,
        note.frechet_distance,
        note.frechet_floor
    );
    crate::cli::write_atomic(&path.with_file_name("README.md"), readme.as_bytes())?;
    Ok(path)
}

/// Loads a UNet saved by [`save_unet`]: its weights (strictly: names and shapes must match the config), the model
/// and its noise schedule.
pub fn load_unet(path: &Path, device: Device) -> Result<(VarStore, crate::nn::unet::UNet, NoiseSchedule)> {
    let saved: SavedUNet = crate::checkpoint::load_valid_config(path)?;
    let sched = NoiseSchedule::by_name(&saved.schedule, saved.timesteps)?;
    let mut vs = VarStore::new(device);
    let net = crate::nn::unet::UNet::new(vs.root(), saved.unet);
    crate::checkpoint::load(&mut vs, path)?;
    vs.freeze();
    Ok((vs, net, sched))
}

/// Lesson 05's class-conditional UNet as it ships: the network and label table's shapes and the noise schedule,
/// saved as the JSON beside `data/lesson05/unet.safetensors` (lesson 10 guides it with classifier-free guidance).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedClassCond {
    pub model: crate::nn::class_cond::ClassCondConfig,
    /// A name [`NoiseSchedule::by_name`] knows.
    pub schedule: String,
    pub timesteps: usize,
}

impl crate::validate::Validate for SavedClassCond {
    fn validate(&self) -> std::result::Result<(), String> {
        self.model.unet.validate()?;
        if self.model.unet.cross_attention_dim.is_none() {
            return Err("model.unet.cross_attention_dim must be set: the UNet cross-attends to the label tokens".into());
        }
        crate::validate::in_range("model.num_classes", self.model.num_classes, 1, 100_000)?;
        crate::validate::in_range("model.tokens", self.model.tokens, 1, 1024)?;
        crate::validate::in_range("timesteps", self.timesteps, 21, 100_000)
    }
}

/// Where `lesson05 --ship` writes the class-conditional UNet.
pub const SHIPPED_CLASS_COND: &str = "data/lesson05/unet.safetensors";

/// [`SHIPPED_CLASS_COND`] under the working directory if it is there, else under the crate root.
pub fn shipped_class_cond() -> std::path::PathBuf {
    crate::cli::shipped_path(SHIPPED_CLASS_COND, "")
}

/// `lesson05 --ship`: saves the class-conditional UNet and its label table to [`SHIPPED_CLASS_COND`] under the crate
/// root with a README (how it was made: the command, the threads, what it scored at guidance `scores`). Returns the
/// path.
pub fn ship_class_cond(vs: &VarStore, saved: &SavedClassCond, how: &str) -> Result<std::path::PathBuf> {
    let path = crate::cli::crate_root().join(SHIPPED_CLASS_COND);
    crate::checkpoint::save(vs, &path, saved)?;
    let readme = format!(
        "# Lesson 05 class-conditional UNet\n\nThe EMA weights of lesson 05's UNet with spatial transformers that \
         cross-attend to {} learned tokens per digit label (∅ included, for classifier-free guidance), {:?} \
         channels, {} schedule, T = {}. Lesson 10 compares classifier-free guidance of it with classifier and CLIP \
         guidance.\n\n{how}\n",
        saved.model.tokens, saved.model.unet.block_out_channels, saved.schedule, saved.timesteps
    );
    crate::cli::write_atomic(&path.with_file_name("README.md"), readme.as_bytes())?;
    Ok(path)
}

/// Loads a class-conditional UNet saved by [`ship_class_cond`] (strictly: names and shapes must match its config),
/// frozen, with its noise schedule.
pub fn load_class_cond(
    path: &Path,
    device: Device,
) -> Result<(VarStore, crate::nn::class_cond::LabelConditioned<crate::nn::unet::UNet>, NoiseSchedule)> {
    let saved: SavedClassCond = crate::checkpoint::load_valid_config(path)?;
    let sched = NoiseSchedule::by_name(&saved.schedule, saved.timesteps)?;
    let mut vs = VarStore::new(device);
    let model = saved.model.build(vs.root());
    crate::checkpoint::load(&mut vs, path)?;
    vs.freeze();
    Ok((vs, model, sched))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn a_saved_unet_loads_with_its_schedule_and_gives_the_same_output() {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let net = crate::nn::unet::UNet::new(vs.root(), crate::nn::unet::UNetConfig::tiny());
        let dir = std::env::temp_dir().join(format!("sd_saved_unet_{}", std::process::id()));
        let path = dir.join("unet.safetensors");
        let saved = SavedUNet { unet: net.config.clone(), schedule: "cosine".into(), timesteps: 1000 };
        save_unet(&vs, &path, &saved).unwrap();
        let (_vs2, net2, sched) = load_unet(&path, Device::Cpu).unwrap();
        assert_eq!(sched.num_steps(), 1000);
        assert!((sched.alpha_bar(500) - NoiseSchedule::cosine(1000).alpha_bar(500)).abs() < 1e-12);
        let x = Tensor::randn([2, 1, 16, 16], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[3i64, 700]);
        let (a, b) = tch::no_grad(|| (net.forward(&x, &t, false), net2.forward(&x, &t, false)));
        assert!(a.equal(&b));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_saved_class_conditional_unet_loads_and_reads_its_labels_alike() {
        tch::manual_seed(2);
        let vs = VarStore::new(Device::Cpu);
        let model = crate::nn::class_cond::ClassCondConfig::tiny().build(vs.root());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unet.safetensors");
        let saved = SavedClassCond {
            model: crate::nn::class_cond::ClassCondConfig::tiny(),
            schedule: "linear".into(),
            timesteps: 1000,
        };
        crate::checkpoint::save(&vs, &path, &saved).unwrap();
        let (_vs2, model2, _) = load_class_cond(&path, Device::Cpu).unwrap();
        let x = Tensor::randn([2, 1, 16, 16], (Kind::Float, Device::Cpu));
        let (t, y) = (Tensor::from_slice(&[3i64, 700]), Tensor::from_slice(&[4i64, 10]));
        let (a, b) = tch::no_grad(|| (model.eps_labels(&x, &t, &y, false), model2.eps_labels(&x, &t, &y, false)));
        assert!(a.equal(&b));
        // a config that would build a UNet without cross-attention is refused before any tensor is made
        let mut bad = saved.clone();
        bad.model.unet.cross_attention_dim = None;
        crate::checkpoint::save(&vs, &path, &bad).unwrap();
        let err = load_class_cond(&path, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("cross_attention_dim"), "{err}");
    }
}
