//! Byte-level byte-pair encoding, laid out exactly as OpenAI CLIP's tokenizer so that CLIP's merges load unchanged.
//!
//! [BPE] Sennrich, Haddow, Birch 2016, "Neural Machine Translation of Rare Words with Subword Units",
//!       arXiv:1508.07909, sec. 3.2 and Algorithm 1 (learning merges from word counts).
//! [CLIP] Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
//!        arXiv:2103.00020, sec. 2.4; the tokenizer is `clip/simple_tokenizer.py` in openai/CLIP.
//! [GPT-2] Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", sec. 2.2: BPE over bytes, with
//!         every byte shown as a printable character (`bytes_to_unicode`) so merges can be written as text.
//!
//! The pipeline of [`Bpe::encode`], step by step as in [CLIP]:
//! 1. clean: collapse runs of whitespace to one space, trim, lower-case. CLIP first runs `ftfy.fix_text` and
//!    `html.unescape`; both are out of scope here (our prompts are plain text), so "&amp;" stays five characters.
//! 2. pre-tokenise with [`PATTERN`]: words of letters, single digits (so "2024" is four pieces), runs of punctuation,
//!    English contractions, and the two special tokens written out literally.
//! 3. per piece: its UTF-8 bytes become symbols (one per byte); the last symbol carries the end-of-word mark
//!    `</w>`; then merges are applied, always the lowest-ranked adjacent pair first, until none applies.
//!
//! The vocabulary, id by id ([CLIP] `SimpleTokenizer.__init__`): the 256 byte symbols in `bytes_to_unicode` order,
//! the same 256 with `</w>`, one token per merge (the pair concatenated) in merge order, then `<|startoftext|>` and
//! `<|endoftext|>`: 512 + merges + 2 tokens (49 408 for CLIP's 48 894 merges).
use crate::text::{Coverage, Encoded};
use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

/// [CLIP] simple_tokenizer.py: the pre-tokeniser, case-insensitive. Rust's `regex` tries alternatives leftmost-first
/// as Python's `regex` does, so the pieces are the same.
pub const PATTERN: &str =
    r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";
pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// Marks the last symbol of a word, so "a" inside "cat" and the word "a" are different tokens.
pub const END_OF_WORD: &str = "</w>";
/// [CLIP] reads `merges[1:49152-256-2+1]`: the file's first 48 894 merges, for a vocabulary of 49 408 tokens.
pub const CLIP_NUM_MERGES: usize = 49152 - 256 - 2;
/// [CLIP] sec. 2.4 and SD 1.x: text is cut to 77 tokens, start and end included.
pub const CLIP_CONTEXT_LEN: usize = 77;
/// Header written by [`Bpe::save`]; CLIP's own file opens with a "…#version: 0.2" line, skipped likewise.
const HEADER: &str = "#version: 0.2 - scratch-diffusion byte-level BPE merges";

/// [GPT-2] / [CLIP] `bytes_to_unicode`: a printable character for each byte. The 188 bytes that are printable
/// Latin-1 ('!'..='~', '¡'..='¬', '®'..='ÿ') stand for themselves; the other 68 (space, control characters, …) are
/// moved to U+0100 onwards in byte order, so a space becomes 'Ġ'. Returned in vocabulary order: entry i is the
/// (byte, symbol) of token id i.
pub fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table: Vec<(u8, char)> = (0..=255u8).filter(|&b| printable(b)).map(|b| (b, char::from(b))).collect();
    let moved = (0..=255u8).filter(|&b| !printable(b));
    table.extend(moved.enumerate().map(|(n, b)| (b, char::from_u32(256 + n as u32).expect("U+0100.. are chars"))));
    table
}

/// Step 1 of the pipeline: whitespace runs to one space, trimmed, lower-cased (no ftfy / HTML unescaping).
pub fn clean(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

fn pre_tokenizer() -> &'static regex::Regex {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(PATTERN).expect("PATTERN is a valid regex"))
}

/// Steps 1 and 2: the pieces BPE sees, e.g. "It's 42!" -> ["it", "'s", "4", "2", "!"].
pub fn pre_tokenize(text: &str) -> Vec<String> {
    let cleaned = clean(text);
    pre_tokenizer().find_iter(&cleaned).map(|m| m.as_str().to_string()).collect()
}

