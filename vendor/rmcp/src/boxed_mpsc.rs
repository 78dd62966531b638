//! Cordon's patch: a bounded tokio mpsc channel whose items are boxed.
//!
//! tokio's bounded channel allocates its buffer in blocks of 32 slots, the
//! first one when the channel is created. rmcp's per-session channels carry
//! JSON-RPC messages of ~370 bytes, so every such channel cost ~12 KiB at
//! rest, and an idle Streamable HTTP session holds six of them. Boxing the
//! item makes a slot 8 bytes: one small allocation per message in flight
//! instead of 12 KiB per channel for the life of the session.
//!
//! The API mirrors the parts of `tokio::sync::mpsc` that rmcp uses, so the
//! call sites read the same.

use std::task::{Context, Poll};

use tokio::sync::mpsc;
pub use tokio::sync::mpsc::error::{SendError, TryRecvError, TrySendError};

pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = mpsc::channel(capacity);
    (Sender(tx), Receiver(rx))
}

pub struct Sender<T>(mpsc::Sender<Box<T>>);

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender(self.0.clone())
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<T> Sender<T> {
    pub async fn send(&self, value: T) -> Result<(), SendError<T>> {
        self.0
            .send(Box::new(value))
            .await
            .map_err(|SendError(value)| SendError(*value))
    }

    pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        self.0.try_send(Box::new(value)).map_err(|e| match e {
            TrySendError::Full(value) => TrySendError::Full(*value),
            TrySendError::Closed(value) => TrySendError::Closed(*value),
        })
    }

    pub async fn closed(&self) {
        self.0.closed().await
    }

    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    pub fn max_capacity(&self) -> usize {
        self.0.max_capacity()
    }
}

pub struct Receiver<T>(mpsc::Receiver<Box<T>>);

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<T> Receiver<T> {
    pub async fn recv(&mut self) -> Option<T> {
        self.0.recv().await.map(|value| *value)
    }

    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        self.0.try_recv().map(|value| *value)
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.0.poll_recv(cx).map(|value| value.map(|value| *value))
    }

    pub fn close(&mut self) {
        self.0.close()
    }

    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}
