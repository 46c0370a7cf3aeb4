"""Reference outputs from diffusers for the Rust parity tests (tests/parity.rs).

Builds diffusers' AutoencoderKL and UNet2DConditionModel from tiny SD-shaped configs with random weights (every
parameter, norms included, drawn at random so that no term can hide behind a zero or a one), runs them on fixed
inputs, and writes the weights and the outputs as safetensors into the folder given as the only argument:

    vae.safetensors             the VAE's state_dict, under diffusers' own names
    vae_reference.safetensors   x (the input), moments (quant_conv(encoder(x)): mean and log-variance), z (the
                                posterior mean) and decoded (vae.decode(z))
    unet.safetensors            the UNet's state_dict
    unet_reference.safetensors  sample, timestep, context and eps (the UNet's output)
    text_encoder.safetensors    transformers' CLIPTextModel state_dict (text_model.* in transformers 4, bare in 5)
    text_encoder_reference.safetensors  ids and hidden (the last hidden state, after final_layer_norm)
    tokens.json                 OpenAI's simple_tokenizer ids of each line of tests/parity/tokenizer_corpus.txt, with
                                data/clip/bpe_simple_vocab_16e6.txt.gz (when clip-anytorch's simple_tokenizer.py and
                                ftfy are installed)
    tiny-sd/                    a whole diffusers StableDiffusionPipeline folder (unet/, vae/, text_encoder/,
                                tokenizer/ made from data/clip's vocabulary, scheduler/: SD 1.5's DDIMScheduler) of
                                SD 1.5's layout shrunk (the SdConfig::tiny of src/sd/weights.rs), random weights
    pipeline_reference.safetensors  latents (the starting noise of seeds 7 and 8), final_latents (before the VAE) and
                                images (the pipeline's output, (2, 64, 64, 3) in [0, 1]) of a 4-step DDIM txt2img
                                with a negative prompt, w = 7.5
    controlnet.safetensors      diffusers' ControlNetModel (from the UNet, then randomised), under its own names
    controlnet-diffusers/       the same ControlNet as save_pretrained writes it (config.json, safetensors)
    controlnet_reference.safetensors  the UNet's inputs, hint, the residuals (down_i, mid; guess_down_i, guess_mid at
                                scale 0.7 in guess mode) and eps_controlled (the UNet with the first residuals added)
    lora_kohya.safetensors, lora-peft/, embeddings/, controlnet-sd/, control_tiny_sd15.safetensors,
    sd_files_reference.safetensors  the files SD 1.5 users download, for tiny-sd, and diffusers' outputs with them
                                (see sd_files)
    taesd-tiny/, tiny-sd-inpaint/, fast_path_reference.safetensors  LCM, TAESD and the inpainting model (fast_path)
    canny_reference.safetensors images (N, 28, 28) uint8 — the first 64 MNIST test digits, then synthetic shapes — and
                                edges: OpenCV's cv2.Canny(image, 100, 200) of each (ControlNet's annotator), when
                                opencv-python-headless is installed
    versions.txt                torch, diffusers and transformers versions

Run from the venv that provides libtorch, with diffusers installed (./run.sh setup installs it).
"""
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = Path(__file__).resolve().parents[2]

# The tiny config; tests/parity.rs builds VaeConfig with the same numbers.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)

# SD 1.5's UNet layout shrunk: a cross-attention level and a plain one, 2 heads, context width 32.
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=2,  # diffusers' name for the number of heads in SD 1.x configs
    norm_num_groups=32,
)

