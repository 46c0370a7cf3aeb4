//! Textual-inversion embeddings for SD 1.x: new "words" whose token vectors were learned, used by name in a prompt.
//!
//! [TI] Gal et al. 2022, "An Image is Worth One Word", arXiv:2208.01618, sec. 3: a pseudo-word S* whose embedding v*
//! replaces the tokenizer's lookup, everything else frozen; multi-vector embeddings (n vectors for one name, as the
//! web UI and diffusers write them) take n consecutive positions of the 77.
//!
//! The files in circulation: diffusers' `learned_embeds.safetensors` (`{token: (D,) or (n, D)}`), kohya's and the web
//! UI's safetensors (`emb_params`: (n, D), named by the file), the web UI's converted `string_to_param.*`; `.pt` and
//! `.bin` are pickles and refused with the conversion command. An embedding for SD 2.x (D = 1024) or SDXL (`clip_l` +
//! `clip_g`) is refused by name. As in the web UI, a name matches in the prompt case-insensitively, as a whole word.
use crate::sd::safetensors::{refuse_pickle, SafetensorsFile};
use crate::text::Bpe;
use crate::text::Encoded;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// One embedding: its name in prompts and its vectors.
#[derive(Debug)]
pub struct Embedding {
    pub name: String,
    /// (n, D) f32 on the CPU.
    pub vectors: Tensor,
    pub path: PathBuf,
}

/// The embeddings a prompt may use (`--embedding-dir`), and the pickled files that were found but not opened.
#[derive(Debug, Default)]
pub struct Embeddings {
    pub list: Vec<Embedding>,
    pickled: Vec<(String, PathBuf)>,
}

/// A part of a prompt: text to tokenise, or the name of embedding i of the list.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Embedding(usize),
}

#[derive(Debug)]
/// Tokens of a prompt with embeddings: the padded ids (an embedding's vector j has id vocab_size + its row) and the
/// rows those ids read, (E, D).
pub struct EmbeddedTokens {
    pub encoded: Encoded,
    pub extra: Option<Tensor>,
    /// The embeddings the prompt used, in order of first use.
    pub used: Vec<String>,
}

impl Embeddings {
    /// The embeddings of one file for a text encoder of width `width`.
    pub fn read_file(path: &Path, width: i64) -> Result<Vec<Embedding>> {
        let shown = path.display().to_string();
        let mut file = SafetensorsFile::open(path)?;
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("embedding").to_string();
        let keys: Vec<String> = file.names().map(String::from).collect();
        if keys.iter().any(|k| k == "clip_g") {
            bail!("{shown} is an SDXL embedding (clip_l + clip_g vectors, for SDXL's two text encoders, which this crate does not run): use an embedding made for the model you load");
        }
        // name -> key: kohya and the web UI name the embedding after the file; diffusers after its key (and a file with
        // one key is also reachable by its file name, as the web UI reads it, unless that is diffusers' generic one)
        let named: Vec<(String, String)> =
            if let Some(k) = keys.iter().find(|k| *k == "emb_params" || k.starts_with("string_to_param")) {
                vec![(stem.clone(), k.clone())]
            } else {
                let mut v: Vec<(String, String)> = keys.iter().map(|k| (k.clone(), k.clone())).collect();
                if keys.len() == 1 && !keys[0].eq_ignore_ascii_case(&stem) && stem != "learned_embeds" {
                    v.push((stem.clone(), keys[0].clone()));
                }
                v
            };
        ensure!(!named.is_empty(), "{shown} holds no tensors: it is not an embedding file");
        let mut out = Vec::new();
        for (name, key) in named {
            let t = file.tensor(&key)?.to_kind(Kind::Float);
            let t = if t.dim() == 1 { t.unsqueeze(0) } else { t };
            let size = t.size();
            ensure!(
                size.len() == 2 && size[0] >= 1 && size[1] == width,
                "{shown}: '{key}' is {size:?}, but this text encoder's vectors are (n, {width}) (SD 1.x's are 768 \
                 wide, SD 2.x's 1024): use an embedding made for the model you load"
            );
            crate::cli::ensure_finite(
                &t,
                &format!("{shown}: tensor '{key}'"),
                "the file is damaged; download it again",
            )?;
            ensure!(
                !name.trim().is_empty() && !name.contains(char::is_whitespace),
                "{shown}: the embedding name '{name}' must be one word"
            );
            out.push(Embedding { name, vectors: t, path: path.to_path_buf() });
        }
        Ok(out)
    }

