//! A frozen text-conditioned UNet steered by a ControlNet, behind classifier-free guidance: the ε-model lesson 13's
//! samplers draw from, with the options Stable Diffusion UIs give a ControlNet (control weight, guess mode, the
//! window of steps where it acts).
//!
//! [ControlNet] Zhang, Rao, Agrawala 2023, arXiv:2302.05543, sec. 3.4 ("classifier-free guidance resolution
//! weighting" and guess mode: the ControlNet on the conditional branch only) and Fig. 3 (where the residuals enter).
//! [CFG] Ho & Salimans 2022, arXiv:2207.12598, eq. 6, in SD's convention ε̃ = ε_∅ + w (ε_c − ε_∅).
//! diffusers' `StableDiffusionControlNetPipeline`: `controlnet_conditioning_scale`, `guess_mode`,
//! `control_guidance_start`/`control_guidance_end` (fractions of the sampling steps).
use crate::model::{Cond, EpsModel};
use crate::nn::controlnet::{ControlNet, ControlScale};
use crate::nn::layers::channels_last;
use crate::nn::unet::{Residuals, UNet};
use crate::sampling::guidance::cfg_combine;
use tch::{Kind, Tensor};

// ANCHOR: controlled_guidance
/// One ControlNet and what it reads: its hint (batch 1 or B, C_hint, H', W') in [0, 1], its weight and guess mode,
/// and the window of steps where it acts, (start, end) in [0, 1]: step k of the N sampling steps (k = 0 first) is
/// controlled when k/N ≥ start and (k + 1)/N ≤ end (diffusers' `control_guidance_start`/`_end`).
pub struct Control<'a> {
    pub net: &'a ControlNet,
    pub hint: Tensor,
    pub scale: ControlScale,
    pub window: (f64, f64),
}

/// ε̃ = ε_∅ + w (ε_c − ε_∅) of a UNet whose skips get the summed residuals of its ControlNets (diffusers'
/// `MultiControlNetModel`) at the steps inside each one's window; in guess mode a ControlNet gives only the
/// conditional rows residuals ([ControlNet] sec. 3.4).
pub struct ControlledGuidance<'a> {
    pub unet: &'a UNet,
    pub controls: Vec<Control<'a>>,
    pub cond: Cond,
    pub uncond: Cond,
    pub guidance: f64,
    /// The timesteps the sampler visits, ascending (the respaced ones of lesson 06's DDPM sampler; SD's fractional
    /// ones of a σ grid).
    pub timesteps: Vec<f64>,
    /// The networks' dtype when it is not the sampler's f32 (SD in bf16): inputs are cast to it, channels-last, at the
    /// door, and ε̃ comes back as f32.
    pub kind: Option<Kind>,
}

