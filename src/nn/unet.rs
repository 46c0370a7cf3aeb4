//! A UNet for diffusion on small images, assembled from the pieces in `layers` and `attention`: the sinusoidal time
//! embedding and its MLP, residual blocks with time injection, strided-conv downsampling, nearest-neighbour
//! upsampling, skip connections, and self-attention at the low resolutions.
//!
//! [UNet] Ronneberger, Fischer, Brox 2015, "U-Net", arXiv:1505.04597 (the encoder-decoder with skip connections).
//! [DDPM] Ho, Jain, Abbeel 2020, arXiv:2006.11239, appendix B (the diffusion variant: GroupNorm ResBlocks, time
//! embedding added in every block, self-attention at 16×16).
//! Module paths follow diffusers' `UNet2DModel` (conv_in, time_embedding.linear_1, down_blocks.i.resnets.j,
//! down_blocks.i.attentions.j, down_blocks.i.downsamplers.0, mid_block, up_blocks.i..., conv_norm_out, conv_out).
use super::attention::SpatialSelfAttention;
use super::layers::{groups_for, timestep_embedding, Downsample, ResBlock, Upsample};
use tch::nn::{self, Module};
use tch::Tensor;

/// The shape of a UNet; see the presets.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UNetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Channels at each resolution level; every level but the last halves the resolution.
    pub block_out_channels: Vec<i64>,
    /// Residual blocks per level on the way down (the way up has one more, for the extra skip).
    pub layers_per_block: usize,
    /// Whether each level has self-attention after its residual blocks.
    pub attention: Vec<bool>,
    /// Width of one attention head.
    pub head_dim: i64,
    pub dropout: f64,
}

impl UNetConfig {
    /// A tiny UNet for tests (two levels, attention at the lower one).
    pub fn tiny() -> Self {
        Self {
            in_channels: 1,
            out_channels: 1,
            block_out_channels: vec![8, 16],
            layers_per_block: 1,
            attention: vec![false, true],
            head_dim: 8,
            dropout: 0.0,
        }
    }
    /// The lesson 04 MNIST UNet: 28×28 → 14×14 → 7×7 with 32, 32 and 64 channels, self-attention at 7×7; sized so
    /// a training step of 64 images takes about half a second on 2 CPU cores (the 28×28 level costs the most).
    pub fn mnist() -> Self {
        Self {
            in_channels: 1,
            out_channels: 1,
            block_out_channels: vec![32, 32, 64],
            layers_per_block: 1,
            attention: vec![false, false, true],
            head_dim: 32,
            dropout: 0.1,
        }
    }
    /// Width of the time embedding: 4× the first level's channels, as in [DDPM].
    pub fn emb_dim(&self) -> i64 {
        4 * self.block_out_channels[0]
    }
}

#[derive(Debug)]
struct Level {
    resnets: Vec<ResBlock>,
    attentions: Vec<SpatialSelfAttention>,
    resample: Option<Resample>,
}

#[derive(Debug)]
enum Resample {
    Down(Downsample),
    Up(Upsample),
}

