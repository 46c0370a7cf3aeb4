use scratch_diffusion::nn::ncsn::{Ncsn, NcsnConfig};
use tch::{nn::VarStore, Device, Kind, Tensor};
fn main() {
    let a: Vec<i64> = std::env::args().skip(1).map(|s| s.parse().unwrap()).collect();
    let vs = VarStore::new(Device::Cpu);
    let net = Ncsn::new(vs.root(), NcsnConfig { channels: [a[0], a[1], a[2]], emb_dim: 64, sigma_data: 0.5 });
    let b = a[3];
    let mut x = Tensor::rand([b, 1, 28, 28], (Kind::Float, Device::Cpu));
    if a.len() > 4 {
        x = x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
    }
    let s = Tensor::full([b], 0.5, (Kind::Float, Device::Cpu));
    let mut tot = 0.0;
    for i in 0..6 {
        let t = std::time::Instant::now();
        let out2 = net.score(&x, &s, true);
        out2.square().mean(Kind::Float).backward();
        if i > 0 {
            tot += t.elapsed().as_secs_f64();
        }
    }
    println!("{a:?}: fwd+bwd {:.3}s", tot / 5.0);
}