# CLIP ViT-L/14's text tower shrunk: quick-GELU, causal, pre-LN, 2 layers of width 32.
TEXT_CONFIG = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=97,
    eos_token_id=98,
)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter at random: conv and linear weights N(0, 2/fan_in) (activations stay O(1) through the
    blocks), norm scales 1 + N(0, 0.2²), biases N(0, 0.2²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(r * (2.0 / p[0].numel()) ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            else:
                p.copy_(0.2 * r)


def save(out: Path, name: str, model: torch.nn.Module, reference: dict) -> None:
    """NAME.safetensors: the model's state_dict (without transformers' position_ids buffer); NAME_reference: the
    inputs and outputs."""
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    save_file(weights, str(out / f"{name}.safetensors"))
    save_file({k: v.contiguous() for k, v in reference.items()}, str(out / f"{name}_reference.safetensors"))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    randomize(vae, 1)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        z = posterior.mean
        decoded = vae.decode(z).sample
    save(out, "vae", vae, {"x": x, "moments": posterior.parameters, "z": z, "decoded": decoded})
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    randomize(unet, 3)
    g = torch.Generator().manual_seed(4)
    sample, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    timestep = torch.tensor([10, 700])
    with torch.no_grad():
        eps = unet(sample, timestep, encoder_hidden_states=context).sample
    save(out, "unet", unet, {"sample": sample, "timestep": timestep, "context": context, "eps": eps})
    controlnet(out, unet, {"sample": sample, "timestep": timestep, "context": context})
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval()
    randomize(text, 5)
    ids = torch.randint(0, 99, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        hidden = text(input_ids=ids).last_hidden_state
    save(out, "text_encoder", text, {"ids": ids, "hidden": hidden})
    import diffusers
    import transformers

    versions = f"torch {torch.__version__}\ndiffusers {diffusers.__version__}\ntransformers {transformers.__version__}\n"
    (out / "versions.txt").write_text(versions)


def openai_tokenizer():
    """OpenAI's tokenizer with data/clip's vocabulary, loaded from the clip-anytorch package's file (its __init__
    would import torchvision); None when clip-anytorch is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("clip")
    if spec is None or spec.submodule_search_locations is None:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("simple_tokenizer", path)
    simple = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(simple)
    return simple.SimpleTokenizer(str(ROOT / "data/clip/bpe_simple_vocab_16e6.txt.gz"))


# The pipeline test's prompt, negative prompt, seed, guidance and steps (tests/parity.rs uses the same).
PROMPT = "a photo of an astronaut riding a horse on mars, 4k"
NEGATIVE = "blurry, low quality"
SEED, STEPS, GUIDANCE = 7, 4, 7.5


def clip_tokenizer(folder: Path):
    """SD 1.5's tokenizer, transformers' CLIPTokenizer, from OpenAI's BPE: vocab.json and merges.txt written into
    `folder` from data/clip's vocabulary file."""
    import json

    from transformers import CLIPTokenizer

    tok = openai_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tok.encoder))
    ranked = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2"] + [" ".join(m) for m in ranked]) + "\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )


# SD 1.5's training schedule, as its scheduler_config.json gives it
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)


def sd15_unet(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, sample_size=64, in_channels=4):
    """UNet2DConditionModel of SD 1.5's layout (runwayml's unet/config.json), at these widths (in_channels 9: the
    inpainting model's latents, mask and masked-image latents)."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=block_out_channels,
        layers_per_block=2,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    ).eval()


def sd15_vae(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512):
    """AutoencoderKL of SD 1.5's layout (vae/config.json), at these widths."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=block_out_channels,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=0.18215,
    ).eval()


# CLIP ViT-L/14's text tower (text_encoder/config.json), over the real vocabulary and 77 positions.
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    pad_token_id=49407,
    bos_token_id=49406,
    eos_token_id=49407,
)


def sd15_text(**widths):
    """CLIPTextModel of SD 1.5's text encoder, with `widths` overriding its sizes."""
    return CLIPTextModel(CLIPTextConfig(**{**SD15_TEXT, **widths})).eval()


