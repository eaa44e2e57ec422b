//! The gRPC contract: batches, validation messages, the API key, reflection and health.

use channelgate::proto::publish_request::Target;
use channelgate::proto::{IndividualTarget, PublishBatchRequest, PublishRequest, UserTarget};
use serde_json::json;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn publish_batch_delivers_in_order_with_one_id_per_event() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut c = node.client(1).await;
    c.join(json!({"page": "table", "table_id": 1})).await;
    let events = (0..50)
        .map(|n| group_request("table-1", event("batch", n)))
        .collect();
    let response = grpc
        .publish_batch(PublishBatchRequest { events })
        .await
        .expect("batch")
        .into_inner();
    let ids = response.event_ids;
    assert_eq!(ids.len(), 50);
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    for (n, id) in ids.iter().enumerate() {
        let frame = c.recv().await;
        assert_eq!(
            (frame["n"].as_u64(), frame["_event_id"].as_u64()),
            (Some(n as u64), Some(*id))
        );
    }
}

#[tokio::test]
async fn a_batch_too_large_for_a_subscriber_is_refused_and_nobody_is_closed() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut c = node.client(1).await;
    c.join(json!({"page": "table", "table_id": 1})).await;
    let many = (0..1001)
        .map(|n| group_request("table-1", event("batch", n)))
        .collect();
    let status = grpc
        .publish_batch(PublishBatchRequest { events: many })
        .await
        .expect_err("over the count");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("--max-batch-events"),
        "{}",
        status.message()
    );
    // 30,000 small events used to overflow every subscriber's 1 MiB queue; now the bytes
    // of a batch are bounded by that queue.
    let pad = "x".repeat(2000);
    let heavy = (0..600)
        .map(|n| {
            group_request(
                "table-1",
                json!({"type": "big", "n": n, "pad": pad}).to_string(),
            )
        })
        .collect();
    let status = grpc
        .publish_batch(PublishBatchRequest { events: heavy })
        .await
        .expect_err("over the bytes");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("--max-batch-bytes"),
        "{}",
        status.message()
    );
    let id = publish(&mut grpc, group_request("table-1", event("after", 1))).await;
    assert_eq!(
        c.recv().await["_event_id"],
        id,
        "still subscribed, nothing sent before"
    );
}

#[tokio::test]
async fn a_message_over_the_grpc_limit_is_resource_exhausted() {
    let node = TestNode::start_with(&["--max-grpc-message-bytes", "1024"]).await;
    let mut grpc = node.grpc().await;
    let big = json!({"type": "big", "pad": "x".repeat(4096)}).to_string();
    let status = grpc
        .publish(group_request("table-1", big))
        .await
        .expect_err("over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    publish(&mut grpc, group_request("table-1", event("small", 1))).await;
}

#[tokio::test]
async fn the_api_speaks_tls_with_a_certificate_and_key() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("a self-signed certificate");
    let cert_pem = certified.cert.pem();
    let dir = std::env::temp_dir().join(format!("cg-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &cert_pem).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    let node = TestNode::start_with(&[
        "--grpc-tls-cert",
        cert.to_str().expect("path"),
        "--grpc-tls-key",
        key.to_str().expect("path"),
    ])
    .await;
    let mut c = node.client(1).await;
    c.join(json!({"page": "table", "table_id": 1})).await;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert_pem))
        .domain_name("localhost");
    let channel =
        tonic::transport::Channel::from_shared(format!("https://{}", node.node.grpc_addr))
            .expect("uri")
            .tls_config(tls)
            .expect("tls config")
            .connect()
            .await
            .expect("a TLS connection");
    let mut grpc = channelgate::proto::gateway_client::GatewayClient::with_interceptor(
        channel,
        ApiKey(Some(API_KEY)),
    );
    let id = publish(&mut grpc, group_request("table-1", event("over_tls", 1))).await;
    assert_eq!(c.recv().await["_event_id"], id);
    // Plaintext gets nowhere.
    let plain = node.grpc_try().await;
    assert!(
        plain.is_err(),
        "a plaintext call must fail against a TLS API"
    );
}

#[tokio::test]
async fn with_history_off_ids_are_zero_and_payloads_verbatim() {
    let node = TestNode::start_with(&["--history", "off"]).await;
    let mut grpc = node.grpc().await;
    let mut c = node.client(1).await;
    c.join(json!({"page": "table", "table_id": 1})).await;
    let events = (0..3)
        .map(|n| group_request("table-1", event("batch", n)))
        .collect();
    let response = grpc
        .publish_batch(PublishBatchRequest { events })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(response.event_ids, vec![0; 3]);
    for n in 0..3 {
        assert_eq!(c.recv().await, json!({"type": "batch", "n": n}));
    }
}

