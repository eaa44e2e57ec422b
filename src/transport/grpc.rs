//! The gRPC API (`channelgate.v1.Gateway`), with health and reflection beside it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::bus::{Bus, PublishError};
use crate::console::recent::{Noted, Recent, Via};
use crate::control;
use crate::control::{Answers, Reply as ControlReply, Request as ControlRequest};
use crate::event::{self, InvalidEvent};
use crate::metrics::Metrics;
use crate::proto;
use crate::proto::gateway_server::{Gateway, GatewayServer};
use crate::transport::api_key::ApiKeyCheck;

/// The backend-facing API of one node.
pub struct GatewayApi {
    pub bus: Arc<dyn Bus>,
    /// Turns true when the node stops and can wait no longer for publishes in flight.
    pub calls_cut: watch::Receiver<bool>,
    /// The node's counters of what was published.
    pub metrics: Arc<Metrics>,
    pub max_payload_bytes: usize,
    /// Events one `PublishBatch` may carry.
    pub max_batch_events: usize,
    /// Payload bytes one `PublishBatch` may carry.
    pub max_batch_bytes: usize,
    /// The console's list of recent publishes; `None` when the console is off.
    pub recent: Option<Arc<Recent>>,
}

/// The payload bytes a publish request carries.
fn payload_bytes(request: &proto::PublishRequest) -> usize {
    let individual = match &request.target {
        Some(proto::publish_request::Target::Individual(individual)) => {
            individual.payloads.values().map(String::len).sum()
        }
        _ => 0,
    };
    request.payload.len() + individual
}

fn invalid(error: InvalidEvent) -> Status {
    Status::invalid_argument(error.to_string())
}

/// What a failed publish tells its caller: `UNAVAILABLE` only when nothing was published,
/// `DEADLINE_EXCEEDED` when it may have been (retry with the same idempotency key).
fn publish_status(error: PublishError) -> Status {
    match error {
        PublishError::Unavailable(_) => Status::unavailable(format!("{error}; retry it")),
        PublishError::Unknown(_) => Status::deadline_exceeded(format!(
            "{error}; retry with the same idempotency_key to publish it at most once"
        )),
    }
}

#[tonic::async_trait]
impl Gateway for GatewayApi {
    async fn publish(
        &self,
        request: Request<proto::PublishRequest>,
    ) -> Result<Response<proto::PublishResponse>, Status> {
        // The console calls this too, marking its requests.
        let via = request.extensions().get::<Via>().copied();
        let event =
            event::from_request(request.into_inner(), self.max_payload_bytes).map_err(invalid)?;
        let noted = self.recent.as_ref().map(|_| Noted::of(&event));
        let event_id = self.until_cut(self.bus.publish(event)).await?;
        self.published(1, event_id != 0);
        if let (Some(recent), Some(noted)) = (&self.recent, noted) {
            recent.push(noted, event_id, via.unwrap_or(Via::Grpc));
        }
        Ok(Response::new(proto::PublishResponse { event_id }))
    }

    async fn publish_batch(
        &self,
        request: Request<proto::PublishBatchRequest>,
    ) -> Result<Response<proto::PublishBatchResponse>, Status> {
        let requests = request.into_inner().events;
        if requests.is_empty() {
            return Err(Status::invalid_argument("events: must not be empty"));
        }
        if requests.len() > self.max_batch_events {
            return Err(Status::invalid_argument(format!(
                "events: {} events; a batch holds at most {} (--max-batch-events)",
                requests.len(),
                self.max_batch_events
            )));
        }
        let bytes: usize = requests.iter().map(payload_bytes).sum();
        if bytes > self.max_batch_bytes {
            return Err(Status::invalid_argument(format!(
                "events: {bytes} bytes of payloads; a batch holds at most {} (--max-batch-bytes), \
                 so that one batch cannot overflow a subscriber's queue",
                self.max_batch_bytes
            )));
        }
        let events = requests
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                event::from_request(r, self.max_payload_bytes)
                    .map_err(|e| invalid(e.within(&format!("events[{i}]"))))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let total = events.len() as u64;
        // Only the last ones would stay in the list.
        let listed = events.len().saturating_sub(crate::console::recent::KEEP);
        let noted: Option<Vec<Noted>> = self
            .recent
            .as_ref()
            .map(|_| events[listed..].iter().map(Noted::of).collect());
        let event_ids = self.until_cut(self.bus.publish_batch(events)).await?;
        if let (Some(recent), Some(noted)) = (&self.recent, noted) {
            for (noted, id) in noted.into_iter().zip(event_ids.iter().skip(listed)) {
                recent.push(noted, *id, Via::Grpc);
            }
        }
        let recorded = event_ids.iter().filter(|id| **id != 0).count() as u64;
        let metrics = &self.metrics;
        metrics.events_published.fetch_add(total, Ordering::Relaxed);
        metrics
            .events_recorded
            .fetch_add(recorded, Ordering::Relaxed);
        Ok(Response::new(proto::PublishBatchResponse { event_ids }))
    }

