//! One slow reader must not hold back the others, nor grow memory without bound.

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

#[tokio::test]
async fn a_reader_that_never_reads_is_closed_as_slow_consumer_while_a_fast_one_gets_everything() {
    let node = TestNode::start_with(&["--max-queue-bytes", "65536"]).await;
    let mut grpc = node.grpc().await;
    let mut fast = node.client(1).await;
    let mut slow = node.client(2).await;
    fast.join(json!({"page": "table", "table_id": 1})).await;
    slow.join(json!({"page": "table", "table_id": 1})).await;

    // 2,000 events of 8 KiB: far more than the socket buffers and the 64 KiB queue hold.
    let pad = "p".repeat(8 * 1024);
    // In batches of four (32 KiB, which the fast reader's 64 KiB queue takes), so that the
    // slow reader reads before its close write gives up (10 s) even on a loaded machine.
    let publisher = tokio::spawn(async move {
        for batch in 0..500 {
            let events = (batch * 4..(batch + 1) * 4)
                .map(|n| {
                    let payload = json!({"type": "bulk", "n": n, "pad": pad}).to_string();
                    group_request("table-1", payload)
                })
                .collect();
            grpc.publish_batch(channelgate::proto::PublishBatchRequest { events })
                .await
                .expect("publish");
        }
    });
    for n in 0..2000 {
        assert_eq!(fast.recv().await["n"], n);
    }
    publisher.await.expect("publisher");

    // Now the slow reader reads: what the kernel buffered, each frame whole and in order
    // (the write abandoned at the overflow finished the frame it had begun), then the close.
    let mut next = 0;
    let close = loop {
        match slow.next_message().await {
            Message::Text(text) => {
                let event: serde_json::Value = serde_json::from_str(&text).expect("JSON frame");
                assert_eq!(event["n"], next, "events in order, none garbled");
                next += 1;
            }
            Message::Close(frame) => break frame.expect("a close code"),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 4008);
    assert!(
        next < 2000,
        "the slow reader lost the events past its queue"
    );
    assert_eq!(node.node.hub.counters().slow_consumers(), 1);
}
