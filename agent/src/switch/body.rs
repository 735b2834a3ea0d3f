//! Bodies through the switch, buffered like nginx's defaults so that slow
//! clients never hold an app server's worker.
//!
//! gunicorn's sync workers serve one request at a time and expect a
//! buffering proxy in front: a client trickling its request body, or
//! reading an answer slowly, would otherwise keep a worker busy for as long
//! as it likes. So a request body is read whole before a container is even
//! chosen (in memory, or spooled to an unlinked temporary file past
//! `max_buffered_body`), upgrade requests included, and an answer is read
//! from the container as fast as it comes, up to `max_buffered_response`
//! ahead of the client: an answer larger than that still waits on a client
//! that reads slowly. Answers that stream on purpose (SSE,
//! `X-Accel-Buffering: no`) and upgraded connections pass as they are.

use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, Stream};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::io::ReaderStream;

use super::pool::Conn;
use super::route::{Backend, InFlight};

/// Any error a body can end with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Chunks read back from a spooled body.
const SPOOL_CHUNK: usize = 64 * 1024;

/// Memory all buffered bodies and answers of one app's switch may hold at
/// once (`buffer_memory`). Each connection's own limits are small; ten
/// thousand connections that send small requests for large pages and never
/// read are not. Past it, request bodies are spooled to disk and answers are
/// read no further ahead than their clients read: slower, never out of
/// memory.
#[derive(Debug, Clone)]
pub(crate) struct Budget(Arc<Semaphore>);

impl Budget {
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))))
    }

    /// `n` bytes of it, if that much is left now.
    fn try_take(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n).ok()?;
        self.0.clone().try_acquire_many_owned(n).ok()
    }

    /// Bytes left now.
    fn left(&self) -> usize {
        self.0.available_permits()
    }
}

/// How request bodies and answers are buffered (`[apps.NAME.switch]`).
#[derive(Debug, Clone)]
pub(crate) struct BodyLimits {
    /// Request bodies up to this stay in memory; larger ones are spooled.
    pub in_memory: u64,
    /// Larger request bodies are refused (413).
    pub max: u64,
    /// The whole request body must arrive within this (else 408).
    pub timeout: Duration,
    /// An answer is read this far ahead of the client.
    pub read_ahead: usize,
    /// What all buffers of the app's switch may hold together.
    pub budget: Budget,
}

/// Why a request body did not reach a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Declared or found larger than `max`: 413.
    TooLarge,
    /// Not whole within `timeout`: 408.
    Timeout,
    /// The client broke off.
    Broken,
    /// The temporary file could not be made or written (a full disk):
    /// the switch's fault, not the client's.
    Spool,
}

/// A body read whole into memory: a request body on its way to a
/// container, or an answer on its way to a client. It holds its share of
/// `buffer_memory` until it is dropped, once written out.
pub(crate) struct Whole {
    bytes: Option<Bytes>,
    _held: Option<OwnedSemaphorePermit>,
}

impl Whole {
    pub fn new(bytes: Option<Bytes>, held: Option<OwnedSemaphorePermit>) -> Self {
        Self { bytes, _held: held }
    }

    /// `chunks` as one body: the chunk itself when there is one, else
    /// joined (`len` bytes in all).
    fn joined(mut chunks: Vec<Bytes>, len: usize, held: Option<OwnedSemaphorePermit>) -> Self {
        let bytes = match chunks.len() {
            0 | 1 => chunks.pop(),
            _ => {
                let mut joined = BytesMut::with_capacity(len);
                for chunk in &chunks {
                    joined.extend_from_slice(chunk);
                }
                Some(joined.freeze())
            }
        };
        Self::new(bytes, held)
    }
}

impl Body for Whole {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.get_mut().bytes.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.bytes.as_ref().map_or(0, |b| b.len() as u64))
    }
}

/// A request body as it goes to a container.
pub(crate) enum RequestBody {
    Empty,
    /// Read whole, in memory.
    Full(Whole),
    /// Read whole into a temporary file (already unlinked), read back here
    /// (boxed: the reader is large, and rare).
    Spooled {
        chunks: Box<ReaderStream<tokio::fs::File>>,
        left: u64,
    },
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => f.write_str("Empty"),
            Self::Full(whole) => write!(f, "Full({:?} bytes)", whole.size_hint().exact()),
            Self::Spooled { left, .. } => write!(f, "Spooled({left} bytes left)"),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Full(whole) => Pin::new(whole).poll_frame(cx),
            Self::Spooled { chunks, left } => match Pin::new(chunks.as_mut()).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    *left = left.saturating_sub(chunk.len() as u64);
                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Full(whole) => whole.is_end_stream(),
            Self::Spooled { left, .. } => *left == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Full(whole) => whole.size_hint(),
            Self::Spooled { left, .. } => SizeHint::with_exact(*left),
        }
    }
}