    async fn check_permission(
        &self,
        request: Request<proto::CheckPermissionRequest>,
    ) -> Result<Response<proto::CheckPermissionResponse>, Status> {
        let request = request.into_inner();
        check_user_ids("user_ids", &request.user_ids)?;
        let answers = self
            .ask_all(ControlRequest::CheckPermission(request))
            .await?;
        let merged = control::merge_check(every_node("CheckPermission", answers)?);
        tracing::info!(
            checked = merged.checked,
            revoked = merged.revoked.len(),
            nodes = merged.nodes,
            "permissions checked"
        );
        Ok(Response::new(merged))
    }

    async fn disconnect(
        &self,
        request: Request<proto::DisconnectRequest>,
    ) -> Result<Response<proto::DisconnectResponse>, Status> {
        let request = request.into_inner();
        if request.user_ids.is_empty() {
            return Err(Status::invalid_argument("user_ids: must not be empty"));
        }
        check_user_ids("user_ids", &request.user_ids)?;
        let answers = self.ask_all(ControlRequest::Disconnect(request)).await?;
        Ok(Response::new(control::merge_disconnect(every_node(
            "Disconnect",
            answers,
        )?)))
    }

    async fn info(
        &self,
        _request: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoResponse>, Status> {
        // Counters of the nodes that answered: a node that did not is simply not listed.
        let answers = self
            .ask_all(ControlRequest::Info(proto::InfoRequest {}))
            .await?;
        Ok(Response::new(control::merge_info(answers.replies)))
    }
}

impl GatewayApi {
    /// A publish's answer, or DEADLINE_EXCEEDED when the node stops before it comes: the
    /// event may have been published.
    async fn until_cut<T>(
        &self,
        publish: impl std::future::Future<Output = Result<T, PublishError>>,
    ) -> Result<T, Status> {
        let mut cut = self.calls_cut.clone();
        tokio::select! {
            // The bus first: it usually answers at once, and then the stop signal is never
            // polled (polling it registers a waiter, and dropping it takes that out again).
            biased;
            answer = publish => answer.map_err(publish_status),
            _ = cut.wait_for(|cut| *cut) => Err(publish_status(PublishError::Unknown(
                "the node stopped before the bus answered".into(),
            ))),
        }
    }

    fn published(&self, events: u64, recorded: bool) {
        let metrics = &self.metrics;
        metrics
            .events_published
            .fetch_add(events, Ordering::Relaxed);
        if recorded {
            metrics.events_recorded.fetch_add(events, Ordering::Relaxed);
        }
    }

    async fn ask_all(&self, request: ControlRequest) -> Result<Answers, Status> {
        self.bus
            .ask_all(request)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }
}

/// The replies of a request that must reach every socket: `UNAVAILABLE`, naming the nodes,
/// when a live node did not answer (it may not have acted; the request is safe to repeat).
fn every_node(call: &str, answers: Answers) -> Result<Vec<ControlReply>, Status> {
    if answers.missing.is_empty() {
        return Ok(answers.replies);
    }
    Err(Status::unavailable(format!(
        "{call} was applied by {} node(s), but {} did not answer in time; retry it (it is safe to repeat)",
        answers.replies.len(),
        answers.missing.join(", ")
    )))
}

fn check_user_ids(field: &str, user_ids: &[i64]) -> Result<(), Status> {
    match user_ids.iter().find(|id| **id < 0) {
        Some(bad) => Err(Status::invalid_argument(format!(
            "{field}: {bad} is not a user id"
        ))),
        None => Ok(()),
    }
}

/// gRPC's code for a message over the size limit is RESOURCE_EXHAUSTED; tonic answers
/// OUT_OF_RANGE, in the headers or (once a call has begun) in the trailers. A `Server`
/// layer maps each response through this.
pub fn oversize_is_resource_exhausted<B>(
    response: http::Response<B>,
) -> http::Response<OversizeCode<B>> {
    let (mut parts, body) = response.into_parts();
    rewrite_oversize(&mut parts.headers);
    http::Response::from_parts(parts, OversizeCode(body))
}

/// The names [`rewrite_oversize`] looks up, parsed once: a lookup by `&str` parses the name
/// on every response.
static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");

fn rewrite_oversize(headers: &mut http::HeaderMap) {
    let too_large = headers.get(&GRPC_STATUS).is_some_and(|s| s == "11")
        && headers
            .get(&GRPC_MESSAGE)
            .and_then(|m| m.to_str().ok())
            // Percent-encoded on the wire.
            .is_some_and(|m| m.replace("%20", " ").contains("message length too large"));
    if too_large {
        headers.insert(
            &GRPC_STATUS,
            http::HeaderValue::from(tonic::Code::ResourceExhausted as i32),
        );
    }
}

/// A response body whose trailers get [`rewrite_oversize`].
pub struct OversizeCode<B>(B);

impl<B: http_body::Body + Unpin> http_body::Body for OversizeCode<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let poll = std::pin::Pin::new(&mut self.0).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(mut frame))) = poll {
            if let Some(trailers) = frame.trailers_mut() {
                rewrite_oversize(trailers);
            }
            return std::task::Poll::Ready(Some(Ok(frame)));
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// The Gateway service behind the API key check, with message limits set.
pub fn gateway_service(
    api: Arc<GatewayApi>,
    api_key: Option<&str>,
    max_message_bytes: usize,
) -> ApiKeyCheck<GatewayServer<GatewayApi>> {
    let server = GatewayServer::from_arc(api)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    ApiKeyCheck::new(server, api_key)
}
