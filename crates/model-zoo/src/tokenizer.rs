//! Tokenizer and chat template: loaded from a `tokenizer.json` when one sits beside the weights,
//! otherwise rebuilt from GGUF metadata (byte-level BPE vocabulary, merges, special tokens and
//! the pre-tokenizer that `tokenizer.ggml.pre` names).
//!
//! Invariants: special tokens (GGUF token types 3 and 4) are matched atomically in text, so a
//! rendered chat template tokenizes to the model's control tokens; `decode` of `encode(s)`
//! gives back `s` for any UTF-8 text.

use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{ModelError, Result};

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A model's tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source_name: String,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`; special tokens and the template come from the
    /// `tokenizer_config.json` beside it when present.
    pub fn from_file(path: &Path) -> Result<Self> {
        let source_name = path.display().to_string();
        let json = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: serde_json::Value = match path.parent().map(|d| d.join("tokenizer_config.json"))
        {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(&p).map_err(|source| ModelError::Io {
                    path: p.clone(),
                    source,
                })?;
                serde_json::from_str(&text).map_err(|e| {
                    ModelError::tokenizer_failed(&source_name, &format!("{}: ", p.display()), e)
                })?
            }
            _ => serde_json::Value::Null,
        };
        Self::from_json(&source_name, &json, &config)
    }

    /// Builds the tokenizer from the text of a `tokenizer.json` and the parsed
    /// `tokenizer_config.json` (`Null` when there is none); `source_name` names them in errors.
    pub fn from_json(source_name: &str, json: &str, config: &serde_json::Value) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e: tokenizers::Error| ModelError::tokenizer_failed(source_name, "", e))?;
        let token_id = |field: &str| -> Option<u32> {
            let v = config.get(field)?;
            let text = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            inner.token_to_id(text)
        };
        let eos = token_id("eos_token")
            .or_else(|| inner.token_to_id("</s>"))
            .or_else(|| inner.token_to_id("<|endoftext|>"))
            .into_iter()
            .collect();
        Ok(Tokenizer {
            bos: token_id("bos_token"),
            eos,
            add_bos: config
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            chat_template: config
                .get("chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            source_name: source_name.to_string(),
            inner,
        })
    }

    /// Rebuilds the tokenizer from GGUF metadata.
    pub fn from_gguf(path: &Path, content: &gguf_file::Content) -> Result<Self> {
        let source_name = format!("{} metadata", path.display());
        let err = |reason: String| ModelError::tokenizer(&source_name, reason);
        let md = &content.metadata;
        let vocab = GgufVocab::read(md, &source_name)?;
        let n_tokens = vocab.tokens.len();
        let inner = vocab.byte_level_bpe(md, &source_name)?;
        // A special token id must name a token: an id outside the vocabulary would never be
        // produced (generation would not stop at an EOS that cannot be sampled).
        let id = |k: &str| -> Result<Option<u32>> {
            let Some(v) = md.get(k) else { return Ok(None) };
            let id = crate::config::gguf_usize(v).map_err(|p| err(format!("`{k}` {p}")))?;
            if id >= n_tokens {
                return Err(err(format!(
                    "`{k}` is {id}, outside the vocabulary of {n_tokens} tokens"
                )));
            }
            Ok(Some(id as u32))
        };
        let eos = id("tokenizer.ggml.eos_token_id")?
            .into_iter()
            .collect::<Vec<_>>();
        Ok(Tokenizer {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos,
            add_bos: md
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
            chat_template: match md.get("tokenizer.chat_template") {
                None => None,
                Some(gguf_file::Value::String(t)) if !t.trim().is_empty() => Some(t.clone()),
                Some(gguf_file::Value::String(_)) => {
                    return Err(err("`tokenizer.chat_template` is empty".into()))
                }
                Some(_) => {
                    return Err(err(
                        "`tokenizer.chat_template` must be a string (a Jinja template)".into(),
                    ))
                }
            },
            source_name,
            inner,
        })
    }

    /// Encodes text; special-token text (e.g. `<|im_start|>`) maps to its token. Adds BOS when
    /// the model asks for it and `add_bos` is set.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::tokenizer_failed(&self.source_name, "", e))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text (special tokens included, so the text round-trips).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::tokenizer_failed(&self.source_name, "", e))
    }

    /// The id of an exact token string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// End-of-sequence ids.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Whether prompts start with BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The underlying `tokenizers` object (for writing `tokenizer.json`).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Renders a conversation with the model's chat template (a ChatML template when the model
    /// has none).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let template = self.chat_template.as_deref().unwrap_or(CHATML);
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(ModelError::ChatTemplate)?;
        let token_text = |id: Option<u32>| {
            id.and_then(|i| self.inner.id_to_token(i))
                .unwrap_or_default()
        };
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => token_text(self.bos),
                    eos_token => token_text(self.eos.first().copied()),
                })
            })
            .map_err(ModelError::ChatTemplate)
    }
}

