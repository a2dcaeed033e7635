//! engine: agate's runtime. An [`Engine`] holds a loaded model and the KV block pool; a
//! [`Session`] is one conversation (prefill → evict → decode, sampling, stop strings, streaming,
//! chat turns that reuse the cache). Also: the default-model cache and fetch.
//!
//! ```no_run
//! use engine::{Engine, GenerateRequest};
//! let engine = Engine::builder().build()?; // the default model, fetched on first use
//! let mut session = engine.new_session();
//! let out = session.complete("The capital of France is", &GenerateRequest::default(), &mut |t| {
//!     print!("{t}");
//!     true
//! })?;
//! println!("\n{} tokens, KV {:?}", out.tokens.len(), session.kv_report().bytes_in_use);
//! # Ok::<(), engine::EngineError>(())
//! ```

pub mod atomic;
pub mod bench;
pub mod data;
mod decoding;
pub mod engine;
pub mod error;
pub mod eval;
pub mod model_cache;
pub mod policy;
pub mod report;
pub mod sampling;
pub mod scheduler;
pub mod session;
pub mod shared_context;
pub mod text;
pub mod train;
pub mod worker;

pub use engine::{Engine, EngineBuilder, EngineConfig};
pub use error::{EngineError, Result};
pub use gate_core::gate::DEFAULT_ATTENTION_WINDOW as DEFAULT_GATE_ATTENTION_WINDOW;
pub use gate_core::{AttentionGate, GateConfig, GateFileDtype};
pub use kv_store::{KvDtype, KvError};
pub use model_zoo::{ChatMessage, ModelConfig, PrefillKind, WeightFormat};
pub use policy::{
    AgMode, Policy, PolicyError, PolicyKind, PolicyOptions, PolicySpec, Recent, Setting,
    UnknownPolicy,
};
pub use report::KvReport;
pub use sampling::SamplingParams;
pub use scheduler::{
    EventSink, MetricsSnapshot, Prompt, RequestEvent, RequestStream, Scheduler, SchedulerConfig,
    Submission, Usage,
};
pub use session::{FinishReason, GenerateRequest, Generation, Positions, Session};
pub use shared_context::SharedContext;
pub use worker::{SessionWorker, StreamEvent, TextStream};