/// The UNet: ε̂ = UNet(x_t, t), same shape in and out.
#[derive(Debug)]
pub struct UNet {
    pub config: UNetConfig,
    time_linear_1: nn::Linear,
    time_linear_2: nn::Linear,
    conv_in: nn::Conv2D,
    down: Vec<Level>,
    mid_resnets: [ResBlock; 2],
    mid_attention: SpatialSelfAttention,
    up: Vec<Level>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl UNet {
    pub fn new(vs: nn::Path, config: UNetConfig) -> Self {
        let ch = &config.block_out_channels;
        let n = ch.len();
        assert!(n >= 1 && config.attention.len() == n, "one attention flag per level");
        let (c0, emb, drop) = (ch[0], config.emb_dim(), config.dropout);
        let pad = nn::ConvConfig { padding: 1, ..Default::default() };
        let attn = |p: nn::Path, c: i64| SpatialSelfAttention::new(p, c, config.head_dim);
        // ANCHOR: unet_down
        let mut down = Vec::new();
        let mut c_prev = c0;
        for (i, &c) in ch.iter().enumerate() {
            let p = &vs / "down_blocks" / i;
            let resnets = (0..config.layers_per_block)
                .map(|j| ResBlock::new(&p / "resnets" / j, if j == 0 { c_prev } else { c }, c, emb, drop))
                .collect();
            let attentions = if config.attention[i] {
                (0..config.layers_per_block).map(|j| attn(&p / "attentions" / j, c)).collect()
            } else {
                vec![]
            };
            let resample = (i + 1 < n).then(|| Resample::Down(Downsample::new(&p / "downsamplers" / 0, c)));
            down.push(Level { resnets, attentions, resample });
            c_prev = c;
        }
        // ANCHOR_END: unet_down
        let c_last = ch[n - 1];
        let m = &vs / "mid_block";
        let mid_resnets = [
            ResBlock::new(&m / "resnets" / 0, c_last, c_last, emb, drop),
            ResBlock::new(&m / "resnets" / 1, c_last, c_last, emb, drop),
        ];
        let mid_attention = attn(&m / "attentions" / 0, c_last);
        // ANCHOR: unet_up
        // Up level r mirrors down level i = n−1−r. Its resnet j takes the running features plus one skip: the skip is
        // a resnet output of level i (c_i channels), except the last one, which is the downsampler output of level i−1
        // (or conv_in's output at the top): c_{i−1} channels.
        let mut up = Vec::new();
        let mut c_run = c_last;
        for r in 0..n {
            let i = n - 1 - r;
            let c = ch[i];
            let c_skip_last = ch[i.saturating_sub(1)];
            let p = &vs / "up_blocks" / r;
            let resnets = (0..=config.layers_per_block)
                .map(|j| {
                    let skip = if j == config.layers_per_block { c_skip_last } else { c };
                    ResBlock::new(&p / "resnets" / j, if j == 0 { c_run } else { c } + skip, c, emb, drop)
                })
                .collect();
            let attentions = if config.attention[i] {
                (0..=config.layers_per_block).map(|j| attn(&p / "attentions" / j, c)).collect()
            } else {
                vec![]
            };
            let resample = (r + 1 < n).then(|| Resample::Up(Upsample::new(&p / "upsamplers" / 0, c)));
            up.push(Level { resnets, attentions, resample });
            c_run = c;
        }
        // ANCHOR_END: unet_up
        Self {
            time_linear_1: nn::linear(&vs / "time_embedding" / "linear_1", c0, emb, Default::default()),
            time_linear_2: nn::linear(&vs / "time_embedding" / "linear_2", emb, emb, Default::default()),
            conv_in: nn::conv2d(&vs / "conv_in", config.in_channels, c0, 3, pad),
            down,
            mid_resnets,
            mid_attention,
            up,
            conv_norm_out: nn::group_norm(&vs / "conv_norm_out", groups_for(c0), c0, Default::default()),
            conv_out: nn::conv2d(&vs / "conv_out", c0, config.out_channels, 3, pad),
            config,
        }
    }

    /// x: (B, C_in, H, W) with H, W divisible by 2^(levels−1); t: (B,) timesteps (any numeric kind) -> (B, C_out, H, W).
    pub fn forward(&self, x: &Tensor, t: &Tensor, train: bool) -> Tensor {
        // ANCHOR: unet_forward
        let c0 = self.config.block_out_channels[0];
        let temb = timestep_embedding(t, c0, 10_000.0).to_kind(x.kind()); // (B, c0), [DDPM] sinusoidal position of t
        let emb = self.time_linear_2.forward(&self.time_linear_1.forward(&temb).silu()); // (B, 4·c0)
        let mut h = self.conv_in.forward(x); // (B, c0, H, W)
        let mut skips = vec![h.shallow_clone()];
        for level in &self.down {
            for (j, resnet) in level.resnets.iter().enumerate() {
                h = resnet.forward(&h, &emb, train);
                if let Some(a) = level.attentions.get(j) {
                    h = a.forward(&h);
                }
                skips.push(h.shallow_clone());
            }
            if let Some(Resample::Down(d)) = &level.resample {
                h = d.forward(&h); // (B, c_i, H/2, W/2)
                skips.push(h.shallow_clone());
            }
        }
        h = self.mid_resnets[0].forward(&h, &emb, train);
        h = self.mid_attention.forward(&h);
        h = self.mid_resnets[1].forward(&h, &emb, train);
        for level in &self.up {
            for (j, resnet) in level.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                h = resnet.forward(&Tensor::cat(&[h, skip], 1), &emb, train); // (B, c_run + c_skip, h, w) -> (B, c_i, h, w)
                if let Some(a) = level.attentions.get(j) {
                    h = a.forward(&h);
                }
            }
            if let Some(Resample::Up(u)) = &level.resample {
                h = u.forward(&h); // (B, c_i, 2h, 2w)
            }
        }
        // (B, C_out, H, W)
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
        // ANCHOR_END: unet_forward
    }

