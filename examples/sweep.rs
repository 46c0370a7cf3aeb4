use scratch_diffusion::nn::ncsn::{Ncsn, NcsnConfig};
use scratch_diffusion::sampling::langevin::annealed_langevin;
use scratch_diffusion::{diffusion::ladder, plot, train::checkpoint};
use tch::{nn::VarStore, Device, Kind, Tensor};
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let mut vs = VarStore::new(Device::Cpu);
    let net = Ncsn::new(vs.root(), NcsnConfig::mnist());
    checkpoint::load(&mut vs, std::path::Path::new(&a[1])).unwrap();
    let sigmas = ladder::geometric(1.0, 0.01, 10);
    for e in a[2].split(',') {
        let eps: f64 = e.parse().unwrap();
        let t: usize = a[3].parse().unwrap();
        tch::manual_seed(0);
        let score = |x: &Tensor, sigma: f64| { let s = Tensor::full([x.size()[0]], sigma, (Kind::Float, Device::Cpu)); tch::no_grad(|| net.score(x, &s, false)) };
        let x = annealed_langevin(score, Tensor::rand([36, 1, 28, 28], (Kind::Float, Device::Cpu)), &sigmas, eps, t, true, &mut |_| {});
        println!("eps {eps}: mean {:.3}", x.clamp(0.0, 1.0).mean(Kind::Float).double_value(&[]));
        plot::image_grid(std::path::Path::new(&format!("/tmp/sweep_{e}_{t}.png")), &format!("eps {e} T {t}"), &x.clamp(0.0, 1.0), 6, 2, &[]).unwrap();
    }
}
