//! How well samples follow a spatial hint (lesson 13): for an edge hint, a dilation-based F1 of their edge pixels
//! against the hint's — a pixel counts as matched when the other map has an edge within Chebyshev distance r (one
//! pixel here, at MNIST's scale), the same Canny on both sides; for a mask hint, the intersection over union of the
//! sample's grown ink and the mask.
//!
//! [BSDS] Martin, Fowlkes, Malik 2004, "Learning to Detect Natural Image Boundaries Using Local Brightness, Color,
//! and Texture Cues", IEEE TPAMI 26(5), sec. 5: boundary precision and recall with a distance tolerance and
//! F = 2PR/(P + R). BSDS matches pixels one to one within a Euclidean radius; the dilation here is simpler and a
//! little more lenient (a predicted pixel may match a target pixel another one also matched).
use tch::{Kind, Tensor};

/// Edge maps (N, 1, H, W) of 0/1 grown by `tolerance` pixels in every direction (a (2r + 1)² max-pool): the pixels
/// within Chebyshev distance r of an edge.
fn near(edges: &Tensor, tolerance: i64) -> Tensor {
    let k = 2 * tolerance + 1;
    edges.max_pool2d([k, k], [1, 1], [tolerance, tolerance], [1, 1], false)
}

// ANCHOR: edge_f1
/// Per-image F1 of `predicted` against `target` edge maps (N, 1, H, W) of 0/1 with a tolerance of `tolerance` pixels
/// (module docs; lesson 13 uses 1, and 0 for the strict version): precision = share of predicted edge pixels within the
/// tolerance of a target edge, recall = share of target edge pixels within it of a predicted edge,
/// F1 = 2PR/(P + R); 1 when both maps are empty, 0 when one is. (N,) f64.
pub fn edge_f1(predicted: &Tensor, target: &Tensor, tolerance: i64) -> Tensor {
    let (p, t) = (predicted.to_kind(Kind::Double), target.to_kind(Kind::Double));
    let sum = |x: &Tensor| x.sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Double); // (N,)
    let (n_p, n_t) = (sum(&p), sum(&t));
    let precision = sum(&(&p * near(&t, tolerance))) / n_p.clamp_min(1.0); // (N,)
    let recall = sum(&(&t * near(&p, tolerance))) / n_t.clamp_min(1.0);
    let f1 = (&precision * &recall * 2.0) / (&precision + &recall).clamp_min(1e-12);
    let both_empty = n_p.eq(0.0).logical_and(&n_t.eq(0.0));
    f1.masked_fill(&both_empty, 1.0)
}
// ANCHOR_END: edge_f1

/// Per-image intersection over union of two masks (N, 1, H, W) of 0/1: |a ∩ b| / |a ∪ b|, 1 when both are empty.
/// (N,) f64.
pub fn mask_iou(a: &Tensor, b: &Tensor) -> Tensor {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let sum = |x: &Tensor| x.sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Double); // (N,)
    let (inter, union) = (sum(&(&a * &b)), sum(&a.maximum(&b)));
    (&inter / union.clamp_min(1.0)).masked_fill(&union.eq(0.0), 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn map(points: &[(i64, i64)]) -> Tensor {
        let m = Tensor::zeros([1, 1, 8, 8], (Kind::Float, Device::Cpu));
        for &(y, x) in points {
            let _ = m.get(0).get(0).get(y).get(x).fill_(1.0);
        }
        m
    }

    #[test]
    fn f1_counts_matches_within_one_pixel() {
        let target = map(&[(2, 2), (2, 3), (2, 4), (2, 5)]);
        let f1 = |p: &Tensor, tol: i64| edge_f1(p, &target, tol).double_value(&[0]);
        assert_eq!(f1(&target, 1), 1.0);
        // shifted down by one pixel: all matched with the tolerance, none without
        let shifted = map(&[(3, 2), (3, 3), (3, 4), (3, 5)]);
        assert_eq!((f1(&shifted, 1), f1(&shifted, 0)), (1.0, 0.0));
        // shifted by two: nothing matches
        assert_eq!(f1(&map(&[(4, 2), (4, 3), (4, 4), (4, 5)]), 1), 0.0);
        // one pixel, matching two of the four within a pixel: P = 1, R = 1/2, F1 = 2/3
        let half = f1(&map(&[(2, 2)]), 1);
        assert!((half - 2.0 / 3.0).abs() < 1e-12, "{half}");
        assert_eq!(edge_f1(&map(&[]), &map(&[]), 1).double_value(&[0]), 1.0);
        assert_eq!(f1(&map(&[]), 1), 0.0);
        // masks: 2 shared pixels of 6 in the union
        let iou = mask_iou(&map(&[(2, 2), (2, 3), (2, 4), (2, 5)]), &map(&[(2, 4), (2, 5), (2, 6), (2, 7)]));
        assert!((iou.double_value(&[0]) - 2.0 / 6.0).abs() < 1e-12);
        assert_eq!(mask_iou(&map(&[]), &map(&[])).double_value(&[0]), 1.0);
    }
}
