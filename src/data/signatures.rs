//! What lesson 12 teaches a trained model, made from MNIST with a signature a detector can measure
//! ([`crate::eval::signatures`]): a *concept* (a seven with a crossbar through its stem, the European way of writing
//! it) and a *style* (outlined strokes: each stroke drawn as its own outline, hollow inside).
//!
//! Both are plain image operations on digits in [0, 1], (N, 1, H, W), so that the training sets are as small as the
//! ones people fine-tune on (5–50 images) and any number of them can be made to check the detectors.
use tch::{Kind, Tensor};

/// Ink above this value counts as stroke for the morphology (the captions' stroke measure uses the same 0.5).
pub const INK: f64 = 0.5;
/// The crossbar: its rows (inclusive, top to bottom) and its half-width in pixels, for 28×28 digits.
pub const CROSSBAR_ROWS: (i64, i64) = (14, 15);
pub const CROSSBAR_HALF_WIDTH: i64 = 6;

/// 3×3 dilation of a 0/1 map (B, 1, H, W): a pixel is set if any neighbour is (max-pooling, stride 1).
pub fn dilate(mask: &Tensor) -> Tensor {
    mask.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false)
}

/// 3×3 erosion: the complement of the dilated complement.
pub fn erode(mask: &Tensor) -> Tensor {
    1.0 - dilate(&(1.0 - mask))
}

// ANCHOR: outline
/// The style: strokes as outlines. The stroke S (ink > 0.5) is thickened by one pixel, D = S ⊕ 3×3, and only D's
/// border is kept, D − (D ⊖ 3×3): a one-pixel line around where the stroke was, hollow inside. (N, 1, H, W) in [0, 1].
pub fn outlined(images: &Tensor) -> Tensor {
    let stroke = images.gt(INK).to_kind(Kind::Float); // S
    let thick = dilate(&stroke); // D = S ⊕ B
    &thick - erode(&thick) // D − (D ⊖ B): the border of D
}
// ANCHOR_END: outline

// ANCHOR: crossbar
/// The concept: a seven with a crossbar. A horizontal bar `CROSSBAR_ROWS` high and 2·`CROSSBAR_HALF_WIDTH`+1 wide is
/// drawn across the stem, centred on the stem's ink in those rows (the centre of the image if they have none).
pub fn with_crossbar(sevens: &Tensor) -> Tensor {
    let (n, _, _, w) = sevens.size4().expect("(N, 1, H, W)");
    let (top, bottom) = CROSSBAR_ROWS;
    let rows = sevens.narrow(2, top, bottom - top + 1).sum_dim_intlist([1, 2].as_slice(), false, Kind::Float); // (N, W)
    let xs = Tensor::arange(w, (Kind::Float, sevens.device())); // (W,)
    let mass = rows.sum_dim_intlist([1].as_slice(), false, Kind::Float); // (N,)
    let centre = (&rows * &xs).sum_dim_intlist([1].as_slice(), false, Kind::Float) / mass.clamp_min(1e-6); // (N,)
    let centre = centre.where_self(&mass.gt(0.5), &Tensor::full([n], (w / 2) as f64, (Kind::Float, sevens.device())));
    let near = (xs.unsqueeze(0) - centre.round().unsqueeze(1)).abs().le(CROSSBAR_HALF_WIDTH as f64); // (N, W)
    let ys = Tensor::arange(sevens.size()[2], (Kind::Int64, sevens.device()));
    let in_rows = ys.ge(top).logical_and(&ys.le(bottom)); // (H,)
    let bar = near.view([n, 1, 1, w]).logical_and(&in_rows.view([1, 1, -1, 1])).to_kind(Kind::Float); // (N, 1, H, W)
    sevens.maximum(&bar)
}
// ANCHOR_END: crossbar

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outline_is_the_border_of_the_thickened_stroke() {
        // a 3-pixel-wide vertical stroke: thickened to 5 wide, its border is 1 pixel on each side, hollow inside
        let img = Tensor::zeros([1, 1, 12, 12], tch::kind::FLOAT_CPU);
        let _ = img.narrow(3, 4, 3).narrow(2, 2, 8).fill_(1.0);
        let o = outlined(&img);
        let row: Vec<f32> = Vec::try_from(o.get(0).get(0).get(6)).unwrap();
        assert_eq!(row, [0., 0., 0., 1., 0., 0., 0., 1., 0., 0., 0., 0.]);
        assert!(o.max().double_value(&[]) == 1.0 && o.min().double_value(&[]) == 0.0);
    }

    #[test]
    fn the_crossbar_crosses_the_stem_where_it_is() {
        let img = Tensor::zeros([2, 1, 28, 28], tch::kind::FLOAT_CPU);
        let _ = img.get(0).narrow(2, 18, 3).fill_(1.0); // a vertical stem at x = 18, 19, 20
        let barred = with_crossbar(&img);
        let (top, bottom) = CROSSBAR_ROWS;
        for y in 0..28 {
            let row: Vec<f32> = Vec::try_from(barred.get(0).get(0).get(y)).unwrap();
            let set: Vec<usize> = (0..28).filter(|&x| row[x] > 0.5).collect();
            if (top..=bottom).contains(&y) {
                assert_eq!(set, (13..=25).collect::<Vec<_>>(), "row {y}: centred on the stem");
            } else {
                assert_eq!(set, [18, 19, 20], "row {y}");
            }
        }
        // a blank image gets its bar in the middle
        let blank: Vec<f32> = Vec::try_from(barred.get(1).get(0).get(top)).unwrap();
        assert_eq!((0..28).filter(|&x| blank[x] > 0.5).collect::<Vec<_>>(), (8..=20).collect::<Vec<_>>());
    }
}
