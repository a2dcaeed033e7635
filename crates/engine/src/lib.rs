//! engine: agate's runtime. An [`Engine`] holds a loaded model and the KV block pool; a
//! [`Session`] is one conversation (prefill → evict → decode, sampling, stop strings, streaming,
//! chat turns that reuse the cache); [`policy`] builds the eviction policies; a [`Scheduler`]
//! runs many sessions in batched steps; [`model_cache`] fetches and verifies the default model.
//!
//! Cargo features (all on by default and in the `agate` CLI; an embedding program that only runs
//! sessions takes `default-features = false`): `train` (gate training, `engine::train`), `eval`
//! (`engine::eval`: task files, synthetic tasks, sweeps), `bench` (`engine::bench`: decode
//! benchmarks), `default-gates` (the default model's trained gates embedded, 13 MB, for `ag`
//! without a gates file); `cuda` is off by default.
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
#[cfg(feature = "bench")]
pub mod bench;
#[cfg(any(feature = "train", feature = "eval"))]
mod data_file;
mod decoding;
pub mod engine;
pub mod error;
#[cfg(feature = "eval")]
pub mod eval;
pub mod model_cache;
pub mod policy;
pub mod report;
pub mod sampling;
pub mod scheduler;
pub mod session;
pub mod shared_context;
pub mod text;
#[cfg(feature = "train")]
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
    Thresholds, UnknownPolicy,
};
pub use report::KvReport;
pub use sampling::{SamplingError, SamplingParams};
pub use scheduler::{
    EventSink, MetricsSnapshot, Prompt, RequestEvent, RequestStream, Scheduler, SchedulerConfig,
    Submission, Usage,
};
pub use session::{FinishReason, GenerateRequest, Generation, Positions, Session};
pub use shared_context::SharedContext;
pub use worker::{SessionWorker, StreamEvent, TextStream};
