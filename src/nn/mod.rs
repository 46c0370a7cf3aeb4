//! Networks. Module paths mirror the names diffusers uses for the same parts (`norm1`, `conv1`, `time_emb_proj`,
//! `conv_shortcut` ...), so later lessons can load real checkpoints without a key map.
pub mod attention;
pub mod class_cond;
pub mod classifier;
pub mod clip;
pub mod controlnet;
pub mod encoder_unet;
pub mod eps_mlp;
pub mod label_context;
pub mod layers;
pub mod lora;
pub mod ncsn;
pub mod score_mlp;
pub mod super_resolution;
pub mod taesd;
pub mod text_encoder;
pub mod text_unet;
pub mod transformer;
pub mod unclip;
pub mod unet;
pub mod vae;

#[cfg(test)]
mod config_tests {
    use super::classifier::ClassifierConfig;
    use super::clip::MiniClipConfig;
    use super::eps_mlp::EpsMlpConfig;
    use super::ncsn::NcsnConfig;
    use super::score_mlp::ScoreMlpConfig;
    use super::text_encoder::TextEncoderConfig;
    use super::unet::UNetConfig;
    use super::vae::VaeConfig;
    use crate::validate::Validate;

    /// `base` with `mutate` applied must be refused, the message naming `field`.
    fn refused<T: Validate + Clone>(base: &T, field: &str, mutate: impl Fn(&mut T)) {
        let mut c = base.clone();
        mutate(&mut c);
        let e = c.validate().expect_err(&format!("a bad `{field}` was accepted"));
        assert!(e.contains(field), "the error for `{field}` does not name it: {e}");
    }

    #[test]
    fn every_preset_is_valid() {
        let unets = [UNetConfig::tiny(), UNetConfig::tiny_cond(6), UNetConfig::mnist(), UNetConfig::mnist_latent()];
        let unets = unets.into_iter().chain([UNetConfig::mnist_latent_tiny(), UNetConfig::sd15()]);
        unets.chain([super::class_cond::ClassCondConfig::mnist().unet]).for_each(|c| c.validate().unwrap());
        for c in [VaeConfig::tiny(), VaeConfig::mnist(), VaeConfig::mnist_tiny(), VaeConfig::sd15()] {
            c.validate().unwrap();
        }
        TextEncoderConfig::tiny().validate().unwrap();
        TextEncoderConfig::clip_vit_l14().validate().unwrap();
        MiniClipConfig::mnist(100).validate().unwrap();
        MiniClipConfig::tiny(100).validate().unwrap();
        ClassifierConfig::mnist().validate().unwrap();
        NcsnConfig::mnist().validate().unwrap();
        ScoreMlpConfig::toy2d().validate().unwrap();
        EpsMlpConfig::mnist().validate().unwrap();
    }

    /// The fields issue 17 found panicking or allocating without bound, and one mutation of every other field.
    #[test]
    fn every_field_out_of_range_is_an_error_naming_it() {
        let u = UNetConfig::mnist();
        refused(&u, "in_channels", |c| c.in_channels = 0);
        refused(&u, "out_channels", |c| c.out_channels = -3);
        refused(&u, "block_out_channels", |c| c.block_out_channels = vec![]);
        refused(&u, "block_out_channels[1]", |c| c.block_out_channels[1] = 1_000_000);
        refused(&u, "block_out_channels[0]", |c| c.block_out_channels[0] = -16);
        refused(&u, "attention", |c| c.attention.pop().map_or((), drop));
        refused(&u, "layers_per_block", |c| c.layers_per_block = 0);
        refused(&u, "layers_per_block", |c| c.layers_per_block = 1_000_000_000_000);
        refused(&u, "head_dim", |c| c.head_dim = 0);
        refused(&u, "head_dim", |c| c.head_dim = 48); // 64 channels at the attention level
        refused(&u, "dropout", |c| c.dropout = 1.5);
        refused(&u, "dropout", |c| c.dropout = -0.5);
        refused(&u, "dropout", |c| c.dropout = f64::NAN);
        refused(&u, "cross_attention_dim", |c| c.cross_attention_dim = Some(0));
        let sd = UNetConfig::sd15();
        refused(&sd, "attention_heads", |c| c.attention_heads = Some(0));
        refused(&sd, "attention_heads", |c| c.attention_heads = Some(7));

        let v = VaeConfig::mnist();
        refused(&v, "in_channels", |c| c.in_channels = 0);
        refused(&v, "out_channels", |c| c.out_channels = 0);
        refused(&v, "block_out_channels", |c| c.block_out_channels.clear());
        refused(&v, "layers_per_block", |c| c.layers_per_block = 0);
        refused(&v, "latent_channels", |c| c.latent_channels = 0);
        refused(&v, "norm_num_groups", |c| c.norm_num_groups = 0);
        refused(&v, "norm_num_groups", |c| c.norm_num_groups = 3);
        refused(&v, "scaling_factor", |c| c.scaling_factor = 0.0);
        refused(&v, "scaling_factor", |c| c.scaling_factor = f64::INFINITY);

        let t = TextEncoderConfig::clip_vit_l14();
        refused(&t, "vocab_size", |c| c.vocab_size = 0);
        refused(&t, "max_position_embeddings", |c| c.max_position_embeddings = -1);
        refused(&t, "hidden_size", |c| c.hidden_size = 0);
        refused(&t, "intermediate_size", |c| c.intermediate_size = 0);
        refused(&t, "num_hidden_layers", |c| c.num_hidden_layers = 0);
        refused(&t, "num_attention_heads", |c| c.num_attention_heads = 0);
        refused(&t, "num_attention_heads", |c| c.num_attention_heads = 5); // 768 / 5
        refused(&t, "layer_norm_eps", |c| c.layer_norm_eps = -1.0);

        let m = MiniClipConfig::mnist(100);
        refused(&m, "text: `hidden_size`", |c| c.text.hidden_size = 0);
        refused(&m, "eos_token_id", |c| c.eos_token_id = 100);
        refused(&m, "in_channels", |c| c.in_channels = 0);
        refused(&m, "image_channels", |c| c.image_channels.clear());
        refused(&m, "embed_dim", |c| c.embed_dim = 0);

        let k = ClassifierConfig::mnist();
        refused(&k, "channels[0]", |c| c.channels[0] = 0);
        refused(&k, "hidden", |c| c.hidden = 0);
        refused(&k, "dropout", |c| c.dropout = 2.0);
        refused(&k, "max_shift", |c| c.max_shift = -1);
        refused(&NcsnConfig::mnist(), "channels[2]", |c| c.channels[2] = 0);
        refused(&NcsnConfig::mnist(), "emb_dim", |c| c.emb_dim = 0);
        refused(&NcsnConfig::mnist(), "sigma_data", |c| c.sigma_data = 0.0);
        refused(&ScoreMlpConfig::toy2d(), "hidden", |c| c.hidden = 0);
        refused(&ScoreMlpConfig::toy2d(), "depth", |c| c.depth = 0);
        refused(&ScoreMlpConfig::toy2d(), "emb_dim", |c| c.emb_dim = 1);
        refused(&ScoreMlpConfig::toy2d(), "sigma_data", |c| c.sigma_data = -1.0);
        refused(&EpsMlpConfig::mnist(), "dim", |c| c.dim = 0);
        refused(&EpsMlpConfig::mnist(), "hidden", |c| c.hidden = 0);
        refused(&EpsMlpConfig::mnist(), "depth", |c| c.depth = 100);
        refused(&EpsMlpConfig::mnist(), "emb_dim", |c| c.emb_dim = 0);
    }
}
