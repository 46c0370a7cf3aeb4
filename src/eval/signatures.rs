//! Detectors for lesson 12's concept and style ([`crate::data::signatures`]), the measure of whether a fine-tuned
//! model learned them (fidelity) and whether they leaked into prompts that did not ask for them (drift).
//!
//! Both read the image's ink (> 0.5) and nothing learned, so they judge a sample the way they judge the training
//! images; their rates on real MNIST (the base rates a frozen model reproduces) are measured in chapter 12.
use crate::data::signatures::{dilate, erode, CROSSBAR_ROWS, INK};
use tch::{Device, Kind, Tensor};

/// The band of rows searched for a crossbar (a little wider than where the training images have it, so that a
/// model drawing it a row higher or lower still counts) and the run of ink that makes one: wider than a stem, even
/// a slanted bold one.
pub const CROSSBAR_BAND: (i64, i64) = (CROSSBAR_ROWS.0 - 2, CROSSBAR_ROWS.1 + 2);
pub const CROSSBAR_MIN_RUN: usize = 11;
/// Hollowness above this marks an outlined digit (midway between the two training sets' means, chapter 12).
pub const OUTLINED_AT: f64 = 0.35;

// ANCHOR: detectors
/// The longest horizontal run of ink in the crossbar band, per image (N, 1, H, W) -> N runs.
pub fn crossbar_runs(images: &Tensor) -> Vec<usize> {
    let (n, _, h, w) = images.size4().expect("(N, 1, H, W)");
    let (top, bottom) = (CROSSBAR_BAND.0.max(0), CROSSBAR_BAND.1.min(h - 1));
    let band = images.narrow(2, top, bottom - top + 1).gt(INK).to_device(Device::Cpu).contiguous();
    let ink: Vec<bool> = Vec::try_from(band.flatten(0, -1)).expect("bool pixels");
    let rows = (bottom - top + 1) as usize;
    (0..n as usize)
        .map(|i| {
            let mut best = 0;
            for r in 0..rows {
                let mut run = 0;
                for x in 0..w as usize {
                    run = if ink[(i * rows + r) * w as usize + x] { run + 1 } else { 0 };
                    best = best.max(run);
                }
            }
            best
        })
        .collect()
}

/// Whether each image has a crossbar: a run of at least [`CROSSBAR_MIN_RUN`] pixels of ink in the band.
pub fn has_crossbar(images: &Tensor) -> Vec<bool> {
    crossbar_runs(images).into_iter().map(|r| r >= CROSSBAR_MIN_RUN).collect()
}

/// How hollow each image's strokes are: the share of the closed shape C = (S ⊕ B ⊕ B) ⊖ B ⊖ B (5×5 closing, which
/// fills gaps up to four pixels wide) that the ink S leaves empty, |C ∖ S| / |C|. A solid stroke fills its closing
/// (only loop holes and corners count); an outline leaves its inside empty.
pub fn hollowness(images: &Tensor) -> Vec<f64> {
    let stroke = images.gt(INK).to_kind(Kind::Float); // S
    let closed = erode(&erode(&dilate(&dilate(&stroke)))); // C
    let empty = (&closed - &closed * &stroke).sum_dim_intlist([1, 2, 3].as_slice(), false, Kind::Float); // |C ∖ S|
    let area = closed.sum_dim_intlist([1, 2, 3].as_slice(), false, Kind::Float).clamp_min(1.0); // |C|
    Vec::try_from((empty / area).to_kind(Kind::Double).to_device(Device::Cpu)).expect("one score per image")
}
// ANCHOR_END: detectors

/// Whether the classifier's probabilities (N, 10) put `digit` among their two most likely classes, per image. The
/// classifier learned MNIST, where a crossbar seven is rare: it reads most real crossbar sevens as 7 and most of the
/// rest as 9 (chapter 12 gives the shares), so a crossbar seven is counted as a seven when 7 is its first or second
/// reading.
pub fn among_top_two(probabilities: &Tensor, digit: i64) -> Vec<bool> {
    let top2 = probabilities.topk(2, -1, true, true).1; // (N, 2)
    Vec::try_from(top2.eq(digit).any_dim(-1, false).to_device(Device::Cpu)).expect("one flag per image")
}

/// The share of `flags` that are true.
pub fn share(flags: &[bool]) -> f64 {
    flags.iter().filter(|&&f| f).count() as f64 / flags.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::signatures::{outlined, with_crossbar};

    #[test]
    fn the_detectors_find_what_the_transforms_make_and_not_on_plain_strokes() {
        let img = Tensor::zeros([1, 1, 28, 28], tch::kind::FLOAT_CPU);
        let _ = img.narrow(3, 12, 3).narrow(2, 4, 20).fill_(1.0); // a 3-wide vertical stroke
        assert_eq!(crossbar_runs(&img), [3]);
        assert_eq!(has_crossbar(&with_crossbar(&img)), [true]);
        let (solid, hollow) = (hollowness(&img)[0], hollowness(&outlined(&img))[0]);
        assert!(solid < 0.05 && hollow > OUTLINED_AT, "solid {solid}, outlined {hollow}");
    }
}
