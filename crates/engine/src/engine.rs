//! `Engine`: one loaded model (weights memory-mapped, tokenizer, config) and the KV block pool
//! shared by all of its sessions. Cheap to clone and safe to share across threads; sessions hold
//! a clone.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use kv_store::{BlockPool, KvDtype, PoolConfig};
use model_zoo::{LoadedModel, ModelConfig, SourceKind, Tokenizer, WeightFormat};

use crate::error::{EngineError, Result};
use crate::model_cache;
use crate::policy::Policy;
use crate::session::Session;

/// Settings of an engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// A GGUF file or Hugging Face directory; `None` = the default model (fetched if missing).
    pub model: Option<PathBuf>,
    /// How weights are held in memory.
    pub weights: WeightFormat,
    /// Element type of the KV cache.
    pub kv_dtype: KvDtype,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV memory budget shared by all sessions, in MiB.
    pub kv_memory_mb: usize,
    /// Prompt tokens per forward pass during prefill.
    pub prefill_chunk: usize,
    /// A Hugging Face `config.json` whose shapes get random weights instead of loading `model`
    /// (speed measurements of models without their files; outputs mean nothing).
    pub dummy_weights: Option<PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            model: None,
            weights: WeightFormat::Auto,
            kv_dtype: KvDtype::F16,
            block_size: 16,
            kv_memory_mb: 1024,
            prefill_chunk: 512,
            dummy_weights: None,
        }
    }
}

/// Receives one line per step of slow work (fetching the default model).
pub type ProgressLine = Box<dyn FnMut(&str)>;

/// Builds an [`Engine`].
#[derive(Default)]
pub struct EngineBuilder {
    cfg: EngineConfig,
    say: Option<ProgressLine>,
}

impl EngineBuilder {
    /// Use this GGUF file or Hugging Face directory instead of the default model.
    pub fn model(mut self, path: impl Into<PathBuf>) -> Self {
        self.cfg.model = Some(path.into());
        self
    }

    /// Weight format (default: auto).
    pub fn weights(mut self, format: WeightFormat) -> Self {
        self.cfg.weights = format;
        self
    }

    /// KV cache element type (default f16).
    pub fn kv_dtype(mut self, dtype: KvDtype) -> Self {
        self.cfg.kv_dtype = dtype;
        self
    }

    /// Tokens per KV block (default 16).
    pub fn block_size(mut self, tokens: usize) -> Self {
        self.cfg.block_size = tokens;
        self
    }

    /// KV memory budget in MiB (default 1024).
    pub fn kv_memory_mb(mut self, mb: usize) -> Self {
        self.cfg.kv_memory_mb = mb;
        self
    }

    /// Prompt tokens per prefill forward pass (default 512).
    pub fn prefill_chunk(mut self, tokens: usize) -> Self {
        self.cfg.prefill_chunk = tokens;
        self
    }

    /// All settings at once.
    pub fn config(mut self, cfg: EngineConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// Receives progress lines (fetching the default model).
    pub fn on_progress(mut self, say: impl FnMut(&str) + 'static) -> Self {
        self.say = Some(Box::new(say));
        self
    }

    /// Loads the model and creates the block pool.
    pub fn build(self) -> Result<Engine> {
        let EngineBuilder { cfg, say } = self;
        for (setting, value) in [
            ("EngineConfig.block_size", cfg.block_size),
            ("EngineConfig.kv_memory_mb", cfg.kv_memory_mb),
            ("EngineConfig.prefill_chunk", cfg.prefill_chunk),
        ] {
            if value == 0 {
                return Err(EngineError::Setting {
                    setting,
                    problem: "must be > 0, got 0".into(),
                });
            }
        }
        let started = Instant::now();
        let loaded = match (&cfg.dummy_weights, &cfg.model) {
            (Some(config), _) => model_zoo::load_random(config, cfg.weights, 0)?,
            (None, Some(path)) => model_zoo::load(path, cfg.weights)?,
            (None, None) => {
                let mut say = say.unwrap_or_else(|| Box::new(|_: &str| {}));
                model_zoo::load(&model_cache::ensure_default_model(&mut *say)?, cfg.weights)?
            }
        };
        let mc = loaded.model.config();
        let bytes = cfg.kv_memory_mb.saturating_mul(1 << 20);
        let pool = BlockPool::new(PoolConfig::from_memory_budget(
            cfg.block_size,
            mc.head_dim,
            cfg.kv_dtype,
            bytes,
        ));
        Ok(Engine {
            inner: Arc::new(Inner {
                loaded,
                pool,
                cfg,
                load_secs: started.elapsed().as_secs_f64(),
                fingerprint: std::sync::OnceLock::new(),
            }),
        })
    }
}

struct Inner {
    loaded: LoadedModel,
    pool: BlockPool,
    cfg: EngineConfig,
    load_secs: f64,
    fingerprint: std::sync::OnceLock<String>,
}

/// A loaded model and its KV block pool.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts a builder.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// A new session with the full cache (no eviction).
    pub fn new_session(&self) -> Session {
        self.session_with(Policy::Full)
            .expect("the full-cache policy always builds")
    }

