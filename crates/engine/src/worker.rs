//! `SessionWorker`: one [`Session`](crate::Session) running on its own thread, driven through crossbeam channels,
//! so a Rust program can stream generated text as an iterator without holding a borrow of the
//! session. Submit a prompt, iterate the returned [`TextStream`]: text chunks as they are decoded,
//! then one final item with the [`Generation`] and the session's [`KvReport`].
//!
//! Invariants: requests run in submission order, one at a time, over the same session (chat turns
//! reuse its cache); dropping a stream before its end cancels that request at the next token;
//! dropping the worker lets the queued requests finish, then joins the thread. Errors (and a
//! panic of the worker thread) reach the caller as `Err` items, never as a panic.

use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver, Sender};

use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::policy::Policy;
use crate::report::KvReport;
use crate::session::{GenerateRequest, Generation};

/// One item of a [`TextStream`].
#[derive(Clone, Debug)]
pub enum StreamEvent {
    /// Newly decoded text.
    Text(String),
    /// The request finished: its generation and the cache afterwards.
    Done {
        /// The result of the request.
        generation: Generation,
        /// The session's cache after the request.
        kv: KvReport,
    },
}

/// How a prompt is fed.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Complete,
    Chat,
}

struct Job {
    mode: Mode,
    prompt: String,
    request: GenerateRequest,
    events: Sender<Result<StreamEvent>>,
}

/// The text of one request, as it is generated; ends after [`StreamEvent::Done`] or an error.
pub struct TextStream {
    events: Receiver<Result<StreamEvent>>,
    finished: bool,
}

impl Iterator for TextStream {
    type Item = Result<StreamEvent>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        match self.events.recv() {
            Ok(item) => {
                self.finished = !matches!(item, Ok(StreamEvent::Text(_)));
                Some(item)
            }
            Err(_) => {
                self.finished = true;
                Some(Err(EngineError::WorkerStopped))
            }
        }
    }
}

impl TextStream {
    /// Drains the stream, returning the whole text, the generation and the final KV report.
    pub fn collect_all(self) -> Result<(String, Generation, KvReport)> {
        let mut text = String::new();
        for item in self {
            match item? {
                StreamEvent::Text(t) => text.push_str(&t),
                StreamEvent::Done { generation, kv } => return Ok((text, generation, kv)),
            }
        }
        Err(EngineError::WorkerStopped)
    }
}

/// A session on its own thread.
pub struct SessionWorker {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl SessionWorker {
    /// Starts a thread running a new session of `engine` with `policy` (validated first).
    pub fn spawn(engine: &Engine, policy: Policy) -> Result<Self> {
        let mut session = engine.session_with(policy)?;
        let (jobs, queue) = unbounded::<Job>();
        let thread = std::thread::Builder::new()
            .name("agate-session".into())
            .spawn(move || {
                for job in queue {
                    let events = job.events.clone();
                    let mut on_text =
                        |t: &str| events.send(Ok(StreamEvent::Text(t.to_string()))).is_ok();
                    let result = match job.mode {
                        Mode::Complete => session.complete(&job.prompt, &job.request, &mut on_text),
                        Mode::Chat => session.chat(&job.prompt, &job.request, &mut on_text),
                    };
                    let last = result.map(|generation| StreamEvent::Done {
                        generation,
                        kv: session.kv_report(),
                    });
                    // The caller may have dropped the stream: nothing to tell.
                    let _ = job.events.send(last);
                }
            })
            .map_err(|source| EngineError::ThreadSpawn {
                thread: "session",
                source,
            })?;
        Ok(SessionWorker {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Queues a raw-text completion of `prompt`; iterate the stream for its text.
    pub fn complete(&self, prompt: &str, request: &GenerateRequest) -> TextStream {
        self.submit(Mode::Complete, prompt, request)
    }

    /// Queues a chat turn (`message` from the user, the chat template applied; the session keeps
    /// the conversation); iterate the stream for the answer.
    pub fn chat(&self, message: &str, request: &GenerateRequest) -> TextStream {
        self.submit(Mode::Chat, message, request)
    }

    fn submit(&self, mode: Mode, prompt: &str, request: &GenerateRequest) -> TextStream {
        let (events, rx) = unbounded();
        let job = Job {
            mode,
            prompt: prompt.to_string(),
            request: request.clone(),
            events,
        };
        // If the thread is gone the job (and its sender) is dropped: the stream reports an error.
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job);
        }
        TextStream {
            events: rx,
            finished: false,
        }
    }
}

impl Drop for SessionWorker {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            // A panicked worker has already reported through its streams.
            let _ = t.join();
        }
    }
}
