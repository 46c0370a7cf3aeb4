use scratch_diffusion::nn::unet::{UNet, UNetConfig};
use tch::{nn::VarStore, Device, Kind, Tensor};
fn main() {
    let a: Vec<i64> = std::env::args().skip(1).map(|s| s.parse().unwrap()).collect();
    let vs = VarStore::new(Device::Cpu);
    let mut cfg = UNetConfig::mnist();
    cfg.block_out_channels = vec![a[0], a[1], a[2]];
    cfg.attention = vec![false, a[4] == 1, true];
    cfg.layers_per_block = a[5] as usize;
    let net = UNet::new(vs.root(), cfg);
    let b = a[3];
    let x = Tensor::rand([b, 1, 28, 28], (Kind::Float, Device::Cpu));
    let t = Tensor::randint(1000, [b], (Kind::Int64, Device::Cpu));
    let mut tot = 0.0;
    for i in 0..4 {
        let s = std::time::Instant::now();
        let out2 = net.forward(&x, &t, true);
        out2.square().mean(Kind::Float).backward();
        if i > 0 { tot += s.elapsed().as_secs_f64(); }
    }
    let s = std::time::Instant::now();
    for _ in 0..3 { tch::no_grad(|| net.forward(&x, &t, false)); }
    println!("{a:?}: train step {:.3}s, fwd {:.3}s", tot / 3.0, s.elapsed().as_secs_f64() / 3.0);
}
