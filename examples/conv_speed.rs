use tch::{Device, Kind, Tensor};
fn t(name: &str, f: impl Fn() -> Tensor) {
    f();
    let s = std::time::Instant::now();
    for _ in 0..5 {
        f();
    }
    println!("{name}: {:.4}s", s.elapsed().as_secs_f64() / 5.0);
}
fn main() {
    for (kind, cl) in [(Kind::Float, false), (Kind::BFloat16, false), (Kind::Float, true), (Kind::BFloat16, true)] {
        let mut x = Tensor::randn([64, 32, 28, 28], (kind, Device::Cpu));
        let mut w = Tensor::randn([32, 32, 3, 3], (kind, Device::Cpu));
        if cl {
            x = x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
            w = w.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
        }
        let x = x.set_requires_grad(true);
        t(&format!("{kind:?} cl={cl} conv fwd"), || x.conv2d(&w, None::<Tensor>, [1], [1], [1], 1));
        t(&format!("{kind:?} cl={cl} conv fwd+bwd"), || {
            let y = x.conv2d(&w, None::<Tensor>, [1], [1], [1], 1);
            y.sum(Kind::Float).backward();
            y
        });
        t(&format!("{kind:?} cl={cl} groupnorm fwd+bwd"), || {
            let y = x.group_norm(8, None::<Tensor>, None::<Tensor>, 1e-5, false);
            y.sum(Kind::Float).backward();
            y
        });
    }
}
