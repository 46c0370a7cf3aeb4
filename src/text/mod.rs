//! The text side of text-to-image: turning a prompt into the integer ids a text encoder embeds.
//!
//! [`bpe`] is a byte-level BPE tokenizer laid out exactly as OpenAI CLIP's `simple_tokenizer.py`, so one piece of
//! code serves both lesson 06 (a tokenizer trained from scratch on MNIST captions) and lesson 09 (CLIP's own
//! 49 408-token vocabulary, loaded from `bpe_simple_vocab_16e6.txt.gz`). Here, beside it, is what any tokenizer
//! hands a model: [`Encoded`] prompts padded to a context length, stacked by [`ids_tensor`], and [`Coverage`], which
//! tells which words of a prompt a model trained on captions has never seen.
pub mod bpe;
pub mod captions;

pub use bpe::Bpe;
use tch::Tensor;

/// A prompt as a model reads it: `<|startoftext|>`, the tokens, `<|endoftext|>`, padded to `context_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Exactly `context_len` ids; the padding repeats `<|endoftext|>` as SD 1.x's tokenizer does (OpenAI's
    /// `clip.tokenize` pads with 0 instead; CLIP's causal mask makes the choice invisible to the real tokens).
    pub ids: Vec<i64>,
    /// Real tokens, start and end included: `ids[len - 1]` is the end token, whose final hidden state CLIP pools.
    pub len: usize,
    /// Whether the text had to be cut (the end token is then placed at `ids[context_len - 1]`).
    pub truncated: bool,
}

impl Encoded {
    /// The text's own tokens, without start, end and padding.
    pub fn content(&self) -> &[i64] {
        &self.ids[1..self.len - 1]
    }
}

/// Stacks encoded prompts into the (B, context_len) i64 tensor a text encoder takes.
pub fn ids_tensor(batch: &[Encoded]) -> Tensor {
    let context_len = batch.first().map_or(0, |e| e.ids.len());
    assert!(batch.iter().all(|e| e.ids.len() == context_len), "every prompt must be padded to the same length");
    let flat: Vec<i64> = batch.iter().flat_map(|e| e.ids.iter().copied()).collect();
    Tensor::from_slice(&flat).view([batch.len() as i64, context_len as i64]) // (B, context_len)
}

/// Which words of a prompt a model has seen tokens for; see [`Bpe::coverage`].
#[derive(Debug, Clone, PartialEq)]
pub struct Coverage {
    /// Each pre-tokenised word of the cleaned prompt, and whether every one of its tokens was seen in training.
    pub words: Vec<(String, bool)>,
}

impl Coverage {
    /// Fraction of words all of whose tokens were seen; 1 for an empty prompt (nothing in it is unknown).
    pub fn known_fraction(&self) -> f64 {
        if self.words.is_empty() {
            return 1.0;
        }
        self.words.iter().filter(|(_, known)| *known).count() as f64 / self.words.len() as f64
    }

    /// Whether any word is known: false means the model gets a prompt made only of embeddings it never trained.
    pub fn any_known(&self) -> bool {
        self.words.iter().any(|(_, known)| *known)
    }

    /// The words with a token never seen in training.
    pub fn unknown_words(&self) -> Vec<&str> {
        self.words.iter().filter(|(_, known)| !*known).map(|(w, _)| w.as_str()).collect()
    }

    /// A note for the user naming the unknown words, or None when every word is known.
    pub fn note(&self) -> Option<String> {
        let unknown: Vec<String> = self.unknown_words().iter().map(|w| format!("\"{w}\"")).collect();
        (!unknown.is_empty()).then(|| {
            let unknown = crate::cli::for_message(&unknown.join(", "), 80);
            format!("note: the training captions never had {unknown}; the model reads the other words")
        })
    }
}
