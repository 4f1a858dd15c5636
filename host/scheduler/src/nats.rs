//! Scale mode: tasks travel on a NATS JetStream work-queue stream, so several `qlayer serve`
//! nodes sharing one PostgreSQL run them, and a dead node's tasks are redelivered to another.
//!
//! - Stream `QLAYER_TASKS` (work-queue retention, file storage) holds one message per ready task
//!   on `qlayer.tasks.<tenant id>`; a durable pull consumer per tenant (explicit ack, ack-wait =
//!   the lease, max-deliver) feeds every node. Each node fetches per tenant in its fair-queue
//!   order, so a flooding tenant's backlog waits in the stream instead of in front of others.
//! - A node holding a message (queued locally or running) acks progress on every heartbeat; it
//!   acks when the task is over, naks with a delay to retry it (the backoff), and naks at once
//!   when it hands work back at shutdown. A node that dies stops acking: after ack-wait the
//!   message goes to another node, whose SQL lease takes over the expired one.
//! - The SQL lease stays the fence: a duplicate or late message finds its task not ready and is
//!   acked away, so a task never runs twice while a lease on it is valid.
//! - Tasks that keep failing (attempts exhausted, or delivered max-deliver times without ever
//!   finishing) are copied to `qlayer.dead.<tenant id>` (stream `QLAYER_DEAD`) with the reason in
//!   a header, and terminated.
//! - Cancellation is announced on `qlayer.cancel`; new work on `qlayer.wake`.

use anyhow::Context as _;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::{StreamExt as _, TryStreamExt as _};
use qlayer_db::Task;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The work-queue stream.
pub const STREAM: &str = "QLAYER_TASKS";
/// The dead-letter stream.
pub const DEAD_STREAM: &str = "QLAYER_DEAD";
/// Where cancellations are announced.
pub const CANCEL_SUBJECT: &str = "qlayer.cancel";
/// Where new work is announced.
pub const WAKE_SUBJECT: &str = "qlayer.wake";

/// The subject a tenant's tasks travel on.
pub fn task_subject(tenant_id: &str) -> String {
    format!("qlayer.tasks.{tenant_id}")
}

/// The subject a tenant's dead tasks land on.
pub fn dead_subject(tenant_id: &str) -> String {
    format!("qlayer.dead.{tenant_id}")
}

/// What a task message carries: enough to queue it fairly before its row is read.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    /// The task.
    pub task_id: String,
    /// Its job.
    pub job_id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// Its plugin.
    pub plugin: String,
    /// Its priority.
    pub priority: i32,
    /// Not before (unix ms).
    pub not_before: i64,
}

/// A fetched message: the envelope and how many times NATS has delivered it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// What it carries.
    pub envelope: Envelope,
    /// Deliveries so far (1 the first time).
    pub delivered: i64,
}

/// The JetStream side of a node.
pub struct NatsQueue {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    consumers: tokio::sync::Mutex<HashMap<String, PullConsumer>>,
    held: Mutex<HashMap<String, jetstream::Message>>,
    ack_wait: Duration,
    max_deliver: i64,
}

impl std::fmt::Debug for NatsQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsQueue").field("max_deliver", &self.max_deliver).finish()
    }
}

