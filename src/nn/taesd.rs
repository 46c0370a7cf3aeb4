//! TAESD, the tiny autoencoder for Stable Diffusion's latents: a plain convolutional encoder and decoder (no
//! attention, no normalisation, ReLU) distilled to map to and from SD's *scaled* latents s·z, 1.2 M parameters per
//! half against the KL-autoencoder's 34 M (encoder) and 49 M (decoder), for previews and fast final images.
//!
//! [TAESD] Ollin Boer Bohan 2023, github.com/madebyollin/taesd (`taesd.py`: `Block`, `Encoder`, `Decoder`; trained to
//! reproduce the SD VAE's latents and images). Module names and layout follow diffusers' `AutoencoderTiny`
//! (`encoder.layers.i`, `decoder.layers.i`; `AutoencoderTinyBlock`'s `conv.{0,2,4}` and `skip`), so its diffusers
//! folder (madebyollin/taesd) loads by name. The encoder reads pixels in [0, 1] (diffusers' wrapper maps them from
//! [−1, 1]); the decoder first soft-clamps its input to (−3, 3) with 3·tanh(z/3), and writes pixels in [0, 1].
use crate::validate::{in_range, list_in, Validate, MAX_WIDTH};
use tch::nn::{self, Module};
use tch::Tensor;

/// diffusers' `AutoencoderTiny` config (the fields that shape it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaesdConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub latent_channels: i64,
    pub encoder_block_out_channels: Vec<i64>,
    pub decoder_block_out_channels: Vec<i64>,
    /// Blocks after each of the encoder's convolutions (the first conv keeps the size, the others halve it).
    pub num_encoder_blocks: Vec<i64>,
    /// Blocks before each of the decoder's 2× nearest upsamplings (none after the last group).
    pub num_decoder_blocks: Vec<i64>,
}

impl TaesdConfig {
    /// madebyollin/taesd (SD 1.x/2.x): 64 channels throughout, 8× down and up.
    pub fn sd() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            encoder_block_out_channels: vec![64; 4],
            decoder_block_out_channels: vec![64; 4],
            num_encoder_blocks: vec![1, 3, 3, 3],
            num_decoder_blocks: vec![3, 3, 3, 1],
        }
    }
}

impl Validate for TaesdConfig {
    fn validate(&self) -> Result<(), String> {
        in_range("in_channels", self.in_channels, 1, 16)?;
        in_range("out_channels", self.out_channels, 1, 16)?;
        in_range("latent_channels", self.latent_channels, 1, 64)?;
        list_in("encoder_block_out_channels", &self.encoder_block_out_channels, None, 1, MAX_WIDTH)?;
        list_in("decoder_block_out_channels", &self.decoder_block_out_channels, None, 1, MAX_WIDTH)?;
        list_in("num_encoder_blocks", &self.num_encoder_blocks, Some(self.encoder_block_out_channels.len()), 0, 64)?;
        list_in("num_decoder_blocks", &self.num_decoder_blocks, Some(self.decoder_block_out_channels.len()), 0, 64)?;
        // diffusers' EncoderTiny/DecoderTiny keep each group's width through its convolutions: one width per half
        for (name, widths) in
            [("encoder", &self.encoder_block_out_channels), ("decoder", &self.decoder_block_out_channels)]
        {
            if widths.windows(2).any(|w| w[0] != w[1]) {
                return Err(format!(
                    "{name}_block_out_channels {widths:?}: the tiny autoencoder has one width per half"
                ));
            }
        }
        Ok(())
    }
}

fn conv(vs: nn::Path, c_in: i64, c_out: i64, stride: i64, bias: bool) -> nn::Conv2D {
    nn::conv2d(vs, c_in, c_out, 3, nn::ConvConfig { padding: 1, stride, bias, ..Default::default() })
}

// ANCHOR: taesd_block
/// [TAESD] `Block`: ReLU(conv(ReLU(conv(ReLU(conv(x))))) + skip(x)), skip a 1×1 convolution where the width changes.
#[derive(Debug)]
struct Block {
    convs: [nn::Conv2D; 3],
    skip: Option<nn::Conv2D>,
}

impl Block {
    fn new(vs: nn::Path, c_in: i64, c_out: i64) -> Self {
        let c = &vs / "conv";
        let skip_config = nn::ConvConfig { bias: false, ..Default::default() };
        Self {
            convs: [
                conv(&c / 0, c_in, c_out, 1, true),
                conv(&c / 2, c_out, c_out, 1, true),
                conv(&c / 4, c_out, c_out, 1, true),
            ],
            skip: (c_in != c_out).then(|| nn::conv2d(&vs / "skip", c_in, c_out, 1, skip_config)),
        }
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.convs[2].forward(&self.convs[1].forward(&self.convs[0].forward(x).relu()).relu()); // (B, C', H, W)
        let skip = self.skip.as_ref().map_or_else(|| x.shallow_clone(), |s| s.forward(x));
        (h + skip).relu()
    }
}
// ANCHOR_END: taesd_block