/// Reads a request body whole within `limits.timeout`: in memory up to
/// `limits.in_memory` (and while the budget lasts), spooled beyond;
/// `declared` is its `Content-Length`. Returns the body, its length, and
/// whether the budget was short (it was spooled although it was small).
pub(crate) async fn read_request(
    body: Incoming,
    declared: Option<u64>,
    limits: &BodyLimits,
) -> Result<(RequestBody, u64, bool), Refused> {
    if declared.is_some_and(|len| len > limits.max) {
        return Err(Refused::TooLarge);
    }
    let mut short = false;
    let read = tokio::time::timeout(limits.timeout, collect(body, limits, &mut short))
        .await
        .unwrap_or(Err(Refused::Timeout))?;
    Ok((read.0, read.1, short))
}

async fn collect(
    mut body: Incoming,
    limits: &BodyLimits,
    short: &mut bool,
) -> Result<(RequestBody, u64), Refused> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    let mut spool: Option<tokio::fs::File> = None;
    let mut len: u64 = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| Refused::Broken)?.into_data() else {
            // Trailers: a container behind a buffering proxy gets none.
            continue;
        };
        len += data.len() as u64;
        if len > limits.max {
            return Err(Refused::TooLarge);
        }
        if spool.is_none() {
            // In memory while it fits this body's limit and the app's budget.
            let memory = if len <= limits.in_memory {
                limits.budget.try_take(data.len())
            } else {
                None
            };
            if let Some(more) = memory {
                match held.as_mut() {
                    Some(held) => held.merge(more),
                    None => held = Some(more),
                }
                chunks.push(data);
                continue;
            }
            // To a file: what was in memory too, and its share of the
            // budget goes back.
            if len <= limits.in_memory {
                *short = true;
            }
            let mut file = spool_file().await?;
            for chunk in chunks.drain(..) {
                file.write_all(&chunk).await.map_err(spool_failed)?;
            }
            held = None;
            spool = Some(file);
        }
        if let Some(file) = spool.as_mut() {
            file.write_all(&data).await.map_err(spool_failed)?;
        }
    }
    let body = match spool {
        Some(mut file) => {
            file.flush().await.map_err(spool_failed)?;
            file.seek(SeekFrom::Start(0)).await.map_err(spool_failed)?;
            RequestBody::Spooled {
                chunks: Box::new(ReaderStream::with_capacity(file, SPOOL_CHUNK)),
                left: len,
            }
        }
        None => RequestBody::Full(Whole::joined(
            chunks,
            usize::try_from(len).unwrap_or(0),
            held,
        )),
    };
    Ok((body, len))
}

/// A temporary file that is gone from the directory once made: nothing is
/// left behind, whatever happens to the request or to deployd.
async fn spool_file() -> Result<tokio::fs::File, Refused> {
    match tokio::task::spawn_blocking(tempfile::tempfile).await {
        Ok(Ok(file)) => Ok(tokio::fs::File::from_std(file)),
        Ok(Err(e)) => Err(spool_failed(e)),
        Err(e) => Err(spool_failed(std::io::Error::other(e))),
    }
}

fn spool_failed(e: std::io::Error) -> Refused {
    tracing::warn!(error = %e, dir = %std::env::temp_dir().display(),
        "cannot spool a request body to a temporary file");
    Refused::Spool
}

/// What the switch answers with: a container's body, or one of its own.
/// An enum rather than a boxed body: one allocation less per request.
pub(crate) enum ProxyBody {
    /// Streamed as the container sends it (it streams on purpose).
    Upstream(Tracked),
    /// Whole: the switch's own answer, or a container's read to its end.
    Own(Whole),
    /// A container's answer, read ahead by a task of its own.
    ReadAhead(ReadAhead),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Upstream(tracked) => Pin::new(tracked).poll_frame(cx),
            Self::Own(whole) => Pin::new(whole).poll_frame(cx),
            Self::ReadAhead(ahead) => ahead.poll(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream(tracked) => tracked.is_end_stream(),
            Self::Own(whole) => whole.is_end_stream(),
            Self::ReadAhead(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream(tracked) => tracked.size_hint(),
            Self::Own(whole) => whole.size_hint(),
            Self::ReadAhead(ahead) => ahead.size_hint,
        }
    }
}

/// A response body from a container: holds its request in flight until it
/// ends, then gives the connection back. A drain that gives up closes the
/// connection, which ends the body with an error (the client's connection
/// is then cut: its answer is incomplete).
pub(crate) struct Tracked {
    inner: Incoming,
    done: Option<(Conn, InFlight)>,
    backend: Arc<Backend>,
}

impl Tracked {
    pub fn new(inner: Incoming, conn: Conn, guard: InFlight, backend: Arc<Backend>) -> Self {
        Self {
            inner,
            done: Some((conn, guard)),
            backend,
        }
    }

