//! Metering off the request path: a request hands its usage record to a channel and goes on; a
//! writer task stores records in batches (one transaction per batch), retrying a failed batch,
//! and [`Meter::close`] writes what is left before a clean shutdown returns.

use qlayer_db::{Db, UsageRecord};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Records buffered before new ones are dropped (and counted) rather than holding memory
/// without bound while the database is down.
const BUFFER: usize = 65_536;
/// The most records one transaction writes.
const BATCH: usize = 512;
/// How long a record may wait for others to share its transaction.
const LINGER: Duration = Duration::from_millis(50);

enum Message {
    Record(Box<UsageRecord>),
    Flush(oneshot::Sender<()>),
}

/// The metering channel. Cheap to clone.
#[derive(Clone)]
pub struct Meter {
    tx: mpsc::Sender<Message>,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter").finish()
    }
}

impl Meter {
    /// Starts the writer over `db`.
    pub fn start(db: Db) -> Meter {
        let (tx, rx) = mpsc::channel(BUFFER);
        tokio::spawn(write_batches(db, rx));
        Meter { tx }
    }

    /// Hands a record to the writer; never waits. A full buffer drops it and counts the drop.
    pub fn record(&self, record: UsageRecord) {
        metrics::counter!("qlayer_gateway_requests_total", "model" => record.model.clone(),
            "deployment" => record.deployment.clone(), "status" => record.status.clone())
        .increment(1);
        if record.prompt_tokens > 0 || record.completion_tokens > 0 {
            metrics::counter!("qlayer_gateway_tokens_total", "model" => record.model.clone(),
                "deployment" => record.deployment.clone(), "direction" => "input")
            .increment(record.prompt_tokens.max(0) as u64);
            metrics::counter!("qlayer_gateway_tokens_total", "model" => record.model.clone(),
                "deployment" => record.deployment.clone(), "direction" => "output")
            .increment(record.completion_tokens.max(0) as u64);
            metrics::counter!("qlayer_gateway_cost_nanos_total", "model" => record.model.clone(),
                "deployment" => record.deployment.clone())
            .increment(record.cost_nanos.max(0) as u64);
        }
        if record.cache == "hit" || record.cache == "semantic-hit" {
            metrics::counter!("qlayer_gateway_cache_hits_total", "model" => record.model.clone(),
                "kind" => record.cache.clone())
            .increment(1);
        }
        metrics::histogram!("qlayer_gateway_latency_seconds", "model" => record.model.clone(),
            "deployment" => record.deployment.clone())
        .record(record.latency_us as f64 / 1e6);
        if let Some(ttft) = record.ttft_us {
            metrics::histogram!("qlayer_gateway_ttft_seconds", "model" => record.model.clone(),
                "deployment" => record.deployment.clone())
            .record(ttft as f64 / 1e6);
        }
        if let Err(e) = self.tx.try_send(Message::Record(Box::new(record))) {
            metrics::counter!("qlayer_gateway_usage_dropped_total").increment(1);
            tracing::error!(
                "a usage record was dropped: {}",
                match e {
                    mpsc::error::TrySendError::Full(_) => "the metering buffer is full (is the database down?)",
                    mpsc::error::TrySendError::Closed(_) => "metering has stopped",
                }
            );
        }
    }

    /// Waits until every record handed over so far is written (or its writing has failed for
    /// good).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Message::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Writes what is buffered; for a clean shutdown.
    pub async fn close(&self) {
        self.flush().await;
    }
}

async fn write_batches(db: Db, mut rx: mpsc::Receiver<Message>) {
    let mut batch: Vec<UsageRecord> = Vec::with_capacity(BATCH);
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        // Wait for the first record (or a flush), then gather more for a short while.
        match rx.recv().await {
            Some(Message::Record(r)) => batch.push(*r),
            Some(Message::Flush(done)) => waiting.push(done),
            None => {
                write(&db, &mut batch).await;
                return;
            }
        }
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < BATCH && waiting.is_empty() {
            tokio::select! {
                message = rx.recv() => match message {
                    Some(Message::Record(r)) => batch.push(*r),
                    Some(Message::Flush(done)) => waiting.push(done),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        // A flush asks for everything queued before it.
        if !waiting.is_empty() {
            while let Ok(message) = rx.try_recv() {
                match message {
                    Message::Record(r) => batch.push(*r),
                    Message::Flush(done) => waiting.push(done),
                }
                if batch.len() >= BATCH {
                    write(&db, &mut batch).await;
                }
            }
        }
        write(&db, &mut batch).await;
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Writes a batch, retrying for a while if the database fails; gives up (and says how many
/// records were lost) after about a minute.
async fn write(db: &Db, batch: &mut Vec<UsageRecord>) {
    if batch.is_empty() {
        return;
    }
    let mut wait = Duration::from_millis(100);
    for attempt in 1..=10 {
        match db.record_usage(batch).await {
            Ok(()) => {
                batch.clear();
                return;
            }
            Err(e) => {
                tracing::warn!(attempt, records = batch.len(), "writing usage records failed: {e}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
    metrics::counter!("qlayer_gateway_usage_dropped_total").increment(batch.len() as u64);
    tracing::error!(records = batch.len(), "usage records were lost: the database refused them for a minute");
    batch.clear();
}