    /// Parameters per top-level block (time_embedding, conv_in, down_blocks.i, mid_block, up_blocks.i, conv_out …),
    /// in network order, for the architecture summary.
    pub fn parameter_summary(vs: &nn::VarStore) -> Vec<(String, i64)> {
        let mut rows: Vec<(String, i64)> = Vec::new();
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        let order = |name: &str| -> (usize, String) {
            let parts: Vec<&str> = name.split('.').collect();
            let key = match parts[0] {
                "down_blocks" | "up_blocks" => format!("{}.{}", parts[0], parts[1]),
                other => other.to_string(),
            };
            let rank =
                ["time_embedding", "conv_in", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out"]
                    .iter()
                    .position(|p| key.starts_with(p))
                    .unwrap_or(99);
            (rank * 100 + parts.get(1).and_then(|s| s.parse::<usize>().ok()).unwrap_or(0), key)
        };
        vars.sort_by_key(|(n, _)| order(n));
        for (name, t) in vars {
            let key = order(&name).1;
            match rows.last_mut() {
                Some((k, count)) if *k == key => *count += t.numel() as i64,
                _ => rows.push((key, t.numel() as i64)),
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device, Kind};

    #[test]
    fn output_shape_equals_input_shape_for_odd_batches() {
        let vs = VarStore::new(Device::Cpu);
        let net = UNet::new(vs.root(), UNetConfig::tiny());
        for b in [1i64, 3] {
            let x = Tensor::randn([b, 1, 28, 28], (Kind::Float, Device::Cpu));
            let t = Tensor::randint(1000, [b], (Kind::Int64, Device::Cpu));
            assert_eq!(net.forward(&x, &t, false).size(), [b, 1, 28, 28]);
        }
        let vs = VarStore::new(Device::Cpu);
        let net = UNet::new(vs.root(), UNetConfig::mnist());
        let x = Tensor::randn([3, 1, 28, 28], (Kind::Float, Device::Cpu));
        assert_eq!(net.forward(&x, &Tensor::from_slice(&[0i64, 500, 999]), false).size(), [3, 1, 28, 28]);
    }

    #[test]
    fn output_depends_on_the_timestep() {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let net = UNet::new(vs.root(), UNetConfig::tiny());
        let x = Tensor::randn([1, 1, 28, 28], (Kind::Float, Device::Cpu)).repeat([2, 1, 1, 1]);
        let out = net.forward(&x, &Tensor::from_slice(&[10i64, 900]), false);
        assert!((out.get(0) - out.get(1)).abs().max().double_value(&[]) > 1e-4);
    }

    #[test]
    fn a_tiny_unet_overfits_one_batch() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let net = UNet::new(vs.root(), UNetConfig::tiny());
        let mut opt = nn::OptimizerConfig::build(nn::Adam::default(), &vs, 3e-3).unwrap();
        let x = Tensor::randn([4, 1, 16, 16], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[1i64, 200, 400, 800]);
        let target = Tensor::randn([4, 1, 16, 16], (Kind::Float, Device::Cpu));
        let mut first = 0.0;
        let mut last = 0.0;
        for step in 0..300 {
            let loss = (net.forward(&x, &t, true) - &target).square().mean(Kind::Float);
            if step == 0 {
                first = loss.double_value(&[]);
            }
            last = loss.double_value(&[]);
            opt.backward_step(&loss);
        }
        assert!(last < 0.1 * first, "loss {first} -> {last}");
    }

    #[test]
    fn parameter_summary_covers_every_parameter_and_mirrors_diffusers_names() {
        let vs = VarStore::new(Device::Cpu);
        let _ = UNet::new(vs.root(), UNetConfig::mnist());
        let rows = UNet::parameter_summary(&vs);
        let total: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(rows.iter().map(|r| r.1).sum::<i64>(), total);
        let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(names.first(), Some(&"time_embedding"));
        assert!(names.contains(&"down_blocks.2") && names.contains(&"mid_block") && names.contains(&"up_blocks.0"));
        let keys: Vec<String> = vs.variables().into_keys().collect();
        for k in [
            "down_blocks.0.resnets.0.conv1.weight",
            "down_blocks.2.attentions.0.to_q.weight",
            "down_blocks.0.downsamplers.0.conv.weight",
            "up_blocks.0.resnets.1.conv_shortcut.weight",
            "mid_block.attentions.0.group_norm.weight",
        ] {
            assert!(keys.iter().any(|x| x == k), "missing {k}");
        }
    }
}