def sd_pipeline(unet, vae, text, tokenizer, scheduler):
    """diffusers' StableDiffusionPipeline of these parts, without the safety checker, progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline(out: Path) -> None:
    """A whole StableDiffusionPipeline of SD 1.5's layout shrunk (SdConfig::tiny), saved as a diffusers folder, and its
    4-step DDIM txt2img output for two images (seeds SEED and SEED + 1)."""
    from diffusers import DDIMScheduler

    if openai_tokenizer() is None:
        return
    unet = sd15_unet(block_out_channels=(64, 128, 192, 192), cross_attention_dim=32, sample_size=8)
    vae = sd15_vae(block_out_channels=(8, 16, 32, 32), norm_num_groups=4, sample_size=64)
    text = sd15_text(**{k: TEXT_CONFIG[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")})
    for i, model in enumerate([unet, vae, text]):
        randomize(model, 10 + i)
    # runwayml/stable-diffusion-v1-5's scheduler_config.json
    scheduler = DDIMScheduler(**SD15_SCHEDULER, clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")
    pipe = sd_pipeline(unet, vae, text, clip_tokenizer(out / "tokenizer_files"), scheduler)
    pipe.save_pretrained(out / "tiny-sd")
    # the starting noise of image i comes from seed SEED + i alone, as our pipeline draws it
    latents = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(SEED + i)) for i in range(2)])
    def run(output_type):
        with torch.no_grad():
            return pipe(
                [PROMPT] * 2,
                negative_prompt=[NEGATIVE] * 2,
                height=64,
                width=64,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                latents=latents,
                output_type=output_type,
            ).images

    reference = {"latents": latents, "final_latents": run("latent"), "images": torch.from_numpy(run("np"))}
    save_file({k: v.contiguous() for k, v in reference.items()}, str(out / "pipeline_reference.safetensors"))


def tokenize_corpus(out: Path) -> None:
    """OpenAI's tokenizer's ids of every line of the corpus."""
    import json

    tok = openai_tokenizer()
    if tok is None:
        return
    lines = (ROOT / "tests/parity/tokenizer_corpus.txt").read_text(encoding="utf-8").splitlines()
    (out / "tokens.json").write_text(json.dumps([{"text": t, "ids": tok.encode(t)} for t in lines]))


def controlnet(out: Path, unet, inputs: dict) -> None:
    """ControlNetModel.from_unet(unet) with a two-stage hint encoder (16, 32: one stride-2 stage, a hint twice the
    latent size), every parameter then randomised (the zero convolutions too, or the residuals would be 0); its
    residuals at conditioning scale 1 and in guess mode at 0.7, and the UNet's output with the first ones added."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).eval()
    randomize(net, 7)
    hint = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    sample, timestep, context = inputs["sample"], inputs["timestep"], inputs["context"]
    reference = {"hint": hint, **inputs}
    with torch.no_grad():
        for prefix, scale, guess in (("", 1.0, False), ("guess_", 0.7, True)):
            down, mid = net(sample, timestep, encoder_hidden_states=context, controlnet_cond=hint,
                            conditioning_scale=scale, guess_mode=guess, return_dict=False)
            reference.update({f"{prefix}down_{i}": d for i, d in enumerate(down)})
            reference[f"{prefix}mid"] = mid
            if not guess:
                reference["eps_controlled"] = unet(sample, timestep, encoder_hidden_states=context,
                                                   down_block_additional_residuals=down,
                                                   mid_block_additional_residual=mid).sample
    save(out, "controlnet", net, reference)
    net.save_pretrained(out / "controlnet-diffusers")  # the folder layout ControlNets for SD 1.5 are published in


def canny(out: Path) -> None:
    """cv2.Canny(image, 100, 200) of MNIST test digits and of synthetic shapes, for tests/parity.rs's Canny parity."""
    try:
        import cv2
        import numpy as np
    except ImportError:
        return
    import gzip

    root = Path(__file__).resolve().parents[2]
    raw = gzip.open(root / "data/mnist/t10k-images-idx3-ubyte.gz").read()
    digits = np.frombuffer(raw[16:], dtype=np.uint8).reshape(-1, 28, 28)[:64]
    shapes = np.zeros((4, 28, 28), dtype=np.uint8)
    shapes[0, 6:20, 8:22] = 255  # a square
    yy, xx = np.mgrid[:28, :28]
    shapes[1][(yy - 13.5) ** 2 + (xx - 13.5) ** 2 <= 64] = 255  # a disc
    shapes[2, 12, 3:25] = 255  # a line
    shapes[3] = np.clip(xx * 9 + yy * 4, 0, 255).astype(np.uint8)  # a ramp
    images = np.concatenate([digits, shapes])
    edges = np.stack([cv2.Canny(im, 100, 200) for im in images])
    save_file({"images": torch.from_numpy(images.copy()), "edges": torch.from_numpy(edges)}, str(out / "canny_reference.safetensors"))