    fn finish(&mut self, reuse: bool) {
        if let Some((conn, guard)) = self.done.take() {
            if reuse {
                self.backend.pool.put(conn);
            }
            drop(guard);
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(None) => {
                self.finish(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.finish(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // An empty body may never be polled: its connection is still good.
        let reuse = self.inner.is_end_stream();
        self.finish(reuse);
    }
}

/// Reads a container's answer ahead of the client. What the container has
/// sent already is taken at once: an answer that is complete (most are,
/// by the time their head is in) becomes a whole body, its connection goes
/// back to the pool and the container is free, with no task and no copy
/// beyond joining its frames. Anything else is read on by a task of its
/// own, up to `limit` bytes ahead of the client. What is held counts
/// against `budget`; with less than `limit` of it left, the answer is not
/// read ahead at all but passed at the client's pace.
pub(crate) fn read_ahead(
    mut body: Tracked,
    limit: usize,
    budget: &Budget,
) -> Result<ProxyBody, BoxError> {
    if budget.left() < limit {
        return Ok(ProxyBody::Upstream(body));
    }
    // Data taken so far, and trailers (an answer's last frame, if any).
    let mut taken: Vec<Bytes> = Vec::new();
    let mut trailers = None;
    let mut bytes = 0usize;
    let ended = loop {
        if body.is_end_stream() {
            break true;
        }
        if bytes >= limit {
            break false;
        }
        match body.frame().now_or_never() {
            Some(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    bytes += data.len();
                    taken.push(data);
                }
                Err(frame) => trailers = Some(frame),
            },
            Some(Some(Err(e))) => return Err(e),
            Some(None) => break true,
            None => break false,
        }
    };
    if ended && trailers.is_none() {
        drop(body);
        let held = budget.try_take(bytes);
        return Ok(ProxyBody::Own(Whole::joined(taken, bytes, held)));
    }
    let taken = taken.into_iter().map(Frame::data).chain(trailers).collect();
    let size_hint = body.size_hint();
    let limit = u32::try_from(limit).unwrap_or(u32::MAX).max(1);
    let room = Arc::new(Semaphore::new(limit as usize));
    let (frames, receiver) = mpsc::unbounded_channel();
    tokio::spawn(pump(body, taken, frames, room, budget.clone(), limit));
    Ok(ProxyBody::ReadAhead(ReadAhead {
        frames: receiver,
        size_hint,
    }))
}

/// A frame read ahead, with the room it holds in its answer's buffer and
/// in the app's budget: both are given back when the client takes it.
type Ahead = Result<(Frame<Bytes>, Held), BoxError>;

/// Room held by a frame read ahead.
#[derive(Debug)]
struct Held {
    _room: Option<OwnedSemaphorePermit>,
    _budget: Option<OwnedSemaphorePermit>,
}

/// The client's side of a read-ahead answer.
pub(crate) struct ReadAhead {
    frames: mpsc::UnboundedReceiver<Ahead>,
    size_hint: SizeHint,
}

impl ReadAhead {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.frames.poll_recv(cx) {
            // The room goes back as the frame goes to the client.
            Poll::Ready(Some(Ok((frame, _held)))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Reads the container's answer into the channel as fast as it comes while
/// there is room in its buffer and in the budget (without budget, one frame
/// at a time); stops when the client is gone (closing the container's
/// connection: its answer is not wanted).
async fn pump(
    mut body: Tracked,
    taken: Vec<Frame<Bytes>>,
    frames: mpsc::UnboundedSender<Ahead>,
    room: Arc<Semaphore>,
    budget: Budget,
    limit: u32,
) {
    let send = async |frame: Frame<Bytes>| -> bool {
        let size = frame.data_ref().map_or(0, Bytes::len);
        let n = u32::try_from(size).unwrap_or(u32::MAX).min(limit);
        let mut held = Held {
            _room: None,
            _budget: None,
        };
        if n > 0 {
            // Never waits on the budget: other clients may hold it for as
            // long as they like. Without a share of it the frame takes the
            // whole room, so it goes out only once the client has taken
            // everything before it: the client's pace, as unbuffered.
            let share = budget.try_take(n as usize);
            let wanted = if share.is_some() { n } else { limit };
            tokio::select! {
                room = room.clone().acquire_many_owned(wanted) => match room {
                    Ok(room) => held = Held { _room: Some(room), _budget: share },
                    Err(_) => return false,
                },
                () = frames.closed() => return false,
            }
        }
        frames.send(Ok((frame, held))).is_ok()
    };
    for frame in taken {
        if !send(frame).await {
            return;
        }
    }
    loop {
        let next = tokio::select! {
            next = body.frame() => next,
            () = frames.closed() => return,
        };
        match next {
            None => return,
            Some(Ok(frame)) => {
                if !send(frame).await {
                    return;
                }
            }
            Some(Err(e)) => {
                let _ = frames.send(Err(e));
                return;
            }
        }
    }
}
