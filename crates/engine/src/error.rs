//! The engine's error type: every failure a user can cause, with a one-line message that names
//! the value at fault.
//!
//! Invariants: an error from another crate or module is wrapped, never flattened to a string,
//! so [`std::error::Error::source`] reaches it (`Model`, with candle's errors, `Kv`, `Gate`,
//! `Policy`, `Sampling`, `ThreadSpawn`, `Io`);
//! messages name settings by their library names (`keep`, `SweepPlan.ratios`), never by a
//! command-line flag: front ends map them to their own names (the CLI to `--keep`, the server
//! to `kv_keep`) from the typed variants.

/// Errors from loading models, running sessions and fetching the default model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] model_zoo::ModelError),
    /// The default model could not be fetched.
    #[error(transparent)]
    Fetch(#[from] crate::model_cache::FetchError),
    /// The KV store refused (e.g. the memory budget is exhausted).
    #[error("KV cache: {0}")]
    Kv(#[from] kv_store::KvError),
    /// A policy cannot be built or does not fit the model; front ends name its settings
    /// ([`crate::PolicyError::describe`]).
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// A setting of a plan (a sweep, a benchmark, a task set) is outside its domain; `setting`
    /// is the field (`SweepPlan.ratios`), which a front end maps to its own name.
    #[error("{setting}: {problem}")]
    Setting {
        /// The field at fault, as `Type.field`.
        setting: &'static str,
        /// What is wrong, naming the value.
        problem: String,
    },
    /// Scoring one evaluation task failed (the source says why).
    #[error(
        "task {number} ({kind}{}): {source}",
        policy.map_or_else(String::new, |p| format!(", policy {p}"))
    )]
    Task {
        /// The task's number in its file or set (1-based).
        number: usize,
        /// Its kind (`choice`, `generate`, `perplexity`).
        kind: &'static str,
        /// The policy it ran under, if the failure is a policy's.
        policy: Option<crate::policy::PolicyKind>,
        /// What failed.
        #[source]
        source: Box<EngineError>,
    },
    /// Attention-Gate parameters or a gates file are unusable (boxed: the variant stays small).
    #[error(transparent)]
    Gate(Box<gate_core::GateError>),
    /// A policy option (`key=value`) has an unknown key or a value outside its domain.
    #[error("policy option `{key}={value}`: expected {expected}")]
    PolicyOption {
        /// The key as given.
        key: String,
        /// The value as given.
        value: String,
        /// What the key accepts.
        expected: String,
    },
    /// A policy option was given to a policy it does not apply to.
    #[error("policy option `{key}` does not apply to {policy} (it applies to {applies_to})")]
    PolicyOptionNotApplicable {
        /// The key.
        key: String,
        /// The policy it was given to.
        policy: crate::policy::PolicyKind,
        /// The policies it applies to.
        applies_to: String,
    },
    /// A policy that evicts inside the prefill (Attention-Gate) cannot start from a
    /// [`crate::SharedContext`].
    #[error("policy {policy} cannot start from a shared context: it evicts inside the prefill")]
    NotShareable {
        /// The policy's name.
        policy: &'static str,
    },
    /// Reading or writing a file failed (the message names the file).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A forward pass produced NaN or infinite logits: the model's weights or metadata are
    /// broken. The pass changed nothing.
    #[error(
        "{}: the model produced non-finite logits (NaN or infinity) at position {position}: its weights or metadata are broken (e.g. NaN weights, a non-positive RMSNorm epsilon)",
        model.display()
    )]
    NonFiniteLogits {
        /// The model file or directory.
        model: std::path::PathBuf,
        /// Position of the first token whose logits are not finite.
        position: u32,
    },
    /// Training's cross-entropy is not finite before any update: the frozen model's weights or
    /// metadata are broken.
    #[error(
        "{}: the model's cross-entropy is not finite at step {step}: its weights or metadata are broken (e.g. NaN weights)",
        model.display()
    )]
    NonFiniteLoss {
        /// The model file or directory.
        model: std::path::PathBuf,
        /// The optimiser step (1-based).
        step: usize,
    },
    /// Training's loss stopped being finite after the trained parameters were updated: the run
    /// diverged (a learning rate or eviction weight too large), the model is not at fault.
    #[error("training diverged at step {step}: the loss is not finite")]
    TrainingDiverged {
        /// The optimiser step (1-based) whose loss is not finite.
        step: usize,
    },
    /// In cache positions, the tokens do not fit beside what the widest KV head holds (a policy
    /// with a fixed budget, `keep`, bounds what heads hold).
    #[error("prompt of {new} tokens does not fit: the widest KV head already spans {span} cache positions and the model's context is {context} tokens")]
    CacheOverflow {
        /// Tokens to add.
        new: usize,
        /// Cache positions the widest KV head spans.
        span: usize,
        /// The model's context length.
        context: usize,
    },
    /// The scheduler's queue is full.
    #[error("the server is busy: {capacity} requests are already waiting")]
    QueueFull {
        /// Requests the queue holds.
        capacity: usize,
    },
    /// A request needs more KV blocks than the whole pool holds, even with nothing else in it.
    #[error("the request needs {needed} KV blocks but the whole pool has {capacity}: give the engine more KV memory, or use an evicting policy")]
    KvCapacity {
        /// Blocks needed.
        needed: usize,
        /// The pool's capacity in blocks.
        capacity: usize,
    },
    /// The scheduler stopped serving a request: it is shutting down, or a step panicked and it
    /// caught the panic (the message says which; a batched pass that failed with an error is
    /// [`EngineError::StepFailed`]).
    #[error("scheduler: {0}")]
    Scheduler(String),
    /// The prompt does not fit in the model's context.
    #[error("prompt of {new} tokens does not fit: {seen} tokens already in the session and the model's context is {context} tokens")]
    ContextOverflow {
        /// Tokens to add.
        new: usize,
        /// Tokens already seen.
        seen: usize,
        /// The model's context length.
        context: usize,
    },
    /// An input a step needs is empty; `what` names it (`the prompt`, `the message`, `the
    /// shared context`, `the token list to score`).
    #[error("{what} is empty")]
    EmptyInput {
        /// The input, in words.
        what: &'static str,
    },
    /// Generation was asked of a session that holds no next-token logits and no pending token.
    #[error("nothing to continue from: prefill a prompt first")]
    NothingToContinue,
    /// A sampling parameter is outside its domain (the source names the field and value).
    #[error(transparent)]
    Sampling(#[from] crate::sampling::SamplingError),
    /// A positions mode name other than `original` or `cache`.
    #[error("unknown positions mode `{name}` (expected original or cache)")]
    UnknownPositions {
        /// The name as given.
        name: String,
    },
    /// A batched forward pass was given sessions of different engines.
    #[error("a batched pass runs sessions of one engine only")]
    MixedEngines,
    /// A [`crate::SessionWorker`]'s thread ended before it finished a request (it panicked).
    #[error("the session worker stopped before finishing the request")]
    WorkerStopped,
    /// A batched forward pass of the scheduler failed as a whole; every request in it fails
    /// with this (shared) cause.
    #[error("scheduler: a batched step failed: {source}")]
    StepFailed {
        /// Why the pass failed.
        #[source]
        source: std::sync::Arc<EngineError>,
    },
    /// The operating system refused to start a thread.
    #[error("cannot start the {thread} thread: {source}")]
    ThreadSpawn {
        /// The thread's role (`session`, `scheduler`).
        thread: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A data file (training text or chats, evaluation tasks) is unusable: a line of it, or the
    /// whole file (`line: None`).
    #[error(
        "{}{}: {problem}{}",
        file.display(),
        line.map_or_else(String::new, |l| format!(":{l}")),
        source.as_ref().map_or_else(String::new, |s| format!(": {s}"))
    )]
    DataFile {
        /// The file (or the name its text was given under).
        file: std::path::PathBuf,
        /// The line at fault (1-based), if one is.
        line: Option<usize>,
        /// What is wrong.
        problem: String,
        /// The error behind it (reading the file, parsing JSON, tokenizing), if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A training checkpoint cannot be written, read, or resumed by this run (corrupt, or
    /// written by another configuration).
    #[error(
        "{}: {problem}{}",
        file.display(),
        source.as_ref().map_or_else(String::new, |s| format!(": {s}"))
    )]
    Checkpoint {
        /// The checkpoint file.
        file: std::path::PathBuf,
        /// What is wrong.
        problem: String,
        /// The error behind it (reading, deserialising), if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Training diverged (a trained parameter is no longer finite): its outputs are not written.
    #[error("{}: not written: parameter `{parameter}` is no longer finite, the run diverged", file.display())]
    Diverged {
        /// The output that was not written.
        file: std::path::PathBuf,
        /// The first parameter that is not finite.
        parameter: String,
    },
    /// An evaluation has nothing to score: a task's text or prompt tokenizes to too little, no
    /// task was scored, a chat template hides where the question starts, or a sweep's runner
    /// gave the wrong number of summaries.
    #[error("{0}")]
    Unscored(String),
    /// A long call stopped early because its progress callback asked it to (a user's Ctrl-C);
    /// it changed nothing.
    #[error("the {0} stopped before it finished")]
    Stopped(&'static str),
}

impl From<gate_core::GateError> for EngineError {
    fn from(e: gate_core::GateError) -> Self {
        EngineError::Gate(Box::new(e))
    }
}

/// Result alias for the engine.
pub type Result<T> = std::result::Result<T, EngineError>;