    /// Every `.safetensors` embedding in `dir` (not recursive); pickled files (`.pt`, `.bin`) are remembered and refused
    /// only if a prompt uses their name.
    pub fn load_dir(dir: &Path, width: i64) -> Result<Self> {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("--embedding-dir {}: cannot read the folder", dir.display()))?;
        let mut paths: Vec<PathBuf> =
            entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
        paths.sort();
        let mut embeddings = Self::default();
        for path in paths {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_lowercase();
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
            match ext.as_str() {
                "safetensors" => embeddings.add_file(&path, width)?,
                "pt" | "bin" | "ckpt" | "pth" => embeddings.pickled.push((stem, path)),
                _ => {}
            }
        }
        Ok(embeddings)
    }

    /// Adds the embeddings of `path`; a name already taken is an error naming both files.
    pub fn add_file(&mut self, path: &Path, width: i64) -> Result<()> {
        for e in Self::read_file(path, width)? {
            if let Some(other) = self.list.iter().find(|o| o.name.eq_ignore_ascii_case(&e.name)) {
                bail!(
                    "two embeddings are named '{}': {} and {}; rename one of the files",
                    e.name,
                    other.path.display(),
                    path.display()
                );
            }
            self.list.push(e);
        }
        Ok(())
    }

    /// `prompt` cut at the names of the embeddings it uses: the text between them (lowercased) and, for each name,
    /// its embedding's index, in order. A pickled embedding the prompt names is refused here.
    pub fn pieces(&self, prompt: &str) -> Result<Vec<Piece>> {
        let lower = prompt.to_lowercase();
        let names: Vec<String> = self.list.iter().map(|e| e.name.to_lowercase()).collect();
        // the first occurrence of any name at or after `from` (longest name wins at a position), as a whole word
        let find = |from: usize| {
            let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            let mut best: Option<(usize, usize, usize)> = None; // (start, len, index)
            for (i, name) in names.iter().enumerate() {
                let mut at = from;
                while let Some(pos) = lower[at..].find(name.as_str()).map(|p| p + at) {
                    let before = lower[..pos].chars().next_back();
                    let after = lower[pos + name.len()..].chars().next();
                    if !is_word(before) && !is_word(after) {
                        if best.map_or(true, |(s, l, _)| pos < s || (pos == s && name.len() > l)) {
                            best = Some((pos, name.len(), i));
                        }
                        break;
                    }
                    at = pos + name.len().max(1);
                }
            }
            best
        };
        for (name, path) in &self.pickled {
            let lower_name = name.to_lowercase();
            if lower.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-')).any(|w| w == lower_name) {
                refuse_pickle(path).with_context(|| format!("the prompt uses embedding '{name}'"))?;
            }
        }
        let (mut pieces, mut from) = (Vec::new(), 0);
        while let Some((start, len, i)) = find(from) {
            pieces.push(Piece::Text(lower[from..start].to_string()));
            pieces.push(Piece::Embedding(i));
            from = start + len;
        }
        pieces.push(Piece::Text(lower[from..].to_string()));
        Ok(pieces)
    }

    // ANCHOR: embedded_tokens
    /// `prompt`'s ids for a text encoder with `vocab_size` tokens: the text around each embedding's name is
    /// tokenised as usual, each name becomes its n vectors' new ids; then start, end and padding to `context_len`.
    pub fn tokenize(&self, bpe: &Bpe, prompt: &str, vocab_size: i64, context_len: usize) -> Result<EmbeddedTokens> {
        // row offsets of each embedding in the extra table, in list order
        let mut offsets = Vec::with_capacity(self.list.len());
        let mut rows = 0;
        for e in &self.list {
            offsets.push(rows);
            rows += e.vectors.size()[0];
        }
        let (mut tokens, mut used) = (Vec::new(), Vec::new());
        for piece in self.pieces(prompt)? {
            match piece {
                Piece::Text(text) => tokens.extend(bpe.encode(&text)),
                Piece::Embedding(i) => {
                    let n = self.list[i].vectors.size()[0];
                    tokens.extend((0..n).map(|j| vocab_size + offsets[i] + j));
                    if !used.contains(&self.list[i].name) {
                        used.push(self.list[i].name.clone());
                    }
                }
            }
        }
        let extra = (!self.list.is_empty())
            .then(|| Tensor::cat(&self.list.iter().map(|e| e.vectors.shallow_clone()).collect::<Vec<_>>(), 0));
        Ok(EmbeddedTokens { encoded: bpe.pad(tokens, context_len), extra, used })
    }
    // ANCHOR_END: embedded_tokens

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// Writes a random n-vector embedding named `name` for width `width` in diffusers' `learned_embeds` layout (the tour and
/// the tests load it).
pub fn write_random_embedding(name: &str, n: i64, width: i64, std: f64, path: &Path) -> Result<()> {
    let t = Tensor::randn([n, width], (Kind::Float, tch::Device::Cpu)) * std;
    Tensor::write_safetensors(&[(name, t)], path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bpe() -> Bpe {
        Bpe::load_clip_vocab_gz(crate::cli::shipped_path("data/clip/bpe_simple_vocab_16e6.txt.gz", "")).unwrap()
    }

    #[test]
    fn names_become_their_vectors_ids_and_the_rest_is_tokenised_as_usual() {
        let dir = std::env::temp_dir().join(format!("ti-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_random_embedding("<cat-toy>", 2, 8, 1.0, &dir.join("learned_embeds.safetensors")).unwrap();
        let kohya = Tensor::randn([3, 8], (Kind::Float, tch::Device::Cpu));
        Tensor::write_safetensors(&[("emb_params", kohya.shallow_clone())], dir.join("StyleX.safetensors")).unwrap();
        std::fs::write(dir.join("old.pt"), b"PK\x03\x04 a pickle").unwrap();
        let e = Embeddings::load_dir(&dir, 8).unwrap();
        let names: Vec<&str> = e.list.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["StyleX", "<cat-toy>"]); // files in name order

        let bpe = bpe();
        let v = 49408;
        let t = e.tokenize(&bpe, "a photo of <cat-toy> in stylex style", v, 77).unwrap();
        let mut want = vec![bpe.start_id()];
        want.extend(bpe.encode("a photo of "));
        want.extend([v + 3, v + 4]); // <cat-toy>'s rows follow StyleX's three
        want.extend(bpe.encode(" in "));
        want.extend([v, v + 1, v + 2]);
        want.extend(bpe.encode(" style"));
        want.push(bpe.end_id());
        assert_eq!(&t.encoded.ids[..t.encoded.len], &want[..]);
        assert_eq!(t.used, ["<cat-toy>", "StyleX"]);
        assert!(t.extra.unwrap().narrow(0, 0, 3).equal(&kohya));
        // a name inside another word is not the embedding; no embedding = the plain tokenizer
        let t = e.tokenize(&bpe, "astylex", v, 77).unwrap();
        assert_eq!(t.encoded.ids, bpe.encode_padded("astylex", 77).ids);
        let err = format!("{:#}", e.tokenize(&bpe, "an old photo", v, 77).unwrap_err());
        assert!(err.contains("'old'") && err.contains("pickle"), "{err}");
        let wide = dir.join("wide.safetensors");
        Tensor::write_safetensors(&[("emb_params", Tensor::zeros([1, 16], (Kind::Float, tch::Device::Cpu)))], &wide)
            .unwrap();
        let err = format!("{:#}", Embeddings::read_file(&wide, 8).unwrap_err());
        assert!(err.contains("[1, 16]") && err.contains("SD 2.x"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