/// The vocabulary of a GGUF tokenizer: tokens, BPE merges and token types.
struct GgufVocab {
    tokens: Vec<String>,
    merges: Vec<(String, String)>,
    /// GGUF token types (3: control, 4: user-defined; both special), one per token.
    types: Vec<i32>,
}

/// GGUF metadata, by key.
type Metadata = std::collections::HashMap<String, gguf_file::Value>;

impl GgufVocab {
    /// Reads the vocabulary of a byte-level BPE (`tokenizer.ggml.model = gpt2`) tokenizer;
    /// `source_name` names the metadata in errors.
    fn read(md: &Metadata, source_name: &str) -> Result<Self> {
        let err = |reason: String| ModelError::tokenizer(source_name, reason);
        let failed = |context: &str, e| ModelError::tokenizer_failed(source_name, context, e);
        let get = |k: &str| md.get(k).ok_or_else(|| err(format!("`{k}` is missing")));
        let model = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| failed("", e))?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model `{model}` is not supported from GGUF metadata (only byte-level BPE, `gpt2`); \
                 put the model's tokenizer.json beside the weights"
            )));
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            get(k)?
                .to_vec()
                .map_err(|e| failed(&format!("`{k}`: "), e))?
                .iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|e| failed(&format!("`{k}`: "), e))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("merge `{m}` has no space")))
            })
            .collect::<Result<Vec<_>>>()?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| failed("", e))?
                .iter()
                .map(|t| t.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        Ok(GgufVocab {
            tokens,
            merges,
            types,
        })
    }

    /// The byte-level BPE tokenizer of this vocabulary: the pre-tokenizer that
    /// `tokenizer.ggml.pre` names, the byte-level decoder, special tokens matched atomically.
    fn byte_level_bpe(self, md: &Metadata, source_name: &str) -> Result<tokenizers::Tokenizer> {
        let failed = |context: &str, e| ModelError::tokenizer_failed(source_name, context, e);
        let vocab: tokenizers::models::bpe::Vocab = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, self.merges)
            .build()
            .map_err(|e| failed("BPE: ", e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "default".to_string());
        let pre =
            pre_tokenizer(&pre).map_err(|reason| ModelError::tokenizer(source_name, reason))?;
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = self
            .tokens
            .iter()
            .zip(&self.types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| failed("special tokens: ", e))?;
        Ok(inner)
    }
}

fn pre_tokenizer(pre: &str) -> std::result::Result<PreTokenizerWrapper, String> {
    let byte_level =
        |use_regex: bool| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let split = |pattern: &str| -> std::result::Result<PreTokenizerWrapper, String> {
        let regex = SplitPattern::Regex(pattern.to_string());
        Split::new(regex, SplitDelimiterBehavior::Isolated, false)
            .map(PreTokenizerWrapper::Split)
            .map_err(|e| format!("pre-tokenizer regex: {e}"))
    };
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" | "starcoder" | "refact" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ])),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![split(LLAMA3_SPLIT)?, byte_level(false)]))
        }
        "qwen2" => PreTokenizerWrapper::Sequence(Sequence::new(vec![split(QWEN2_SPLIT)?, byte_level(false)])),
        other => {
            return Err(format!(
                "pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported; supported: default, gpt2, smollm, \
                 starcoder, llama3, llama-bpe, qwen2"
            ))
        }
    })
}
