//! The text half of a text-to-image pipeline, shared by lesson 06 (pixels) and lesson 08 (latents): the tokenizer,
//! the frozen text encoder and the tokens its training captions used. It checks a prompt before any work and turns
//! it into the context τ(y) the UNet cross-attends to (diffusers: the pipeline's `tokenizer` + `text_encoder` and
//! its `encode_prompt`).
use crate::checkpoint;
use crate::data::captions::digits_named;
use crate::model::Cond;
use crate::nn::text_encoder::{TextEncoder, TextEncoderConfig};
use crate::nn::text_unet::{encode_context, lens_to_mask};
use crate::sd::embeddings::{Embeddings, Piece};
use crate::text::bpe::{END_OF_TEXT, END_OF_WORD, START_OF_TEXT};
use crate::text::{Bpe, Coverage, Encoded};
use anyhow::{ensure, Context, Result};
use std::collections::HashSet;
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// Why a pipeline will not draw a prompt ([`PromptEncoder::check_prompt`]): graders count such a prompt as missed
/// instead of stopping.
#[derive(Debug)]
pub struct PromptRefused(pub String);

impl std::fmt::Display for PromptRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PromptRefused {}

/// The conditionings of the prompts and of what guidance pushes away from (the empty prompt or a negative one).
pub type CondPair = (Cond, Cond);

/// Tokenizer + frozen text encoder, saved as `merges.txt` and `text_encoder.safetensors` (+ its JSON config).
pub struct PromptEncoder {
    pub tokenizer: Bpe,
    pub text_encoder: TextEncoder,
    /// Tokens per prompt, start and end included (≤ the text encoder's max_position_embeddings).
    pub context_len: usize,
    /// Textual-inversion embeddings its prompts may name (lesson 12): new words read from their own vectors.
    pub embeddings: Embeddings,
    seen: HashSet<i64>,
    text_vs: VarStore,
}

impl PromptEncoder {
    /// Rebuilds the text encoder on its own frozen VarStore, under `text_model.` as in CLIP checkpoints, with the
    /// weights of `text_vs` (a [`crate::nn::clip::MiniClip`]'s VarStore works: the names match). `seen_tokens`: every
    /// token id of the training captions.
    pub fn new(
        tokenizer: Bpe,
        text_config: TextEncoderConfig,
        text_vs: &VarStore,
        context_len: usize,
        seen_tokens: &[i64],
        device: Device,
    ) -> Result<Self> {
        let mut own = VarStore::new(device);
        let text_encoder = TextEncoder::new(own.root() / "text_model", text_config);
        own.copy(text_vs).context("the text encoder's weights: text_vs must hold text_model.* of the same shapes")?;
        Self::assemble(tokenizer, own, text_encoder, context_len, seen_tokens)
    }

    fn assemble(
        tokenizer: Bpe,
        mut text_vs: VarStore,
        text_encoder: TextEncoder,
        context_len: usize,
        seen_tokens: &[i64],
    ) -> Result<Self> {
        let text = &text_encoder.config;
        ensure!(
            context_len as i64 <= text.max_position_embeddings && context_len >= 2,
            "context_len {context_len} must lie in 2..={} (the text encoder's positions)",
            text.max_position_embeddings
        );
        ensure!(tokenizer.vocab_size() as i64 == text.vocab_size, "the tokenizer and text encoder vocabularies differ");
        text_vs.freeze();
        let seen = seen_tokens.iter().copied().collect();
        Ok(Self { tokenizer, text_encoder, context_len, embeddings: Embeddings::default(), seen, text_vs })
    }

    /// Width D of the token states (the UNet's cross_attention_dim).
    pub fn hidden_size(&self) -> i64 {
        self.text_encoder.config.hidden_size
    }

    pub fn device(&self) -> Device {
        self.text_vs.device()
    }

    /// The text encoder's (frozen) VarStore, under `text_model.` (what a LoRA's `lora_te_` modules change).
    pub fn text_vs(&self) -> &VarStore {
        &self.text_vs
    }

    /// `prompt` as the vocabulary check reads it (the text around the names of [`Self::embeddings`], which lesson 12's
    /// textual inversion adds) and its length in tokens, each use of an embedding counting its vectors.
    fn read_words(&self, prompt: &str) -> Result<(String, usize, bool)> {
        if self.embeddings.is_empty() {
            return Ok((prompt.to_string(), self.tokenizer.encode(prompt).len(), false));
        }
        let (mut words, mut tokens, mut embedded) = (Vec::new(), 0, false);
        for piece in self.embeddings.pieces(prompt)? {
            match piece {
                Piece::Text(text) => {
                    tokens += self.tokenizer.encode(&text).len();
                    words.push(text);
                }
                Piece::Embedding(i) => {
                    tokens += self.embeddings.list[i].vectors.size()[0] as usize;
                    embedded = true;
                }
            }
        }
        Ok((words.join(" "), tokens, embedded))
    }