/// A byte-level BPE tokenizer: a list of merges and the vocabulary they imply.
#[derive(Debug, Clone)]
pub struct Bpe {
    /// The merges in rank order (rank 0 is applied first).
    merges: Vec<(String, String)>,
    /// id -> token text (byte symbols, maybe ending in `</w>`).
    vocab: Vec<String>,
    /// token text -> id. Built like CLIP's `dict(zip(vocab, range(...)))`: a repeated text keeps its last id.
    encoder: HashMap<String, i64>,
    /// (left id, right id) -> (rank, id of the merged token).
    ranks: HashMap<(i64, i64), (usize, i64)>,
    /// byte -> id of its symbol without `</w>`; the `</w>` form is that id + 256.
    byte_ids: [i64; 256],
    /// symbol -> byte, the inverse of `bytes_to_unicode`.
    char_bytes: HashMap<char, u8>,
}

impl Bpe {
    /// Builds the vocabulary for `merges` (each pair of token texts, in rank order), laid out as in the module doc.
    pub fn from_merges(merges: Vec<(String, String)>) -> Result<Self> {
        let table = bytes_to_unicode();
        let mut byte_ids = [0i64; 256];
        for (id, &(byte, _)) in table.iter().enumerate() {
            byte_ids[byte as usize] = id as i64;
        }
        let mut vocab: Vec<String> = table.iter().map(|&(_, c)| c.to_string()).collect();
        vocab.extend(table.iter().map(|&(_, c)| format!("{c}{END_OF_WORD}")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.extend([START_OF_TEXT.to_string(), END_OF_TEXT.to_string()]);
        let encoder: HashMap<String, i64> = vocab.iter().enumerate().map(|(i, t)| (t.clone(), i as i64)).collect();
        let mut ranks = HashMap::new();
        for (rank, (a, b)) in merges.iter().enumerate() {
            let id = |t: &str| {
                encoder.get(t).copied().with_context(|| {
                    format!("merge {rank} (\"{a} {b}\"): \"{t}\" is neither a byte symbol nor made by another merge")
                })
            };
            // A repeated pair keeps its last rank, as CLIP's `dict(zip(merges, range(...)))` does.
            ranks.insert((id(a)?, id(b)?), (rank, encoder[&format!("{a}{b}")]));
        }
        let char_bytes = table.iter().map(|&(b, c)| (c, b)).collect();
        Ok(Self { merges, vocab, encoder, ranks, byte_ids, char_bytes })
    }

    /// Parses a merges file's text: a header line, then one "left right" merge per line (blank lines ignored), at
    /// most `max_merges` of them. CLIP's own file needs `Some(CLIP_NUM_MERGES)`.
    pub fn from_merges_text(text: &str, max_merges: Option<usize>) -> Result<Self> {
        let mut lines = text.lines();
        let header = lines.next().unwrap_or_default();
        ensure!(
            header.contains('#'),
            "a BPE merges file starts with a header line such as \"#version: 0.2\", found \"{header}\"; \
             without it the first merge would be skipped as CLIP skips its header"
        );
        let mut merges = Vec::new();
        for (n, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            if max_merges.is_some_and(|m| merges.len() >= m) {
                break;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [a, b] = parts[..] else {
                bail!("line {} of the merges file is \"{line}\": expected two tokens separated by a space", n + 2)
            };
            merges.push((a.to_string(), b.to_string()));
        }
        Self::from_merges(merges)
    }

    /// Loads OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (gzip text), keeping the merges CLIP uses.
    pub fn load_clip_vocab_gz(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open CLIP vocabulary {}", path.display()))?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .with_context(|| format!("{} is not gzip-compressed UTF-8 text", path.display()))?;
        Self::from_merges_text(&text, Some(CLIP_NUM_MERGES)).with_context(|| format!("in {}", path.display()))
    }

    /// Writes the merges as text (header, then "left right" lines): the format [`Bpe::load`] and CLIP read.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut text = format!("{HEADER}\n");
        for (a, b) in &self.merges {
            text.push_str(&format!("{a} {b}\n"));
        }
        std::fs::write(path, text).with_context(|| format!("cannot write BPE merges to {}", path.display()))
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read BPE merges {}", path.display()))?;
        Self::from_merges_text(&text, None).with_context(|| format!("in {}", path.display()))
    }

    /// [BPE] Algorithm 1 on bytes: count the pre-tokenised words of `corpus`, then `num_merges` times merge the
    /// most frequent adjacent pair of symbols within words (counted with the words' frequencies). Ties go to the
    /// lexicographically smallest pair, so training is deterministic. Stops early once no pair occurs twice (the
    /// default `--min-frequency 2` of Sennrich's subword-nmt): [`Bpe::vocab_size`] tells how many merges were kept.
    pub fn train(corpus: &[String], num_merges: usize) -> Self {
        let table = bytes_to_unicode();
        let mut symbol = [char::default(); 256];
        for &(b, c) in &table {
            symbol[b as usize] = c;
        }
        let mut words: BTreeMap<Vec<String>, u64> = BTreeMap::new();
        for piece in corpus.iter().flat_map(|t| pre_tokenize(t)) {
            if piece == START_OF_TEXT || piece == END_OF_TEXT {
                continue;
            }
            let mut symbols: Vec<String> = piece.bytes().map(|b| symbol[b as usize].to_string()).collect();
            symbols.last_mut().expect("pieces are non-empty").push_str(END_OF_WORD);
            *words.entry(symbols).or_default() += 1;
        }
        let mut words: Vec<(Vec<String>, u64)> = words.into_iter().collect();
        let mut merges = Vec::with_capacity(num_merges);
        while merges.len() < num_merges {
            let mut pairs: HashMap<(&str, &str), u64> = HashMap::new();
            for (symbols, count) in &words {
                for p in symbols.windows(2) {
                    *pairs.entry((p[0].as_str(), p[1].as_str())).or_default() += count;
                }
            }
            // Most frequent first; among equals the smallest pair.
            let best = pairs.into_iter().max_by(|(p, n), (q, m)| n.cmp(m).then_with(|| q.cmp(p)));
            let Some(((a, b), count)) = best else { break };
            if count < 2 {
                break;
            }
            let pair = (a.to_string(), b.to_string());
            for (symbols, _) in &mut words {
                *symbols = merge_pair(symbols, &pair.0, &pair.1, |x, y| format!("{x}{y}"));
            }
            merges.push(pair);
        }
        Self::from_merges(merges).expect("merges learned from words are consistent")
    }

    /// 512 byte symbols + merges + 2 special tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn num_merges(&self) -> usize {
        self.merges.len()
    }

    pub fn start_id(&self) -> i64 {
        self.encoder[START_OF_TEXT]
    }

    pub fn end_id(&self) -> i64 {
        self.encoder[END_OF_TEXT]
    }

    /// The text of token `id` (byte symbols, with `</w>` if it ends a word), or None if out of range.
    pub fn token(&self, id: i64) -> Option<&str> {
        usize::try_from(id).ok().and_then(|i| self.vocab.get(i)).map(String::as_str)
    }

    /// Step 3 for one piece: its byte symbols, merged by rank ([CLIP] `SimpleTokenizer.bpe`).
    fn bpe_piece(&self, piece: &str) -> Vec<i64> {
        if piece == START_OF_TEXT || piece == END_OF_TEXT {
            // [CLIP] seeds its cache with the two specials, so written out in a prompt they are the special tokens.
            return vec![self.encoder[piece]];
        }
        let mut word: Vec<i64> = piece.bytes().map(|b| self.byte_ids[b as usize]).collect();
        *word.last_mut().expect("pieces are non-empty") += 256; // the `</w>` form of the last byte
        loop {
            let best = word
                .windows(2)
                .filter_map(|p| self.ranks.get(&(p[0], p[1])).map(|&(rank, merged)| (rank, p[0], p[1], merged)))
                .min();
            let Some((_, left, right, merged)) = best else { break };
            word = merge_pair(&word, &left, &right, |_, _| merged);
        }
        word
    }

    /// Token ids of `text`, without start and end tokens.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        pre_tokenize(text).iter().flat_map(|piece| self.bpe_piece(piece)).collect()
    }