impl ControlledGuidance<'_> {
    /// Whether `control` acts at timestep t (the samplers give every row the same t): diffusers' `controlnet_keep`,
    /// 1 − (k/N < start or (k + 1)/N > end) for step k of N.
    fn active(&self, control: &Control, t: &Tensor) -> bool {
        let t = t.double_value(&[0]);
        let n = self.timesteps.len();
        // its place, ascending: the nearest of the grid's timesteps (the samplers hand σ over in f32, so the t they
        // give the model can sit a hair below the grid's own, 750.99999 for 751)
        let distance = |s: f64| (s - t).abs();
        let from_top =
            (0..n).min_by(|&a, &b| distance(self.timesteps[a]).total_cmp(&distance(self.timesteps[b]))).unwrap_or(0);
        let k = (n - 1 - from_top) as f64; // the step's index in sampling order
        let kept = k / n as f64 >= control.window.0 && (k + 1.0) / n as f64 <= control.window.1;
        control.scale.conditioning_scale != 0.0 && kept
    }

    /// The residuals of every active ControlNet, summed, for the batch of 2B (∅ rows first): `(x_t, t)` and `cond` are
    /// the B conditional rows, `(x2, t2)` and `both` the whole batch; None when none acts.
    fn residuals(
        &self,
        (x_t, t): (&Tensor, &Tensor),
        (x2, t2): (&Tensor, &Tensor),
        (cond, both): (&Cond, &Cond),
        train: bool,
    ) -> Option<Residuals> {
        let b = x_t.size()[0];
        let mut sum: Option<Residuals> = None;
        for control in self.controls.iter().filter(|c| self.active(c, t)) {
            let size = control.hint.size();
            let hint = control.hint.expand([b, size[1], size[2], size[3]], false).to_kind(x_t.kind()); // (B, C_hint, H', W')
            let r = if control.scale.guess_mode {
                // guess mode: the ControlNet reads the conditional rows only; ∅'s rows get no residual
                let r = control.net.residuals(
                    x_t,
                    t,
                    (Some(&cond.context), cond.mask.as_ref()),
                    &hint,
                    control.scale,
                    train,
                );
                let pad = |d: &Tensor| Tensor::cat(&[d.zeros_like(), d.shallow_clone()], 0); // (2B, ...)
                Residuals { down: r.down.iter().map(pad).collect(), mid: pad(&r.mid) }
            } else {
                let hint2 = Tensor::cat(&[&hint, &hint], 0); // (2B, C_hint, H', W')
                control.net.residuals(x2, t2, (Some(&both.context), both.mask.as_ref()), &hint2, control.scale, train)
            };
            sum = Some(match sum {
                None => r,
                Some(s) => {
                    Residuals { down: s.down.iter().zip(&r.down).map(|(a, b)| a + b).collect(), mid: s.mid + r.mid }
                }
            });
        }
        sum
    }
}

