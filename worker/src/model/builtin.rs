//! Models compiled into the binary, so the worker serves something with no files at all.

use super::ModelError;

pub(super) struct Builtin {
    pub name: &'static str,
    pub config: &'static str,
    pub tokenizer: &'static [u8],
    pub weights: &'static [u8],
    pub weights_name: &'static str,
}

/// The default model: `builtin:shakespeare`.
pub const BUILTIN_DEFAULT: &str = "builtin:shakespeare";

const BUILTINS: &[Builtin] = &[Builtin {
    // A 4.2M-parameter GPT-NeoX trained on Shakespeare's plays (see assets/shakespeare-neox/README.md).
    name: "shakespeare",
    config: include_str!("../../assets/shakespeare-neox/config.json"),
    tokenizer: include_bytes!("../../assets/shakespeare-neox/tokenizer.json"),
    weights: include_bytes!("../../assets/shakespeare-neox/model.safetensors"),
    weights_name: "builtin:shakespeare/model.safetensors",
}];

pub fn builtin_names() -> Vec<String> {
    BUILTINS.iter().map(|b| format!("builtin:{}", b.name)).collect()
}

pub(super) fn find(name: &str) -> Result<&'static Builtin, ModelError> {
    BUILTINS.iter().find(|b| b.name == name).ok_or_else(|| {
        ModelError::Config(format!(
            "no built-in model {name:?}; available: {}",
            builtin_names().join(", ")
        ))
    })
}