#[tokio::test]
async fn one_invalid_event_fails_the_batch_and_nothing_is_sent() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut c = node.client(1).await;
    c.join(json!({"page": "table", "table_id": 1})).await;
    let events = vec![
        group_request("table-1", event("first", 1)),
        group_request("table-1", "not json".into()),
    ];
    let status = grpc
        .publish_batch(PublishBatchRequest { events })
        .await
        .expect_err("invalid batch");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("events[1].payload"),
        "{}",
        status.message()
    );
    grpc.publish(group_request("table-1", event("after", 1)))
        .await
        .expect("publish");
    assert_eq!(c.recv().await["type"], "after");
    let empty = grpc
        .publish_batch(PublishBatchRequest { events: vec![] })
        .await;
    assert_eq!(
        empty.expect_err("empty batch").code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn each_invalid_argument_names_its_field() {
    let node = TestNode::start_with(&["--max-payload-bytes", "100"]).await;
    let mut grpc = node.grpc().await;
    let ok = event("x", 1);
    let cases = [
        (
            PublishRequest {
                payload: ok.clone(),
                ..Default::default()
            },
            "target",
        ),
        (group_request("", ok.clone()), "group"),
        (group_request("g", "".into()), "payload"),
        (group_request("g", "[]".into()), "payload"),
        (group_request("g", r#"{"no_type":1}"#.into()), "payload"),
        (group_request("g", r#"{"type":5}"#.into()), "payload"),
        (
            group_request(
                "g",
                json!({"type": "x", "pad": "p".repeat(200)}).to_string(),
            ),
            "payload",
        ),
        (
            PublishRequest {
                target: Some(Target::Users(UserTarget {
                    user_ids: vec![],
                    all_users: false,
                })),
                payload: ok.clone(),
                ..Default::default()
            },
            "users.user_ids",
        ),
        (
            PublishRequest {
                target: Some(Target::Users(UserTarget {
                    user_ids: vec![1],
                    all_users: false,
                })),
                payload: ok.clone(),
                exclude_user_ids: vec![2],
                ..Default::default()
            },
            "exclude_user_ids",
        ),
        (
            PublishRequest {
                target: Some(Target::Individual(IndividualTarget::default())),
                ..Default::default()
            },
            "individual.payloads",
        ),
        (
            PublishRequest {
                target: Some(Target::Individual(IndividualTarget {
                    payloads: [(4, "{}".to_string())].into(),
                })),
                ..Default::default()
            },
            "individual.payloads[4]",
        ),
    ];
    for (request, field) in cases {
        let status = grpc.publish(request).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "{field}: {}",
            status.message()
        );
    }
}

#[tokio::test]
async fn calls_without_the_api_key_are_refused() {
    let node = TestNode::start().await;
    for key in [None, Some("wrong-key")] {
        let mut grpc = node.grpc_with_key(key).await;
        let status = grpc
            .publish(group_request("g", event("x", 1)))
            .await
            .expect_err("no key");
        assert_eq!(status.code(), Code::Unauthenticated);
    }
}

#[tokio::test]
async fn info_counts_this_node() {
    let node = TestNode::start_with(&["--node-id", "node-a"]).await;
    let mut grpc = node.grpc().await;
    let mut a = node.client(1).await;
    let mut b = node.client(1).await;
    let _anonymous = node.client(0).await;
    a.join(json!({"page": "table", "table_id": 1})).await;
    a.join(json!({"page": "table", "table_id": 2})).await;
    b.join(json!({"page": "table", "table_id": 1})).await;
    let info = grpc
        .info(channelgate::proto::InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.nodes.len(), 1);
    let n = &info.nodes[0];
    assert_eq!(n.node_id, "node-a");
    assert_eq!(n.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        (n.connections, n.users, n.groups, n.subscriptions),
        (3, 1, 2, 3)
    );
}

#[tokio::test]
async fn reflection_v1alpha_and_v1_list_the_services_and_health_serves() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let node = TestNode::start().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", node.node.grpc_addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let answer = answers.next().await.expect("an answer").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"channelgate.v1.Gateway"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    let mut v1 = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
        channel.clone(),
    );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut answers = v1
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1")
        .into_inner();
    assert!(answers.next().await.expect("an answer").is_ok());

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "channelgate.v1.Gateway".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}
