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
}