    /// `<|startoftext|>` + tokens + `<|endoftext|>`, cut to `context_len` keeping the end token last, then padded
    /// with `<|endoftext|>` ([CLIP] `clip.tokenize(truncate=True)`, padding as SD 1.x).
    pub fn encode_padded(&self, text: &str, context_len: usize) -> Encoded {
        self.pad(self.encode(text), context_len)
    }

    /// [`Self::encode_padded`] of tokens already made (`tokens` without start and end).
    pub fn pad(&self, tokens: Vec<i64>, context_len: usize) -> Encoded {
        assert!(context_len >= 2, "context_len {context_len} leaves no room for the start and end tokens");
        let mut ids = vec![self.start_id()];
        ids.extend(tokens);
        ids.push(self.end_id());
        let truncated = ids.len() > context_len;
        if truncated {
            ids.truncate(context_len);
            ids[context_len - 1] = self.end_id();
        }
        let len = ids.len();
        ids.resize(context_len, self.end_id());
        Encoded { ids, len, truncated }
    }

    /// The text of `ids`: bytes joined back, a space after every token that ends a word, the trailing space trimmed
    /// (CLIP's `decode` keeps it). Invalid UTF-8 and out-of-range ids become U+FFFD; the special tokens read as
    /// their names. For a cleaned prompt this gives its pieces joined by spaces ("it's 42!" -> "it 's 4 2 !").
    pub fn decode(&self, ids: &[i64]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(token) = self.token(id) else {
                bytes.extend_from_slice("\u{FFFD}".as_bytes());
                continue;
            };
            let (body, ends_word) = match token.strip_suffix(END_OF_WORD) {
                Some(body) => (body, true),
                None => (token, false),
            };
            bytes.extend(body.chars().map(|c| self.char_bytes[&c]));
            if ends_word {
                bytes.push(b' ');
            }
        }
        String::from_utf8_lossy(&bytes).trim_end_matches(' ').to_string()
    }

    /// Every token id that occurs when `corpus` is encoded: what a model trained on that corpus has embeddings for.
    pub fn seen_tokens(&self, corpus: &[String]) -> HashSet<i64> {
        corpus.iter().flat_map(|t| self.encode(t)).collect()
    }

    /// Byte-level BPE has no out-of-vocabulary text: "zebra" still encodes, to tokens whose embeddings a model
    /// trained only on digit captions never updated. This says, word by word, whether all of a word's tokens are
    /// in `seen` (from [`Bpe::seen_tokens`] on the training captions).
    pub fn coverage(&self, text: &str, seen: &HashSet<i64>) -> Coverage {
        let words = pre_tokenize(text)
            .into_iter()
            .map(|piece| {
                let known = self.bpe_piece(&piece).iter().all(|id| seen.contains(id));
                (piece, known)
            })
            .collect();
        Coverage { words }
    }
}