impl EpsModel for ControlledGuidance<'_> {
    fn eps(&self, x_t: &Tensor, t: &Tensor, train: bool) -> Tensor {
        let b = x_t.size()[0];
        let x_in = match self.kind {
            Some(kind) => channels_last(&x_t.to_kind(kind)), // (B, C, H, W) in NHWC memory, as the conv weights
            None => x_t.shallow_clone(),
        };
        let cast = |c: Cond| match self.kind {
            Some(kind) => Cond { context: c.context.to_kind(kind), ..c },
            None => c,
        };
        let (cond, uncond) = (cast(self.cond.for_batch(b)), cast(self.uncond.for_batch(b)));
        // both branches in one batch of 2B: rows 0..B unconditional, B..2B conditional
        let (x2, t2) = (Tensor::cat(&[&x_in, &x_in], 0), Tensor::cat(&[t, t], 0)); // (2B, C, H, W), (2B,)
        let both = Cond::cat(&[&uncond, &cond]); // (2B, L, D) and the masks (2B, L)
        let ctx = (Some(&both.context), both.mask.as_ref());
        let eps = match self.residuals((&x_in, t), (&x2, &t2), (&cond, &both), train) {
            None => self.unet.forward_cond(&x2, &t2, ctx.0, ctx.1, train),
            Some(residuals) => self.unet.forward_controlled(&x2, &t2, ctx, &residuals, train),
        };
        // (B, C, H, W) each
        let eps = eps.to_kind(x_t.kind()).chunk(2, 0);
        cfg_combine(&eps[0], &eps[1], self.guidance) // [CFG] eq. 6: ε̃ = ε_∅ + w (ε_c − ε_∅)
    }
}
// ANCHOR_END: controlled_guidance

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::controlnet::{copy_unet_encoder, ControlNetConfig};
    use crate::nn::unet::UNetConfig;
    use crate::sampling::guidance::ClassifierFreeGuidance;
    use tch::{nn::VarStore, Device, Kind};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Outside its window, or at control weight 0, the controlled model is plain CFG bit for bit; inside it a trained
    /// ControlNet changes ε̃; guess mode leaves ε_∅ alone and controls ε_c only.
    #[test]
    fn the_window_the_weight_and_guess_mode_act_as_the_uis_say() {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        tch::manual_seed(2);
        let (uvs, cvs) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
        let unet = UNet::new(uvs.root(), UNetConfig::tiny_cond(6));
        let control = ControlNet::new(cvs.root(), ControlNetConfig::pixel_space(UNetConfig::tiny_cond(6), 1));
        copy_unet_encoder(&cvs, &uvs).unwrap();
        tch::no_grad(|| {
            for (_, mut v) in cvs.variables() {
                v.copy_(&(v.randn_like() * 0.1)); // a "trained" ControlNet
            }
        });
        let opts = (Kind::Float, Device::Cpu);
        let (c, u) = (Tensor::randn([1, 3, 6], opts), Tensor::randn([1, 3, 6], opts));
        let x = Tensor::randn([2, 1, 16, 16], opts);
        let hint = Tensor::rand([1, 1, 16, 16], opts);
        let model = |scale: f64, guess_mode: bool, window: (f64, f64)| ControlledGuidance {
            unet: &unet,
            controls: vec![Control {
                net: &control,
                hint: hint.copy(),
                scale: ControlScale { conditioning_scale: scale, guess_mode },
                window,
            }],
            cond: Cond::new(c.copy()),
            uncond: Cond::new(u.copy()),
            guidance: 3.0,
            timesteps: (0..1000).map(f64::from).collect(),
            kind: None,
        };
        let plain = ClassifierFreeGuidance::new(&unet, c.copy(), u.copy(), 3.0);
        // diffusers' window over 5 steps with end 0.5: steps 0 and 1 controlled (2/5 ≤ 0.5 < 3/5), then not
        let grid = vec![0.0, 250.0, 500.0, 750.0, 999.0];
        // a timestep a hair off the grid (σ rounded to f32 on its way to the model) is still its step
        let near = ControlledGuidance { timesteps: grid.clone(), ..model(1.0, false, (0.2, 0.4)) }; // step 1 alone
        let at_near = |t: f64| near.active(&near.controls[0], &Tensor::from_slice(&[t]));
        assert_eq!(
            [998.99999, 749.99999, 499.99999, 250.00001, 0.00001].map(at_near),
            [false, true, false, false, false]
        );
        let five = ControlledGuidance { timesteps: grid.clone(), ..model(1.0, false, (0.0, 0.5)) };
        let active: Vec<bool> = [999i64, 750, 500, 250, 0]
            .iter()
            .map(|&t| five.active(&five.controls[0], &Tensor::from_slice(&[t])))
            .collect();
        assert_eq!(active, [true, true, false, false, false]);
        let none = ControlledGuidance { timesteps: grid, ..model(1.0, false, (0.4, 0.4)) };
        let at = |t: i64| none.active(&none.controls[0], &Tensor::from_slice(&[t]));
        assert!([999i64, 750, 500, 250, 0].iter().all(|&t| !at(t)), "start = end");
        let early = Tensor::from_slice(&[999i64, 999]); // progress 0
        let late = Tensor::from_slice(&[0i64, 0]); // progress 1
        let plain_early = plain.eps(&x, &early, false);
        assert!(model(0.0, false, (0.0, 1.0)).eps(&x, &early, false).equal(&plain_early), "weight 0 is plain CFG");
        assert!(model(1.0, false, (0.5, 1.0)).eps(&x, &early, false).equal(&plain_early), "before the window");
        assert!(model(1.0, false, (0.0, 0.5)).eps(&x, &late, false).equal(&plain.eps(&x, &late, false)), "after it");
        assert!(max_diff(&model(1.0, false, (0.0, 1.0)).eps(&x, &early, false), &plain_early) > 1e-4, "inside it");
        // guess mode: ε_∅ without residuals, ε_c with them
        let scale = ControlScale { conditioning_scale: 1.0, guess_mode: true };
        let (cb, ub) = (c.expand([2, 3, 6], false), u.expand([2, 3, 6], false));
        let r = control.residuals(&x, &early, (Some(&cb), None), &hint.expand([2, 1, 16, 16], false), scale, false);
        let eps_c = unet.forward_controlled(&x, &early, (Some(&cb), None), &r, false);
        let eps_u = unet.forward_cond(&x, &early, Some(&ub), None, false);
        let want = &eps_u + (&eps_c - &eps_u) * 3.0;
        let got = model(1.0, true, (0.0, 1.0)).eps(&x, &early, false);
        assert!(max_diff(&got, &want) < 1e-4 * want.abs().max().double_value(&[]), "{}", max_diff(&got, &want));
        tch::set_num_threads(threads);
    }
}
