//! `config.json` of a HuggingFace GPT-NeoX checkpoint.
//!
//! Both the classic keys (`rotary_pct`, `rotary_emb_base`) used by GPT-NeoX-20B and Pythia and
//! the transformers-5 form (`rope_parameters.partial_rotary_factor` / `rope_theta`) are read.

use serde::Deserialize;

use super::ModelError;

/// The activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (erf), HF's `gelu`.
    GeluErf,
    /// Tanh approximation, HF's `gelu_new`, `gelu_fast` and `gelu_pytorch_tanh`.
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self, ModelError> {
        match name {
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            other => Err(ModelError::Config(format!(
                "hidden_act {other:?} is not supported (expected gelu, gelu_new, gelu_fast, gelu_pytorch_tanh or relu)"
            ))),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawRopeParameters {
    partial_rotary_factor: Option<f64>,
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    intermediate_size: usize,
    hidden_act: Option<String>,
    rotary_pct: Option<f64>,
    rotary_emb_base: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: usize,
    layer_norm_eps: Option<f64>,
    use_parallel_residual: Option<bool>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    eos_token_id: Option<serde_json::Value>,
    bos_token_id: Option<serde_json::Value>,
}

/// Validated model hyper-parameters. Nothing about any particular checkpoint is hard-coded.
#[derive(Debug, Clone, PartialEq)]
pub struct NeoXConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub intermediate_size: usize,
    pub activation: Activation,
    /// Number of leading dims of each head that are rotated (even).
    pub rotary_dims: usize,
    pub rotary_base: f64,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub use_parallel_residual: bool,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// The dtype the checkpoint was saved in, as written in the config.
    pub torch_dtype: Option<String>,
    pub eos_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
}

fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|x| x.as_u64()).and_then(|x| u32::try_from(x).ok()),
        _ => None,
    }
}

impl NeoXConfig {
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json is not a GPT-NeoX config: {e}")))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if let Some(t) = &raw.model_type {
            if t != "gpt_neox" {
                return bad(format!("model_type is {t:?}, expected \"gpt_neox\""));
            }
        }
        if raw.hidden_size == 0 || raw.num_attention_heads == 0 || raw.num_hidden_layers == 0 {
            return bad("hidden_size, num_attention_heads and num_hidden_layers must be positive".into());
        }
        if raw.vocab_size == 0 || raw.intermediate_size == 0 || raw.max_position_embeddings == 0 {
            return bad("vocab_size, intermediate_size and max_position_embeddings must be positive".into());
        }
        if !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                raw.hidden_size, raw.num_attention_heads
            ));
        }
        if let Some(s) = &raw.rope_scaling {
            if !s.is_null() {
                return bad(format!("rope_scaling {s} is not supported"));
            }
        }
        let rp = raw.rope_parameters.as_ref();
        if let Some(t) = rp.and_then(|r| r.rope_type.as_deref()) {
            if t != "default" {
                return bad(format!(
                    "rope_parameters.rope_type {t:?} is not supported (only \"default\")"
                ));
            }
        }
        let rotary_pct = raw
            .rotary_pct
            .or(raw.partial_rotary_factor)
            .or(rp.and_then(|r| r.partial_rotary_factor))
            .unwrap_or(0.25);
        let rotary_base = raw
            .rotary_emb_base
            .or(raw.rope_theta)
            .or(rp.and_then(|r| r.rope_theta))
            .unwrap_or(10000.0);
        if !(rotary_pct > 0.0 && rotary_pct <= 1.0) {
            return bad(format!("rotary_pct {rotary_pct} must be in (0, 1]"));
        }
        if rotary_base <= 0.0 {
            return bad(format!("rotary_emb_base {rotary_base} must be positive"));
        }
        let head_dim = raw.hidden_size / raw.num_attention_heads;
        // HF: int(head_dim * rotary_pct).
        let rotary_dims = (head_dim as f64 * rotary_pct) as usize;
        if rotary_dims == 0 || !rotary_dims.is_multiple_of(2) {
            return bad(format!(
                "rotary_pct {rotary_pct} of head dim {head_dim} gives {rotary_dims} rotary dims; it must be even and positive"
            ));
        }
        let activation = Activation::parse(raw.hidden_act.as_deref().unwrap_or("gelu"))?;
        let eps = raw.layer_norm_eps.unwrap_or(1e-5);
        if eps <= 0.0 {
            return bad(format!("layer_norm_eps {eps} must be positive"));
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_heads: raw.num_attention_heads,
            num_layers: raw.num_hidden_layers,
            intermediate_size: raw.intermediate_size,
            activation,
            rotary_dims,
            rotary_base,
            max_position_embeddings: raw.max_position_embeddings,
            layer_norm_eps: eps,
            use_parallel_residual: raw.use_parallel_residual.unwrap_or(true),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(true),
            torch_dtype: raw.torch_dtype.or(raw.dtype),
            eos_token_id: first_id(&raw.eos_token_id),
            bos_token_id: first_id(&raw.bos_token_id),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// A short stable description, compared across ranks so a group never mixes checkpoints.
    pub fn fingerprint(&self) -> String {
        format!(
            "neox:v{}:h{}:a{}:l{}:i{}:r{}:p{}",
            self.vocab_size,
            self.hidden_size,
            self.num_heads,
            self.num_layers,
            self.intermediate_size,
            self.rotary_dims,
            self.use_parallel_residual as u8
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"model_type":"gpt_neox","vocab_size":512,"hidden_size":64,"num_attention_heads":4,
        "num_hidden_layers":2,"intermediate_size":256,"hidden_act":"gelu","rotary_pct":0.25,
        "rotary_emb_base":10000,"max_position_embeddings":256,"use_parallel_residual":true}"#;

    fn with(key: &str, value: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(BASE).unwrap();
        v[key] = serde_json::from_str(value).unwrap();
        v.to_string()
    }

    #[test]
    fn reads_classic_keys() {
        let c = NeoXConfig::from_json(BASE).unwrap();
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.rotary_dims, 4);
        assert_eq!(c.activation, Activation::GeluErf);
        assert!(c.use_parallel_residual);
    }

    #[test]
    fn reads_transformers5_rope_parameters() {
        let mut v: serde_json::Value = serde_json::from_str(BASE).unwrap();
        v.as_object_mut().unwrap().remove("rotary_pct");
        v.as_object_mut().unwrap().remove("rotary_emb_base");
        v["rope_parameters"] =
            serde_json::json!({"rope_type":"default","partial_rotary_factor":0.5,"rope_theta":500.0});
        let c = NeoXConfig::from_json(&v.to_string()).unwrap();
        assert_eq!(c.rotary_dims, 8);
        assert_eq!(c.rotary_base, 500.0);
    }

    #[test]
    fn rejects_unknown_activation_and_bad_shapes() {
        let e = NeoXConfig::from_json(&with("hidden_act", "\"swish\"")).unwrap_err();
        assert!(e.to_string().contains("hidden_act \"swish\""), "{e}");
        let e = NeoXConfig::from_json(&with("num_attention_heads", "5")).unwrap_err();
        assert!(e.to_string().contains("not divisible"), "{e}");
        let e = NeoXConfig::from_json(&with("rope_scaling", r#"{"type":"linear","factor":2}"#)).unwrap_err();
        assert!(e.to_string().contains("rope_scaling"), "{e}");
        let e = NeoXConfig::from_json(&with("model_type", "\"llama\"")).unwrap_err();
        assert!(e.to_string().contains("llama"), "{e}");
        assert!(NeoXConfig::from_json("{").is_err());
    }
}