/// Replaces every non-overlapping occurrence of the adjacent pair (a, b), left to right, by `join(a, b)` — the rule
/// of [CLIP] `bpe` and of [BPE] Algorithm 1 alike, so training and encoding agree.
fn merge_pair<T: PartialEq + Clone>(word: &[T], a: &T, b: &T, join: impl Fn(&T, &T) -> T) -> Vec<T> {
    let mut out = Vec::with_capacity(word.len());
    let mut i = 0;
    while i < word.len() {
        if i + 1 < word.len() && word[i] == *a && word[i + 1] == *b {
            out.push(join(a, b));
            i += 2;
        } else {
            out.push(word[i].clone());
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::ids_tensor;

    fn strings(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    fn merges_text(merges: &[&str]) -> String {
        format!("#version: 0.2\n{}\n", merges.join("\n"))
    }

    #[test]
    fn bytes_to_unicode_is_a_bijection_onto_printable_symbols() {
        let table = bytes_to_unicode();
        assert_eq!(table.len(), 256);
        assert_eq!(table.iter().map(|&(b, _)| b).collect::<HashSet<_>>().len(), 256);
        assert_eq!(table.iter().map(|&(_, c)| c).collect::<HashSet<_>>().len(), 256);
        assert!(table.iter().all(|&(_, c)| !c.is_whitespace() && !c.is_control()));
        assert_eq!(table[0], (b'!', '!')); // vocabulary order: printable bytes first
        assert!(table.contains(&(b'a', 'a')) && table.contains(&(b' ', 'Ġ')) && table.contains(&(0, 'Ā')));
    }

    #[test]
    fn pre_tokenizer_splits_as_clips_regex() {
        assert_eq!(pre_tokenize("  It's   2024,  OK?! "), strings(&["it", "'s", "2", "0", "2", "4", ",", "ok", "?!"]));
        assert_eq!(pre_tokenize("<|startoftext|>Hi"), strings(&["<|startoftext|>", "hi"]));
        assert_eq!(pre_tokenize("café 日本"), strings(&["café", "日本"]));
    }

    #[test]
    fn layout_without_merges_matches_clips_byte_ids() {
        let bpe = Bpe::from_merges(vec![]).unwrap();
        assert_eq!(bpe.vocab_size(), 514);
        // In CLIP's vocabulary "a</w>" is 320, "!</w>" 256, ",</w>" 267 and "!" 0: the byte part of the layout.
        assert_eq!(bpe.encode("a"), vec![320]);
        assert_eq!(bpe.encode("! ,"), vec![256, 267]);
        assert_eq!(bpe.encode("!!"), vec![0, 256]);
        assert_eq!((bpe.start_id(), bpe.end_id()), (512, 513));
    }

    #[test]
    fn clip_layout_size_and_merge_ids() {
        let text = merges_text(&["t h", "th e</w>", "i n"]);
        let bpe = Bpe::from_merges_text(&text, None).unwrap();
        assert_eq!(bpe.vocab_size(), 512 + 3 + 2);
        assert_eq!(bpe.encode("the"), vec![513]);
        assert_eq!(bpe.token(513), Some("the</w>"));
        assert_eq!((bpe.start_id(), bpe.end_id()), (515, 516));
        assert_eq!(Bpe::from_merges_text(&text, Some(1)).unwrap().vocab_size(), 512 + 1 + 2);
        assert_eq!(512 + CLIP_NUM_MERGES + 2, 49408); // CLIP's vocabulary size
    }

    #[test]
    fn merges_apply_lowest_rank_first() {
        let pieces = |merges: &[&str]| {
            let bpe = Bpe::from_merges_text(&merges_text(merges), None).unwrap();
            bpe.encode("this").iter().map(|&id| bpe.token(id).unwrap().to_string()).collect::<Vec<_>>()
        };
        assert_eq!(pieces(&["h i", "t h"]), strings(&["t", "hi", "s</w>"]));
        assert_eq!(pieces(&["t h", "h i"]), strings(&["th", "i", "s</w>"]));
        assert_eq!(pieces(&["t h", "th i", "thi s</w>"]), strings(&["this</w>"]));
    }

    #[test]
    fn bad_merges_files_are_rejected_with_a_reason() {
        assert!(Bpe::from_merges_text("t h\n", None).is_err()); // no header
        assert!(Bpe::from_merges_text(&merges_text(&["t h e"]), None).is_err());
        let err = Bpe::from_merges_text(&merges_text(&["xy z"]), None).unwrap_err();
        assert!(format!("{err:#}").contains("neither a byte symbol"), "{err:#}");
    }

    #[test]
    fn training_learns_sennrichs_first_merges() {
        // [BPE] sec. 3.2's example: low ×5, lower ×2, newest ×6, widest ×3. With `</w>` fused to the last symbol,
        // (e, s) and (s, t</w>) both occur 9 times: the tie goes to (e, s); then (es, t</w>) 9, (l, o) 7, and at 6
        // (e, w) before (n, e) and (w, est</w>).
        let mut corpus = vec![];
        for (word, n) in [("low", 5), ("lower", 2), ("newest", 6), ("widest", 3)] {
            corpus.extend(std::iter::repeat(word.to_string()).take(n));
        }
        let bpe = Bpe::train(&corpus, 4);
        let expected = [("e", "s"), ("es", "t</w>"), ("l", "o"), ("e", "w")];
        assert_eq!(bpe.merges, expected.map(|(a, b)| (a.to_string(), b.to_string())).to_vec());
        assert_eq!(bpe.encode("lowest").len(), 3); // lo w est</w>

        // It stops once no pair occurs twice: every word is then a single token.
        let full = Bpe::train(&corpus, 1000);
        assert!(full.num_merges() < 1000);
        assert!(["low", "lower", "newest", "widest"].iter().all(|w| full.encode(w).len() == 1));
    }

    #[test]
    fn decode_inverts_encode_up_to_word_spacing() {
        let corpus = strings(&["a handwritten seven", "the number 7, leaning left!", "hello world"]);
        let bpe = Bpe::train(&corpus, 50);
        let texts =
            ["Hello,   World!", "it's 2024 -- (ok?)", "a 🙂 emoji 🎉🎉", "日本語のテキスト и кириллица", "Ünïcödé"];
        for text in texts {
            let decoded = bpe.decode(&bpe.encode(text));
            assert_eq!(decoded, pre_tokenize(text).join(" "), "{text}");
            assert_eq!(decoded.replace(' ', ""), clean(text).replace(' ', ""), "{text}");
        }
        assert_eq!(bpe.decode(&bpe.encode("It's 42!")), "it 's 4 2 !");
    }

    #[test]
    fn padding_and_truncation_keep_start_and_end_in_place() {
        let bpe = Bpe::from_merges(vec![]).unwrap();
        let (s, e) = (bpe.start_id(), bpe.end_id());
        let enc = bpe.encode_padded("a b", 6);
        assert_eq!(enc, Encoded { ids: vec![s, 320, 321, e, e, e], len: 4, truncated: false });
        assert_eq!(enc.content(), &[320, 321]);
        let cut = bpe.encode_padded("a b c d", 4);
        assert_eq!(cut, Encoded { ids: vec![s, 320, 321, e], len: 4, truncated: true });
        let exact = bpe.encode_padded("a b", 4);
        assert!(!exact.truncated && exact.len == 4);
        assert_eq!(bpe.encode_padded("", 3).ids, vec![s, e, e]);
        let ids = ids_tensor(&[enc, cut.clone(), cut].map(|c| Encoded { ids: c.ids[..4].to_vec(), ..c }));
        assert_eq!(ids.size(), vec![3, 4]);
        // Written out, the special tokens are the special tokens, as in CLIP.
        assert_eq!(bpe.encode("<|endoftext|>"), vec![e]);
    }

    #[test]
    fn save_then_load_gives_identical_encodings() -> Result<()> {
        let corpus = strings(&["a bold seven leaning right", "the digit 3", "café ünïcödé 🙂"]);
        let bpe = Bpe::train(&corpus, 40);
        let dir = tempfile::tempdir()?;
        bpe.save(dir.path().join("merges.txt"))?;
        let loaded = Bpe::load(dir.path().join("merges.txt"))?;
        assert_eq!(loaded.vocab, bpe.vocab);
        for text in corpus.iter().map(String::as_str).chain(["zebra crossing", "7 8 9"]) {
            assert_eq!(loaded.encode(text), bpe.encode(text));
        }
        // The gzip path CLIP's file takes, on a tiny file of the same format.
        let gz = dir.path().join("vocab.txt.gz");
        let mut encoder = flate2::write::GzEncoder::new(std::fs::File::create(&gz)?, Default::default());
        std::io::Write::write_all(&mut encoder, std::fs::read(dir.path().join("merges.txt"))?.as_slice())?;
        encoder.finish()?;
        assert_eq!(Bpe::load_clip_vocab_gz(&gz)?.vocab, bpe.vocab);
        Ok(())
    }

    #[test]
    fn coverage_reports_words_the_model_never_saw() {
        let corpus = strings(&["a thin 7", "a bold seven", "the number 3"]);
        let bpe = Bpe::train(&corpus, 100);
        let seen = bpe.seen_tokens(&corpus);
        let known = bpe.coverage("A bold 7", &seen);
        assert_eq!(known.known_fraction(), 1.0);
        let mixed = bpe.coverage("a bold zebra", &seen);
        assert_eq!(mixed.unknown_words(), vec!["zebra"]);
        assert!((mixed.known_fraction() - 2.0 / 3.0).abs() < 1e-12);
        let none = bpe.coverage("zebra crossing", &seen);
        assert!(!none.any_known() && none.known_fraction() == 0.0);
        assert_eq!(bpe.coverage("", &seen).known_fraction(), 1.0);
    }
}