# The LoRA of sd_files: (module, rank, alpha) per network of tiny-sd; attention, feed-forward and 1×1 projections,
# and LoCon's convolutions (3×3 resnet convs, a shortcut, the time projection, a down- and an upsampler). to_out.0 and
# out_proj keep the common alpha: diffusers 0.42.1's kohya conversion files their alphas under names PEFT never matches
# (`…processor.to_out_lora.down.weight`, `…self_attn`), so it scales them by lora_alpha/r instead of their own alpha/r,
# where kohya's scripts and the web UI use the module's own (tested in src/sd/lora.rs).
LORA_UNET = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4, 2.0),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 4, 2.0),
    ("down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0", 2, 2.0),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", 4, 8.0),
    ("up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2", 4, 2.0),
    ("down_blocks.0.attentions.0.proj_in", 4, 2.0),
    ("up_blocks.2.attentions.0.proj_out", 4, 2.0),
    ("down_blocks.0.resnets.0.conv1", 4, 2.0),
    ("up_blocks.0.resnets.0.conv_shortcut", 4, 2.0),
    ("down_blocks.1.resnets.0.time_emb_proj", 4, 2.0),
    ("down_blocks.0.downsamplers.0.conv", 2, 2.0),
    ("up_blocks.1.upsamplers.0.conv", 4, 2.0),
]
LORA_TE = [
    ("text_model.encoder.layers.0.self_attn.q_proj", 4, 2.0),
    ("text_model.encoder.layers.1.self_attn.out_proj", 2, 2.0),
    ("text_model.encoder.layers.1.mlp.fc1", 4, 2.0),
]
# multipliers of the fused LoRA (the web UI's <lora:name:te:unet>)
LORA_TE_SCALE, LORA_UNET_SCALE = 0.5, 0.8
TI_PROMPT = "a photo of <cat-toy> in tinystyle style"


def controlnet_to_original(state: dict, layers: int = 2, levels: int = 4, hint_blocks: int = 6) -> dict:
    """diffusers ControlNetModel names -> lllyasviel's cldm names (control_model.*), SD 1.x's layout: written from
    diffusers' convert_controlnet_checkpoint (the reverse direction), and checked against it by the caller."""
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    pairs = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
             ("conv_in", "input_blocks.0.0"), ("controlnet_mid_block", "middle_block_out.0"),
             ("controlnet_cond_embedding.conv_in", "input_hint_block.0"), ("mid_block.attentions.0", "middle_block.1"),
             ("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * (hint_blocks + 1)}")]
    pairs += [(f"controlnet_cond_embedding.blocks.{i}", f"input_hint_block.{2 * (i + 1)}") for i in range(hint_blocks)]
    pairs += [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0") for i in range(levels * (layers + 1))]
    pairs += [(f"mid_block.resnets.{j}.{a}", f"middle_block.{m}.{b}") for j, m in ((0, 0), (1, 2)) for a, b in res.items()]
    for i in range(levels):
        for j in range(layers):
            block = 1 + i * (layers + 1) + j
            pairs += [(f"down_blocks.{i}.resnets.{j}.{a}", f"input_blocks.{block}.0.{b}") for a, b in res.items()]
            pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{block}.1"))
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (layers + 1)}.0.op"))
    out = {}
    for key, value in state.items():
        ours = next((o + key[len(d):] for d, o in pairs if key.startswith(d + ".")), None)
        if ours is None:
            raise KeyError(f"no original name for {key}")
        out["control_model." + ours] = value
    return out


