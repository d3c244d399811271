//! The model's tokenizer (`tokenizer.json`) and streaming-safe incremental decoding.

use std::sync::LazyLock;

use tokenizers::{DecoderWrapper, Tokenizer};

use super::ModelError;

#[derive(Clone)]
pub struct NeoXTokenizer {
    inner: Tokenizer,
    eos: Option<u32>,
    /// GPT-2 style byte-level BPE: each vocabulary character stands for one byte.
    byte_level: bool,
}

/// The byte each character of GPT-2's byte-level alphabet stands for: printable Latin-1 bytes
/// are themselves, the other 68 are shifted to U+0100.. in byte order.
static BYTE_OF_CHAR: LazyLock<[Option<u8>; 324]> = LazyLock::new(|| {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = [None; 324];
    let mut shifted = 256;
    for b in 0..=255u8 {
        if printable(b) {
            table[b as usize] = Some(b);
        } else {
            table[shifted] = Some(b);
            shifted += 1;
        }
    }
    table
});

/// A byte-level token's bytes; `None` if a character is outside the alphabet (an added token,
/// spelled as itself).
fn byte_level_bytes(token: &str) -> Option<Vec<u8>> {
    token
        .chars()
        .map(|c| BYTE_OF_CHAR.get(c as usize).copied().flatten())
        .collect()
}

impl NeoXTokenizer {
    pub fn from_bytes(bytes: &[u8], eos_from_config: Option<u32>) -> Result<Self, ModelError> {
        let inner =
            Tokenizer::from_bytes(bytes).map_err(|e| ModelError::Tokenizer(format!("invalid tokenizer.json: {e}")))?;
        let eos = eos_from_config.or_else(|| inner.token_to_id("<|endoftext|>"));
        let byte_level = matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        Ok(Self { inner, eos, byte_level })
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

    /// The bytes a token stands for. Byte-level BPE tokens may end inside a UTF-8 character,
    /// where `decode` alone reads U+FFFD; these are exact (for other tokenizers, the decoded
    /// text's bytes).
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>, ModelError> {
        if self.byte_level {
            if let Some(token) = self.inner.id_to_token(id) {
                return Ok(byte_level_bytes(&token).unwrap_or_else(|| token.into_bytes()));
            }
        }
        Ok(self.decode(&[id])?.into_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shakespeare() -> NeoXTokenizer {
        let json = include_bytes!("../../assets/shakespeare-neox/tokenizer.json");
        NeoXTokenizer::from_bytes(json, None).unwrap()
    }

    #[test]
    fn token_bytes_agree_with_the_tokenizers_decoder_and_keep_partial_characters() {
        let tok = shakespeare();
        assert!(tok.byte_level);
        let mut partial = 0;
        for id in 0..tok.vocab_size() as u32 {
            let bytes = tok.token_bytes(id).unwrap();
            let decoded = tok.decode(&[id]).unwrap();
            match String::from_utf8(bytes.clone()) {
                Ok(text) => assert_eq!(text, decoded, "token {id}"),
                Err(_) => {
                    partial += 1;
                    assert!(decoded.contains('\u{FFFD}'), "token {id}: {decoded:?} {bytes:x?}");
                }
            }
        }
        // Every byte from 0x80 up is a token of its own: part of a character, never one.
        assert!(partial >= 128, "{partial} partial tokens");
        // Tokens of multi-byte characters give the text back byte for byte.
        let text = "Hé said “no” — ½ 🎭";
        let ids = tok.encode(text).unwrap();
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id).unwrap()).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
        assert!(ids
            .iter()
            .any(|&id| String::from_utf8(tok.token_bytes(id).unwrap()).is_err()));
    }
}