    // ANCHOR: check_prompt
    /// Whether the pipeline can read `prompt`: a [`PromptRefused`] error for an empty prompt, one with no word the
    /// training captions had, or one longer than the context; otherwise which of its words are known. (Byte-level
    /// BPE encodes any text, an unknown word as many byte tokens, so the vocabulary check comes before the length
    /// check.)
    pub fn check_prompt(&self, prompt: &str) -> Result<Coverage> {
        let example = "describe a digit, e.g. \"a bold 7\", \"seven\" or \"the number 3, leaning left\"";
        let refuse = |why: String| Err(PromptRefused(why).into());
        if prompt.trim().is_empty() {
            return refuse(format!("the prompt is empty: {example}"));
        }
        let (words, tokens, embedded) = self.read_words(prompt)?;
        let coverage = self.tokenizer.coverage(&words, &self.seen);
        if !coverage.any_known() && !embedded {
            let unknown: Vec<String> = coverage.unknown_words().iter().map(|w| format!("\"{w}\"")).collect();
            let unknown = crate::cli::for_message(&unknown.join(", "), 80);
            return refuse(format!(
                "no word of the prompt was in the training captions (unknown: {unknown}): {example}"
            ));
        }
        let limit = self.context_len - 2; // start and end take two positions
        if tokens > limit {
            let context = self.context_len;
            return refuse(format!(
                "the prompt is {tokens} tokens long, the text encoder reads at most {limit} (context of {context} with \
                 start and end tokens): shorten it"
            ));
        }
        Ok(coverage)
    }
    // ANCHOR_END: check_prompt

    /// τ(prompt) for the UNet, (1, L, D) with its padding mask (1, L), on the encoder's device, without any check
    /// ("" is the ∅ prompt).
    pub fn context(&self, prompt: &str) -> (Encoded, Cond) {
        if !self.embeddings.is_empty() {
            // `check_prompt` refuses what `tokenize` cannot read (a pickled embedding) before any context is made
            let e = self.tokenize(prompt).expect("a prompt checked by check_prompt");
            let ids = Tensor::from_slice(&e.encoded.ids).unsqueeze(0).to_device(self.device()); // (1, L)
            let lens = Tensor::from_slice(&[e.encoded.len as i64]).to_device(self.device());
            let mask = lens_to_mask(&lens, e.encoded.ids.len() as i64); // (1, L)
            let extra = e.extra.map(|x| x.to_device(self.device()));
            let hidden =
                tch::no_grad(|| self.text_encoder.forward_with_extra_tokens(&ids, Some(&mask), extra.as_ref()));
            return (e.encoded, Cond::masked(hidden, mask)); // (1, L, D)
        }
        let e = self.tokenizer.encode_padded(prompt, self.context_len);
        let ids = Tensor::from_slice(&e.ids).unsqueeze(0).to_device(self.device()); // (1, L)
        let mask = lens_to_mask(&Tensor::from_slice(&[e.len as i64]).to_device(self.device()), e.ids.len() as i64);
        let context = encode_context(&self.text_encoder, &ids, &mask);
        (e, context)
    }

    /// The padded ids of `prompt` with the names of [`Self::embeddings`] as their vectors' ids (vocab_size + row),
    /// and those vectors ([`Embeddings::tokenize`]).
    pub fn tokenize(&self, prompt: &str) -> Result<crate::sd::embeddings::EmbeddedTokens> {
        let vocab = self.text_encoder.config.vocab_size;
        self.embeddings.tokenize(&self.tokenizer, prompt, vocab, self.context_len)
    }

    /// The checked conditionings of a prompt and of its negative (None or blank: the empty prompt ∅), batch 1 each.
    pub fn cond_uncond(&self, prompt: &str, negative: Option<&str>) -> Result<(Cond, Cond)> {
        self.check_prompt(prompt).context("in the prompt")?;
        let negative = negative.filter(|s| !s.trim().is_empty());
        if let Some(neg) = negative {
            self.check_prompt(neg).context("in the negative prompt")?;
        }
        Ok((self.context(prompt).1, self.context(negative.unwrap_or("")).1))
    }