/// A layer of the encoder's or decoder's Sequential, by its index there.
#[derive(Debug)]
enum Layer {
    Conv(nn::Conv2D),
    Block(Box<Block>),
    Relu,
    Upsample,
}

impl Module for Layer {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Layer::Conv(c) => c.forward(x),
            Layer::Block(b) => b.forward(x),
            Layer::Relu => x.relu(),
            // nearest, 2× (diffusers' `nn.Upsample(scale_factor=2, mode="nearest")`)
            Layer::Upsample => {
                let s = x.size();
                x.upsample_nearest2d([s[2] * 2, s[3] * 2], None, None)
            }
        }
    }
}

/// The tiny autoencoder: `encode` pixels in [0, 1] (B, 3, H, W) -> SD's scaled latents (B, 4, H/8, W/8); `decode` back.
#[derive(Debug)]
pub struct Taesd {
    pub config: TaesdConfig,
    encoder: Vec<Layer>,
    decoder: Vec<Layer>,
}

impl Taesd {
    pub fn new(vs: nn::Path, config: TaesdConfig) -> Self {
        let (e, d) = (&vs / "encoder" / "layers", &vs / "decoder" / "layers");
        let mut encoder = Vec::new();
        let ch = &config.encoder_block_out_channels;
        for (i, &blocks) in config.num_encoder_blocks.iter().enumerate() {
            let at = encoder.len();
            encoder.push(Layer::Conv(match i {
                0 => conv(&e / at, config.in_channels, ch[0], 1, true),
                _ => conv(&e / at, ch[i], ch[i], 2, false), // halves the size (diffusers: widths are equal)
            }));
            for _ in 0..blocks {
                let at = encoder.len();
                encoder.push(Layer::Block(Box::new(Block::new(&e / at, ch[i], ch[i]))));
            }
        }
        let at = encoder.len();
        encoder.push(Layer::Conv(conv(&e / at, *ch.last().expect("validated"), config.latent_channels, 1, true)));
        let ch = &config.decoder_block_out_channels;
        let mut decoder = vec![Layer::Conv(conv(&d / 0, config.latent_channels, ch[0], 1, true)), Layer::Relu];
        let n = config.num_decoder_blocks.len();
        for (i, &blocks) in config.num_decoder_blocks.iter().enumerate() {
            let last = i + 1 == n;
            for _ in 0..blocks {
                let at = decoder.len();
                decoder.push(Layer::Block(Box::new(Block::new(&d / at, ch[i], ch[i]))));
            }
            if !last {
                decoder.push(Layer::Upsample);
            }
            let at = decoder.len();
            let c_out = if last { config.out_channels } else { ch[i] };
            decoder.push(Layer::Conv(conv(&d / at, ch[i], c_out, 1, last)));
        }
        Self { config, encoder, decoder }
    }

    // ANCHOR: taesd_forward
    /// Pixels (B, 3, H, W) in [0, 1] -> scaled latents (B, 4, H/8, W/8), directly in the UNet's space.
    pub fn encode(&self, pixels: &Tensor) -> Tensor {
        self.encoder.iter().fold(pixels.shallow_clone(), |h, layer| layer.forward(&h))
    }

    /// Scaled latents (B, 4, h, w) -> pixels (B, 3, 8h, 8w), about [0, 1] (not clamped).
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let clamped = (latents / 3.0).tanh() * 3.0; // [TAESD] the decoder's soft clamp to (−3, 3)
        self.decoder.iter().fold(clamped, |h, layer| layer.forward(&h))
    }
    // ANCHOR_END: taesd_forward
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device, Kind};

    /// madebyollin/taesd's parameter count (diffusers' AutoencoderTiny: 1 222 532 encoder + 1 222 531 decoder =
    /// 2 445 063) and its 8× down- and upsampling.
    #[test]
    fn the_sd_preset_has_taesds_shapes() {
        let vs = VarStore::new(Device::Cpu);
        let t = Taesd::new(vs.root(), TaesdConfig::sd());
        let count = |prefix: &str| -> i64 {
            vs.variables().iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v.numel() as i64).sum()
        };
        assert_eq!((count("encoder."), count("decoder.")), (1_222_532, 1_222_531));
        let z = tch::no_grad(|| t.encode(&Tensor::rand([1, 3, 64, 48], (Kind::Float, Device::Cpu))));
        assert_eq!(z.size(), [1, 4, 8, 6]);
        assert_eq!(tch::no_grad(|| t.decode(&z)).size(), [1, 3, 64, 48]);
    }
}