    /// A new session evicting with `policy`.
    pub fn session_with(&self, policy: Policy) -> Result<Session> {
        policy.validate(self.model_config())?;
        Session::new(self.clone(), policy)
    }

    /// The model's shape.
    pub fn model_config(&self) -> &ModelConfig {
        self.inner.loaded.model.config()
    }

    /// The decoder.
    pub fn model(&self) -> &model_zoo::LlamaModel {
        &self.inner.loaded.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.loaded.tokenizer
    }

    /// The shared KV block pool.
    pub fn pool(&self) -> &BlockPool {
        &self.inner.pool
    }

    /// The settings this engine was built with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// The model file or directory.
    pub fn model_path(&self) -> &std::path::Path {
        &self.inner.loaded.path
    }

    /// GGUF or safetensors.
    pub fn source_kind(&self) -> SourceKind {
        self.inner.loaded.kind
    }

    /// What gates record about the model they were trained for: architecture, shape and a
    /// fingerprint of the weights file(s) (sha256 of their sizes and first and last MiB each,
    /// computed once).
    pub fn model_identity(&self) -> Result<gate_core::ModelIdentity> {
        let fingerprint = match self.inner.fingerprint.get() {
            Some(f) => f.clone(),
            None => {
                let f = crate::model_cache::weights_fingerprint(&self.inner.loaded.path)?;
                self.inner.fingerprint.get_or_init(|| f).clone()
            }
        };
        Ok(self.model_config().gate_identity(&fingerprint))
    }

    /// The default Attention-Gate shape for this model (`gate_core::GateConfig::new` over its
    /// hidden size, KV heads, layers and RoPE base), to adjust before [`Engine::random_gates`].
    pub fn gate_config(&self) -> gate_core::GateConfig {
        let cfg = self.model_config();
        gate_core::GateConfig::new(
            cfg.hidden_size,
            cfg.n_kv_heads,
            cfg.n_layers,
            cfg.rope_theta,
        )
    }

    /// Randomly initialised Attention-Gate parameters of shape `gate_cfg` (seeded), bound to this
    /// model's identity. `gate_cfg.bias_init` is the initial keep logit (the default, +3, keeps
    /// almost everything; 0 starts near a coin flip). For training, or for exercising the
    /// mechanics before training.
    pub fn random_gates(
        &self,
        gate_cfg: &gate_core::GateConfig,
        seed: u64,
    ) -> Result<gate_core::AttentionGate> {
        let cfg = self.model_config();
        if let Some(why) = cfg.gate_shape_mismatch(gate_cfg) {
            return Err(crate::PolicyError::GatesDoNotFit(why).into());
        }
        let mut gates =
            gate_core::AttentionGate::random(gate_cfg, seed, &candle_core::Device::Cpu)?;
        gates.set_identity(self.model_identity()?);
        Ok(gates)
    }

    /// True when `other` is a clone of this engine (same model, same pool).
    pub fn same_engine(&self, other: &Engine) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Seconds spent loading the model.
    pub fn load_secs(&self) -> f64 {
        self.inner.load_secs
    }
}
