"""The diffusers side of `cargo run --release --bin bench_sd`: SD 1.5's networks at full size with random weights
(diffusers' UNet2DConditionModel and AutoencoderKL, transformers' CLIPTextModel, built from runwayml's configs),
timed on the same inputs as ours. Prints one JSON object.

    python tests/parity/bench_diffusers.py DTYPE THREADS REPS [--full-image STEPS] [--parts text,unet,vae|lcm]

DTYPE is f32 or bf16 (weights and inputs cast, as our bf16 path does); each timing is the median of REPS runs after
one warm-up run; --parts times only those networks (all three by default). --full-image also times one whole
512x512 StableDiffusionPipeline call (Euler a, w = 7, SD 1.5's scheduler config, the tokenizer built from data/clip's
vocabulary as make_reference.py builds it); --parts lcm times only a whole 512x512 LCM image (4 steps, w = 1, decoded
by AutoencoderTiny), alone in the process so that its peak memory is the image's.
"""
import json
import resource
import sys
import time

import torch
from make_reference import sd15_text, sd15_unet, sd15_vae


def median_time(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def full_image(unet, vae, text, steps):
    import tempfile
    from pathlib import Path

    from diffusers import EulerAncestralDiscreteScheduler
    from make_reference import SD15_SCHEDULER, clip_tokenizer, sd_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        pipe = sd_pipeline(unet, vae, text, clip_tokenizer(Path(tmp)), EulerAncestralDiscreteScheduler(**SD15_SCHEDULER))
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe("a photo of an astronaut riding a horse", num_inference_steps=steps, guidance_scale=7.0,
                 height=512, width=512, generator=torch.Generator().manual_seed(0), output_type="np")
        return time.perf_counter() - t0


def lcm_image(unet, vae, text):
    """A whole 512x512 image as LCM-LoRA users draw it: 4 LCMScheduler steps at guidance 1 (one UNet call per step),
    the text encoding, and the decode by a (random) AutoencoderTiny in place of the VAE."""
    import tempfile
    from pathlib import Path

    from diffusers import AutoencoderTiny, LCMScheduler
    from make_reference import SD15_SCHEDULER, clip_tokenizer, sd_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        taesd = AutoencoderTiny().to(unet.dtype).eval()
        pipe = sd_pipeline(unet, taesd, text, clip_tokenizer(Path(tmp)), LCMScheduler(**SD15_SCHEDULER))
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe("a photo of an astronaut riding a horse", num_inference_steps=4, guidance_scale=1.0,
                 height=512, width=512, generator=torch.Generator().manual_seed(0), output_type="np")
        return time.perf_counter() - t0


def main():
    dtype_name, threads, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    parts = sys.argv[sys.argv.index("--parts") + 1].split(",") if "--parts" in sys.argv else ["text", "unet", "vae"]
    unet, text = sd15_unet().to(dtype), sd15_text().to(dtype)
    out = {"dtype": dtype_name, "threads": threads, "torch": torch.__version__}
    if "lcm" in parts:  # alone in its process: the peak is the image's (no full VAE built)
        out["lcm_taesd_512_s"] = lcm_image(unet, None, text)
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return
    vae = sd15_vae().to(dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    latents = torch.randn(2, 4, 64, 64, generator=g).to(dtype)
    context = torch.randn(2, 77, 768, generator=g).to(dtype)
    t = torch.tensor([500, 500])
    z = torch.randn(1, 4, 64, 64, generator=g).to(dtype)
    out["parameters"] = [sum(p.numel() for p in m.parameters()) for m in (text, unet, vae)]
    with torch.no_grad():
        if "text" in parts:
            out["text_encode_s"] = median_time(lambda: text(ids), reps)
        if "unet" in parts:
            out["unet_cfg_step_s"] = median_time(lambda: unet(latents, t, encoder_hidden_states=context), reps)
        if "vae" in parts:
            out["vae_decode_512_s"] = median_time(lambda: vae.decode(z), reps)
    if "--full-image" in sys.argv:
        steps = int(sys.argv[sys.argv.index("--full-image") + 1])
        out["txt2img_512_s"] = full_image(unet, vae, text, steps)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