impl NatsQueue {
    /// Connects to `url` and makes sure the streams exist.
    pub async fn connect(url: &str, ack_wait: Duration, max_deliver: i64) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .name("qlayer")
            .connect(url)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        let js = jetstream::new(client.clone());
        let stream = js
            .get_or_create_stream(jetstream::stream::Config {
                name: STREAM.into(),
                subjects: vec!["qlayer.tasks.>".into()],
                retention: jetstream::stream::RetentionPolicy::WorkQueue,
                storage: jetstream::stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .with_context(|| {
                format!("creating the JetStream stream {STREAM} (is JetStream enabled: nats-server -js?)")
            })?;
        js.get_or_create_stream(jetstream::stream::Config {
            name: DEAD_STREAM.into(),
            subjects: vec!["qlayer.dead.>".into()],
            storage: jetstream::stream::StorageType::File,
            max_age: Duration::from_secs(14 * 24 * 3600),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the JetStream stream {DEAD_STREAM}"))?;
        Ok(NatsQueue {
            client,
            js,
            stream,
            consumers: Default::default(),
            held: Default::default(),
            ack_wait,
            max_deliver,
        })
    }

    /// The core NATS client (for subscriptions).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Deliveries after which a message is dead-lettered instead of run.
    pub fn max_deliver(&self) -> i64 {
        self.max_deliver
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, jetstream::Message>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes ready tasks (waiting for the stream's acknowledgement), then announces them.
    /// The message id makes a republish within two minutes a no-op.
    pub async fn publish(&self, tasks: &[Task]) -> anyhow::Result<()> {
        let mut acks = Vec::with_capacity(tasks.len());
        for task in tasks {
            let envelope = Envelope {
                task_id: task.id.clone(),
                job_id: task.job_id.clone(),
                tenant_id: task.tenant_id.clone(),
                plugin: task.plugin.clone(),
                priority: task.priority,
                not_before: task.not_before,
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("{}:{}:{}", task.id, task.attempts, task.not_before).as_str());
            let payload = serde_json::to_vec(&envelope)?;
            let ack = self
                .js
                .publish_with_headers(task_subject(&task.tenant_id), headers, payload.into())
                .await
                .with_context(|| format!("publishing task {}", task.id))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.context("JetStream did not store a task message")?;
        }
        if !tasks.is_empty() {
            let _ = self.client.publish(WAKE_SUBJECT, bytes::Bytes::new()).await;
        }
        Ok(())
    }

    /// Tenants with messages in the stream (queued or in flight), with their counts.
    pub async fn pending_tenants(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        let mut subjects = self.stream.info_with_subjects("qlayer.tasks.>").await?;
        while let Some((subject, count)) = subjects.try_next().await? {
            if let Some(tenant) = subject.strip_prefix("qlayer.tasks.")
                && count > 0
            {
                out.push((tenant.to_string(), count as u64));
            }
        }
        Ok(out)
    }

    async fn consumer(&self, tenant_id: &str) -> anyhow::Result<PullConsumer> {
        let mut consumers = self.consumers.lock().await;
        if let Some(c) = consumers.get(tenant_id) {
            return Ok(c.clone());
        }
        let name = format!("qlayer-{tenant_id}");
        let consumer: PullConsumer = self
            .stream
            .get_or_create_consumer(
                &name,
                jetstream::consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: task_subject(tenant_id),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    max_deliver: self.max_deliver,
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("the JetStream consumer {name}"))?;
        consumers.insert(tenant_id.to_string(), consumer.clone());
        Ok(consumer)
    }

    /// Takes up to `max` of a tenant's messages without waiting; they are held (progress-acked on
    /// every heartbeat) until settled.
    pub async fn fetch(&self, tenant_id: &str, max: usize) -> anyhow::Result<Vec<Delivery>> {
        let consumer = self.consumer(tenant_id).await?;
        let mut messages = consumer.fetch().max_messages(max).messages().await?;
        let mut out = Vec::new();
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "fetching task messages failed");
                    break;
                }
            };
            let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
            match serde_json::from_slice::<Envelope>(&message.payload) {
                Ok(envelope) => {
                    self.lock().insert(envelope.task_id.clone(), message);
                    out.push(Delivery { envelope, delivered });
                }
                Err(e) => {
                    tracing::error!(error = %e, "a task message is not an envelope; terminating it");
                    let _ = message.ack_with(AckKind::Term).await;
                }
            }
        }
        Ok(out)
    }

    async fn settle(&self, task_id: &str, kind: AckKind) {
        let message = self.lock().remove(task_id);
        if let Some(message) = message
            && let Err(e) = message.ack_with(kind).await
        {
            tracing::warn!(task = task_id, error = %e, "settling a task message failed; it will be redelivered");
        }
    }

    /// The task is over (or not ours to run): remove its message.
    pub async fn ack(&self, task_id: &str) {
        self.settle(task_id, AckKind::Ack).await;
    }

    /// Deliver the task's message again after `delay` (to any node).
    pub async fn nak(&self, task_id: &str, delay: Option<Duration>) {
        self.settle(task_id, AckKind::Nak(delay)).await;
    }

    /// Stops holding the task's message without settling it: JetStream redelivers it after
    /// ack-wait (when its outcome could not be recorded).
    pub fn forget(&self, task_id: &str) {
        self.lock().remove(task_id);
    }

    /// How many times the held message of a task was delivered.
    pub fn delivered(&self, task_id: &str) -> Option<i64> {
        self.lock().get(task_id).and_then(|m| m.info().ok().map(|i| i.delivered))
    }

    /// Whether this node holds the task's message.
    pub fn holds(&self, task_id: &str) -> bool {
        self.lock().contains_key(task_id)
    }

    /// Tells JetStream every held message is still being worked on (or waits here).
    pub async fn progress_all(&self) {
        let held: Vec<(String, jetstream::Message)> = self.lock().iter().map(|(k, m)| (k.clone(), m.clone())).collect();
        for (task_id, message) in held {
            if let Err(e) = message.ack_with(AckKind::Progress).await {
                tracing::warn!(task = %task_id, error = %e, "progress ack failed");
            }
        }
    }

    /// Hands every held message back at once (graceful stop).
    pub async fn release_all(&self) {
        let held: Vec<String> = self.lock().keys().cloned().collect();
        for task_id in held {
            self.nak(&task_id, None).await;
        }
    }

    /// Copies a task that keeps failing to the dead-letter subject, with the reason, and
    /// terminates its message.
    pub async fn dead_letter(&self, task: &Task, reason: &str) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Qlayer-Task", task.id.as_str());
        headers.insert("Qlayer-Job", task.job_id.as_str());
        headers.insert("Qlayer-Reason", reason.replace(['\r', '\n'], " ").as_str());
        let body = serde_json::json!({
            "task_id": task.id, "job_id": task.job_id, "tenant_id": task.tenant_id, "name": task.name,
            "plugin": task.plugin, "attempts": task.attempts, "reason": reason, "input": task.input,
        });
        let published =
            match self.js.publish_with_headers(dead_subject(&task.tenant_id), headers, body.to_string().into()).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(anyhow::Error::from),
                Err(e) => Err(anyhow::Error::from(e)),
            };
        if let Err(e) = published {
            tracing::error!(task = %task.id, error = %e, "dead-lettering a task failed");
        }
        self.settle(&task.id, AckKind::Term).await;
    }

    /// Announces a cancelled job to every node.
    pub async fn announce_cancel(&self, job_id: &str) {
        if let Err(e) = self.client.publish(CANCEL_SUBJECT, job_id.to_string().into()).await {
            tracing::warn!(job = job_id, error = %e, "announcing a cancellation failed; nodes notice at their heartbeat");
        }
    }
}