    /// One conditioning per prompt of `prompts` that the pipeline reads, as one batch (A, L, D), with the empty
    /// prompt's for each (A, L, D), and which prompts it refused ([`PromptRefused`]; they have no row). `None` when
    /// it refused them all. Graders draw many one-sample prompts in one batch with it, at the cost of one.
    pub fn conds_each(&self, prompts: &[String]) -> Result<(Option<CondPair>, Vec<bool>)> {
        let mut conds = Vec::new();
        let mut refused = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let read = match self.check_prompt(prompt) {
                Ok(_) => true,
                Err(e) if e.is::<PromptRefused>() => false,
                Err(e) => return Err(e),
            };
            if read {
                conds.push(self.context(prompt).1); // (1, L, D)
            }
            refused.push(!read);
        }
        if conds.is_empty() {
            return Ok((None, refused));
        }
        let cond = Cond::cat(&conds.iter().collect::<Vec<_>>()); // (A, L, D)
        let uncond = self.context("").1.for_batch(conds.len() as i64); // (A, L, D), expanded
        Ok((Some((cond, uncond)), refused))
    }

    /// How the tokenizer reads `prompt`, a line per token: its position, id, text, and whether the training captions
    /// ever had it (a token they never had reaches an embedding that never trained). The learner's window into why a
    /// prompt fails.
    pub fn describe_tokens(&self, prompt: &str) -> String {
        let e = self.tokenizer.encode_padded(prompt, self.context_len);
        let mut lines = vec![format!("{} tokens of {} (start and end included):", e.len, self.context_len)];
        for (i, &id) in e.ids[..e.len].iter().enumerate() {
            let seen = if self.seen.contains(&id) { "" } else { "   never in a training caption" };
            lines.push(format!("{i:>3}  id {id:>5}  {:?}{seen}", crate::cli::for_message(&self.token_label(id), 40)));
        }
        if e.truncated {
            lines.push(format!("(the prompt was cut at {} tokens)", self.context_len));
        }
        lines.join("\n")
    }

    /// What to tell the user about `prompt` before drawing, after [`Self::check_prompt`]: words the captions never had,
    /// and a prompt that names no digit (drawn anyway: the rest of the prompt decides) or several (every training
    /// caption named one, so expect one of them or a blend).
    pub fn notes(&self, prompt: &str) -> Result<Vec<String>> {
        let mut notes: Vec<String> = self.check_prompt(prompt)?.note().into_iter().collect();
        let named: Vec<String> = digits_named(prompt).iter().map(i64::to_string).collect();
        match named.len() {
            0 => notes.push(
                "note: the prompt names no digit (as a numeral or a word), so the rest of it decides which digit is \
                 drawn; name one, e.g. \"a bold 7\""
                    .into(),
            ),
            1 => {}
            n => notes.push(format!(
                "note: the prompt names {n} digits ({}); every training caption named one, so expect one of them or a \
                 blend",
                named.join(", ")
            )),
        }
        Ok(notes)
    }

    /// The text of a token for figure labels: "seven", "<start>", "<end>" (a word piece keeps no `</w>` mark).
    pub fn token_label(&self, id: i64) -> String {
        match self.tokenizer.token(id) {
            Some(START_OF_TEXT) => "<start>".into(),
            Some(END_OF_TEXT) => "<end>".into(),
            Some(t) => t.trim_end_matches(END_OF_WORD).to_string(),
            None => format!("#{id}"),
        }
    }

    /// Writes merges.txt and text_encoder.safetensors (with text_encoder.json) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.tokenizer.save(dir.join("merges.txt"))?;
        checkpoint::save(&self.text_vs, &dir.join("text_encoder.safetensors"), &self.text_encoder.config)
    }

    /// Loads what [`Self::save`] wrote in `dir` onto `device`.
    pub fn load(dir: &Path, context_len: usize, seen_tokens: &[i64], device: Device) -> Result<Self> {
        let tokenizer = Bpe::load(dir.join("merges.txt"))?;
        let text_path = dir.join("text_encoder.safetensors");
        let mut text_vs = VarStore::new(device);
        let config = checkpoint::load_valid_config::<TextEncoderConfig>(&text_path)?;
        let text_encoder = TextEncoder::new(text_vs.root() / "text_model", config);
        checkpoint::load(&mut text_vs, &text_path)?;
        Self::assemble(tokenizer, text_vs, text_encoder, context_len, seen_tokens)
    }
}