def lora_files(out: Path, pipe, g: torch.Generator, ref: dict) -> None:
    """sd_files' LoRA: the kohya file, the same as diffusers saves it (PEFT), and diffusers' outputs with it fused."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    # kohya's layout: lora_down (r, in[, k, k]), lora_up (out, r[, 1, 1]), alpha
    kohya = {}
    for model, modules, prefix in ((pipe.unet, LORA_UNET, "lora_unet_"), (pipe.text_encoder, LORA_TE, "lora_te_")):
        params = dict(model.named_parameters())
        for module, rank, alpha in modules:
            # transformers 5's CLIPTextModel has no text_model. level; kohya's names keep it
            w = params.get(module + ".weight", params.get(module.removeprefix("text_model.") + ".weight"))
            name = prefix + module.replace(".", "_")
            kohya[name + ".lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.2
            kohya[name + ".lora_up.weight"] = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.2
            kohya[name + ".alpha"] = torch.tensor(alpha)
    save_file(kohya, str(out / "lora_kohya.safetensors"))
    pipe.load_lora_weights(str(out / "lora_kohya.safetensors"), adapter_name="kohya")
    StableDiffusionPipeline.save_lora_weights(
        out / "lora-peft",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="kohya"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="kohya"),
        unet_lora_adapter_metadata=pipe.unet.peft_config["kohya"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["kohya"].to_dict(),
    )
    pipe.fuse_lora(components=["unet"], lora_scale=LORA_UNET_SCALE)
    pipe.fuse_lora(components=["text_encoder"], lora_scale=LORA_TE_SCALE)
    with torch.no_grad():
        states = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
        ref["lora_states"] = states
        ref["lora_eps"] = pipe.unet(ref["sample"], ref["timestep"], encoder_hidden_states=states).sample


def sd_files(out: Path) -> None:
    """The files SD 1.5 users download, made for tiny-sd with random values, and diffusers' outputs with them:

    lora_kohya.safetensors      a kohya-layout LoRA/LoCon (LORA_UNET, LORA_TE); lora-peft/ the same LoRA as diffusers
                                saves it (PEFT keys, alphas in the metadata)
    embeddings/                 learned_embeds.safetensors (diffusers: <cat-toy>, 2 vectors) and tinystyle.safetensors
                                (kohya: emb_params)
    controlnet-sd/              a random ControlNetModel.from_unet (SD's 16/32/96/256 hint encoder), save_pretrained;
    control_tiny_sd15.safetensors  the same as an original single file (control_model.*)
    sd_files_reference.safetensors  sample, timestep; lora_states, lora_eps (text states of PROMPT and the UNet's output
                                with the LoRA fused at LORA_TE_SCALE / LORA_UNET_SCALE); ti_states (TI_PROMPT's states);
                                hint, control_images, guess_images (StableDiffusionControlNetPipeline, 4 DDIM steps,
                                scale 0.8 for steps 1 and 2 of 0-3, then guess mode at 1.0); img2img_input, img2img_images
                                (StableDiffusionImg2ImgPipeline's defaults, strength 0.75, generator seed SEED)
    """
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    if openai_tokenizer() is None:
        return
    folder = out / "tiny-sd"

    def load():
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    g = torch.Generator().manual_seed(40)
    ref = {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([421.0])}
    try:
        lora_files(out, load(), g, ref)
    except ImportError as e:  # diffusers loads LoRAs through peft (./run.sh test installs it)
        print(f"no LoRA reference: {e}")
    # textual inversion: a 2-vector diffusers embedding and a 1-vector kohya one
    pipe = load()
    width = pipe.text_encoder.config.hidden_size
    (out / "embeddings").mkdir(exist_ok=True)
    save_file({"<cat-toy>": torch.randn(2, width, generator=g)}, str(out / "embeddings/learned_embeds.safetensors"))
    save_file({"emb_params": torch.randn(1, width, generator=g)}, str(out / "embeddings/tinystyle.safetensors"))
    pipe.load_textual_inversion(str(out / "embeddings/learned_embeds.safetensors"))
    pipe.load_textual_inversion(str(out / "embeddings/tinystyle.safetensors"), token="tinystyle")
    with torch.no_grad():
        ref["ti_states"] = pipe.encode_prompt(TI_PROMPT, "cpu", 1, False)[0]
    # ControlNet: a diffusers folder and the original single file, which diffusers' own converter must read back
    pipe = load()
    net = ControlNetModel.from_unet(pipe.unet).eval()
    randomize(net, 41)
    net.save_pretrained(out / "controlnet-sd")
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    original = controlnet_to_original(state)
    back = convert_controlnet_checkpoint(original, {"layers_per_block": 2})
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state), "the original layout"
    save_file(original, str(out / "control_tiny_sd15.safetensors"))
    control = StableDiffusionControlNetPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                                unet=pipe.unet, controlnet=net, scheduler=pipe.scheduler,
                                                safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False)
    control.set_progress_bar_config(disable=True)
    ref["hint"] = torch.rand(1, 3, 64, 64, generator=g)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(SEED))
    for name, scale, start, end, guess in (("control_images", 0.8, 0.25, 0.75, False), ("guess_images", 1.0, 0.0, 1.0, True)):
        with torch.no_grad():
            ref[name] = torch.from_numpy(control(PROMPT, negative_prompt=NEGATIVE, image=ref["hint"], height=64, width=64,
                                                 num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents,
                                                 controlnet_conditioning_scale=scale, control_guidance_start=start,
                                                 control_guidance_end=end,
                                                 guess_mode=guess, output_type="np").images)
    # img2img with diffusers' defaults: the posterior sampled with the generator, then the noise
    img2img = StableDiffusionImg2ImgPipeline(**load().components)
    img2img.set_progress_bar_config(disable=True)
    ref["img2img_input"] = torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        ref["img2img_images"] = torch.from_numpy(img2img(PROMPT, image=ref["img2img_input"], negative_prompt=NEGATIVE,
                                                         strength=0.75, num_inference_steps=STEPS,
                                                         guidance_scale=GUIDANCE,
                                                         generator=torch.Generator().manual_seed(SEED),
                                                         output_type="np").images)
    # and with the posterior's mean (sample_mode="argmax"), our Posterior::Mean
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module

    sampled = img2img_module.retrieve_latents
    img2img_module.retrieve_latents = lambda output, generator=None, sample_mode="sample": sampled(output, generator, "argmax")
    with torch.no_grad():
        ref["img2img_mean_images"] = torch.from_numpy(img2img(PROMPT, image=ref["img2img_input"], negative_prompt=NEGATIVE,
                                                              strength=0.75, num_inference_steps=STEPS,
                                                              guidance_scale=GUIDANCE,
                                                              generator=torch.Generator().manual_seed(SEED),
                                                              output_type="np").images)
    img2img_module.retrieve_latents = sampled
    save_file({k: v.contiguous() for k, v in ref.items()}, str(out / "sd_files_reference.safetensors"))


def fast_path(out: Path) -> None:
    """SD on a CPU (issue 25), for tiny-sd with random weights:

    taesd-tiny/                 a random AutoencoderTiny (16 channels, TAESD's layout), save_pretrained
    tiny-sd-inpaint/            tiny-sd with a random 9-channel UNet (SD 1.5 inpainting's layout), save_pretrained
    fast_path_reference.safetensors  taesd_x, taesd_latents (encode), taesd_z, taesd_decoded (decode);
                                lcm_images (StableDiffusionPipeline + LCMScheduler, 4 steps, w = 1.5, generator SEED),
                                lcm_taesd_images (the same decoded by taesd-tiny); inpaint_image, inpaint_mask,
                                inpaint_images (StableDiffusionInpaintPipeline, 4 DDIM steps, w = 7.5, generator SEED)
    """
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    if openai_tokenizer() is None:
        return
    g = torch.Generator().manual_seed(50)
    ref = {}
    taesd = AutoencoderTiny(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4).eval()
    randomize(taesd, 51)
    taesd.save_pretrained(out / "taesd-tiny")
    ref["taesd_x"] = torch.rand(1, 3, 64, 64, generator=g)
    ref["taesd_z"] = torch.randn(1, 4, 8, 8, generator=g) * 2
    with torch.no_grad():
        ref["taesd_latents"] = taesd.encode(ref["taesd_x"] * 2 - 1).latents
        ref["taesd_decoded"] = taesd.decode(ref["taesd_z"]).sample

    def load():
        pipe = StableDiffusionPipeline.from_pretrained(out / "tiny-sd", safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        return pipe

    for name, vae in (("lcm_images", None), ("lcm_taesd_images", taesd)):
        pipe = load()
        if vae is not None:
            pipe.vae = vae
        with torch.no_grad():
            ref[name] = torch.from_numpy(pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=4,
                                              guidance_scale=1.5, generator=torch.Generator().manual_seed(SEED),
                                              output_type="np").images)
    base = StableDiffusionPipeline.from_pretrained(out / "tiny-sd", safety_checker=None, requires_safety_checker=False)
    unet = sd15_unet(block_out_channels=(64, 128, 192, 192), cross_attention_dim=32, sample_size=8, in_channels=9)
    randomize(unet, 52)
    inpaint = StableDiffusionInpaintPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                             unet=unet, scheduler=base.scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    inpaint.set_progress_bar_config(disable=True)
    inpaint.save_pretrained(out / "tiny-sd-inpaint")
    ref["inpaint_image"] = torch.rand(1, 3, 64, 64, generator=g)
    mask = torch.zeros(1, 1, 64, 64)
    mask[:, :, 16:48, 8:40] = 1.0  # white = repaint
    ref["inpaint_mask"] = mask
    with torch.no_grad():
        ref["inpaint_images"] = torch.from_numpy(inpaint(PROMPT, image=ref["inpaint_image"], mask_image=mask,
                                                         negative_prompt=NEGATIVE, height=64, width=64,
                                                         num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                                         generator=torch.Generator().manual_seed(SEED),
                                                         output_type="np").images)
    save_file({k: v.contiguous() for k, v in ref.items()}, str(out / "fast_path_reference.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    canny(Path(sys.argv[1]))
    tokenize_corpus(Path(sys.argv[1]))
    pipeline(Path(sys.argv[1]))
    sd_files(Path(sys.argv[1]))
    fast_path(Path(sys.argv[1]))
