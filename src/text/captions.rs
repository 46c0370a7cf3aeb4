//! Captioned MNIST as a text-to-image data set: every image measured, captioned K times from its digit and its
//! attributes ([`crate::data::captions`]), and each caption tokenised to a fixed context length.
use crate::data::captions::{caption_corpus, captions_for, stroke_stats, AttributeBins, Attributes, CaptionStyle};
use crate::text::{Bpe, Encoded};
use anyhow::{ensure, Result};
use rand::{rngs::StdRng, SeedableRng};
use std::collections::HashMap;
use tch::Tensor;

/// Tokens a prompt may have, start and end included. The longest fixed caption ("an image of the digit 1 in a thin
/// pen, leaning to the right and drawn large") is 20 tokens; a varied one has at most
/// [`crate::data::captions::MAX_PIECES`] pieces, counting a distractor word as one piece per letter (a BPE token
/// has at least one byte), and 40 leaves room for a few frequent words split in two. (SD 1.x: 77,
/// [`crate::text::bpe::CLIP_CONTEXT_LEN`].) Pipelines save the length they were trained with: the first ones read 24.
pub const CONTEXT_LEN: usize = 40;
/// The tokenizer learns from this many random captions (plus every evaluation prompt), with at most
/// `BPE_MAX_MERGES` merges: it stops earlier (about 110 merges), once no pair of symbols occurs twice.
pub const BPE_CORPUS: usize = 20_000;
pub const BPE_MAX_MERGES: usize = 1000;

/// K tokenised captions per image: `ids` (N, K, L) i64 and `lens` (N, K) i64, the real tokens of each (start and end
/// included). The trainer slices both with the images' rows, so every image keeps its own captions.
#[derive(Debug)]
pub struct CaptionIds {
    pub ids: Tensor,
    pub lens: Tensor,
}

impl CaptionIds {
    /// Tokenises `captions`, K per image (image i's are `captions[i]`), to `context_len` tokens. A caption that does
    /// not fit is an error (the text encoder would never see its end). Captions repeat a lot ("7", "seven"), so each
    /// distinct text is encoded once.
    pub fn tokenize(bpe: &Bpe, captions: &[Vec<String>], context_len: usize) -> Result<Self> {
        let k = captions.first().map_or(0, Vec::len);
        let same = captions.iter().all(|c| c.len() == k);
        ensure!(k > 0 && same, "every image needs the same number (≥ 1) of captions");
        let mut cache: HashMap<&str, Encoded> = HashMap::new();
        let (mut ids, mut lens) = (Vec::new(), Vec::new());
        for text in captions.iter().flatten() {
            let e = cache.entry(text.as_str()).or_insert_with(|| bpe.encode_padded(text, context_len));
            ensure!(!e.truncated, "caption {text:?} is longer than {context_len} tokens: raise the context length");
            ids.extend_from_slice(&e.ids);
            lens.push(e.len as i64);
        }
        let (n, k) = (captions.len() as i64, k as i64);
        Ok(Self {
            ids: Tensor::from_slice(&ids).view([n, k, context_len as i64]), // (N, K, L)
            lens: Tensor::from_slice(&lens).view([n, k]),                   // (N, K)
        })
    }

    /// Every token id the captions use (start and end included), sorted.
    pub fn seen_tokens(&self) -> Vec<i64> {
        let mut seen = Vec::<i64>::try_from(self.ids.flatten(0, -1)).expect("i64 ids");
        seen.sort_unstable();
        seen.dedup();
        seen
    }
}

/// A captioned image set: the attribute bins its captions were written with, the tokenizer and the token ids.
pub struct CaptionedImages {
    pub bins: AttributeBins,
    pub tokenizer: Bpe,
    pub captions: CaptionIds,
    /// The first image's captions, for the log.
    pub example: Vec<String>,
}

// ANCHOR: caption_images
/// Captions for images (N, 1, H, W) in [0, 1] with digit `labels` (N,): measures every image ([`stroke_stats`]),
/// fits the attribute terciles on them, draws `k` captions per image in `style` from a generator seeded with `seed`,
/// trains the BPE tokenizer on [`BPE_CORPUS`] random captions and tokenises every caption to [`CONTEXT_LEN`].
pub fn caption_images(
    images: &Tensor,
    labels: &Tensor,
    (k, style): (usize, CaptionStyle),
    seed: u64,
) -> Result<CaptionedImages> {
    let tokenizer = Bpe::train(&caption_corpus(style, BPE_CORPUS, seed), BPE_MAX_MERGES);
    caption_images_with(images, labels, (k, style), seed, tokenizer)
}
// ANCHOR_END: caption_images

/// [`caption_images`] with a given tokenizer (lesson 08 reuses lesson 06's tokenizer and text encoder): the same
/// captions for the same images and seed.
pub fn caption_images_with(
    images: &Tensor,
    labels: &Tensor,
    (k, style): (usize, CaptionStyle),
    seed: u64,
    tokenizer: Bpe,
) -> Result<CaptionedImages> {
    let labels = Vec::<i64>::try_from(labels)?;
    let stats = stroke_stats(images)?;
    let bins = AttributeBins::fit(&stats, &labels)?;
    let attributes: Vec<Attributes> = stats.iter().zip(&labels).map(|(s, &d)| bins.attributes(s, d)).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let drawn: Vec<Vec<String>> = (0..k).map(|_| captions_for(style, &labels, &attributes, &mut rng)).collect(); // k × N
    let mut per_image: Vec<Vec<String>> =
        (0..labels.len()).map(|i| drawn.iter().map(|c| c[i].clone()).collect()).collect();
    let captions = CaptionIds::tokenize(&tokenizer, &per_image, CONTEXT_LEN)?; // ids (N, k, L), lens (N, k)
    Ok(CaptionedImages { bins, tokenizer, captions, example: per_image.swap_remove(0) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every varied caption fits the context: a tokenizer trained as the lessons train it, then 100 000 captions
    /// from another seed, none cut (the bound of [`CONTEXT_LEN`]'s doc).
    #[test]
    fn varied_captions_fit_the_context() {
        let tokenizer = Bpe::train(&caption_corpus(CaptionStyle::Varied, BPE_CORPUS, 0), BPE_MAX_MERGES);
        let longest = caption_corpus(CaptionStyle::Varied, 100_000, 1)
            .iter()
            .map(|c| tokenizer.encode(c).len() + 2)
            .max()
            .expect("captions");
        assert!(longest <= CONTEXT_LEN, "a caption of {longest} tokens does not fit {CONTEXT_LEN}");
    }
}
