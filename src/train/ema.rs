//! Exponential moving average of the weights: samples from the averaged weights are smoother and better than from
//! the last iterate, most of all after short training (as in [DDPM] sec. 4 and every diffusion codebase since).
//!
//! [DDPM] Ho, Jain, Abbeel 2020, arXiv:2006.11239, appendix B: EMA decay 0.9999.
//! Update: θ̄ ← β θ̄ + (1 − β) θ, with the warm-up β_t = min(β, (1 + t)/(10 + t)) of TensorFlow's
//! `ExponentialMovingAverage(num_updates=t)`, so early averages are not dominated by the random initialisation.
use std::collections::BTreeMap;
use tch::nn::VarStore;
use tch::Tensor;

pub struct Ema {
    pub decay: f64,
    shadow: BTreeMap<String, Tensor>,
    updates: usize,
}

impl Ema {
    /// Starts the average at the current weights of `vs`.
    pub fn new(vs: &VarStore, decay: f64) -> Self {
        let shadow = vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect();
        Self { decay, shadow, updates: 0 }
    }

    /// Rebuilds an average from saved state (a checkpoint): the averaged weights of `average` and the number of updates
    /// made so far, so the warm-up continues where it stopped.
    pub fn from_state(average: &VarStore, decay: f64, updates: usize) -> Self {
        Self { updates, ..Self::new(average, decay) }
    }

    /// Updates made so far.
    pub fn updates(&self) -> usize {
        self.updates
    }

    /// The decay used at the next update: min(β, (1 + t)/(10 + t)).
    pub fn current_decay(&self) -> f64 {
        self.decay.min((1.0 + self.updates as f64) / (10.0 + self.updates as f64))
    }

    /// θ̄ ← β_t θ̄ + (1 − β_t) θ for every variable.
    pub fn update(&mut self, vs: &VarStore) {
        let beta = self.current_decay();
        tch::no_grad(|| {
            for (name, var) in vs.variables() {
                let avg = self.shadow.get_mut(&name).expect("EMA made from this VarStore");
                let _ = avg.g_mul_scalar_(beta).g_add_(&(var * (1.0 - beta)));
            }
        });
        self.updates += 1;
    }

    /// Copies the averaged weights into `vs` (for sampling and saving).
    pub fn copy_to(&self, vs: &mut VarStore) {
        tch::no_grad(|| {
            for (name, mut var) in vs.variables() {
                var.copy_(&self.shadow[&name]);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device, Kind};

    #[test]
    fn ema_follows_the_update_formula_with_warm_up() {
        let mut vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[2], nn::Init::Const(0.0));
        let mut ema = Ema::new(&vs, 0.9);
        let mut expected = 0.0;
        for t in 0..50 {
            let _ = tch::no_grad(|| w.shallow_clone().fill_(1.0 + t as f64));
            let beta = 0.9f64.min((1.0 + t as f64) / (10.0 + t as f64));
            assert!((ema.current_decay() - beta).abs() < 1e-12);
            ema.update(&vs);
            expected = beta * expected + (1.0 - beta) * (1.0 + t as f64);
        }
        ema.copy_to(&mut vs);
        let got = vs.variables()["w"].mean(Kind::Double).double_value(&[]);
        assert!((got - expected).abs() < 1e-4, "{got} vs {expected}");
    }
}
