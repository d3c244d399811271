//! The model's tokenizer (`tokenizer.json`) and streaming-safe incremental decoding.

use tokenizers::Tokenizer;

use super::ModelError;

#[derive(Clone)]
pub struct NeoXTokenizer {
    inner: Tokenizer,
    eos: Option<u32>,
}

impl NeoXTokenizer {
    pub fn from_bytes(bytes: &[u8], eos_from_config: Option<u32>) -> Result<Self, ModelError> {
        let inner =
            Tokenizer::from_bytes(bytes).map_err(|e| ModelError::Tokenizer(format!("invalid tokenizer.json: {e}")))?;
        let eos = eos_from_config.or_else(|| inner.token_to_id("<|endoftext|>"));
        Ok(Self { inner, eos })
    }

    /// Token ids of `text`, without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The token strings of `ids` as the tokenizer spells them.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Text of `ids`; special tokens are kept so nothing the model wrote is hidden.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Entries in the tokenizer, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }
}

/// Turns a growing list of token ids into text deltas that are always whole UTF-8 characters.
///
/// Byte-level BPE tokens can end in the middle of a character; decoding them alone yields
/// U+FFFD. Like TGI, we decode a small window of recent tokens and only emit the new suffix
/// once it no longer ends in an incomplete character.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &NeoXTokenizer, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back at the end of generation (may contain U+FFFD if the model
    /// really produced invalid UTF-8).
    pub fn finish(&mut self, tok: &NeoXTokenizer) -> Result<String, ModelError> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            Ok(full[prefix.len()..].to_owned())
        } else {
            Ok(String::new())
        }
    }
}
